"""Exercises with checkers: a student writes one function per component, a checker runs it next to the package's
reference on seeded inputs and says what is wrong, not just that something is.

Each `check_<name>(fn)` returns a `CheckResult` (`.passed`, `.message`, printable; `.assert_ok()` raises an
AssertionError when it failed) and never raises itself: an exception inside `fn` becomes a failed result that names
it. The reference is always the package's own code (`rope.apply_rotary_emb`, `MLA.queries` / `MLA.latent` /
`MLA.forward`, `Gate.forward`, `balance.update_bias`, `MTPModule.forward`, `fp8.quantize`); the known mistakes are
modelled next to it (a half-split RoPE, the bias in the gate weights, ...) so that a wrong answer that matches one
of them gets that mistake's diagnosis. Otherwise the message gives the maximum error and where it is.

| name          | the student writes                                   | reference                                  |
|---------------|------------------------------------------------------|--------------------------------------------|
| rope          | apply_rope(x, freqs_cis) -> x rotated                | rope.apply_rotary_emb                      |
| mla_proj      | mla_projections(mla, x, freqs_cis) -> (q_nope, q_pe, c_kv, k_pe) | MLA.queries, MLA.latent        |
| absorb        | absorbed_attention(mla, x, freqs_cis, mask) -> out   | MLA.forward(attn_impl="absorb")            |
| gate          | route(gate, x) -> (weights, indices)                 | Gate.forward                               |
| bias_update   | update_bias(bias, load, gamma) -> new bias           | balance.update_bias (sign rule)            |
| mtp_combine   | mtp_combine(mtp, h_prev, emb) -> h'                  | MTPModule.forward (the block's input)      |
| fp8_tile      | quantize_1x128(x) -> (q, scale)                      | fp8.quantize(x, "1x128")                   |
| dsa_score     | indexer_scores(indexer, x, qr, freqs_cis, mask) -> I | indexer.Indexer.forward                    |
| dsa_topk      | topk_mask(scores, topk, mask) -> additive mask       | indexer.topk_indices + indexer.sparse_mask |
| dsa_kl        | indexer_kl(scores, attn, selected) -> loss           | indexer_objective.indexer_kl_loss          |

`load_solutions(path)` runs the cells of a solutions notebook that start with `# SOLUTION` and returns the
functions they define: the student notebook plugs them in when the environment variable `DSV3_SOLUTIONS=1` is set
(as the notebook tests do), so it runs green in CI while its stubs stay empty.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import balance, fp8, indexer, indexer_objective
from .attention import MLA, causal_mask
from .config import ModelConfig
from .indexer import Indexer
from .moe import Gate
from .mtp import MTPModule
from .rope import apply_rotary_emb, precompute_freqs_cis

SOLUTIONS_ENV = "DSV3_SOLUTIONS"
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


def _call(fn: Callable, *args: Any) -> Any:
    """fn(*args) with the student's exception turned into a diagnosis."""
    try:
        with torch.no_grad():
            return fn(*args)
    except Exception as e:  # noqa: BLE001 - any error of the student's code is reported, never raised
        detail = f": {e}" if str(e) else ""
        hint = " (the stub is not implemented yet)" if isinstance(e, NotImplementedError) else ""
        raise _Fail(f"your function raised {type(e).__name__}{detail}{hint}") from None


# ---------------------------------------------------------------------------------------------- comparisons
def _close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> bool:
    return (isinstance(got, torch.Tensor) and got.shape == want.shape
            and torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol))


def _max_error(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float, label: str) -> _Fail:
    """The generic diagnosis: largest absolute error, where, and how many values are out of tolerance."""
    g, w = got.double(), want.double()
    diff = (g - w).abs()
    diff = torch.where(torch.isnan(diff) | (torch.isinf(g) != torch.isinf(w)), torch.inf, diff)
    bad = int((diff > atol + rtol * w.abs()).sum())
    flat = int(diff.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), got.shape))
    err = float(diff.flatten()[flat])
    return _Fail(f"{label}: max abs error {err:.3g} at index {index} (got {float(g[index]):.6g}, expected "
                 f"{float(w[index]):.6g}); {bad} of {got.numel()} values outside atol={atol:g}, rtol={rtol:g}",
                 err, index)


