"""Command line: `python -m dsv3_ref {info,train,generate,validate} ...` (also installed as `dsv3-ref`).

The only module that knows argparse. Each subcommand has an `_add_<name>(subparsers)` that registers its parser and
a `_run_<name>(args)` that calls the package and returns the exit code; bad input (a ValueError) exits with 2 and
one line on stderr instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from .config import ATTN_IMPLS, PRESETS, ModelConfig
from .data import bits_per_byte
from .inference.generate import generate_text
from .io.checkpoint import from_pretrained
from .nn.model import Transformer
from .systems.accounting import check_counts, report, resolve_config
from .teaching import validate
from .train import PRECISIONS, TRAIN_PRESETS, TrainConfig, Trainer
from .train.trainer import read_model_config, read_train_config

# `train` flags: every TrainConfig field with a scalar default (betas, a pair, is not one), with its type
TRAIN_FLAGS = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig) if type(f.default) in (int, float, str)}
_TRAIN_FLAG_HELP = {"data": dict(help="'corpus' (default) or the path of a UTF-8 text file"),
                    "precision": dict(choices=PRECISIONS)}


# ---------------------------------------------------------------------------------------------- info
def _add_info(subparsers: argparse._SubParsersAction) -> None:
    """`info MODEL [--ctx N] [--no-check-meta]`: `dsv3_ref.systems.accounting.report`."""
    p = subparsers.add_parser("info", help="parameter, KV-cache and FLOP accounting of a model",
                              description="Print the parameter, activated-parameter, KV-cache and FLOP accounting.")
    p.add_argument("model", help=f"a preset ({', '.join(PRESETS)}) or a path to a HF config.json or its folder")
    p.add_argument("--ctx", type=int, default=None,
                   help="context length for the FLOP lines (default: the config's original_seq_len)")
    p.add_argument("--check-meta", action=argparse.BooleanOptionalAction, default=True,
                   help="also build the model on the meta device and check the counts agree (default: on)")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    cfg, label = resolve_config(args.model)
    meta = check_counts(cfg) if args.check_meta else None
    print(report(cfg, name=label, ctx=args.ctx, meta_counts=meta))
    return 0


# ---------------------------------------------------------------------------------------------- train
def _add_train(subparsers: argparse._SubParsersAction) -> None:
    """`train --preset small --steps N --out DIR [...]`: a `Trainer` run, one flag per field in `TRAIN_FLAGS`."""
    p = subparsers.add_parser("train", help="train a small model on the synthetic corpus or a text file",
                              description="Train a preset on byte tokens; save a resumable checkpoint in --out.")
    p.add_argument("--preset", choices=list(TRAIN_PRESETS), default=None,
                   help="model preset (default small; with --resume: the checkpoint's)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--resume", default=None, help="checkpoint folder to continue from (its train_config.json gives "
                                                  "the defaults)")
    for name, kind in TRAIN_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                       **_TRAIN_FLAG_HELP.get(name, {}))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]; with --precision fp8 a GPU with FP8 "
                   "tensor cores runs real FP8 GEMMs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _device(name: str) -> torch.device:
    """--device: "cpu" or a CUDA device ("cuda", "cuda:1"), with a clear error where there is none."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be 'cpu' or 'cuda[:N]', got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu' or 'cuda[:N]', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build or machine has no CUDA device")
    return device


def _train_configs(args: argparse.Namespace) -> tuple[TrainConfig, ModelConfig]:
    """The run's configs: a preset's defaults, or the checkpoint's when resuming, with the flags given on top."""
    overrides = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    if args.resume is not None:
        # with --preset, resume checks that it matches the checkpoint
        model_cfg = read_model_config(args.resume) if args.preset is None else ModelConfig.from_preset(args.preset)
        return read_train_config(args.resume).replace(**overrides), model_cfg
    preset = args.preset or "small"
    return TrainConfig.for_preset(preset, **overrides), ModelConfig.from_preset(preset)


