"""Validation against shipped reference outputs, layer by layer: is an implementation (or a converted checkpoint)
computing the same function as dsv3_ref, and if not, where does it start to differ?

The package ships small seeded models (`REFERENCES`) and their expected outputs on fixed tokens
(`dsv3_ref/reference_outputs/<name>.safetensors`, written by `scripts/make_reference_outputs.py`). The weights are not
shipped: they are regenerated from the seed (`reference_model`), bit for bit on any machine (torch's CPU generator).

Three ways in (`python -m dsv3_ref validate ...`):

* `--export-reference NAME DIR` writes the reference model as a hub-format checkpoint (config.json +
  model.safetensors, `save_pretrained`) and the tokens (`DIR/tokens.safetensors`, key `tokens`, int64 (B, T)), for
  you to load into your own implementation;
* `--outputs FILE --reference NAME` compares what your implementation computed on those tokens (a safetensors file in
  the format below) with the expected outputs;
* `CHECKPOINT_DIR` runs dsv3_ref itself on a checkpoint (e.g. one you converted) and compares it with the reference
  whose config it has.

The outputs format (safetensors; any float dtype; the hub's layer numbering, MTP module k = layer n_layers + k):

    logits                     (B, T, vocab)   the main model's logits                                   required
    hidden.{i}                 (B, T, dim)     the residual stream after block i (before the final norm)  optional
    routing.{i}.indices        (B*T, K) int    the experts block i's gate chose per token (any order)     optional
    routing.{i}.weights        (B*T, K)        their gate weights, aligned with the indices               optional
    mtp.{k}.logits             (B, T-k-1, V)   MTP depth k+1's logits: slot j predicts token j + k + 2    optional

For MTP module k, `hidden.{n_layers + k}` is the output of its block (before its norm) and
`routing.{n_layers + k}.*` its gate's choice. Entries are compared in the order the model computes them (block by
block: routing, then the block's output; then the logits; then the MTP modules), and the report names the first
layer where they diverge and the maximum error there. Expert choices are compared as sets per token (the order of
the K chosen experts does not matter: transformers, for one, does not sort them), weights after aligning by expert.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..io.checkpoint import from_pretrained, save_pretrained
from ..nn.model import Transformer
from ..nn.moe import MoE
from ..objectives.mtp import mtp_hidden_states

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "reference_outputs"
FORMAT = "dsv3_ref reference outputs v1"
TOKENS_FILE = "tokens.safetensors"
STD, NORM_STD, BIAS_MAX = 0.1, 0.2, 0.3  # the reference weights: N(0, STD), norms 1 + N(0, NORM_STD), bias U(0, MAX)
ATOL, RTOL = 1e-4, 1e-4  # default tolerances for another implementation in float32
# config fields that do not change the function a checkpoint computes
_IRRELEVANT = ("attn_impl", "init_std", "n_mtp_layers")


@dataclass(frozen=True)
class Reference:
    """A shipped reference: a tiny config (overrides of the `tiny` preset), the seed of its weights and tokens."""

    name: str
    description: str
    overrides: dict[str, Any]
    seed: int
    batch: int = 2
    seq_len: int = 16

    def config(self) -> ModelConfig:
        return ModelConfig.from_preset("tiny", **self.overrides)


REFERENCES: dict[str, Reference] = {r.name: r for r in [
    Reference("v3_groups", "DeepSeek-V3 gate: sigmoid scores, 16 experts in 4 groups (top-2 groups, top-4 experts), "
              "non-zero correction bias, query compression",
              dict(n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2), seed=1),
    Reference("v2_softmax", "DeepSeek-V2-Lite style: softmax gate without bias or groups, no query compression "
              "(q_lora_rank 0), 2 shared experts",
              dict(score_func="softmax", q_lora_rank=0, n_expert_groups=1, n_limited_groups=1, n_shared_experts=2,
                   route_scale=1.0), seed=2),
    Reference("v3_yarn_mtp", "DeepSeek-V3 with YaRN active (s = 4 over 64 positions, mscale in the softmax scale) "
              "and one MTP module",
              dict(max_seq_len=256, original_seq_len=64, rope_factor=4.0, mscale=1.0, n_mtp_layers=1), seed=3),
]}


def get_reference(name: str) -> Reference:
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; allowed: {list(REFERENCES)}")
    return REFERENCES[name]


# ---------------------------------------------------------------------------------------------- the reference models
@torch.no_grad()
def reference_model(name: str) -> Transformer:
    """The reference model `name`, its weights regenerated from its seed (float32, eval mode): matrices and the
    embedding N(0, STD^2), norm weights 1 + N(0, NORM_STD^2), gate correction biases U(0, BIAS_MAX) (positive, so
    every implementation's group masking agrees)."""
    ref = get_reference(name)
    cfg = ref.config()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(ref.seed)
    for pname, p in model.named_parameters():
        if pname.endswith("norm.weight"):
            p.copy_(1.0 + NORM_STD * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(STD * torch.randn(p.shape, generator=gen))
    for bname, b in model.named_buffers():
        if bname.endswith("gate.bias"):
            b.copy_(BIAS_MAX * torch.rand(b.shape, generator=gen))
    return model.eval()


def reference_tokens(name: str) -> torch.Tensor:
    """(batch, seq_len) int64 token ids of reference `name`, from its seed."""
    ref = get_reference(name)
    gen = torch.Generator().manual_seed(1000 + ref.seed)
    return torch.randint(0, ref.config().vocab_size, (ref.batch, ref.seq_len), generator=gen)


@torch.no_grad()
def collect_outputs(model: Transformer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run dsv3_ref's `model` on tokens (B, T) and return its outputs in the validation format (module docstring)."""
    n = model.config.n_layers
    blocks = {i: layer for i, layer in enumerate(model.layers)}
    blocks.update({n + k: m.block for k, m in enumerate(model.mtp)})
    hidden: dict[int, torch.Tensor] = {}
    hooks = [block.register_forward_hook(lambda mod, args, out, i=i: hidden.__setitem__(i, out))
             for i, block in blocks.items()]
    try:
        h = model.hidden_states(tokens)  # (B, T, dim)
        out = {"logits": model.head(h)}
        mtp_h = mtp_hidden_states(model, tokens, hidden=h) if len(model.mtp) else []
    finally:
        for hook in hooks:
            hook.remove()
    for k, hk in enumerate(mtp_h):
        out[f"mtp.{k}.logits"] = model.head(hk)  # (B, T - k - 1, vocab)
    for i, block in blocks.items():
        out[f"hidden.{i}"] = hidden[i]
        if isinstance(block.ffn, MoE):
            out[f"routing.{i}.indices"] = block.ffn.last_routing.indices
            out[f"routing.{i}.weights"] = block.ffn.last_routing.weights
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in out.items()}


def make_expected(name: str) -> dict[str, torch.Tensor]:
    """A fresh regeneration of reference `name`'s expected outputs (what `scripts/make_reference_outputs.py`
    ships), plus its `tokens`."""
    tokens = reference_tokens(name)
    return {"tokens": tokens, **collect_outputs(reference_model(name), tokens)}


def save_expected(name: str, folder: str | os.PathLike = REFERENCE_DIR) -> Path:
    """Write `make_expected(name)` to folder/<name>.safetensors (metadata: format, config, seed, torch version)."""
    ref = get_reference(name)
    path = Path(folder) / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "reference": name, "config": json.dumps(ref.config().to_dict(), sort_keys=True),
            "seed": str(ref.seed), "torch": torch.__version__}
    save_file({k: v.clone() for k, v in make_expected(name).items()}, str(path), metadata=meta)
    return path


def _read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what}: no such file {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{what}: {path!r} is not a valid safetensors file ({type(e).__name__}: {e})") from None


def expected_outputs(name: str) -> dict[str, torch.Tensor]:
    """The shipped expected outputs of reference `name` (with `tokens`)."""
    get_reference(name)
    tensors, meta = _read_safetensors(REFERENCE_DIR / f"{name}.safetensors", f"reference {name!r}")
    if meta.get("format") != FORMAT or meta.get("reference") != name:
        raise ValueError(f"reference {name!r}: the shipped file is not in format {FORMAT!r}; regenerate it with "
                         "scripts/make_reference_outputs.py")
    return tensors


def export_reference(name: str, folder: str | os.PathLike) -> Path:
    """Write reference `name` as a hub-format checkpoint (config.json + model.safetensors) plus tokens.safetensors
    (key `tokens`, the inputs to run) into `folder`."""
    model, tokens = reference_model(name), reference_tokens(name)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"export: {str(folder)!r} exists and is not a folder")
    save_pretrained(model, folder)
    save_file({"tokens": tokens}, str(folder / TOKENS_FILE), metadata={"reference": name})
    return folder


