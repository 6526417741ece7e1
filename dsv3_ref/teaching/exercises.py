"""Exercises with checkers: a student writes one function per component, a checker runs it next to the package's
reference on seeded inputs and says what is wrong, not just that something is.

Each `check_<name>(fn)` returns a `CheckResult` (`.passed`, `.message`, printable; `.assert_ok()` raises an
AssertionError when it failed) and never raises itself: an exception inside `fn` becomes a failed result that names
it and, where the error says enough, its likely cause (RoPE applied to all query dims, a mask that does not
broadcast over the heads, ...). The reference is always the package's own code (`rope.apply_rotary_emb`,
`MLA.queries` / `MLA.latent` / `MLA.forward`, `Gate.forward`, `balance.update_bias`, `MTPModule.forward`,
`fp8.quantize`); the known mistakes are modelled next to it (a half-split RoPE, the bias in the gate weights, ...)
so that a wrong answer that matches one of them gets that mistake's diagnosis. The gate is modelled step by step
(scores, biased scores, group scores, kept groups, top-k, weights) and the diagnosis names the first step that
differs, then the later ones, so that compound mistakes are named too. Otherwise the message gives the maximum error
and where it is.

| name          | the student writes                                   | reference                                  |
|---------------|------------------------------------------------------|--------------------------------------------|
| rope          | apply_rope(x, freqs_cis) -> x rotated                | rope.apply_rotary_emb                      |
| mla_proj      | mla_projections(mla, x, freqs_cis) -> (q_nope, q_pe, c_kv, k_pe) | MLA.queries, MLA.latent        |
| absorb        | absorbed_attention(mla, x, freqs_cis, mask) -> out   | MLA.forward(attn_impl="absorb")            |
| gate          | route(gate, x) -> (weights, indices)                 | Gate.forward                               |
| bias_update   | update_bias(bias, load, gamma) -> new bias           | balance.update_bias (sign rule)            |
| mtp_combine   | mtp_combine(mtp, h_prev, emb) -> h'                  | MTPModule.forward (the block's input)      |
| fp8_tile      | quantize_1x128(x) -> (q, scale)                      | fp8.quantize(x, "1x128")                   |
| dsa_score     | indexer_scores(indexer, x, qr, freqs_cis, mask) -> I | nn.indexer.Indexer.forward                 |
| dsa_topk      | topk_mask(scores, topk, mask) -> additive mask       | indexer.topk_indices + indexer.sparse_mask |
| dsa_kl        | indexer_kl(scores, attn, selected) -> loss           | objectives.indexer.indexer_kl_loss         |

`load_solutions(path)` runs the cells of a solutions notebook that start with `# SOLUTION` and returns the
functions they define: in the instructor edition, cells tagged `solution` plug them into the student notebook, so it
runs green in CI while its stubs stay empty (the student edition, `make student`, leaves those cells out).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..config import ModelConfig
from ..fp8 import formats as fp8
from ..nn import indexer
from ..nn.attention import MLA, causal_mask
from ..nn.indexer import Indexer
from ..nn.model import MTPModule
from ..nn.moe import Gate
from ..nn.rope import apply_rotary_emb, precompute_freqs_cis, rope_frequencies
from ..objectives import balance
from ..objectives import indexer as indexer_objective

SOLUTION_MARKER = "# SOLUTION"


# ---------------------------------------------------------------------------------------------- results
@dataclass(repr=False)
class CheckResult:
    """The verdict of one checker. `max_error` / `index`: the largest deviation from the reference and where it is
    (None when the failure is not numerical, e.g. a wrong shape)."""

    name: str
    passed: bool
    message: str
    max_error: float | None = None
    index: tuple[int, ...] | None = None

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return f"[{'PASS' if self.passed else 'FAIL'}] {self.name}: {self.message}"

    __repr__ = __str__

    def assert_ok(self) -> CheckResult:
        """Raise AssertionError with the diagnosis unless the check passed; return self otherwise."""
        if not self.passed:
            raise AssertionError(str(self))
        return self


class _Fail(Exception):
    """Internal: stops a checker with a diagnosis."""

    def __init__(self, message: str, max_error: float | None = None, index: tuple[int, ...] | None = None):
        super().__init__(message)
        self.message, self.max_error, self.index = message, max_error, index


def _run_check(name: str, body: Callable[[], str]) -> CheckResult:
    """Run a checker body (returns the success message, raises _Fail) into a CheckResult."""
    try:
        return CheckResult(name, True, body())
    except _Fail as f:
        return CheckResult(name, False, f.message, f.max_error, f.index)


def _call(fn: Callable, *args: Any, label: str = "", hint: Callable[[Exception], str] | None = None) -> Any:
    """fn(*args) with the student's exception turned into a diagnosis: its type, the first line of its message and,
    when `hint(e)` recognises it, the likely cause."""
    try:
        with torch.no_grad():
            return fn(*args)
    except Exception as e:  # noqa: BLE001 - any error of the student's code is reported, never raised
        lines = str(e).strip().splitlines()
        detail = f": {lines[0]}" if lines else ""
        if isinstance(e, NotImplementedError):
            cause = " (the stub is not implemented yet)"
        else:
            cause = hint(e) if hint else ""
            cause = f"; likely cause: {cause}" if cause else ""
        raise _Fail(f"{label + ': ' if label else ''}your function raised {type(e).__name__}{detail}{cause}") from None


def _runs(fn: Callable, *args: Any) -> bool:
    """Whether fn(*args) returns without an exception (to locate a failure: does it fail without the mask?)."""
    try:
        with torch.no_grad():
            fn(*args)
    except Exception:  # noqa: BLE001 - only whether it fails matters
        return False
    return True


def _shape_error(e: Exception) -> bool:
    """Whether `e` is torch's complaint about sizes or shapes (a broadcast, view, matmul or norm mismatch)."""
    return isinstance(e, (RuntimeError, ValueError)) and any(w in str(e) for w in ("size", "shape"))


def _numbers(e: Exception) -> set[int]:
    return {int(n) for n in re.findall(r"\d+", str(e))}


def _none_hint(what: str) -> Callable[[Exception], str]:
    """The hint for an argument that may be None (the V2 gate's bias, a single token's mask)."""
    return lambda e: f"{what} is None here: use it only when it is not None" if "NoneType" in str(e) else ""


# ---------------------------------------------------------------------------------------------- comparisons
def _close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> bool:
    return (isinstance(got, torch.Tensor) and got.shape == want.shape
            and torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True))


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def _max_error(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float, label: str, note: str = "") -> _Fail:
    """The generic diagnosis: largest absolute error, where, and how many values are out of tolerance (after `note`,
    what is known about the kind of error)."""
    g, w = got.double(), want.double()
    diff = (g - w).abs()
    diff = torch.where(torch.isnan(diff) | (torch.isinf(g) != torch.isinf(w)), torch.inf, diff)
    bad = int((diff > atol + rtol * w.abs()).sum())
    flat = int(diff.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), got.shape))
    err = float(diff.flatten()[flat])
    return _Fail(f"{label}: {note + '; ' if note else ''}max abs error {err:.3g} at index {index} (got "
                 f"{float(g[index]):.6g}, expected {float(w[index]):.6g}); {bad} of {got.numel()} values outside "
                 f"atol={atol:g}, rtol={rtol:g}", err, index)


def _expect_tensor(label: str, got: Any, want: torch.Tensor, shape_doc: str,
                   shape_hints: dict[tuple[int, ...], str] | None = None, dtype_hint: str = "") -> torch.Tensor:
    """Type, shape and dtype of one output; raises _Fail with the specific complaint."""
    if not isinstance(got, torch.Tensor):
        raise _Fail(f"{label}: expected a torch.Tensor, got {type(got).__name__}")
    if got.shape != want.shape:
        hint = (shape_hints or {}).get(tuple(got.shape), "")
        raise _Fail(f"{label}: wrong shape {tuple(got.shape)}, expected {shape_doc} = {tuple(want.shape)}"
                    + (f": {hint}" if hint else ""))
    if got.dtype != want.dtype:
        raise _Fail(f"{label}: wrong dtype {got.dtype}, expected {want.dtype}" + (f": {dtype_hint}" if dtype_hint
                                                                                     else ""))
    return got


def _diagnose(label: str, got: torch.Tensor, want: torch.Tensor, mistakes: list[tuple[torch.Tensor | None, str]],
              atol: float, rtol: float, nonfinite_hint: str = "", note: Callable[[], str] | None = None,
              explain: Callable[[], str] | None = None) -> None:
    """Pass silently if got matches want; else the first known mistake it matches (NaN where the mistake has NaN),
    else non-finite values (with `nonfinite_hint`), else `explain()` if it names the mistake, else the max error
    after `note()`."""
    if _close(got, want, atol, rtol):
        return
    for model, message in mistakes:
        if model is not None and _close(got, model, atol, rtol):
            raise _Fail(f"{label}: {message}")
    bad = ~torch.isfinite(got.float()) & torch.isfinite(want.float())
    if bad.any():
        index = _first(bad)
        kind = "NaN" if torch.isnan(got.float()[index]) else "inf"
        raise _Fail(f"{label}: {int(bad.sum())} non-finite value(s) where the reference is finite, first {kind} at "
                    f"index {index}" + (f": {nonfinite_hint}" if nonfinite_hint else ""), math.inf, index)
    explanation = explain() if explain else ""
    if explanation:
        raise _Fail(f"{label}: {explanation}")
    raise _max_error(got, want, atol, rtol, label, note() if note else "")


def _unpack(got: Any, names: tuple[str, ...]) -> tuple[Any, ...]:
    if not isinstance(got, (tuple, list)) or len(got) != len(names):
        kind = f"a {type(got).__name__}" + (f" of length {len(got)}" if isinstance(got, (tuple, list)) else "")
        raise _Fail(f"expected a tuple ({', '.join(names)}), got {kind}")
    return tuple(got)


# ---------------------------------------------------------------------------------------------- seeded inputs
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def _seeded(module: nn.Module, seed: int, gain: float = 1.0, norm_std: float = 0.3) -> nn.Module:
    """Overwrite every parameter from a seeded generator: matrices N(0, gain^2 / fan_in), norm weights
    1 + N(0, norm_std^2) (distinct, so a forgotten or swapped norm shows)."""
    gen = _gen(seed)
    for name, p in module.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + norm_std * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * gain / math.sqrt(p.shape[-1]))
    return module


def _build(factory: Callable[[], nn.Module], seed: int, gain: float = 1.0) -> nn.Module:
    """A module with seeded weights, built without touching the global RNG (the student's notebook state)."""
    with torch.random.fork_rng(devices=[]):
        return _seeded(factory(), seed, gain).eval()


_ROPE_CFG = dict(qk_rope_head_dim=16, max_seq_len=64, original_seq_len=64)
_YARN_CFG = dict(max_seq_len=128, original_seq_len=32, rope_factor=4.0, mscale=1.0)  # YaRN on: mscale matters