def _run_train(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg, model_cfg = _train_configs(args)
    device = _device(args.device)
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    model.reset_parameters(cfg.seed)  # on the CPU, so that a seed gives the same weights on every device
    trainer = Trainer(model.to(device), cfg, progress=not args.no_progress)
    trainer.fit(resume_from=args.resume, out=args.out)
    last = trainer.history[-1]
    val = last.get("val_loss", float("nan"))
    print(f"step {trainer.step}: train loss {last['train_loss']:.4f} ({bits_per_byte(last['train_loss']):.3f} "
          f"bits/byte), val loss {val:.4f} ({bits_per_byte(val):.3f} bits/byte), "
          f"{trainer.tokens_per_s:.0f} tokens/s")
    print(f"checkpoint: {os.path.abspath(args.out)}")
    return 0


# ---------------------------------------------------------------------------------------------- generate
def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    """`generate DIR --prompt TEXT [...]`: continue a byte-level prompt with a saved model (`generate_text`)."""
    p = subparsers.add_parser("generate", help="continue a text prompt with a saved checkpoint",
                              description="Load from_pretrained(DIR) and continue --prompt (byte tokens).")
    p.add_argument("checkpoint", metavar="DIR", help="checkpoint folder (config.json + *.safetensors)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (default 1: no cut)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: unseeded)")
    p.add_argument("--no-bos", action="store_true", help="do not start the prompt with <bos>")
    p.add_argument("--attn-impl", choices=ATTN_IMPLS, default=None,
                   help="KV cache layout (default: the checkpoint config's)")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    model = from_pretrained(args.checkpoint).eval()
    text = generate_text(model, args.prompt, max_new_tokens=args.max_new_tokens, bos=not args.no_bos,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed, attn_impl=args.attn_impl)
    print(args.prompt + text)
    return 0


# ---------------------------------------------------------------------------------------------- validate
def _add_validate(subparsers: argparse._SubParsersAction) -> None:
    """`validate ...`: the three modes of `dsv3_ref.teaching.validate`, and --list."""
    p = subparsers.add_parser(
        "validate", help="compare a checkpoint or an implementation's outputs with shipped reference outputs",
        description="Exactly one of: CHECKPOINT_DIR (run dsv3_ref on a hub-format checkpoint and compare it with "
                    "the reference of the same config), --outputs FILE --reference NAME (compare your "
                    "implementation's outputs), --export-reference NAME DIR (write a reference model and its tokens "
                    "for your implementation), --list. Exit code 0: agrees, 1: diverges, 2: bad input.",
        epilog="Outputs format (safetensors): logits (B, T, vocab); optional hidden.{i} (B, T, dim) after block i; "
               "routing.{i}.indices / routing.{i}.weights (B*T, K); mtp.{k}.logits. See "
               "`dsv3_ref.teaching.validate`.")
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT_DIR", help="hub-format checkpoint folder")
    p.add_argument("--outputs", metavar="FILE", help="safetensors file with your implementation's outputs")
    p.add_argument("--reference", metavar="NAME", help=f"reference name, one of {list(validate.REFERENCES)}")
    p.add_argument("--export-reference", nargs=2, metavar=("NAME", "DIR"), help="write reference NAME to DIR")
    p.add_argument("--list", action="store_true", help="list the shipped references")
    p.add_argument("--atol", type=float, default=validate.ATOL, help=f"absolute tolerance (default {validate.ATOL:g})")
    p.add_argument("--rtol", type=float, default=validate.RTOL, help=f"relative tolerance (default {validate.RTOL:g})")
    p.set_defaults(func=_run_validate)


def _run_validate(args: argparse.Namespace) -> int:
    modes = [m for m, on in [("CHECKPOINT_DIR", args.checkpoint), ("--outputs", args.outputs),
                             ("--export-reference", args.export_reference), ("--list", args.list)] if on]
    if len(modes) != 1:
        raise ValueError(f"validate: give exactly one of CHECKPOINT_DIR, --outputs, --export-reference, --list; got "
                         f"{modes or 'none'}")
    if not (args.atol >= 0 and args.rtol >= 0):
        raise ValueError(f"--atol and --rtol must be >= 0, got {args.atol} and {args.rtol}")
    if args.list:
        for name, ref in validate.REFERENCES.items():
            print(f"{name:<12} {ref.description}")
        return 0
    if args.export_reference:
        name, folder = args.export_reference
        validate.export_reference(name, folder)
        print(f"wrote reference {name!r} to {folder}: config.json + model.safetensors (hub format) and "
              f"{validate.TOKENS_FILE} (tokens {tuple(validate.reference_tokens(name).shape)}); run your "
              f"implementation on the tokens and check it with: python -m dsv3_ref validate --outputs FILE "
              f"--reference {name}")
        return 0
    if args.outputs:
        if args.reference is None:
            raise ValueError(f"validate --outputs needs --reference NAME, one of {list(validate.REFERENCES)}")
        result = validate.validate_outputs(args.outputs, args.reference, args.atol, args.rtol)
    else:
        result = validate.validate_checkpoint(args.checkpoint, args.reference, args.atol, args.rtol)
    print(result)
    sys.stdout.flush()
    return 0 if result.passed else 1


# ---------------------------------------------------------------------------------------------- entry point
COMMANDS = (_add_info, _add_train, _add_generate, _add_validate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsv3_ref", description="dsv3_ref: DeepSeek-V3 reference")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