def _expect_tensor(label: str, got: Any, want: torch.Tensor, shape_doc: str,
                   shape_hints: dict[tuple[int, ...], str] | None = None, dtype_hint: str = "",
                   finite: bool = True) -> torch.Tensor:
    """Type, shape, dtype and (if `finite`) finiteness of one output; raises _Fail with the specific complaint."""
    if not isinstance(got, torch.Tensor):
        raise _Fail(f"{label}: expected a torch.Tensor, got {type(got).__name__}")
    if got.shape != want.shape:
        hint = (shape_hints or {}).get(tuple(got.shape), "")
        raise _Fail(f"{label}: wrong shape {tuple(got.shape)}, expected {shape_doc} = {tuple(want.shape)}"
                    + (f": {hint}" if hint else ""))
    if got.dtype != want.dtype:
        raise _Fail(f"{label}: wrong dtype {got.dtype}, expected {want.dtype}" + (f": {dtype_hint}" if dtype_hint
                                                                                     else ""))
    bad = ~torch.isfinite(got.float()) & torch.isfinite(want.float())
    if finite and bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        kind = "NaN" if torch.isnan(got.float()[index]) else "inf"
        raise _Fail(f"{label}: {int(bad.sum())} non-finite value(s) where the reference is finite, first {kind} at "
                    f"index {index}", math.inf, index)
    return got


def _diagnose(label: str, got: torch.Tensor, want: torch.Tensor, mistakes: list[tuple[torch.Tensor | None, str]],
              atol: float, rtol: float) -> None:
    """Pass silently if got matches want; else the first known mistake it matches, else the max error."""
    if _close(got, want, atol, rtol):
        return
    for model, message in mistakes:
        if model is not None and _close(got, model, atol, rtol):
            raise _Fail(f"{label}: {message}")
    raise _max_error(got, want, atol, rtol, label)


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