# ---------------------------------------------------------------------------------------------- comparison
_KEY_RE = re.compile(r"^(?:logits|hidden\.(\d+)|routing\.(\d+)\.(?:indices|weights)|mtp\.(\d+)\.logits)$")


@dataclass
class Entry:
    """One compared output. status: "ok", "diverged" or "absent" (not provided: optional entries only)."""

    key: str
    layer: int | None  # hub layer number (None for the main logits)
    status: str
    message: str = ""
    max_error: float | None = None
    index: tuple[int, ...] | None = None


@dataclass
class ValidationReport:
    """Entries in computation order; `first_divergence` is the first that diverged (None if all agree)."""

    reference: str
    entries: list[Entry] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(e.status != "diverged" for e in self.entries)

    @property
    def first_divergence(self) -> Entry | None:
        return next((e for e in self.entries if e.status == "diverged"), None)

    def __str__(self) -> str:
        lines = [f"validation against reference {self.reference!r} ({get_reference(self.reference).description})"]
        for e in self.entries:
            err = "" if e.max_error is None else f"max err {e.max_error:.2e}"
            lines.append(f"  {e.key:<22} {e.status:<9} {err:<16} {e.message}".rstrip())
        first = self.first_divergence
        if first is None:
            compared = sum(e.status == "ok" for e in self.entries)
            lines.append(f"PASS: all {compared} compared outputs agree with the reference")
        else:
            where = "the main logits (head)" if first.layer is None else f"layer {first.layer}"
            lines.append(f"FAIL: first divergence at {where}: {first.key}: {first.message}")
        return "\n".join(lines)