# ---------------------------------------------------------------------------------------------- 1. RoPE
def _half_split(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """The mistake: rotating pairs (x_j, x_{j + d/2}) (GPT-NeoX / HF half-split layout) instead of interleaved
    (x_{2j}, x_{2j+1}); it is the reference conjugated by the de-interleaving permutation."""
    m = x.shape[-1] // 2
    perm = torch.stack([torch.arange(m), torch.arange(m) + m], dim=-1).flatten()  # half layout -> interleaved
    return apply_rotary_emb(x[..., perm], freqs_cis)[..., perm.argsort()]


def _pairs(x: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x's interleaved pairs a = x_{2j}, b = x_{2j+1} in float32 (..., d/2) and cos, sin of freqs_cis broadcast to
    them ((1, T, 1, d/2) for a (B, T, H, d) x, (1, T, d/2) for (B, T, d))."""
    f = freqs_cis.view(1, x.shape[1], *([1] * (x.dim() - 3)), -1)
    xf = x.float()
    return xf[..., 0::2], xf[..., 1::2], f.real, f.imag


def _rope_mistakes(x: torch.Tensor, f: torch.Tensor, positions: torch.Tensor,
                   theta: torch.Tensor) -> list[tuple[torch.Tensor | None, str]]:
    """The known RoPE mistakes on one case: layout, direction, signs, sin / cos, write-back, positions."""
    a, b, cos, sin = _pairs(x, f)

    def interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
        return torch.stack([even, odd], dim=-1).flatten(-2).to(x.dtype)

    def at(p: torch.Tensor) -> torch.Tensor:  # x rotated for the positions p instead
        angle = torch.outer(p.float(), theta)
        return apply_rotary_emb(x, torch.polar(torch.ones_like(angle), angle))

    first, last, T = int(positions[0]), int(positions[-1]), len(positions)
    mistakes: list[tuple[torch.Tensor | None, str]] = [
        (_half_split(x, f), "you rotate the pairs (x_j, x_{j + d/2}) (half-split, as GPT-NeoX / HF `rotate_half`); "
                            "DeepSeek's checkpoints expect interleaved pairs (x_0, x_1), (x_2, x_3), ... : the same "
                            "values in a different permutation"),
        (apply_rotary_emb(x, f.conj()), "you rotate the wrong way (by -t * theta): multiply by freqs_cis, not by its "
                                        "conjugate (x_even' = x_even cos - x_odd sin)"),
        (x, "the output equals the input: nothing was rotated"),
        (interleave(a * cos + b * sin, a * sin + b * cos),
         "one sign is wrong: x'_{2j} = x_{2j} cos - x_{2j+1} sin, yours has + x_{2j+1} sin"),
        (interleave(a * cos - b * sin, -a * sin + b * cos),
         "one sign is wrong: x'_{2j+1} = x_{2j} sin + x_{2j+1} cos, yours has - x_{2j} sin"),
        (interleave(a * sin - b * cos, a * cos + b * sin),
         "you use sin where cos belongs (and cos where sin belongs): freqs_cis.real is cos(t theta_j), "
         "freqs_cis.imag is sin(t theta_j)"),
        (torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(x.dtype),
         "the values are right but you concatenated the rotated evens and odds [x'_0, x'_2, ...; x'_1, x'_3, ...]: "
         "interleave them back (x'_0, x'_1, x'_2, ...), e.g. stack them on a new last axis and flatten it"),
        (at(positions.flip(0)), f"the positions are reversed (the first token is rotated as position {last}): "
                                f"token i sits at position {first} + i, freqs_cis[i] is its rotation"),
    ]
    for shift in (1, -1):
        mistakes.append((at(positions + shift), f"your positions are off by one: you rotate the tokens as positions "
                                                f"{first + shift}-{last + shift}, they sit at positions {first}-{last} "
                                                "(freqs_cis[i] is token i's rotation)"))
    if first != 0:
        mistakes.append((at(torch.arange(T)), f"you rotate positions 0-{T - 1}, but these tokens sit at positions "
                                              f"{first}-{last}: use the freqs_cis you are given (row i is token i's "
                                              "position, YaRN included), not angles of your own"))
    return mistakes


def _rotation_note(x: torch.Tensor, got: torch.Tensor, f: torch.Tensor, tol: float) -> str:
    """For an unmodelled wrong answer: is it a rotation of each pair (only the angles wrong) or not one at all?"""
    a, b, cos, sin = _pairs(x, f)
    ga, gb = got.float()[..., 0::2], got.float()[..., 1::2]
    xc, gc = torch.complex(a, b).cdouble(), torch.complex(ga, gb).cdouble()
    if not torch.allclose(gc.abs(), xc.abs(), rtol=tol, atol=tol):
        return ("not a rotation: some pairs (x_{2j}, x_{2j+1}) change length; check the pairing and the signs of "
                "x'_{2j} = x_{2j} cos - x_{2j+1} sin, x'_{2j+1} = x_{2j} sin + x_{2j+1} cos")
    turned = (gc / xc).angle()  # (..., d/2) the angle you rotate each pair by
    want = torch.complex(cos, sin).cdouble().expand_as(xc).angle()
    off = torch.polar(torch.ones_like(turned), turned - want).angle().abs()  # the angle error, wrapped to [0, pi]
    index = _first(off == off.max())
    t, j = index[1], index[-1]
    return (f"each pair (x_{{2j}}, x_{{2j+1}}) keeps its length, so you rotate, but by the wrong angle: token {t}, "
            f"pair {j} is turned by {float(turned[index]):.4f} rad, expected {float(want[index]):.4f} rad "
            f"(freqs_cis[{t}, {j}].angle())")


def check_rope(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> CheckResult:
    """fn(x, freqs_cis) -> x rotated: x (B, T, H, rope_dim) or (B, T, rope_dim), freqs_cis (T, rope_dim / 2) complex
    for the positions of x's T tokens; the result has x's shape and dtype. Reference: `rope.apply_rotary_emb`."""

    def body() -> str:
        cfg = ModelConfig(**_ROPE_CFG)
        freqs, theta = precompute_freqs_cis(cfg), rope_frequencies(cfg)  # (64, 8), (8,)
        gen = _gen(0)
        broadcast = "freqs_cis is (T, d_r/2): view it as (1, T, 1, d_r/2) so it broadcasts over the batch and heads"
        cases = [("queries (B, T, H, d_r), positions 0-6", torch.randn(2, 7, 3, 16, generator=gen), range(0, 7),
                  lambda e: broadcast if _shape_error(e) else ""),
                 ("shared key (B, T, d_r), positions 5-13", torch.randn(2, 9, 16, generator=gen), range(5, 14),
                  lambda e: "x can be the shared key (B, T, d_r), with no head axis: there freqs_cis broadcasts as "
                            "(1, T, d_r/2) (make the view depend on x.dim())" if _shape_error(e) else ""),
                 ("bfloat16 queries", torch.randn(1, 5, 2, 16, generator=gen).bfloat16(), range(0, 5),
                  lambda e: "x is bfloat16 here: compute in float32 (x.float(); view_as_complex rejects bfloat16), "
                            "then cast back with .to(x.dtype)" if "BFloat16" in str(e) else "")]
        for label, x, positions, hint in cases:
            f = freqs[positions.start:positions.stop]
            want = apply_rotary_emb(x, f)
            d = x.shape[-1]
            got = _expect_tensor(label, _call(fn, x.clone(), f, label=label, hint=hint), want, "x's shape", {
                (*x.shape[:-1], d // 2, 2): "you left the pairs on their own axis: flatten the last two dims back "
                                            "into d_r (.flatten(-2))",
                (*x.shape[:-1], d // 2): "one value per pair: return both coordinates of each rotated pair, "
                                         "interleaved"},
                dtype_hint="return x's dtype (compute in float32, then cast back with .to(x.dtype))")
            tol = 2e-2 if x.dtype == torch.bfloat16 else 1e-5
            _diagnose(label, got, want, _rope_mistakes(x, f, torch.tensor(list(positions)), theta), tol, tol,
                      note=lambda x=x, got=got, f=f, tol=tol: _rotation_note(x, got, f, tol))
        return "interleaved rotation, shapes and dtypes match the reference on 3 seeded cases"

    return _run_check("rope", body)


# ---------------------------------------------------------------------------------------------- 2. MLA projections
def _mla_module(seed: int, **overrides: Any) -> MLA:
    cfg = ModelConfig(**{**_YARN_CFG, **overrides})
    return _build(lambda: MLA(cfg), seed)


def _mla_hint(mla: MLA) -> Callable[[Exception], str]:
    """Recognise a shape error by the size it names: RoPE or kv_norm applied to the wrong slice."""
    dh, dr, dc = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
    sizes = [(mla.qk_head_dim // 2, f"you applied RoPE to all d_h + d_r = {mla.qk_head_dim} query dims: apply RoPE "
                                    f"only to the last qk_rope_head_dim = {dr} dims of each head (q_pe, the decoupled "
                                    "part), after the split"),
             ((dc + dr) // 2, f"you applied RoPE to wkv_a's whole output: split it into [c_kv ({dc}); k_pe ({dr})] "
                              "first and rotate k_pe only"),
             (dc + dr, f"kv_norm normalises c_kv only (the first kv_lora_rank = {dc} dims of wkv_a's output): split "
                       "[c_kv; k_pe] before the norm"),
             (dc // 2, "you applied RoPE to c_kv: only k_pe (the last qk_rope_head_dim dims of wkv_a's output) is "
                       "rotated"),
             (dh // 2, f"you applied RoPE to q_nope: rotate q_pe (the last {dr} dims of each head); q_nope is not "
                       "rotated")]

    def hint(e: Exception) -> str:
        numbers = _numbers(e) if _shape_error(e) else set()
        return next((text for size, text in sizes if size in numbers), "")

    return hint


def check_mla_projections(fn: Callable) -> CheckResult:
    """fn(mla, x, freqs_cis) -> (q_nope (B, S, H, d_h), q_pe (B, S, H, d_r), c_kv (B, S, d_c), k_pe (B, S, d_r)) from
    an `MLA` module's weights (eqs. 1, 3, 6-9): q_pe and k_pe rotated, c_kv normalised. Reference: `MLA.queries`,
    `MLA.latent`. Checked with query compression (q_lora_rank 32) and without (q_lora_rank 0, `mla.wq`)."""

    def body() -> str:
        for label, overrides in [("q_lora_rank=32", {}), ("q_lora_rank=0", {"q_lora_rank": 0})]:
            mla = _mla_module(1, **overrides)
            B, S, H = 2, 6, mla.n_heads
            dh, dr, dc = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
            x = torch.randn(B, S, 64, generator=_gen(2))
            freqs = precompute_freqs_cis(ModelConfig(**{**_YARN_CFG, **overrides}))[:S]
            with torch.no_grad():
                q_nope, q_pe = mla.queries(x, freqs)
                c_kv, k_pe = mla.latent(x, freqs)
                # the mistakes' ingredients: before the head view, before the norms, before RoPE
                q_flat = mla.wq(x) if mla.q_lora_rank == 0 else mla.wq_b(mla.q_norm(mla.wq_a(x)))  # (B, S, H * 24)
                q_raw = q_flat.view(B, S, H, -1)
                q_nonorm = None if mla.q_lora_rank == 0 else mla.wq_b(mla.wq_a(x)).view(B, S, H, -1)
                kv_raw = mla.wkv_a(x)  # (B, S, d_c + d_r)
                c_raw, k_raw = kv_raw.split([dc, dr], dim=-1)
            got = _unpack(_call(fn, mla, x.clone(), freqs, label=label, hint=_mla_hint(mla)),
                          ("q_nope", "q_pe", "c_kv", "k_pe"))
            split_hint = (f"each head's {dh + dr} query columns are [q_nope ({dh}); q_pe ({dr})], in that order")
            g_nope = _expect_tensor(f"{label} q_nope", got[0], q_nope, "(B, S, H, qk_nope_head_dim)",
                                    {(B, S, H, dr): split_hint, (B, S, H * dh): "view it as (B, S, H, d_h)"})
            g_pe = _expect_tensor(f"{label} q_pe", got[1], q_pe, "(B, S, H, qk_rope_head_dim)",
                                  {(B, S, H, dh): split_hint})
            g_kv = _expect_tensor(f"{label} c_kv", got[2], c_kv, "(B, S, kv_lora_rank)",
                                  {(B, S, dr): "wkv_a's output is [c_kv (d_c); k_pe (d_r)], in that order"})
            g_k = _expect_tensor(f"{label} k_pe", got[3], k_pe, "(B, S, qk_rope_head_dim)", {
                (B, S, H, dr): "k_pe is ONE rotary key shared by all heads (eq. 3, the decoupled shared key), not "
                               "a key per head: that sharing is what keeps the cache at d_c + d_r per token",
                (B, S, 1, dr): "keep k_pe as (B, S, d_r): one key shared by all heads, without a head axis",
                (B, S, dc): "wkv_a's output is [c_kv (d_c); k_pe (d_r)], in that order"})
            tol = 1e-5
            no_qnorm = "you skipped q_norm: the query latent c_q is RMS-normalised between wq_a and wq_b (eq. 6-7)"
            per_head = (f"you split q before viewing it per head: view q as (B, S, H, d_h + d_r) first; {split_hint} "
                        f"(not [all heads' q_nope; all heads' q_pe])")
            kv_reversed = ("you split wkv_a's output the wrong way round: it is [c_kv (d_c); k_pe (d_r)], c_kv first")
            _diagnose(f"{label} q_nope", g_nope, q_nope, [
                (None if q_nonorm is None else q_nonorm[..., :dh], no_qnorm),
                (q_raw[..., dr:] if dr != dh else None, f"you split each head from the wrong end: {split_hint}"),
                (q_flat[..., : H * dh].view(B, S, H, dh), per_head),
            ], tol, tol)
            _diagnose(f"{label} q_pe", g_pe, q_pe, [
                (q_raw[..., dh:], "q_pe is not rotated: apply RoPE to it (eq. 8)"),
                (_half_split(q_raw[..., dh:], freqs), "q_pe is rotated with half-split pairs; use interleaved pairs "
                                                      "(rope.apply_rotary_emb)"),
                (None if q_nonorm is None else apply_rotary_emb(q_nonorm[..., dh:], freqs), no_qnorm),
                (apply_rotary_emb(q_raw[..., :dr], freqs), f"you split each head from the wrong end: {split_hint}"),
                (apply_rotary_emb(q_flat[..., H * dh:].reshape(B, S, H, dr), freqs), per_head)], tol, tol)
            _diagnose(f"{label} c_kv", g_kv, c_kv, [
                (c_raw, "c_kv is not normalised: apply mla.kv_norm to the latent (the cached c_kv is the normalised "
                        "one, as in the official code)"),
                (mla.kv_norm(kv_raw[..., dr:]), kv_reversed)], tol, tol)
            _diagnose(f"{label} k_pe", g_k, k_pe, [
                (k_raw, "k_pe is not rotated: apply RoPE to it (eq. 3)"),
                (_half_split(k_raw, freqs), "k_pe is rotated with half-split pairs; use interleaved pairs"),
                (apply_rotary_emb(kv_raw[..., :dr], freqs), kv_reversed)], tol, tol)
        return "q_nope, q_pe, c_kv and k_pe match MLA.queries / MLA.latent with and without query compression"

    return _run_check("mla_proj", body)


# ---------------------------------------------------------------------------------------------- 3. absorption
def _absorb_model(mla: MLA, x: torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor | None, *,
                  scale: float | None = None, rope: bool = True, softmax_dim: int = -1, mask_op: str = "add",
                  wkv_b: torch.Tensor | None = None, wo: bool = True, scale_after: bool = False) -> torch.Tensor:
    """Absorbed attention with the known mistakes as switches (all off: `MLA.forward(attn_impl="absorb")`): another
    softmax `scale`, no rotary term, the softmax over another axis of the scores (B, S, H, T), the mask multiplied
    ("mul") or added after the softmax ("after"), another (H * (d_h + d_v), d_c) `wkv_b` weight (a wrong slice or
    view of the real one), no output projection, the scale applied after the softmax."""
    H, dh, dv, dc = mla.n_heads, mla.qk_nope_head_dim, mla.v_head_dim, mla.kv_lora_rank
    with torch.no_grad():
        q_nope, q_pe = mla.queries(x, freqs)  # (B, S, H, d_h), (B, S, H, d_r)
        c_kv, k_pe = mla.latent(x, freqs)  # (B, T, d_c), (B, T, d_r)
        w = (mla.wkv_b.weight if wkv_b is None else wkv_b).view(H, dh + dv, dc)  # (H, d_h + d_v, d_c)
        scores = torch.einsum("bshc,btc->bsht", torch.einsum("bshd,hdc->bshc", q_nope, w[:, :dh]), c_kv)
        if rope:
            scores = scores + torch.einsum("bshr,btr->bsht", q_pe, k_pe)  # (B, S, H, T)
        s = mla.softmax_scale if scale is None else scale
        scores = scores if scale_after else scores * s
        if mask is not None and mask_op == "add":
            scores = scores + mask[:, None, :]  # (S, T) -> (S, 1, T)
        elif mask is not None and mask_op == "mul":
            scores = scores * mask[:, None, :]
        p = scores.softmax(dim=softmax_dim)
        if mask is not None and mask_op == "after":
            p = p + mask[:, None, :]
        p = p * s if scale_after else p
        o = torch.einsum("bshc,hdc->bshd", torch.einsum("bsht,btc->bshc", p, c_kv), w[:, dh:]).flatten(2)
        return mla.wo(o) if wo else o  # (B, S, dim) or (B, S, H * d_v)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in a (nested) tuple, list or dict of arguments or results."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class _LatentTracker(TorchFunctionMode):
    """While a student's function runs, follow where tensors come from through every torch call: "L" the normalised
    latent c_kv (kv_norm's output), "W" wkv_b's weight, "Q" the queries (the query projection's output). A call
    that combines a pure-L and a pure-W tensor with no query in it multiplies the latent by W_UK or W_UV, i.e.
    expands per-head keys or values; the absorbed path only ever meets the latent with query-derived tensors."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.origin: dict[int, tuple[torch.Tensor, frozenset[str]]] = {}
        self.expanded = False
        self.tag(weight, "W")

    def tag(self, t: torch.Tensor, tag: str) -> None:
        self.origin[id(t)] = (t, frozenset({tag}))

    def tags(self, t: torch.Tensor) -> frozenset[str]:
        entry = self.origin.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else frozenset()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tags = [self.tags(t) for t in _tensors((args, kwargs))]
        if {"L"} in tags and {"W"} in tags and not any("Q" in t for t in tags):
            self.expanded = True
        union = frozenset().union(*tags)
        if union:
            for t in _tensors(out):
                self.origin[id(t)] = (t, union)
        return out


@contextmanager
def _track_latent(mla: MLA) -> Iterator[tuple[_LatentTracker, list[bool]]]:
    """A _LatentTracker over `mla`, and a list that gets an entry whenever `mla.wkv_b` itself is called."""
    tracker, calls = _LatentTracker(mla.wkv_b.weight), []
    query = mla.wq if mla.q_lora_rank == 0 else mla.wq_b
    handles = [mla.kv_norm.register_forward_hook(lambda m, a, out: tracker.tag(out, "L")),
               query.register_forward_hook(lambda m, a, out: tracker.tag(out, "Q")),
               mla.wkv_b.register_forward_pre_hook(lambda m, a: calls.append(True))]
    try:
        with tracker:
            yield tracker, calls
    finally:
        for h in handles:
            h.remove()


def check_absorbed_attention(fn: Callable) -> CheckResult:
    """fn(mla, x, freqs_cis, mask) -> (B, S, dim): MLA's output computed in the latent space (W_UK folded into the
    query, W_UV into the output), never expanding per-head keys or values: neither `mla.wkv_b(...)` nor a product of
    the latent with `mla.wkv_b.weight` (use the weight's W_UK rows on the query, its W_UV rows after the softmax).
    YaRN is active, so the softmax scale includes mscale^2 (`mla.softmax_scale`).
    Reference: `MLA.forward(..., attn_impl="absorb")`."""

    def body() -> str:
        mla = _mla_module(3)
        H, dh, dv, dc = mla.n_heads, mla.qk_nope_head_dim, mla.v_head_dim, mla.kv_lora_rank
        weight = mla.wkv_b.weight.detach()
        per_head = weight.view(H, dh + dv, dc)
        no_w_uv = ("apply W_UV (the last d_v rows of each head of mla.wkv_b.weight) to the attended latent: mla.wo "
                   "takes the heads' outputs (B, S, H * d_v)")

        def hint(e: Exception) -> str:
            return (_none_hint("mask (a single token has none)")(e)
                    or (no_w_uv if f"x{H * dc} and" in str(e) and "cannot be multiplied" in str(e) else ""))
        for label, S, masked in [("prefill S=6 (causal mask)", 6, True), ("one token S=1 (no mask)", 1, False)]:
            x = torch.randn(2, S, 64, generator=_gen(4 + S))
            freqs = precompute_freqs_cis(ModelConfig(**_YARN_CFG))[:S]
            mask = causal_mask(S, 0) if masked else None
            with torch.no_grad():
                want = mla(x, freqs, mask, attn_impl="absorb")
            try:
                with _track_latent(mla) as (tracker, wkv_b_calls):
                    got = _call(fn, mla, x.clone(), freqs, mask, label=label, hint=hint)
            except _Fail as f:
                if masked and "NotImplementedError" not in f.message and _runs(fn, mla, x.clone(), freqs, None):
                    f.message += ("; it fails only when a mask is given: the mask is (S, T); add it to the scores "
                                  "(B, S, H, T) as mask[:, None, :] so that it broadcasts over the heads")
                raise
            if wkv_b_calls:
                raise _Fail(f"{label}: you called mla.wkv_b(...) on the latent, which expands per-head keys and values "
                            "(the naive path). Absorb instead: view mla.wkv_b.weight as (H, d_h + d_v, d_c), fold its "
                            "W_UK rows into q_nope and apply its W_UV rows after the softmax")
            if tracker.expanded:
                raise _Fail(f"{label}: you multiplied the latent c_kv by W_UK or W_UV (rows of mla.wkv_b.weight), "
                            "which expands per-head keys or values: the naive path without calling mla.wkv_b. Absorb "
                            "instead: fold W_UK into q_nope (q_nope W_UK is (B, S, H, d_c)), take the scores against "
                            "c_kv itself, and apply W_UV after the softmax")
            got = _expect_tensor(label, got, want, "(B, S, dim)", {(2, S, H * dc): no_w_uv})
            plain = mla.qk_head_dim ** -0.5

            def model(x: torch.Tensor = x, freqs: torch.Tensor = freqs, mask: torch.Tensor | None = mask,
                      **kw: Any) -> torch.Tensor:
                return _absorb_model(mla, x, freqs, mask, **kw)

            axes = {0: "the batch", 1: "the queries", 2: "the heads"}
            _diagnose(label, got, want, [
                (model(scale=plain), f"you used 1/sqrt(d_h + d_r) = {plain:.4f} as the softmax scale and forgot YaRN's "
                                     f"mscale^2: use mla.softmax_scale = {mla.softmax_scale:.4f} "
                                     "(ModelConfig.softmax_scale)"),
                (model(scale=1.0), "you forgot the softmax scale: multiply the scores by mla.softmax_scale"),
                (model(scale=1.0 / mla.softmax_scale), "you divided the scores by mla.softmax_scale; multiply instead"),
                (_absorb_model(mla, x, freqs, None) if masked else None,
                 "you ignored the causal mask: add it to the scores before the softmax"),
                (model(rope=False), "you dropped the rotary term q_pe . k_pe from the scores: they are "
                                    "(q_nope W_UK) . c_kv + q_pe . k_pe (eq. 10), then scaled"),
                *[(model(softmax_dim=d) if S > 1 or d != 1 else None,
                   f"you took the softmax over {name} (axis {d} of the scores (B, S, H, T)); take it over the keys, "
                   "the last axis T") for d, name in axes.items()],
                (model(mask_op="mul") if masked else None,
                 "you multiplied the scores by the mask; the mask is additive (0 where allowed, -inf where masked): "
                 "add it to the scores before the softmax"),
                (model(mask_op="after") if masked else None,
                 "you added the mask after the softmax; add it to the scores before the softmax, so that masked keys "
                 "get probability 0"),
                (model(scale_after=True), "you applied the softmax scale after the softmax; multiply the scores by "
                                          "mla.softmax_scale before it"),
                (model(wo=False), "you forgot the output projection: return mla.wo(o), o the heads' outputs flattened "
                                  "to (B, S, H * d_v)"),
                (model(wkv_b=torch.cat([per_head[:, -dh:], per_head[:, :dv]], 1).reshape(weight.shape)),
                 "W_UK and W_UV are swapped: per head, mla.wkv_b.weight's rows are [W_UK (d_h); W_UV (d_v)], W_UK "
                 "first"),
                (model(wkv_b=weight.view(H, dc, dh + dv).transpose(1, 2).reshape(weight.shape)),
                 "view mla.wkv_b.weight as (H, d_h + d_v, d_c) (rows are the H * (d_h + d_v) outputs, columns the d_c "
                 "latent dims), not (H, d_c, d_h + d_v)"),
                (model(wkv_b=weight.view(dh + dv, H, dc).transpose(0, 1).reshape(weight.shape)),
                 "mla.wkv_b.weight's rows are grouped by head (head 0's d_h + d_v rows first): view it as "
                 "(H, d_h + d_v, d_c), not (d_h + d_v, H, d_c)"),
            ], 1e-5, 1e-4, nonfinite_hint="a softmax over a row that is entirely -inf gives NaN: add the mask to the "
                                          "scores (B, S, H, T) and take the softmax over the keys (the last axis, "
                                          "where the causal mask always leaves the diagonal)")
        return "absorbed attention matches MLA.forward(attn_impl='absorb') without expanding keys or values"

    return _run_check("absorb", body)


# ---------------------------------------------------------------------------------------------- 4. the gate
_ROUTE_STEPS = {"scores": (1, "scores"), "bias": (2, "biased scores"), "groups": (3, "group scores"),
                "keep": (4, "kept groups"), "topk": (5, "top-k"), "source": (6, "weights"), "norm": (6, "weights"),
                "scale": (6, "weights")}


@dataclass(frozen=True)
class _Route:
    """One way to route, step by step as `Gate.forward` does it; each field is a step's choice and "ref" the
    reference's own. Selection: scores (ref | other: sigmoid <-> softmax | logits | tokens: softmax over the tokens),
    bias (ref: s + b | ignore | subtract), groups (ref: V3 top-2 sum, V2 max | other | sum: all experts | strided:
    every G-th expert | none), keep (ref | inverted: the dropped groups kept), topk (ref: by s + b | unbiased: by s).
    Weights: source (ref: s | biased | logits), norm (ref: sigmoid renormalised, softmax not | flipped | softmax over
    the chosen), scale (ref | missing)."""

    scores: str = "ref"
    bias: str = "ref"
    groups: str = "ref"
    keep: str = "ref"
    topk: str = "ref"
    source: str = "ref"
    norm: str = "ref"
    scale: str = "ref"

    def mistakes(self) -> list[tuple[str, str]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) != "ref"]


_SELECTION = ("scores", "bias", "groups", "keep", "topk")
_WEIGHTING = ("source", "norm", "scale")


def _route_options(gate: Gate) -> dict[str, tuple[str, ...]]:
    """Each step's choices that make sense for this gate (no bias: no bias choices; no groups: no group choices)."""
    biased, grouped = gate.bias is not None, gate.n_groups > 1
    return {"scores": ("ref", "other", "logits", "tokens"),
            "bias": ("ref", "ignore", "subtract") if biased else ("ref",),
            "groups": ("ref", "other", "sum", "strided", "none") if grouped else ("ref",),
            "keep": ("ref", "inverted") if grouped else ("ref",),
            "topk": ("ref", "unbiased") if biased else ("ref",),
            "source": ("ref", "biased", "logits") if biased else ("ref", "logits"),
            "norm": ("ref", "flipped", "softmax"), "scale": ("ref", "missing")}


def _variants(gate: Gate, steps: tuple[str, ...], **fixed: str) -> list[_Route]:
    """Every combination of the choices of `steps` (the others as in `fixed`, else "ref"), fewest mistakes first,
    then earliest step first."""
    options = _route_options(gate)
    routes = [_Route(**fixed, **dict(zip(steps, combo, strict=True)))
              for combo in itertools.product(*(options[s] for s in steps))]
    routes = [r for r in routes if not (r.groups == "none" and r.keep != "ref")]  # no groups: nothing to keep
    order = {name: i for i, name in enumerate(_ROUTE_STEPS)}
    return sorted(routes, key=lambda r: (len(r.mistakes()), [(order[k], options[k].index(v))
                                                             for k, v in r.mistakes()]))


def _route_select(gate: Gate, logits: torch.Tensor, r: _Route) -> dict[str, torch.Tensor]:
    """Steps 1-5 of route `r`: affinities s (N, E), biased scores, group scores (N, G), kept groups (N, topk_groups)
    and the chosen experts (N, K) (groups and kept are None without groups)."""
    N, E = logits.shape
    func = gate.score_func if r.scores == "ref" else {"sigmoid": "softmax", "softmax": "sigmoid"}[gate.score_func]
    if r.scores in ("logits", "tokens"):
        s = logits if r.scores == "logits" else logits.softmax(dim=0)
    else:
        s = logits.sigmoid() if func == "sigmoid" else logits.softmax(dim=-1)  # (N, E)
    b = gate.bias
    biased = s if b is None or r.bias == "ignore" else s - b if r.bias == "subtract" else s + b
    choose = s if r.topk == "unbiased" else biased
    out = {"s": s, "biased": biased, "logits": logits, "group_scores": None, "kept": None}
    if gate.n_groups > 1 and r.groups != "none":
        G = gate.n_groups
        order = torch.arange(E).view(E // G, G).T.flatten() if r.groups == "strided" else torch.arange(E)
        grouped = biased[:, order].view(N, G, E // G)  # (N, G, E/G)
        k = {"other": 3 - gate.group_topk, "sum": E // G}.get(r.groups, gate.group_topk)
        out["group_scores"] = grouped.topk(k, dim=-1).values.sum(dim=-1)  # (N, G)
        out["kept"] = out["group_scores"].topk(gate.topk_groups, dim=-1).indices  # (N, topk_groups)
        drop = torch.ones(N, G, dtype=torch.bool).scatter_(1, out["kept"], False)
        drop = ~drop if r.keep == "inverted" else drop
        choose = choose.masked_fill(drop.repeat_interleave(E // G, dim=1)[:, order.argsort()], float("-inf"))
    out["indices"] = choose.topk(gate.topk, dim=-1).indices  # (N, K)
    return out


def _route_weights(gate: Gate, r: _Route, steps: dict[str, torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
    """Step 6 of route `r` for the experts `indices` (N, K)."""
    w = steps[{"ref": "s", "biased": "biased", "logits": "logits"}[r.source]].gather(1, indices)
    if r.norm == "softmax":
        w = w.softmax(dim=-1)
    elif (gate.score_func == "sigmoid") != (r.norm == "flipped"):
        w = w / w.sum(dim=-1, keepdim=True)  # eq. 13
    return w if r.scale == "missing" else w * gate.route_scale


def _route_message(gate: Gate, step: str, choice: str) -> str:
    fn, v3 = gate.score_func, gate.bias is not None
    other = {"sigmoid": "softmax", "softmax": "sigmoid"}[fn]
    E, G, tg, K = gate.weight.shape[0], gate.n_groups, gate.topk_groups, gate.topk
    group_rule = "the sum of its top-2 biased affinities (V3)" if v3 else "its best affinity (V2)"
    return {
        ("scores", "other"): f"the affinities use {other}, but this gate's score_func is {fn!r} (V3: sigmoid, "
                             "V2: softmax)",
        ("scores", "logits"): f"you routed on the raw logits x W^T: apply the score function ({fn}) first",
        ("scores", "tokens"): "you took the softmax over the tokens (dim 0); "
                              + ("take it over the experts (the last dim)" if fn == "softmax"
                                 else "this gate's score_func is 'sigmoid', applied elementwise"),
        ("bias", "ignore"): "you ignored the bias when choosing experts: select by s_{i,t} + b_i (eq. 16), while "
                            "the weights use s_{i,t}",
        ("bias", "subtract"): "you subtracted the bias: the choice uses s_{i,t} + b_i (eq. 16), so that an "
                              "underloaded expert's rising bias makes it more attractive",
        ("groups", "other"): ("a group's score is the sum of its top-2 biased affinities in V3, not its best one "
                              "(that is V2's softmax rule)") if v3 else
                             ("a softmax (V2) gate scores a group by its best affinity (the max), not by the sum of "
                              "its top two (V3's rule)"),
        ("groups", "sum"): f"a group's score is {group_rule}, not of all its experts",
        ("groups", "strided"): f"the groups are contiguous blocks of E / n_groups = {E // G} experts (view the scores "
                               f"as (N, {G}, {E // G})); you grouped every {G}-th expert together",
        ("groups", "none"): f"you ignored the expert groups (or took the top-k before masking the dropped groups): "
                            f"keep only the top-{tg} of {G} groups, then choose top-{K} experts inside them",
        ("keep", "inverted"): f"you masked the kept groups instead of the dropped ones: the experts of the {G - tg} "
                              f"groups outside the top-{tg} get -inf",
        ("topk", "unbiased"): "you chose the experts inside the kept groups by s_{i,t}; the bias takes part in the "
                              "top-k too (s_{i,t} + b_i, eq. 16)",
        ("source", "biased"): "the bias leaked into the weights: b_i only chooses the experts (eq. 16); the weights "
                              "come from the unbiased affinities s_{i,t}",
        ("source", "logits"): "the weights come from the raw logits x W^T; apply the score function (sigmoid / "
                              "softmax) first",
        ("norm", "flipped"): ("sigmoid weights must be renormalised over the chosen experts (divide by their sum, "
                              "eq. 13) before route_scale") if fn == "sigmoid" else
                             ("softmax (V2) weights are not renormalised over the chosen experts (the official code "
                              "renormalises only sigmoid scores)"),
        ("norm", "softmax"): "you took a softmax over the chosen experts' scores (Mixtral style); "
                             + ("divide the chosen sigmoid affinities by their sum instead (eq. 13)" if fn == "sigmoid"
                                else "V2 uses the chosen experts' softmax affinities as they are"),
        ("scale", "missing"): f"you forgot route_scale: multiply the weights by gate.route_scale = {gate.route_scale}",
    }[(step, choice)]


def _route_diagnosis(gate: Gate, r: _Route) -> str:
    """The first step that differs in route r, then the later ones."""
    parts = [f"step {_ROUTE_STEPS[k][0]} ({_ROUTE_STEPS[k][1]}): {_route_message(gate, k, v)}" for k, v in r.mistakes()]
    return f"the first step that differs is {parts[0]}" + ("; then also " + "; ".join(parts[1:]) if parts[1:] else "")


def _weights_route(gate: Gate, r: _Route, steps: dict[str, torch.Tensor], got_w: torch.Tensor,
                   got_i: torch.Tensor) -> _Route | None:
    """The route (r's selection, some weighting) whose weights for the student's experts are the student's."""
    for w in _variants(gate, _WEIGHTING, **{k: getattr(r, k) for k in _SELECTION}):
        if _close(got_w, _route_weights(gate, w, steps, got_i), 1e-5, 1e-5):
            return w
    return None


def _diagnose_selection(label: str, gate: Gate, logits: torch.Tensor, got_w: torch.Tensor, got_i: torch.Tensor,
                        ref: dict[str, torch.Tensor]) -> None:
    """Different expert sets: the route with the fewest mistakes whose selection is the student's names the first
    step that differs (and the later ones, the weights included); without one, locate the step from the groups."""
    got_set = got_i.sort(dim=-1).values
    for r in _variants(gate, _SELECTION)[1:]:
        steps = _route_select(gate, logits, r)
        if torch.equal(got_set, steps["indices"].sort(dim=-1).values):
            full = _weights_route(gate, r, steps, got_w, got_i)
            extra = "" if full is not None else "; and the weights differ beyond that"
            raise _Fail(f"{label}: {_route_diagnosis(gate, full or r)}{extra}")
    want_i = ref["indices"]
    rows = (got_set != want_i.sort(dim=-1).values).any(dim=-1)
    t = int(rows.nonzero()[0])
    where = ""
    if ref["kept"] is not None:
        per = gate.weight.shape[0] // gate.n_groups
        groups, kept = sorted(set((got_i[t] // per).tolist())), sorted(ref["kept"][t].tolist())
        if len(groups) > gate.topk_groups:
            where = (f"token {t}'s experts come from {len(groups)} groups {groups}, but only the top-{gate.topk_groups}"
                     " groups may be used: the first step that differs is step 4 (kept groups) or before")
        elif not set(groups) <= set(kept):
            scores = [round(v, 4) for v in ref["group_scores"][t].tolist()]
            where = (f"token {t}'s experts come from groups {groups}, the kept groups are {kept} (group scores "
                     f"{scores}): the first step that differs is step 3 (group scores) or before")
        else:
            where = (f"token {t}'s experts lie in the kept groups {kept}, so steps 1-4 agree there: the first step "
                     f"that differs is step 5 (top-k): choose the top-{gate.topk} by s_{{i,t}} + b_i inside them")
    raise _Fail(f"{label}: {where + '; ' if where else ''}{int(rows.sum())} of {len(rows)} tokens chose different "
                f"experts; first token {t}: got {sorted(got_i[t].tolist())}, expected {sorted(want_i[t].tolist())}",
                index=(t,))


def _gate_cases() -> list[tuple[str, Gate, torch.Tensor]]:
    """(label, gate, x): a V3 sigmoid gate with groups and a non-zero bias, and a V2 softmax gate with groups."""
    v3 = ModelConfig(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=4,
                     score_func="sigmoid", route_scale=2.5)
    v2 = ModelConfig(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3,
                     score_func="softmax", route_scale=2.0)
    gate_v3 = _build(lambda: Gate(v3), 5, gain=2.0)
    gate_v3.bias.copy_(0.3 * torch.rand(16, generator=_gen(6)))  # large enough to change the choice
    gate_v2 = _build(lambda: Gate(v2), 7, gain=2.0)
    return [("V3 sigmoid gate (16 experts, 4 groups, top-2 groups, top-4, bias)", gate_v3,
             torch.randn(32, 64, generator=_gen(8))),
            ("V2 softmax gate (16 experts, 4 groups, top-2 groups, top-3)", gate_v2,
             torch.randn(32, 64, generator=_gen(9)))]


def check_gate(fn: Callable) -> CheckResult:
    """fn(gate, x) -> (weights (N, K) float32, indices (N, K) int64) for x (N, dim), from a `Gate`'s weight, bias,
    score_func, n_groups, topk_groups, topk and route_scale; indices in descending order of the (biased) score, as
    torch.topk returns them. Reference: `Gate.forward`. A wrong answer is compared with routes that differ from the
    reference in one or more steps (`_Route`): the diagnosis names the first step that differs, then the others."""

    def body() -> str:
        for label, gate, x in _gate_cases():
            with torch.no_grad():
                ref = gate(x)
                logits = F.linear(x.float(), gate.weight.float())  # (N, E)
                steps = _route_select(gate, logits, _Route())
            want_w, want_i = ref.weights, ref.indices
            N, K = want_i.shape
            got_w, got_i = _unpack(_call(fn, gate, x.clone(), label=label, hint=_none_hint("gate.bias (a V2 gate)")),
                                   ("weights", "indices"))
            if isinstance(got_i, torch.Tensor) and got_i.is_floating_point():
                raise _Fail(f"{label}: indices have dtype {got_i.dtype}: return the expert indices (int64, as "
                            "torch.topk(...).indices), and the weights as the first element")
            got_i = _expect_tensor(f"{label} indices", got_i, want_i, "(N, topk)",
                                   {(N, gate.weight.shape[0]): "return only the chosen topk experts per token"})
            got_w = _expect_tensor(f"{label} weights", got_w, want_w, "(N, topk)")
            if not torch.equal(got_i.sort(dim=-1).values, want_i.sort(dim=-1).values):
                _diagnose_selection(label, gate, logits, got_w, got_i, steps)
            if not torch.equal(got_i, want_i):
                # same set per token: are the weights attached to the right experts?
                order_g, order_w = got_i.argsort(dim=-1), want_i.argsort(dim=-1)
                if _close(got_w.gather(1, order_g), want_w.gather(1, order_w), 1e-5, 1e-5):
                    t = int((got_i != want_i).any(dim=-1).nonzero()[0])
                    raise _Fail(f"{label}: the same experts with the same weights, in a different order (token {t}: "
                                f"{got_i[t].tolist()}, expected {want_i[t].tolist()}): list them in descending order "
                                "of the biased score, as torch.topk does")
                raise _Fail(f"{label}: the right experts, but the indices are not in topk order and the weights do not "
                            "follow them: keep weights[t, k] the weight of expert indices[t, k]")
            if _close(got_w, want_w, 1e-5, 1e-5):
                continue
            # the right experts: another score function may still choose them (V2 without a bias ranks by the
            # logits alone), so the weights are compared with every score choice that gives the same selection
            routes = []
            for r in _variants(gate, ("scores",)):
                chosen = _route_select(gate, logits, r)
                if torch.equal(chosen["indices"].sort(dim=-1).values, want_i.sort(dim=-1).values):
                    w = _weights_route(gate, r, chosen, got_w, got_i)
                    routes += [] if w is None else [w]
            if routes:
                r = min(routes, key=lambda r: len(r.mistakes()))
                if r.scores != "ref":
                    raise _Fail(f"{label}: {_route_diagnosis(gate, r)}")
                messages = [_route_message(gate, k, v) for k, v in r.mistakes()]
                raise _Fail(f"{label} weights: " + "; then also ".join(messages))
            sums = got_w.sum(dim=-1)
            note = (f"the experts are right (steps 1-5) but token 0's weights sum to {float(sums[0]):.4g}, expected "
                    f"route_scale = {gate.route_scale} (renormalise, then scale)"
                    if gate.score_func == "sigmoid" and not torch.allclose(sums, want_w.sum(dim=-1), atol=1e-4)
                    else "the experts are right (steps 1-5): the first step that differs is step 6 (weights)")
            raise _max_error(got_w, want_w, 1e-5, 1e-5, f"{label} weights", note)
        return "expert indices (in topk order) and weights match Gate.forward for a V3 and a V2 gate"

    return _run_check("gate", body)


# ---------------------------------------------------------------------------------------------- 5. the bias update
def check_bias_update(fn: Callable) -> CheckResult:
    """fn(bias (E,) float32, load (E,) int64 token counts, gamma) -> the updated bias (E,) float32 (or None after
    updating `bias` in place): one step of the sign rule b_i += gamma * sign(mean(load) - load_i) (report §2.1.2).
    Reference: `balance.update_bias(..., rule="sign")`."""

    def int_hint(e: Exception) -> str:  # torch cannot average int64 counts
        return ("the loads are int64 token counts: convert them with load.float() first"
                if "dtype" in str(e) or "Long" in str(e) else "")

    def body() -> str:
        gen = _gen(10)
        cases = [("8 experts, 3 exactly at the mean load", torch.tensor([10, 2, 5, 5, 9, 1, 5, 3]), 1e-3),
                 ("16 experts, random loads", torch.randint(0, 40, (16,), generator=gen), 0.01)]
        for label, load, gamma in cases:
            bias0 = 0.1 * torch.randn(load.numel(), generator=gen)
            want = bias0.clone()
            balance.update_bias(want, load, gamma, "sign")
            arg = bias0.clone()
            got = _call(fn, arg, load.clone(), gamma, label=label, hint=int_hint)
            got = arg if got is None else got
            got = _expect_tensor(label, got, want, "(E,)", dtype_hint="keep the bias in float32")
            direction = torch.round((want - bias0) / gamma)  # the reference's sign(e_i): +1, -1 or 0
            step = gamma * direction
            loads = load.float()
            mean = loads.mean()
            prop = bias0.clone()
            balance.update_bias(prop, load, gamma, "proportional")
            at_mean = loads == mean
            _diagnose(label, got, want, [
                (bias0 - step, "the sign is inverted: an overloaded expert (load above the mean) must get a LOWER bias "
                               "(b_i += gamma * sign(mean - load_i)), or routing collapses onto it"),
                (step, "you returned the change, not the updated bias: return bias + gamma * sign(...)"),
                (bias0 + direction, "you forgot gamma: the step is gamma * sign(e_i), not sign(e_i)"),
                (prop, "that is the proportional variant (gamma * e_i / mean); this exercise asks for the paper's "
                       "sign rule"),
                (bias0 + gamma * (mean - loads), "the step must be gamma * sign(e_i), not gamma * e_i"),
                (torch.where(loads > mean, bias0 - gamma, bias0 + gamma) if at_mean.any() else None,
                 "experts exactly at the mean load must keep their bias (sign(0) = 0): use torch.sign, not a "
                 "two-way choice"),
                (bias0, "the bias did not change: return the updated bias, or update `bias` in place (bias += ... or "
                        "bias.add_(...)) and return None"),
                (bias0 + 2 * step, "you applied the step twice: you updated `bias` in place and returned bias + step "
                                   "as well; do one or the other"),
                (bias0 + gamma * (loads.sum() - loads).sign(), "you compared each load with the total; compare it "
                                                               "with the mean load: e_i = mean(load) - load_i"),
            ], 1e-7, 1e-6)
        return "the sign rule matches balance.update_bias (including experts exactly at the mean)"

    return _run_check("bias_update", body)


# ---------------------------------------------------------------------------------------------- 6. the MTP combine
def check_mtp_combine(fn: Callable) -> CheckResult:
    """fn(mtp, h_prev, emb) -> (B, S, dim) = mtp.eh_proj(cat[mtp.enorm(emb), mtp.hnorm(h_prev)]): the input of the
    MTP module's block (eq. 21, in the checkpoint's order: embedding first). Reference: `MTPModule.forward`, whose
    block input is captured."""

    def body() -> str:
        cfg = ModelConfig()
        mtp = _build(lambda: MTPModule(cfg, cfg.n_layers), 11)
        B, S = 2, 5
        gen = _gen(12)
        h_prev, emb = torch.randn(B, S, cfg.dim, generator=gen), 0.02 * torch.randn(B, S, cfg.dim, generator=gen)
        captured: list[torch.Tensor] = []
        handle = mtp.block.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        try:
            with torch.no_grad():
                mtp(h_prev, emb, precompute_freqs_cis(cfg)[:S], causal_mask(S, 0))
        finally:
            handle.remove()
        want = captured[0]

        def hint(e: Exception) -> str:
            return (f"eh_proj maps 2 * dim = {2 * cfg.dim} features to dim: concatenate [enorm(emb); hnorm(h_prev)] "
                    "along the last axis (dim=-1); do not add them or join them along the tokens"
                    if "cannot be multiplied" in str(e) else "")

        got = _expect_tensor("h'", _call(fn, mtp, h_prev.clone(), emb.clone(), label="h'", hint=hint), want,
                             "(B, S, dim)", {(B, S, 2 * cfg.dim): "project the concatenation back to dim with "
                                                                  "mtp.eh_proj"})
        cat = torch.cat
        with torch.no_grad():
            _diagnose("h'", got, want, [
                (mtp.eh_proj(cat([mtp.hnorm(h_prev), mtp.enorm(emb)], -1)),
                 "the concatenation order is reversed: the checkpoint's eh_proj takes [enorm(emb); hnorm(h_prev)], "
                 "embedding first (the report's eq. 21 writes [h; emb], the released weights do not)"),
                (mtp.eh_proj(cat([mtp.hnorm(emb), mtp.enorm(h_prev)], -1)),
                 "the norms are swapped: enorm normalises the embedding, hnorm the previous hidden state"),
                (mtp.eh_proj(cat([emb, h_prev], -1)),
                 "you forgot the RMSNorms: normalise the embedding with enorm and h_prev with hnorm before "
                 "concatenating"),
                (mtp.eh_proj(cat([h_prev, emb], -1)), "no RMSNorms and the order reversed: eh_proj takes "
                                                      "[enorm(emb); hnorm(h_prev)]"),
                (mtp.eh_proj(cat([emb, mtp.hnorm(h_prev)], -1)),
                 "you forgot enorm: normalise the embedding with mtp.enorm before concatenating"),
                (mtp.eh_proj(cat([mtp.enorm(emb), h_prev], -1)),
                 "you forgot hnorm: normalise h_prev with mtp.hnorm before concatenating"),
                (want + h_prev, "you added a residual (h_prev): h' is eh_proj's output alone (the block adds its own "
                                "residuals)"),
                (mtp(h_prev, emb, precompute_freqs_cis(cfg)[:S], causal_mask(S, 0)),
                 "that is the whole module's output (block and norm); return only the combined input h'"),
            ], 1e-5, 1e-5)
        return "h' = eh_proj([enorm(emb); hnorm(h_prev)]) matches the MTP module's block input"

    return _run_check("mtp_combine", body)


# ---------------------------------------------------------------------------------------------- 7. FP8 1x128 tiles
def _fp8_cases() -> list[tuple[str, torch.Tensor]]:
    gen = _gen(13)
    a = torch.randn(4, 384, generator=gen)
    a[:, 7] *= 60.0  # an outlier channel: only its own tiles get a large scale
    a[1, 128:256] = 0.0  # an all-zero tile
    b = torch.randn(2, 3, 200, generator=gen) * 0.01  # leading dims, ragged last tile (200 = 128 + 72)
    return [("x (4, 384) with an outlier channel and an all-zero tile", a),
            ("x (2, 3, 200): leading dims, ragged last tile", b)]


_E4M3_GRID = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
_E4M3_GRID = _E4M3_GRID[torch.isfinite(_E4M3_GRID)].unique()  # the 253 finite values, ascending, one zero
_FP8_MAXES = {127.0: " (INT8's largest value)", 240.0: " (E4M3FNUZ's largest value)",
              57344.0: " (E5M2's largest value)"}


def _per_element(scale: torch.Tensor, cols: int) -> torch.Tensor:
    """(..., n_tiles) scales -> (..., cols): each element's tile scale."""
    return scale.repeat_interleave(128, dim=-1)[..., :cols]


def _code_step(q: torch.Tensor, step: int) -> torch.Tensor:
    """Each E4M3 code moved `step` codes in magnitude (the sign kept, within 0 .. 448), as float32."""
    bits = q.view(torch.uint8).int()
    magnitude = ((bits & 0x7F) + step).clamp(0, 0x7E)
    return ((bits & 0x80) | magnitude).to(torch.uint8).view(torch.float8_e4m3fn).float()


def _check_codes(label: str, x: torch.Tensor, got_q: torch.Tensor, want_q: torch.Tensor, scale: torch.Tensor) -> None:
    """The codes must be round-to-nearest-even E4M3 of x / scale exactly. Only where x / scale lies within 2^-19
    (relative) of a rounding boundary may they take the other neighbour: x * (1 / scale) differs from x / scale by
    a float32 ulp. Known rounding mistakes are named, with the quantisation error they cost."""
    s = _per_element(scale, x.shape[-1])
    v = (x.float() / s).clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX)  # what gets rounded
    got, want = got_q.float(), want_q.float()
    e4m3 = torch.float8_e4m3fn
    near = (v * (1 - 2.0**-19)).to(e4m3).float() != (v * (1 + 2.0**-19)).to(e4m3).float()  # at a rounding boundary
    ok = (got == want) | near
    if ok.all():
        return
    lo = _E4M3_GRID[torch.searchsorted(_E4M3_GRID, v, right=True) - 1]  # largest grid value <= v
    hi = _E4M3_GRID[torch.searchsorted(_E4M3_GRID, v)]  # smallest grid value >= v
    rne = "E4M3 codes are round-to-nearest-even of x / scale (the cast .to(torch.float8_e4m3fn) rounds so)"
    mistakes = [
        (torch.where(v >= 0, lo, hi), f"your codes round toward zero (truncation); {rne}"),
        (torch.where(v >= 0, hi, lo), f"your codes round away from zero; {rne}"),
        (lo, f"your codes round down (toward -inf); {rne}"),
        (hi, f"your codes round up (toward +inf); {rne}"),
        (_code_step(want_q, 1), f"every code is one E4M3 step larger in magnitude than round-to-nearest-even; {rne}"),
        (_code_step(want_q, -1), f"every code is one E4M3 step smaller in magnitude than round-to-nearest-even; {rne}"),
        (v.to(torch.float8_e5m2).float().to(torch.float8_e4m3fn).float(),
         "your codes lie on the E5M2 grid (2 mantissa bits), then cast to E4M3: round x / scale to E4M3 directly"),
        (v.bfloat16().float().to(torch.float8_e4m3fn).float(),
         "you rounded x / scale to bfloat16 first, then to E4M3 (double rounding): cast the float32 value directly"),
        ((x.float() * s).clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX).to(torch.float8_e4m3fn).float(),
         "you multiplied x by the scale: q = x / scale (the scale is the dequantisation multiplier)"),
    ]
    err = (x.float() - got * s).abs().mean() / (x.float() - want * s).abs().mean()
    cost = f" ({float(err):.2f}x the mean quantisation error of round-to-nearest)"
    for model, message in mistakes:
        if bool(((got == model) | near).all()):
            raise _Fail(f"{label} q: {message}{cost}")
    index = _first(~ok)
    raise _Fail(f"{label} q: {int((~ok).sum())} of {got.numel()} codes differ from round-to-nearest-even E4M3 (the "
                f"codes must match exactly); first at index {index}: got {float(got[index]):g}, expected "
                f"{float(want[index]):g} for x / scale = {float(v[index]):.6g}{cost}", index=index)


def _scale_ratio_note(got_s: torch.Tensor, want_s: torch.Tensor) -> str:
    """A scale off by one constant factor: which maximum the student divided the amax by."""
    ratio = got_s.double() / want_s.double()
    if not torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-5):
        return ""
    fmax = fp8.E4M3_MAX / float(ratio.flatten()[0])
    name = next((n for m, n in _FP8_MAXES.items() if math.isclose(fmax, m, rel_tol=1e-4)), "")
    return f"you divide the amax by {fmax:.6g}{name}; divide it by 448, E4M3's largest value"


def check_fp8_tile_quant(fn: Callable) -> CheckResult:
    """fn(x) -> (q, scale): x (..., cols) float32 -> q float8_e4m3fn of x's shape and scale float32
    (..., ceil(cols / 128)), one per row per 128 columns: scale = max(amax, 1e-4) / 448 (the dequantisation
    multiplier), q = cast(clamp(x / scale, -448, 448)), rounded to nearest even: the codes must be exact.
    Reference: `fp8.quantize(x, "1x128")`."""

    def hint(e: Exception) -> str:
        return ("arithmetic on float8 tensors is not implemented on the CPU: compute in float32 and cast to "
                "float8_e4m3fn at the end" if "Float8" in str(e) else "")

    def body() -> str:
        for label, x in _fp8_cases():
            want_q, want_s = fp8.quantize(x, "1x128")
            got_q, got_s = _unpack(_call(fn, x.clone(), label=label, hint=hint), ("q", "scale"))
            x2 = x.reshape(-1, x.shape[-1])
            rows, cols = x2.shape
            if isinstance(got_q, torch.Tensor) and got_q.dtype != torch.float8_e4m3fn:
                fmt = ("E5M2: DeepSeek-V3 uses E4M3 for every tensor (report §3.3.2)"
                       if got_q.dtype == torch.float8_e5m2 else "cast q with .to(torch.float8_e4m3fn)")
                raise _Fail(f"{label}: q has dtype {got_q.dtype}, expected torch.float8_e4m3fn: {fmt}")
            lead, tiles = tuple(x.shape[:-1]), math.ceil(cols / 128)
            got_q = _expect_tensor(f"{label} q", got_q, want_q, "x's shape", {
                (*lead, tiles * 128): "crop the zero padding of the last tile: q has x's shape"})
            per_tensor = "one scale for the whole tensor is per-tensor scaling; 1x128 tiles need one per row per 128 " \
                         "columns"
            per_row = "one scale per row is per-row scaling; 1x128 tiles need one per 128 columns"
            one_by_64 = "that is 1x64 tiles: a tile is 1x128, one scale per row per 128 columns"
            hints = {(): per_tensor, (1,): per_tensor, (*lead, 1): per_row, (*lead,): per_row,
                     (*lead, math.ceil(cols / 64)): one_by_64, (rows, math.ceil(cols / 64)): one_by_64,
                     (math.ceil(rows / 128), tiles): "that is one scale per 128x128 block (the weights' "
                                                     "granularity); activations use 1x128 tiles: one scale per row "
                                                     "per 128 columns",
                     (*lead, cols // 128): "the last, partial tile needs a scale too: ceil(cols / 128) tiles per row "
                                           "(pad with zeros to find its amax)",
                     (math.ceil(rows / 128), cols): "tiles run along the rows (128x1); 1x128 tiles run along the "
                                                    "channels (the last dim)",
                     (rows, tiles): "keep x's leading dims: scale has shape (*x.shape[:-1], ceil(cols / 128))"}
            got_s = _expect_tensor(f"{label} scale", got_s, want_s, "(*x.shape[:-1], ceil(cols / 128))", hints,
                                   dtype_hint="scales are float32")
            if torch.isnan(got_q.float()).any():
                zero_tile = torch.isnan(got_q.float()) & (x == 0)
                extra = (": an all-zero tile has amax 0, so scale 0 and 0 / 0 = NaN; floor the amax at 1e-4 as the "
                         "official act_quant does" if zero_tile.any() else "")
                index = _first(torch.isnan(got_q.float()))
                raise _Fail(f"{label} q: NaN at index {index} where x is finite{extra}", math.inf, index)
            row_amax = x2.abs().amax(dim=-1, keepdim=True).clamp(min=fp8.AMAX_FLOOR)  # (rows, 1)
            block = fp8.quantize(x2, "128x128")[1].repeat_interleave(128, dim=0)[:rows]  # (rows, tiles)
            _diagnose(f"{label} scale", got_s, want_s, [
                (1.0 / want_s, "the scale is inverted: store the dequantisation multiplier amax / 448 (the "
                               "checkpoint's weight_scale_inv), and quantise with x / scale"),
                (want_s * fp8.E4M3_MAX, "the scale is the tile's amax; divide it by 448 (E4M3's largest value)"),
                (fp8.quantize(x, "1x128", scale_fmt="ue8m0")[1], "you rounded the scales up to powers of two (UE8M0, "
                                                                 "DeepSeek-V3.1); this exercise wants amax / 448"),
                (fp8.quantize(x, "1x128", amax_floor=1e-12)[1], "the all-zero tile's scale differs: floor the amax "
                                                                "at 1e-4 (max(amax, 1e-4) / 448), as the official "
                                                                "act_quant"),
                (torch.full_like(want_s, float(row_amax.max()) / fp8.E4M3_MAX),
                 "every tile has the same scale, the whole tensor's: that is per-tensor scaling; 1x128 tiles need "
                 "one scale per row per 128 columns"),
                ((row_amax / fp8.E4M3_MAX).expand(rows, tiles).reshape(want_s.shape),
                 "every tile of a row has the row's scale: that is per-row scaling; 1x128 tiles need one scale per "
                 "128 columns"),
                (block.reshape(want_s.shape), "your scales are those of 128x128 blocks (the weights' granularity) "
                                              "repeated over their rows; activations use 1x128 tiles: one scale per "
                                              "row per 128 columns"),
                (fp8.quantize(x.clamp(min=0), "1x128")[1], "the amax is the largest |x| of the tile (max |x|), not "
                                                           "the largest x: a tile whose extreme value is negative "
                                                           "gets too small a scale and saturates"),
            ], 0.0, 1e-6, explain=lambda got_s=got_s, want_s=want_s: _scale_ratio_note(got_s, want_s))
            _check_codes(label, x, got_q, want_q, want_s)
        return "q (E4M3) and the 1x128 scales match fp8.quantize(x, '1x128'), ragged tiles and zero tiles included"

    return _run_check("fp8_tile", body)


# ================================================================================ DeepSeek-V3.2-Exp: sparse attention
# Three checkers for notebook 70 (the lightning indexer, the top-k mask, the indexer's KL objective). The reference is
# `dsv3_ref.nn.indexer` and `dsv3_ref.objectives.indexer`; the classic mistakes are modelled next to it.
_DSA_CFG = dict(_YARN_CFG, index_n_heads=4, index_head_dim=16, index_topk=4)


def _indexer_variant(idx: Indexer, x: torch.Tensor, qr: torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor | None,
                     rope: str = "half", act: str = "relu", norm: bool = True, scale: float = 1.0) -> torch.Tensor:
    """The indexer's scores with one mistake: rope "interleaved" (MLA's layout), "last" (rotary part at the end of
    the head, MLA's order) or "none"; act "softmax" or "none" instead of ReLU; norm=False (no k_norm); the scores
    multiplied by `scale` (a forgotten H^-0.5 or d^-0.5)."""
    B, S, _ = x.shape
    r, d = idx.rope_head_dim, idx.head_dim

    def rotate(t: torch.Tensor) -> torch.Tensor:
        if rope == "none":
            return t
        if rope == "last":
            nope, pe = t.split([d - r, r], dim=-1)
            return torch.cat([nope, apply_rotary_emb(pe, freqs, interleaved=False)], dim=-1)
        pe, nope = t.split([r, d - r], dim=-1)
        return torch.cat([apply_rotary_emb(pe, freqs, interleaved=rope == "interleaved"), nope], dim=-1)

    with torch.no_grad():
        q = rotate(idx.wq_b(qr).view(B, S, idx.n_heads, d))
        k = rotate(idx.k_norm(idx.wk(x)) if norm else idx.wk(x))
        logits = torch.einsum("bshd,btd->bsht", q, k)
        logits = {"relu": logits.relu(), "softmax": logits.softmax(-1), "none": logits}[act]
        scores = torch.einsum("bsht,bsh->bst", logits, idx.head_weights(x)) * scale
    return scores if mask is None else scores + mask


def check_indexer_scores(fn: Callable) -> CheckResult:
    """fn(indexer, x, qr, freqs_cis, mask) -> index scores I (B, S, T), eq. 1 of the V3.2-Exp report, from an
    `Indexer`'s weights: x (B, S, dim) the layer input, qr (B, S, q_lora_rank) the MLA query latent, freqs_cis (S,
    d_r/2), mask (S, T) additive or None. q = wq_b(qr) per head, k = k_norm(wk(x)), the first qk_rope_head_dim values
    of both rotated in the HALF-SPLIT layout, w = weights_proj(x) * H^-0.5 * d^-0.5, I = sum_j w_j ReLU(q_j . k) + mask.
    Reference: `Indexer.forward`."""

    def body() -> str:
        cfg = ModelConfig(**_DSA_CFG)
        idx = _build(lambda: Indexer(cfg), 21)
        freqs = precompute_freqs_cis(cfg)
        gen = _gen(22)
        cases = [("prefill of 9 tokens, causal mask", 9, freqs[:9], causal_mask(9, 0)),
                 ("6 tokens at positions 3-8, no mask", 6, freqs[3:9], None)]
        for label, S, f, mask in cases:
            x, qr = torch.randn(2, S, cfg.dim, generator=gen), torch.randn(2, S, cfg.q_lora_rank, generator=gen)
            with torch.no_grad():
                want = idx(x, qr, f, mask)
            got = _expect_tensor(label, _call(fn, idx, x.clone(), qr.clone(), f, mask), want, "(B, S, T)",
                                 {(2, S, idx.n_heads, S): "sum the heads, weighted by w (eq. 1): one score per (t, s)"},
                                 dtype_hint="compute in float32")
            if mask is not None and torch.isfinite(got[:, 0, 1:]).any():
                raise _Fail(f"{label}: query 0 scores future positions: add the causal mask (-inf above the diagonal)")
            variant = functools.partial(_indexer_variant, idx, x, qr, f, mask)
            H, d = idx.n_heads, idx.head_dim
            _diagnose(label, got, want, [
                (variant(rope="interleaved"), "the rotary part is rotated in interleaved pairs (x_0, x_1), ... like "
                                              "the main MLA; the indexer's RoPE is half-split: pairs (x_i, x_{i+d/2}) "
                                              "(apply_rotary_emb(..., interleaved=False))"),
                (variant(rope="last"), "you rotated the LAST qk_rope_head_dim values of each indexer head; in the "
                                       "indexer the rotary part comes FIRST (MLA's heads have it last)"),
                (variant(rope="none"), "no RoPE: rotate the first qk_rope_head_dim values of q and k"),
                (variant(act="softmax"), "softmax instead of ReLU: eq. 1 takes ReLU(q . k) per head (chosen for "
                                         "throughput), no normalisation over the positions"),
                (variant(act="none"), "no ReLU: negative q . k must count as 0 (eq. 1)"),
                (variant(norm=False), "k is not normalised: apply indexer.k_norm (a LayerNorm) to wk(x)"),
                (variant(scale=H**0.5), "the head weights miss the factor H^-0.5 (n_heads ** -0.5)"),
                (variant(scale=d**0.5), "the head weights miss the softmax scale d^-0.5 (index_head_dim ** -0.5)"),
                (variant(scale=(H * d) ** 0.5), "the head weights miss both H^-0.5 and d^-0.5"),
            ], 1e-5, 1e-5)
        return "ReLU-weighted index scores match Indexer.forward (half-split RoPE, rotary part first, k_norm, scales)"

    return _run_check("dsa_score", body)


def check_topk_mask(fn: Callable) -> CheckResult:
    """fn(scores, topk, mask) -> the additive sparse mask (B, S, T): 0 at the min(topk, T) positions of highest index
    score of each query that the causal mask lets it see, -inf everywhere else. scores (B, S, T) float32 (the causal
    mask already added), mask (S, T) additive or None (decoding). Reference: `indexer.sparse_mask(
    indexer.topk_indices(scores, topk), T, mask)`."""

    def body() -> str:
        gen = _gen(31)
        cases = [("prefill T=10, topk=4 (early queries see fewer than 4)", 10, 10, 4, causal_mask(10, 0)),
                 ("prefill T=6, topk=8 > T", 6, 6, 8, causal_mask(6, 0)),
                 ("decode: 1 query over 10 positions, topk=4, mask None", 1, 10, 4, None)]
        for label, S, T, k, mask in cases:
            scores = torch.randn(2, S, T, generator=gen)
            if mask is not None:
                scores = scores + mask
            want = indexer.sparse_mask(indexer.topk_indices(scores, k), T, mask)
            got = _call(fn, scores.clone(), k, mask, label=label,
                        hint=lambda e: "topk larger than T: keep min(topk, T)" if "out of range" in str(e) else "")
            if isinstance(got, torch.Tensor) and got.dtype == torch.bool:
                raise _Fail(f"{label}: a bool mask; return an additive float mask: 0 where kept, -inf elsewhere "
                            "(it is added to the attention scores)")
            got = _expect_tensor(label, got, want, "(B, S, T)")
            if ((got != 0) & torch.isfinite(got)).any():
                raise _Fail(f"{label}: the mask must hold only 0 (kept) and -inf (dropped)")
            kept, want_kept = got == 0, want == 0
            if mask is not None and (kept & ~torch.isfinite(mask)).any():
                raise _Fail(f"{label}: a query keeps a future position. With fewer visible positions than topk, topk "
                            "also returns masked (-inf) ones: add the causal mask again after the scatter")
            if torch.equal(kept, ~want_kept & torch.isfinite(scores)):
                raise _Fail(f"{label}: inverted: 0 must mark the KEPT positions, -inf the dropped ones")
            visible = torch.isfinite(scores)
            if k < T and (scores[kept & visible].mean() < scores[visible].mean()):
                raise _Fail(f"{label}: you kept LOWEST scores: topk must keep the largest (largest=True)")
            if not torch.equal(kept, want_kept):
                counts, want_counts = kept.sum(-1), want_kept.sum(-1)
                if not torch.equal(counts, want_counts):
                    index = tuple(int(i) for i in (counts != want_counts).nonzero()[0])
                    raise _Fail(f"{label}: query {index} keeps {int(counts[index])} positions, expected "
                                f"{int(want_counts[index])} (min(topk, visible positions))")
                raise _Fail(f"{label}: a different selection than the reference: keep the highest scores per query "
                            "(over the last dim)")
        return "the top-k mask matches: highest scores kept, causal mask re-applied, topk > T and decoding handled"

    return _run_check("dsa_topk", body)


def _with_grad(fn: Callable) -> Callable:
    """fn run with autograd on (the checkers call the student's function under no_grad)."""

    def run(*args: Any) -> Any:
        with torch.enable_grad():
            return fn(*args)

    return run


def check_indexer_kl(fn: Callable) -> CheckResult:
    """fn(scores, attn, selected) -> the indexer's loss, a scalar: the mean over queries of KL(p_t || softmax(I_t))
    (eqs. 3-4). scores (B, S, T) the index scores (-inf where the query cannot see); attn (B, S, H, T) the main
    attention's probabilities per head (part of the main model's graph); selected (B, S, T) bool (the sparse stage's
    top-k set) or None (dense warm-up). p_t = attn summed over the heads, restricted to the visible (and selected)
    positions, L1-normalised; softmax(I_t) over the same positions. Reference: `indexer_objective.indexer_kl_loss`."""

    def body() -> str:
        gen = _gen(41)
        B, S, H = 2, 7, 3
        mask = causal_mask(S, 0)
        for label, sparse in (("dense warm-up (selected=None)", False), ("sparse stage (selected given)", True)):
            scores = torch.randn(B, S, S, generator=gen) * 2 + mask
            selected = None
            logits = torch.randn(B, S, H, S, generator=gen) * 2 + mask.unsqueeze(1)
            if sparse:
                selected = (torch.rand(B, S, S, generator=gen) < 0.5) | torch.eye(S, dtype=torch.bool)
                selected &= torch.isfinite(mask)
                logits = logits.masked_fill(~selected.unsqueeze(2), float("-inf"))
            leaf = logits.clone().requires_grad_(True)
            attn = leaf.softmax(-1)  # (B, S, H, T), in a graph like the main model's attention
            want = indexer_objective.indexer_kl_loss(indexer.IndexerRecord(scores, attn.detach().sum(2), selected))
            got = _call(_with_grad(fn), scores.clone(), attn, selected)
            if not isinstance(got, torch.Tensor) or got.numel() != 1:
                raise _Fail(f"{label}: expected a scalar tensor, got {getattr(got, 'shape', type(got).__name__)}")
            if got.requires_grad:
                got.sum().backward()
                if leaf.grad is not None and (leaf.grad != 0).any():
                    raise _Fail(f"{label}: the loss sends gradients into the main attention: detach the target "
                                "(attn.detach()): the report trains the indexer only by L^I and the main model only "
                                "by the language-modelling loss")
            got = got.detach().reshape(())
            support = torch.isfinite(scores) if selected is None else torch.isfinite(scores) & selected
            p_raw = attn.detach().sum(2) * support
            p = p_raw / p_raw.sum(-1, keepdim=True)
            log_q = scores.masked_fill(~support, float("-inf")).log_softmax(-1)
            log_q_all = scores.log_softmax(-1)

            def kl(pp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
                return (torch.xlogy(pp, pp) - pp * lq.masked_fill(pp == 0, 0.0)).sum(-1)

            q = log_q.exp()
            _diagnose(label, got, want, [
                (kl(p, log_q).sum(), "you summed over the queries (the report's sum over t); take the mean over all "
                                     "B * S queries, as dsv3_ref does"),
                (-(p * log_q.masked_fill(~support, 0.0)).sum(-1).mean(),
                 "that is the cross-entropy; the KL divergence also adds the target's negative entropy sum p log p "
                 "(same gradient for the indexer, different value)"),
                ((torch.xlogy(q, q) - q * torch.log(p).masked_fill(~support, 0.0)).sum(-1).mean(),
                 "the KL is reversed: the report's is D_KL(p || softmax(I)), the attention distribution first"),
                (kl(p_raw, log_q).mean(), "p is not L1-normalised: the heads' probabilities summed over the heads "
                                          "add up to H; divide by their total (eq. 3)"),
                (None if selected is None else kl(p, log_q_all).mean(),
                 "in the sparse stage softmax(I) is taken over the selected positions only (eq. 4), not over all "
                 "visible ones"),
            ], 1e-5, 1e-5)
        return "the KL objective matches (mean over queries, L1-normalised head sum, selected set, target detached)"

    return _run_check("dsa_kl", body)


# ---------------------------------------------------------------------------------------------- registry, solutions
@dataclass(frozen=True)
class Exercise:
    """One exercise: its checker, the function the student writes, the notebook it belongs to, and its level."""

    name: str
    check: Callable[[Callable], CheckResult]
    function: str
    notebook: str
    level: str


EXERCISES: dict[str, Exercise] = {e.name: e for e in [
    Exercise("rope", check_rope, "apply_rope", "20_mla", "beginner"),
    Exercise("mla_proj", check_mla_projections, "mla_projections", "20_mla", "intermediate"),
    Exercise("absorb", check_absorbed_attention, "absorbed_attention", "20_mla", "advanced"),
    Exercise("gate", check_gate, "route", "30_moe_routing", "intermediate"),
    Exercise("bias_update", check_bias_update, "update_bias", "40_load_balancing", "beginner"),
    Exercise("mtp_combine", check_mtp_combine, "mtp_combine", "45_mtp", "beginner"),
    Exercise("fp8_tile", check_fp8_tile_quant, "quantize_1x128", "50_fp8_formats_and_scaling", "intermediate"),
    # DeepSeek-V3.2-Exp (the section above): solved in the chapter notebook itself
    Exercise("dsa_score", check_indexer_scores, "indexer_scores", "70_sparse_attention", "intermediate"),
    Exercise("dsa_topk", check_topk_mask, "topk_mask", "70_sparse_attention", "beginner"),
    Exercise("dsa_kl", check_indexer_kl, "indexer_kl", "70_sparse_attention", "advanced"),
]}


def check(name: str, fn: Callable) -> CheckResult:
    """Run the checker of exercise `name` (one of EXERCISES) on fn."""
    if name not in EXERCISES:
        raise ValueError(f"unknown exercise {name!r}; allowed: {list(EXERCISES)}")
    return EXERCISES[name].check(fn)


def load_solutions(path: str | os.PathLike) -> dict[str, Callable]:
    """The functions defined by the code cells of the notebook `path` whose first line starts with `# SOLUTION`,
    executed in order in one fresh namespace (so a solution may use an earlier one). Only run your own notebooks:
    this executes their code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"load_solutions: no notebook at {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            cells = json.load(f)["cells"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"load_solutions: {path!r} is not a notebook ({type(e).__name__}: {e})") from None
    namespace: dict[str, Any] = {"__name__": "dsv3_solutions"}
    for cell in cells:
        source = "".join(cell.get("source", []))
        if cell.get("cell_type") == "code" and source.lstrip().startswith(SOLUTION_MARKER):
            exec(compile(source, f"{path}:solution", "exec"), namespace)  # noqa: S102 - the repository's notebook
    functions = {k: v for k, v in namespace.items() if callable(v) and getattr(v, "__module__", "") == "dsv3_solutions"}
    if not functions:
        raise ValueError(f"load_solutions: {path!r} has no code cell starting with {SOLUTION_MARKER!r}")
    return functions