def check_rope(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> CheckResult:
    """fn(x, freqs_cis) -> x rotated: x (B, T, H, rope_dim) or (B, T, rope_dim), freqs_cis (T, rope_dim / 2) complex
    for the positions of x's T tokens; the result has x's shape and dtype. Reference: `rope.apply_rotary_emb`."""

    def body() -> str:
        cfg = ModelConfig(**_ROPE_CFG)
        freqs = precompute_freqs_cis(cfg)  # (64, 8)
        gen = _gen(0)
        cases = [("queries (B, T, H, d_r), positions 0-6", torch.randn(2, 7, 3, 16, generator=gen), freqs[:7]),
                 ("shared key (B, T, d_r), positions 5-13", torch.randn(2, 9, 16, generator=gen), freqs[5:14]),
                 ("bfloat16 queries", torch.randn(1, 5, 2, 16, generator=gen).bfloat16(), freqs[:5])]
        for label, x, f in cases:
            want = apply_rotary_emb(x, f)
            got = _expect_tensor(label, _call(fn, x.clone(), f), want, "x's shape",
                                 dtype_hint="return x's dtype (compute in float32, then cast back with .to(x.dtype))")
            tol = 2e-2 if x.dtype == torch.bfloat16 else 1e-5
            _diagnose(label, got, want, [
                (_half_split(x, f), "you rotate the pairs (x_j, x_{j + d/2}) (half-split, as GPT-NeoX / HF "
                                    "`rotate_half`); DeepSeek's checkpoints expect interleaved pairs (x_0, x_1), "
                                    "(x_2, x_3), ... : the same values in a different permutation"),
                (apply_rotary_emb(x, f.conj()), "you rotate the wrong way (by -t * theta): multiply by freqs_cis, "
                                                "not by its conjugate (x_even' = x_even cos - x_odd sin)"),
                (x, "the output equals the input: nothing was rotated"),
            ], tol, tol)
        return "interleaved rotation, shapes and dtypes match the reference on 3 seeded cases"

    return _run_check("rope", body)


# ---------------------------------------------------------------------------------------------- 2. MLA projections
def _mla_module(seed: int, **overrides: Any) -> MLA:
    cfg = ModelConfig(**{**_YARN_CFG, **overrides})
    return _build(lambda: MLA(cfg), seed)


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
                # the mistakes' ingredients: before the norms, before RoPE
                q_raw = (mla.wq(x) if mla.q_lora_rank == 0 else mla.wq_b(mla.q_norm(mla.wq_a(x)))).view(B, S, H, -1)
                q_nonorm = None if mla.q_lora_rank == 0 else mla.wq_b(mla.wq_a(x)).view(B, S, H, -1)
                c_raw, k_raw = mla.wkv_a(x).split([dc, dr], dim=-1)
            got = _unpack(_call(fn, mla, x.clone(), freqs), ("q_nope", "q_pe", "c_kv", "k_pe"))
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
            _diagnose(f"{label} q_nope", g_nope, q_nope, [
                (None if q_nonorm is None else q_nonorm[..., :dh], no_qnorm),
                (q_raw[..., dr:] if dr != dh else None, f"you split each head from the wrong end: {split_hint}"),
            ], tol, tol)
            _diagnose(f"{label} q_pe", g_pe, q_pe, [
                (q_raw[..., dh:], "q_pe is not rotated: apply RoPE to it (eq. 8)"),
                (_half_split(q_raw[..., dh:], freqs), "q_pe is rotated with half-split pairs; use interleaved pairs "
                                                      "(rope.apply_rotary_emb)"),
                (None if q_nonorm is None else apply_rotary_emb(q_nonorm[..., dh:], freqs), no_qnorm)], tol, tol)
            _diagnose(f"{label} c_kv", g_kv, c_kv, [
                (c_raw, "c_kv is not normalised: apply mla.kv_norm to the latent (the cached c_kv is the normalised "
                        "one, as in the official code)")], tol, tol)
            _diagnose(f"{label} k_pe", g_k, k_pe, [
                (k_raw, "k_pe is not rotated: apply RoPE to it (eq. 3)"),
                (_half_split(k_raw, freqs), "k_pe is rotated with half-split pairs; use interleaved pairs")], tol, tol)
        return "q_nope, q_pe, c_kv and k_pe match MLA.queries / MLA.latent with and without query compression"

    return _run_check("mla_proj", body)


# ---------------------------------------------------------------------------------------------- 3. absorption
def _absorb_variant(mla: MLA, x: torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor | None,
                    scale: float | None = None) -> torch.Tensor:
    """The reference absorbed attention with another softmax scale (a known mistake)."""
    m = copy.deepcopy(mla)
    if scale is not None:
        m.softmax_scale = scale
    with torch.no_grad():
        return m(x, freqs, mask, attn_impl="absorb")


def _expands(fn: Callable, mla: MLA, *args: Any) -> tuple[Any, bool]:
    """fn(mla, *args), and whether it called `mla.wkv_b` (i.e. expanded the latent into per-head keys / values)."""
    calls: list[bool] = []
    handle = mla.wkv_b.register_forward_pre_hook(lambda m, a: calls.append(True))
    try:
        return _call(fn, mla, *args), bool(calls)
    finally:
        handle.remove()


def check_absorbed_attention(fn: Callable) -> CheckResult:
    """fn(mla, x, freqs_cis, mask) -> (B, S, dim): MLA's output computed in the latent space (W_UK folded into the
    query, W_UV into the output), never expanding per-head keys or values: `mla.wkv_b` must not be called (use
    `mla.wkv_b.weight`). YaRN is active, so the softmax scale includes mscale^2 (`mla.softmax_scale`).
    Reference: `MLA.forward(..., attn_impl="absorb")`."""

    def body() -> str:
        mla = _mla_module(3)
        for label, S, masked in [("prefill S=6 (causal mask)", 6, True), ("one token S=1 (no mask)", 1, False)]:
            x = torch.randn(2, S, 64, generator=_gen(4 + S))
            freqs = precompute_freqs_cis(ModelConfig(**_YARN_CFG))[:S]
            mask = causal_mask(S, 0) if masked else None
            want = _absorb_variant(mla, x, freqs, mask)
            got, expanded = _expands(fn, mla, x.clone(), freqs, mask)
            if expanded:
                raise _Fail(f"{label}: you called mla.wkv_b(...) on the latent, which expands per-head keys and values "
                            "(the naive path). Absorb instead: view mla.wkv_b.weight as (H, d_h + d_v, d_c), fold its "
                            "W_UK rows into q_nope and apply its W_UV rows after the softmax")
            got = _expect_tensor(label, got, want, "(B, S, dim)")
            plain = mla.qk_head_dim ** -0.5
            _diagnose(label, got, want, [
                (_absorb_variant(mla, x, freqs, mask, plain),
                 f"you used 1/sqrt(d_h + d_r) = {plain:.4f} as the softmax scale and forgot YaRN's mscale^2: use "
                 f"mla.softmax_scale = {mla.softmax_scale:.4f} (ModelConfig.softmax_scale)"),
                (_absorb_variant(mla, x, freqs, mask, 1.0),
                 "you forgot the softmax scale: multiply the scores by mla.softmax_scale"),
                (_absorb_variant(mla, x, freqs, mask, 1.0 / mla.softmax_scale),
                 "you divided the scores by mla.softmax_scale; multiply instead"),
                (_absorb_variant(mla, x, freqs, None) if masked else None,
                 "you ignored the causal mask: add it to the scores before the softmax"),
            ], 1e-5, 1e-4)
        return "absorbed attention matches MLA.forward(attn_impl='absorb') without expanding keys or values"

    return _run_check("absorb", body)


# ---------------------------------------------------------------------------------------------- 4. the gate
class _MaxGroupScoreGate(Gate):
    """The mistake: a group scored by its best expert (V2's rule) where V3 sums the top two biased affinities."""

    group_topk = 1


class _Top2GroupScoreGate(Gate):
    """The mistake: a softmax (V2) gate scoring groups by the sum of their top two, which is V3's rule."""

    group_topk = 2


def _as(gate: Gate, cls: type[Gate]) -> Gate:
    g = copy.deepcopy(gate)
    g.__class__ = cls
    return g


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


def _weights_from(scores: torch.Tensor, indices: torch.Tensor, renorm: bool, scale: float) -> torch.Tensor:
    w = scores.gather(1, indices)
    return (w / w.sum(dim=-1, keepdim=True) if renorm else w) * scale


def check_gate(fn: Callable) -> CheckResult:
    """fn(gate, x) -> (weights (N, K) float32, indices (N, K) int64) for x (N, dim), from a `Gate`'s weight, bias,
    score_func, n_groups, topk_groups, topk and route_scale; indices in descending order of the (biased) score, as
    torch.topk returns them. Reference: `Gate.forward`."""

    def body() -> str:
        for label, gate, x in _gate_cases():
            with torch.no_grad():
                ref = gate(x)
            want_w, want_i = ref.weights, ref.indices
            N, K = want_i.shape
            got_w, got_i = _unpack(_call(fn, gate, x.clone()), ("weights", "indices"))
            if isinstance(got_i, torch.Tensor) and got_i.is_floating_point():
                raise _Fail(f"{label}: indices have dtype {got_i.dtype}: return the expert indices (int64, as "
                            "torch.topk(...).indices), and the weights as the first element")
            got_i = _expect_tensor(f"{label} indices", got_i, want_i, "(N, topk)",
                                   {(N, gate.weight.shape[0]): "return only the chosen topk experts per token"})
            got_w = _expect_tensor(f"{label} weights", got_w, want_w, "(N, topk)")
            sigmoid = gate.score_func == "sigmoid"
            if not torch.equal(got_i.sort(dim=-1).values, want_i.sort(dim=-1).values):
                _diagnose_selection(label, gate, x, got_i, want_i)
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
            biased = ref.scores + gate.bias if gate.bias is not None else None
            _diagnose(f"{label} weights", got_w, want_w, [
                (None if biased is None else _weights_from(biased, want_i, sigmoid, gate.route_scale),
                 "the bias leaked into the weights: b_i only chooses the experts (eq. 16); the weights come from the "
                 "unbiased affinities s_{i,t}"),
                (_weights_from(ref.scores, want_i, sigmoid, 1.0),
                 f"you forgot route_scale: multiply the weights by gate.route_scale = {gate.route_scale}"),
                (_weights_from(ref.scores, want_i, False, gate.route_scale) if sigmoid else None,
                 "sigmoid weights must be renormalised over the chosen experts (divide by their sum, eq. 13) before "
                 "route_scale"),
                (None if sigmoid else _weights_from(ref.scores, want_i, True, gate.route_scale),
                 "softmax (V2) weights are not renormalised over the chosen experts (the official code renormalises "
                 "only sigmoid scores)"),
                (_weights_from(torch.nn.functional.linear(x, gate.weight), want_i, sigmoid, gate.route_scale),
                 "the weights come from the raw logits x W^T; apply the score function (sigmoid / softmax) first"),
            ], 1e-5, 1e-5)
        return "expert indices (in topk order) and weights match Gate.forward for a V3 and a V2 gate"

    return _run_check("gate", body)


def _diagnose_selection(label: str, gate: Gate, x: torch.Tensor, got_i: torch.Tensor, want_i: torch.Tensor) -> None:
    """Different expert sets: compare with the selections of known mistakes (run through the reference gate)."""
    got_set = got_i.sort(dim=-1).values
    mistakes: list[tuple[Gate, str]] = []
    if gate.bias is not None:
        no_bias = copy.deepcopy(gate)
        no_bias.bias.zero_()
        mistakes.append((no_bias, "you ignored the bias when choosing experts: select by s_{i,t} + b_i (eq. 16), "
                                  "while the weights use s_{i,t}"))
        mistakes.append((_as(gate, _MaxGroupScoreGate), "a group's score is the sum of its top-2 biased affinities "
                                                        "in V3, not its best one (that is V2's softmax rule)"))
    else:
        mistakes.append((_as(gate, _Top2GroupScoreGate), "a softmax (V2) gate scores a group by its best affinity "
                                                         "(the max), not by the sum of its top two (V3's rule)"))
    if gate.n_groups > 1:
        flat = copy.deepcopy(gate)
        flat.n_groups = 1
        mistakes.append((flat, f"you ignored the expert groups: keep only the top-{gate.topk_groups} of "
                               f"{gate.n_groups} groups, then choose top-{gate.topk} experts inside them"))
    for wrong, message in mistakes:
        with torch.no_grad():
            if torch.equal(got_set, wrong(x).indices.sort(dim=-1).values):
                raise _Fail(f"{label}: {message}")
    rows = (got_set != want_i.sort(dim=-1).values).any(dim=-1)
    t = int(rows.nonzero()[0])
    raise _Fail(f"{label}: {int(rows.sum())} of {len(rows)} tokens chose different experts; first token {t}: got "
                f"{sorted(got_i[t].tolist())}, expected {sorted(want_i[t].tolist())}", index=(t,))


# ---------------------------------------------------------------------------------------------- 5. the bias update
def check_bias_update(fn: Callable) -> CheckResult:
    """fn(bias (E,) float32, load (E,) int64 token counts, gamma) -> the updated bias (E,) float32 (or None after
    updating `bias` in place): one step of the sign rule b_i += gamma * sign(mean(load) - load_i) (report §2.1.2).
    Reference: `balance.update_bias(..., rule="sign")`."""

    def body() -> str:
        gen = _gen(10)
        cases = [("8 experts, 3 exactly at the mean load", torch.tensor([10, 2, 5, 5, 9, 1, 5, 3]), 1e-3),
                 ("16 experts, random loads", torch.randint(0, 40, (16,), generator=gen), 0.01)]
        for label, load, gamma in cases:
            bias0 = 0.1 * torch.randn(load.numel(), generator=gen)
            want = bias0.clone()
            balance.update_bias(want, load, gamma, "sign")
            arg = bias0.clone()
            try:
                got = _call(fn, arg, load.clone(), gamma)
            except _Fail as f:
                if "dtype" in f.message:  # torch cannot average int64 counts
                    f.message += " (the loads are int64 token counts: convert them with load.float() first)"
                raise
            got = arg if got is None else got
            got = _expect_tensor(label, got, want, "(E,)", dtype_hint="keep the bias in float32")
            direction = torch.round((want - bias0) / gamma)  # the reference's sign(e_i): +1, -1 or 0
            step = gamma * direction
            mean = load.float().mean()
            prop = bias0.clone()
            balance.update_bias(prop, load, gamma, "proportional")
            at_mean = load.float() == mean
            _diagnose(label, got, want, [
                (bias0 - step, "the sign is inverted: an overloaded expert (load above the mean) must get a LOWER bias "
                               "(b_i += gamma * sign(mean - load_i)), or routing collapses onto it"),
                (step, "you returned the change, not the updated bias: return bias + gamma * sign(...)"),
                (bias0 + direction, "you forgot gamma: the step is gamma * sign(e_i), not sign(e_i)"),
                (prop, "that is the proportional variant (gamma * e_i / mean); this exercise asks for the paper's "
                       "sign rule"),
                (bias0 + gamma * (mean - load.float()), "the step must be gamma * sign(e_i), not gamma * e_i"),
                (torch.where(load.float() > mean, bias0 - gamma, bias0 + gamma) if at_mean.any() else None,
                 "experts exactly at the mean load must keep their bias (sign(0) = 0): use torch.sign, not a "
                 "two-way choice"),
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
        got = _expect_tensor("h'", _call(fn, mtp, h_prev.clone(), emb.clone()), want, "(B, S, dim)", {
            (B, S, 2 * cfg.dim): "project the concatenation back to dim with mtp.eh_proj"})
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


def check_fp8_tile_quant(fn: Callable) -> CheckResult:
    """fn(x) -> (q, scale): x (..., cols) float32 -> q float8_e4m3fn of x's shape and scale float32
    (..., ceil(cols / 128)), one per row per 128 columns: scale = max(amax, 1e-4) / 448 (the dequantisation
    multiplier), q = cast(clamp(x / scale, -448, 448)). Reference: `fp8.quantize(x, "1x128")`."""

    def body() -> str:
        for label, x in _fp8_cases():
            want_q, want_s = fp8.quantize(x, "1x128")
            got_q, got_s = _unpack(_call(fn, x.clone()), ("q", "scale"))
            rows, cols = x.reshape(-1, x.shape[-1]).shape
            if isinstance(got_q, torch.Tensor) and got_q.dtype != torch.float8_e4m3fn:
                fmt = ("E5M2: DeepSeek-V3 uses E4M3 for every tensor (report §3.3.2)"
                       if got_q.dtype == torch.float8_e5m2 else "cast q with .to(torch.float8_e4m3fn)")
                raise _Fail(f"{label}: q has dtype {got_q.dtype}, expected torch.float8_e4m3fn: {fmt}")
            got_q = _expect_tensor(f"{label} q", got_q, want_q, "x's shape", finite=False)
            lead = tuple(x.shape[:-1])
            per_tensor = "one scale for the whole tensor is per-tensor scaling; 1x128 tiles need one per row per 128 " \
                         "columns"
            per_row = "one scale per row is per-row scaling; 1x128 tiles need one per 128 columns"
            hints = {(): per_tensor, (1,): per_tensor, (*lead, 1): per_row, (*lead,): per_row,
                     (*lead, cols // 128): "the last, partial tile needs a scale too: ceil(cols / 128) tiles per row "
                                           "(pad with zeros to find its amax)",
                     (math.ceil(rows / 128), cols): "tiles run along the rows (128x1); 1x128 tiles run along the "
                                                    "channels (the last dim)",
                     (rows, math.ceil(cols / 128)): "keep x's leading dims: scale has shape (*x.shape[:-1], "
                                                    "ceil(cols / 128))"}
            got_s = _expect_tensor(f"{label} scale", got_s, want_s, "(*x.shape[:-1], ceil(cols / 128))", hints,
                                   dtype_hint="scales are float32")
            if torch.isnan(got_q.float()).any():
                zero_tile = torch.isnan(got_q.float()) & (x == 0)
                extra = (": an all-zero tile has amax 0, so scale 0 and 0 / 0 = NaN; floor the amax at 1e-4 as the "
                         "official act_quant does" if zero_tile.any() else "")
                index = tuple(int(i) for i in torch.isnan(got_q.float()).nonzero()[0])
                raise _Fail(f"{label} q: NaN at index {index} where x is finite{extra}", math.inf, index)
            _diagnose(f"{label} scale", got_s, want_s, [
                (1.0 / want_s, "the scale is inverted: store the dequantisation multiplier amax / 448 (the "
                               "checkpoint's weight_scale_inv), and quantise with x / scale"),
                (want_s * fp8.E4M3_MAX, "the scale is the tile's amax; divide it by 448 (E4M3's largest value)"),
                (fp8.quantize(x, "1x128", scale_fmt="ue8m0")[1], "you rounded the scales up to powers of two (UE8M0, "
                                                                 "DeepSeek-V3.1); this exercise wants amax / 448"),
                (fp8.quantize(x, "1x128", amax_floor=1e-12)[1], "the all-zero tile's scale differs: floor the amax "
                                                                "at 1e-4 (max(amax, 1e-4) / 448), as the official "
                                                                "act_quant"),
            ], 0.0, 1e-6)
            # q: allow one E4M3 step of rounding difference (x / s vs x * (1 / s))
            _diagnose(f"{label} q", got_q.float(), want_q.float(), [], 2.0**-9, 2.0**-3)
        return "q (E4M3) and the 1x128 scales match fp8.quantize(x, '1x128'), ragged tiles and zero tiles included"

    return _run_check("fp8_tile", body)


# ================================================================================ DeepSeek-V3.2-Exp: sparse attention
# Three checkers for notebook 70 (the lightning indexer, the top-k mask, the indexer's KL objective). The reference is
# `dsv3_ref.indexer` and `dsv3_ref.indexer_objective`; the classic mistakes are modelled next to it.
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
                                 dtype_hint="compute in float32", finite=False)
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
            try:
                got = _call(fn, scores.clone(), k, mask)
            except _Fail as f:
                hint = " (topk larger than T: keep min(topk, T))" if "out of range" in f.message else ""
                raise _Fail(f"{label}: {f.message}{hint}") from None
            if isinstance(got, torch.Tensor) and got.dtype == torch.bool:
                raise _Fail(f"{label}: a bool mask; return an additive float mask: 0 where kept, -inf elsewhere "
                            "(it is added to the attention scores)")
            got = _expect_tensor(label, got, want, "(B, S, T)", finite=False)
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


def solutions_enabled() -> bool:
    """True when the environment asks for the solutions to be plugged in (DSV3_SOLUTIONS=1, set by the notebook
    tests)."""
    return os.environ.get(SOLUTIONS_ENV, "") == "1"


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