def _order(cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """Every key of the format in computation order, with its layer."""
    keys: list[tuple[str, int | None]] = []
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            keys += [(f"routing.{i}.indices", i), (f"routing.{i}.weights", i)]
        keys.append((f"hidden.{i}", i))
    keys.append(("logits", None))
    for k in range(cfg.n_mtp_layers):
        i = cfg.n_layers + k
        keys += [(f"routing.{i}.indices", i), (f"routing.{i}.weights", i), (f"hidden.{i}", i), (f"mtp.{k}.logits", i)]
    return keys


def _compare_dense(key: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float
                   ) -> tuple[str, str, float | None, tuple[int, ...] | None]:
    if tuple(got.shape) != tuple(want.shape):
        return "diverged", f"shape {tuple(got.shape)}, expected {tuple(want.shape)}", None, None
    g, w = got.double(), want.double()
    diff = (g - w).abs()
    diff = torch.where(torch.isnan(diff), torch.inf, diff)
    flat = int(diff.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), got.shape))
    err = float(diff.flatten()[flat])
    bad = int((diff > atol + rtol * w.abs()).sum())
    if bad == 0:
        return "ok", "", err, None
    return ("diverged", f"{bad} of {got.numel()} values outside tolerance; max error at index {index} (got "
            f"{float(g[index]):.6g}, expected {float(w[index]):.6g})", err, index)


def _routing_sets(indices: torch.Tensor, k: int) -> torch.Tensor:
    return indices.reshape(-1, k).sort(dim=-1).values


def _compare_routing(outputs: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], i: int, atol: float,
                     rtol: float) -> list[Entry]:
    ki, kw = f"routing.{i}.indices", f"routing.{i}.weights"
    want_i, want_w = expected[ki], expected[kw]
    N, K = want_i.shape
    entries = []
    got_i = outputs.get(ki)
    if got_i is None:
        entries.append(Entry(ki, i, "absent"))
    elif got_i.is_floating_point() or got_i.numel() != N * K:
        entries.append(Entry(ki, i, "diverged", f"expected {N} x {K} integer expert ids, got {tuple(got_i.shape)} "
                                                f"{got_i.dtype}"))
        got_i = None
    else:
        got_i = got_i.reshape(N, K).long()
        rows = (_routing_sets(got_i, K) != _routing_sets(want_i, K)).any(dim=-1)
        if rows.any():
            t = int(rows.nonzero()[0])
            entries.append(Entry(ki, i, "diverged", f"{int(rows.sum())} of {N} tokens chose different experts; first "
                                                    f"token {t}: got {sorted(got_i[t].tolist())}, expected "
                                                    f"{sorted(want_i[t].tolist())}", index=(t,)))
            got_i = None
        else:
            entries.append(Entry(ki, i, "ok"))
    got_w = outputs.get(kw)
    if got_w is None:
        entries.append(Entry(kw, i, "absent"))
    elif got_i is None:
        entries.append(Entry(kw, i, "absent", "not compared: the expert choices differ or are not provided"))
    elif got_w.numel() != N * K:
        entries.append(Entry(kw, i, "diverged", f"shape {tuple(got_w.shape)}, expected {N} x {K}"))
    else:  # align both by expert id
        aligned_got = got_w.reshape(N, K).gather(1, got_i.argsort(dim=-1))
        aligned_want = want_w.gather(1, want_i.argsort(dim=-1))
        status, message, err, index = _compare_dense(kw, aligned_got, aligned_want, atol, rtol)
        entries.append(Entry(kw, i, status, message, err, index))  # index: (token, rank of the expert id)
    return entries


