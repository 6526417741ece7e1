"""Command line: `python -m dsv3_ref {info,train,generate,validate} ...` (also installed as `dsv3-ref`).

The only module that knows argparse. Each subcommand has an `_add_<name>(subparsers)` that registers its parser and
a `_run_<name>(args)` that calls the package and returns the exit code; bad input (a ValueError) exits with 2 and
one line on stderr instead of a traceback.

Each subcommand imports what it needs itself, in its two functions, and `main` registers in full only the parser of
the subcommand being run: `info` then loads the config and the accounting (and the model, for the meta check), not
the trainer, the data, the checkpoint code or the validator (`_add_train` and `_add_validate` need them for their
flags' choices and defaults). `--help` without a subcommand registers them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import random
import sys
from typing import TYPE_CHECKING

import torch

from .config import ATTN_IMPLS, PRESETS, ModelConfig
from .systems.accounting import check_counts, report, resolve_config

if TYPE_CHECKING:
    from .train import TrainConfig
    from .train.distributed import Parallel

# the subcommands' one-line help, for the full parsers and for the names-only ones alike (see `build_parser`)
HELP = {"info": "parameter, KV-cache and FLOP accounting of a model",
        "train": "train a small model on the synthetic corpus or a text file",
        "generate": "continue a text prompt with a saved checkpoint",
        "validate": "compare a checkpoint or an implementation's outputs with shipped reference outputs"}


@functools.cache
def train_flags() -> dict[str, type]:
    """`train` flags: every TrainConfig field with a scalar default (betas, a pair, is not one), with its type."""
    from .train import TrainConfig

    return {f.name: type(f.default) for f in dataclasses.fields(TrainConfig) if type(f.default) in (int, float, str)}


# ---------------------------------------------------------------------------------------------- info
def _add_info(subparsers: argparse._SubParsersAction) -> None:
    """`info MODEL [--ctx N] [--no-check-meta]`: `dsv3_ref.systems.accounting.report`."""
    p = subparsers.add_parser("info", help=HELP["info"],
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
    """`train --preset small --steps N --out DIR [...]`: a `Trainer` run, one flag per field in `train_flags()`."""
    from .fp8.gemm import GEMMS
    from .train import PRECISIONS, TRAIN_PRESETS

    flag_help = {"data": dict(help="'corpus' (default) or the path of a UTF-8 text file"),
                 "precision": dict(choices=PRECISIONS), "fp8_gemm": dict(choices=GEMMS)}
    p = subparsers.add_parser("train", help=HELP["train"],
                              description="Train a preset on byte tokens; save a resumable checkpoint in --out.")
    p.add_argument("--preset", choices=list(TRAIN_PRESETS), default=None,
                   help="model preset (default small; with --resume: the checkpoint's)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--resume", default=None, help="checkpoint folder to continue from (its train_config.json gives "
                                                  "the defaults)")
    for name, kind in train_flags().items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, **flag_help.get(name, {}))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]; with --precision fp8 a GPU with FP8 "
                   "tensor cores runs real FP8 GEMMs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--bias-gamma", type=float, default=None,
                   help="auxiliary-loss-free balancing: update the gates' biases by this speed after every step "
                        "(the report: 0.001; default: no balancing)")
    p.add_argument("--expert-parallel", action="store_true",
                   help="under torchrun: split every MoE layer's routed experts over the processes (all of them "
                        "also data-parallel)")
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
    from .train import TrainConfig
    from .train.trainer import read_model_config, read_train_config

    overrides = {k: getattr(args, k) for k in train_flags() if getattr(args, k) is not None}
    if args.resume is not None:
        # with --preset, resume checks that it matches the checkpoint
        model_cfg = read_model_config(args.resume) if args.preset is None else ModelConfig.from_preset(args.preset)
        return read_train_config(args.resume).replace(**overrides), model_cfg
    preset = args.preset or "small"
    return TrainConfig.for_preset(preset, **overrides), ModelConfig.from_preset(preset)


def _parallel(args: argparse.Namespace, device: torch.device) -> tuple[Parallel | None, torch.device]:
    """In a torchrun job of 2+ processes: join it (gloo on CPU, NCCL with one GPU per process: cuda:LOCAL_RANK)."""
    from .train.distributed import Parallel, torchrun_world

    _, world, local_rank = torchrun_world()
    if world == 1:
        if args.expert_parallel:
            raise ValueError("--expert-parallel needs a torchrun job of 2 or more processes (torchrun "
                             "--nproc-per-node N -m dsv3_ref train ...)")
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return Parallel.init(device, args.expert_parallel), device


def _run_train(args: argparse.Namespace) -> int:
    from .data import bits_per_byte
    from .nn.model import Transformer
    from .train import LossFreeBalancing, Trainer

    if args.threads is not None:
        if not 1 <= args.threads <= 1024:
            raise ValueError(f"--threads must be an integer in [1, 1024], got {args.threads}")
        torch.set_num_threads(args.threads)
    cfg, model_cfg = _train_configs(args)
    parallel, device = _parallel(args, _device(args.device))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)  # saved in the training state: seeded, so that two identical runs write the same state
    model = Transformer(model_cfg)
    model.reset_parameters(cfg.seed)  # on the CPU, so that a seed gives the same weights on every device
    hooks = [] if args.bias_gamma is None else [LossFreeBalancing(args.bias_gamma)]
    trainer = Trainer(model.to(device), cfg, hooks=hooks, progress=not args.no_progress, parallel=parallel)
    trainer.fit(resume_from=args.resume, out=args.out)
    if parallel is not None:
        torch.distributed.destroy_process_group()
        if parallel.rank != 0:
            return 0  # rank 0 reports
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
    p = subparsers.add_parser("generate", help=HELP["generate"],
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
    from .inference.generate import generate_text
    from .io.checkpoint import from_pretrained

    model = from_pretrained(args.checkpoint).eval()
    text = generate_text(model, args.prompt, max_new_tokens=args.max_new_tokens, bos=not args.no_bos,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed, attn_impl=args.attn_impl)
    print(args.prompt + text)
    return 0


# ---------------------------------------------------------------------------------------------- validate
def _add_validate(subparsers: argparse._SubParsersAction) -> None:
    """`validate ...`: the three modes of `dsv3_ref.teaching.validate`, and --list."""
    from .teaching import validate

    p = subparsers.add_parser(
        "validate", help=HELP["validate"],
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
    p.add_argument("--overwrite", action="store_true",
                   help="let --export-reference replace a non-empty folder that is not a reference export")
    p.add_argument("--list", action="store_true", help="list the shipped references")
    p.add_argument("--atol", type=float, default=validate.ATOL, help=f"absolute tolerance (default {validate.ATOL:g})")
    p.add_argument("--rtol", type=float, default=validate.RTOL, help=f"relative tolerance (default {validate.RTOL:g})")
    p.set_defaults(func=_run_validate)


def _run_validate(args: argparse.Namespace) -> int:
    from .teaching import validate

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
        validate.export_reference(name, folder, overwrite=args.overwrite)
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
COMMANDS = {"info": _add_info, "train": _add_train, "generate": _add_generate, "validate": _add_validate}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand's arguments, or, given `command` (the one being run), with that one's only:
    the others are registered by name and help (for the usage and error messages) without their arguments, whose
    choices and defaults would import the trainer or the validator."""
    parser = argparse.ArgumentParser(prog="python -m dsv3_ref", description="dsv3_ref: DeepSeek-V3 reference")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add in COMMANDS.items():
        if command in (None, name):
            add(sub)
        else:
            sub.add_parser(name, help=HELP[name])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