def compare(outputs: dict[str, torch.Tensor], reference: str, atol: float = ATOL,
            rtol: float = RTOL) -> ValidationReport:
    """Compare `outputs` (the format of the module docstring) with reference `reference`'s expected outputs."""
    ref = get_reference(reference)
    cfg = ref.config()
    expected = expected_outputs(reference)
    order = _order(cfg)
    known = {k for k, _ in order}
    unknown = sorted(k for k in outputs if k not in known and k != "tokens")
    if unknown:
        bad_pattern = [k for k in unknown if not _KEY_RE.match(k)]
        hint = ("keys are logits, hidden.{i}, routing.{i}.indices, routing.{i}.weights, mtp.{k}.logits" if bad_pattern
                else f"reference {reference!r} has layers 0..{cfg.n_layers - 1} (MoE from layer {cfg.n_dense_layers})"
                     f" and {cfg.n_mtp_layers} MTP module(s)")
        raise ValueError(f"outputs: unknown key(s) {unknown}; {hint}")
    if "logits" not in outputs:
        raise ValueError("outputs: the required key 'logits' (B, T, vocab) is missing")
    if "tokens" in outputs and not torch.equal(outputs["tokens"].long().cpu(), expected["tokens"]):
        raise ValueError(f"outputs: 'tokens' differ from reference {reference!r}'s tokens (use the ones "
                         "`--export-reference` writes)")
    report = ValidationReport(reference)
    for key, layer in order:
        if key.startswith("routing."):
            if key.endswith(".indices"):
                report.entries += _compare_routing(outputs, expected, layer, atol, rtol)
            continue
        if key not in outputs:
            report.entries.append(Entry(key, layer, "absent"))
            continue
        status, message, err, index = _compare_dense(key, outputs[key].detach().cpu(), expected[key], atol, rtol)
        report.entries.append(Entry(key, layer, status, message, err, index))
    return report


def validate_outputs(path: str | os.PathLike, reference: str, atol: float = ATOL,
                     rtol: float = RTOL) -> ValidationReport:
    """Compare a safetensors outputs file (your implementation's) with reference `reference`."""
    get_reference(reference)
    outputs, _ = _read_safetensors(path, "outputs")
    return compare(outputs, reference, atol, rtol)


def matching_reference(cfg: ModelConfig) -> str:
    """The name of the reference whose config equals `cfg` (ignoring attn_impl, init_std, n_mtp_layers)."""

    def relevant(c: ModelConfig) -> dict[str, Any]:
        return {k: v for k, v in c.to_dict().items() if k not in _IRRELEVANT}

    ours = relevant(cfg)
    diffs = {}
    for name, ref in REFERENCES.items():
        theirs = relevant(ref.config())
        diff = sorted(k for k in ours if not _same(ours[k], theirs[k]))
        if not diff:
            return name
        diffs[name] = diff
    closest = min(diffs, key=lambda n: len(diffs[n]))
    raise ValueError(f"the checkpoint's config matches no shipped reference ({list(REFERENCES)}); the closest, "
                     f"{closest!r}, differs in {diffs[closest]}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def validate_checkpoint(path: str | os.PathLike, reference: str | None = None, atol: float = ATOL,
                        rtol: float = RTOL) -> ValidationReport:
    """Load a hub-format checkpoint with dsv3_ref, run it on the matching reference's tokens (or `reference`'s,
    whose config it must have), and compare layer by layer."""
    model = from_pretrained(path).eval()
    name = matching_reference(model.config)
    if reference is not None and reference != name:
        get_reference(reference)
        raise ValueError(f"the checkpoint's config is reference {name!r}'s, not {reference!r}'s")
    return compare(collect_outputs(model, reference_tokens(name)), name, atol, rtol)
