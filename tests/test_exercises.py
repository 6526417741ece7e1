"""Exercise checkers: each passes the package's own function and a from-scratch solution, and each known mistake
(implemented here, the way a student would make it) gets its specific diagnosis, never an exception."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsv3_ref import balance, exercises, fp8
from dsv3_ref.exercises import EXERCISES, CheckResult, load_solutions
from dsv3_ref.rope import apply_rotary_emb

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "notebooks" / "exercises" / "02_solutions.ipynb"


def _fails_with(result: CheckResult, *fragments: str) -> None:
    assert isinstance(result, CheckResult)
    assert not result.passed, f"expected a failure, got {result}"
    for fragment in fragments:
        assert fragment in result.message, f"{fragment!r} not in {result.message!r}"


def _passes(result: CheckResult) -> None:
    assert result.passed, str(result)
    assert result.assert_ok() is result


# ---------------------------------------------------------------------------------------------- results
def test_check_result_is_printable_and_assert_ok_raises():
    ok, bad = CheckResult("x", True, "fine"), CheckResult("x", False, "broken", 0.5, (1, 2))
    assert str(ok) == repr(ok) == "[PASS] x: fine" and bool(ok)
    assert str(bad) == "[FAIL] x: broken" and not bad
    with pytest.raises(AssertionError, match="broken"):
        bad.assert_ok()


def test_unknown_exercise_is_a_value_error():
    with pytest.raises(ValueError, match="unknown exercise 'nope'.*allowed"):
        exercises.check("nope", lambda: None)


@pytest.mark.parametrize("name", list(EXERCISES))
def test_an_unimplemented_stub_fails_without_raising(name):
    def stub(*args):
        raise NotImplementedError

    _fails_with(EXERCISES[name].check(stub), "raised NotImplementedError", "not implemented yet")


@pytest.mark.parametrize("name", list(EXERCISES))
def test_returning_none_or_garbage_is_diagnosed(name):
    result = EXERCISES[name].check(lambda *args: "garbage")
    assert not result.passed and result.message


# ---------------------------------------------------------------------------------------------- 1. RoPE
def _rope(x, freqs_cis, layout="interleaved", direction=1, keep_dtype=True):
    """A from-scratch RoPE with the mistakes as switches."""
    f = freqs_cis.view(1, x.shape[1], *([1] * (x.dim() - 3)), -1)
    cos, sin = f.real, direction * f.imag
    xf = x.float()
    if layout == "interleaved":
        a, b = xf[..., 0::2], xf[..., 1::2]
        y = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    else:  # half-split
        m = x.shape[-1] // 2
        a, b = xf[..., :m], xf[..., m:]
        y = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return y.to(x.dtype) if keep_dtype else y


def test_rope_passes_reference_and_scratch():
    _passes(exercises.check_rope(apply_rotary_emb))
    _passes(exercises.check_rope(_rope))


def test_rope_mistakes():
    _fails_with(exercises.check_rope(lambda x, f: _rope(x, f, layout="half")), "half-split", "interleaved",
                "permutation")
    _fails_with(exercises.check_rope(lambda x, f: _rope(x, f, direction=-1)), "wrong way")
    _fails_with(exercises.check_rope(lambda x, f: x.clone()), "nothing was rotated")
    _fails_with(exercises.check_rope(lambda x, f: _rope(x, f, keep_dtype=False)), "bfloat16 queries",
                "wrong dtype torch.float32", "x's dtype")
    _fails_with(exercises.check_rope(lambda x, f: _rope(x, f).unflatten(-1, (-1, 2))), "wrong shape")
    _fails_with(exercises.check_rope(lambda x, f: _rope(x, f) * torch.nan), "non-finite", "NaN")


def test_rope_generic_error_reports_max_error_and_index():
    def off(x, f):
        y = _rope(x, f).clone()
        y[1, 4, 2, 3] += 0.5
        return y

    result = exercises.check_rope(off)
    _fails_with(result, "max abs error 0.5", "at index (1, 4, 2, 3)", "1 of 672 values")
    assert result.index == (1, 4, 2, 3) and math.isclose(result.max_error, 0.5, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------- 2. MLA projections
def _mla_proj(mla, x, freqs, q_norm=True, kv_norm=True, rotate_q=True, rotate_k=True, per_head_k=False,
              swap_split=False):
    B, S, _ = x.shape
    if mla.q_lora_rank == 0:
        q = mla.wq(x)
    else:
        c_q = mla.wq_a(x)
        q = mla.wq_b(mla.q_norm(c_q) if q_norm else c_q)
    q = q.view(B, S, mla.n_heads, mla.qk_head_dim)
    dh, dr = mla.qk_nope_head_dim, mla.qk_rope_head_dim
    q_nope, q_pe = (q[..., dr:], q[..., :dr]) if swap_split else (q[..., :dh], q[..., dh:])
    c_kv, k_pe = mla.wkv_a(x).split([mla.kv_lora_rank, dr], dim=-1)
    if per_head_k:
        k_pe = k_pe.unsqueeze(2).expand(-1, -1, mla.n_heads, -1)
    return (q_nope, _rope(q_pe, freqs) if rotate_q else q_pe, mla.kv_norm(c_kv) if kv_norm else c_kv,
            _rope(k_pe, freqs) if rotate_k else k_pe)


def test_mla_projections_pass_reference_and_scratch():
    _passes(exercises.check_mla_projections(lambda m, x, f: (*m.queries(x, f), *m.latent(x, f))))
    _passes(exercises.check_mla_projections(_mla_proj))


@pytest.mark.parametrize("mistake, fragments", [
    (dict(q_norm=False), ("q_norm",)),
    (dict(kv_norm=False), ("c_kv is not normalised", "kv_norm")),
    (dict(rotate_q=False), ("q_pe is not rotated",)),
    (dict(rotate_k=False), ("k_pe is not rotated",)),
    (dict(per_head_k=True), ("k_pe: wrong shape", "ONE rotary key shared by all heads")),
    (dict(swap_split=True), ("wrong end", "[q_nope (16); q_pe (8)]")),
])
def test_mla_projection_mistakes(mistake, fragments):
    _fails_with(exercises.check_mla_projections(lambda m, x, f: _mla_proj(m, x, f, **mistake)), *fragments)


def test_mla_projections_without_query_compression_are_checked_too():
    def only_lora(m, x, f):  # forgets the q_lora_rank = 0 case (no wq_a on such a module)
        return _mla_proj(m, x, f) if m.q_lora_rank else (None, None, None, None)

    _fails_with(exercises.check_mla_projections(only_lora), "q_lora_rank=0 q_nope", "expected a torch.Tensor")


# ---------------------------------------------------------------------------------------------- 3. absorption
def _absorbed(mla, x, freqs, mask, scale=None, use_mask=True):
    """From scratch: scores in the latent space, W_UV after the softmax."""
    q_nope, q_pe = mla.queries(x, freqs)  # (B, S, H, d_h), (B, S, H, d_r)
    c_kv, k_pe = mla.latent(x, freqs)  # (B, S, d_c), (B, S, d_r)
    w = mla.wkv_b.weight.view(mla.n_heads, -1, mla.kv_lora_rank)  # (H, d_h + d_v, d_c)
    w_uk, w_uv = w[:, : mla.qk_nope_head_dim], w[:, mla.qk_nope_head_dim:]
    q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
    scores = torch.einsum("bshc,btc->bsht", q_lat, c_kv) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
    scores = scores * (mla.softmax_scale if scale is None else scale)
    if mask is not None and use_mask:
        scores = scores + mask[:, None, :]
    p = scores.softmax(dim=-1)
    o = torch.einsum("bshc,hdc->bshd", torch.einsum("bsht,btc->bshc", p, c_kv), w_uv)
    return mla.wo(o.flatten(2))


def test_absorbed_attention_passes_reference_and_scratch():
    _passes(exercises.check_absorbed_attention(lambda m, x, f, mask: m(x, f, mask, attn_impl="absorb")))
    _passes(exercises.check_absorbed_attention(_absorbed))


def test_absorbed_attention_mistakes():
    check = exercises.check_absorbed_attention
    _fails_with(check(lambda m, x, f, mask: _absorbed(m, x, f, mask, scale=m.qk_head_dim ** -0.5)),
                "forgot YaRN's mscale^2", "mla.softmax_scale")
    _fails_with(check(lambda m, x, f, mask: _absorbed(m, x, f, mask, scale=1.0)), "forgot the softmax scale")
    _fails_with(check(lambda m, x, f, mask: _absorbed(m, x, f, mask, use_mask=False)), "causal mask")
    _fails_with(check(lambda m, x, f, mask: m(x, f, mask, attn_impl="naive")), "mla.wkv_b(...)", "naive path")


# ---------------------------------------------------------------------------------------------- 4. the gate
def _route(gate, x, bias_in_weights=False, ignore_bias=False, ignore_groups=False, group_max=None, scale=True,
           renorm=None, sort_indices=False):
    """From scratch, the mistakes as switches (group_max None: the right rule for the gate's score function)."""
    logits = F.linear(x.float(), gate.weight.float())
    s = logits.sigmoid() if gate.score_func == "sigmoid" else logits.softmax(dim=-1)
    biased = s + gate.bias if gate.bias is not None and not ignore_bias else s
    choose = biased
    if gate.n_groups > 1 and not ignore_groups:
        g = biased.view(len(x), gate.n_groups, -1)
        use_max = (gate.bias is None) if group_max is None else group_max
        group_score = g.amax(-1) if use_max else g.topk(2, dim=-1).values.sum(-1)
        keep = group_score.topk(gate.topk_groups, dim=-1).indices
        drop = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
        choose = g.masked_fill(drop[..., None], float("-inf")).flatten(1)
    idx = choose.topk(gate.topk, dim=-1).indices
    w = (biased if bias_in_weights else s).gather(1, idx)
    if (gate.score_func == "sigmoid") if renorm is None else renorm:
        w = w / w.sum(-1, keepdim=True)
    if scale:
        w = w * gate.route_scale
    if sort_indices:
        idx, order = idx.sort(dim=-1)
        w = w.gather(1, order)
    return w, idx


def test_gate_passes_reference_and_scratch():
    def reference(g, x):
        r = g(x)
        return r.weights, r.indices

    _passes(exercises.check_gate(reference))
    _passes(exercises.check_gate(_route))


@pytest.mark.parametrize("mistake, fragments", [
    (dict(bias_in_weights=True), ("V3 sigmoid", "bias leaked into the weights")),
    (dict(ignore_bias=True), ("ignored the bias when choosing",)),
    (dict(ignore_groups=True), ("ignored the expert groups",)),
    (dict(group_max=True), ("sum of its top-2 biased affinities",)),
    (dict(scale=False), ("forgot route_scale",)),
    (dict(renorm=False), ("renormalised over the chosen experts",)),
    (dict(sort_indices=True), ("same experts with the same weights, in a different order",)),
])
def test_gate_mistakes(mistake, fragments):
    _fails_with(exercises.check_gate(lambda g, x: _route(g, x, **mistake)), *fragments)


def test_gate_v2_mistakes():
    def v2_renorm(g, x):  # right for V3, renormalises the V2 softmax weights too
        return _route(g, x, renorm=True)

    def v2_top2(g, x):  # V3's group score (sum of the top two) applied to the softmax gate too
        return _route(g, x, group_max=False)

    _fails_with(exercises.check_gate(v2_renorm), "V2 softmax", "not renormalised")
    _fails_with(exercises.check_gate(v2_top2), "V2 softmax", "best affinity (the max)")


def test_gate_swapped_outputs_and_float_indices():
    _fails_with(exercises.check_gate(lambda g, x: _route(g, x)[::-1]), "indices have dtype torch.float32")
    _fails_with(exercises.check_gate(lambda g, x: (_route(g, x)[0], _route(g, x)[1].int())), "indices",
                "wrong dtype torch.int32")


# ---------------------------------------------------------------------------------------------- 5. the bias update
def _update(bias, load, gamma, sign=1, two_way=False, use_gamma=True, delta_only=False, dtype=None):
    load = load.float()
    e = load.mean() - load
    step = torch.where(e >= 0, 1.0, -1.0) if two_way else e.sign()
    delta = sign * (gamma if use_gamma else 1.0) * step
    out = delta if delta_only else bias + delta
    return out if dtype is None else out.to(dtype)


def test_bias_update_passes_reference_scratch_and_in_place():
    _passes(exercises.check_bias_update(lambda b, load, g: balance.update_bias(b, load, g)))  # in place, None
    _passes(exercises.check_bias_update(_update))


@pytest.mark.parametrize("mistake, fragments", [
    (dict(sign=-1), ("sign is inverted", "LOWER bias")),
    (dict(two_way=True), ("exactly at the mean", "sign(0) = 0")),
    (dict(use_gamma=False), ("forgot gamma",)),
    (dict(delta_only=True), ("returned the change",)),
    (dict(dtype=torch.float64), ("wrong dtype torch.float64", "float32")),
])
def test_bias_update_mistakes(mistake, fragments):
    _fails_with(exercises.check_bias_update(lambda b, load, g: _update(b, load, g, **mistake)), *fragments)


def test_bias_update_proportional_rule_is_named():
    def proportional(b, load, g):
        balance.update_bias(b, load, g, "proportional")

    _fails_with(exercises.check_bias_update(proportional), "proportional variant")


def test_bias_update_integer_loads_hint():
    def int_mean(b, load, g):
        return b + g * (load.mean() - load).sign()  # int64 mean raises in torch

    _fails_with(exercises.check_bias_update(int_mean), "raised RuntimeError", "load.float()")


# ---------------------------------------------------------------------------------------------- 6. the MTP combine
def _combine(mtp, h, e, order="emb_first", norms=True, swap_norms=False):
    en, hn = (mtp.hnorm, mtp.enorm) if swap_norms else (mtp.enorm, mtp.hnorm)
    a, b = (en(e), hn(h)) if norms else (e, h)
    return mtp.eh_proj(torch.cat([a, b] if order == "emb_first" else [b, a], dim=-1))


def test_mtp_combine_passes():
    _passes(exercises.check_mtp_combine(_combine))


@pytest.mark.parametrize("mistake, fragments", [
    (dict(order="h_first"), ("concatenation order is reversed", "embedding first")),
    (dict(norms=False), ("forgot the RMSNorms",)),
    (dict(swap_norms=True), ("norms are swapped",)),
])
def test_mtp_combine_mistakes(mistake, fragments):
    _fails_with(exercises.check_mtp_combine(lambda m, h, e: _combine(m, h, e, **mistake)), *fragments)


def test_mtp_combine_without_projection_is_a_shape_hint():
    _fails_with(exercises.check_mtp_combine(lambda m, h, e: torch.cat([m.enorm(e), m.hnorm(h)], -1)),
                "wrong shape (2, 5, 128)", "eh_proj")


# ---------------------------------------------------------------------------------------------- 7. FP8 1x128
def _quant(x, floor=1e-4, invert=False, divide=True, fmt=torch.float8_e4m3fn, cast=True, per_tensor=False,
           drop_ragged=False, pow2=False):
    *lead, cols = x.shape
    n = math.ceil(cols / 128)
    x2 = x.reshape(-1, cols).float()
    tiles = F.pad(x2, (0, n * 128 - cols)).view(len(x2), n, 128)  # (rows, n, 128)
    amax = tiles.abs().amax(-1).clamp(min=floor)  # (rows, n)
    if per_tensor:
        amax = amax.amax().expand(len(x2), n)
    scale = amax / 448.0 if divide else amax
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (tiles / scale[..., None]).clamp(-448, 448).reshape(len(x2), n * 128)[:, :cols].reshape(x.shape)
    q = q.to(fmt) if cast else q
    scale = 1 / scale if invert else scale
    if per_tensor:
        return q, scale[0, 0]
    return q, scale.reshape(*lead, n)[..., : cols // 128] if drop_ragged else scale.reshape(*lead, n)


def test_fp8_tile_passes_reference_and_scratch():
    _passes(exercises.check_fp8_tile_quant(lambda x: fp8.quantize(x, "1x128")))
    _passes(exercises.check_fp8_tile_quant(_quant))


@pytest.mark.parametrize("mistake, fragments", [
    (dict(floor=0), ("NaN", "all-zero tile", "1e-4")),
    (dict(invert=True), ("scale is inverted",)),
    (dict(divide=False), ("divide it by 448",)),
    (dict(fmt=torch.float8_e5m2), ("E5M2", "E4M3")),
    (dict(cast=False), ("torch.float32", "float8_e4m3fn")),
    (dict(per_tensor=True), ("per-tensor scaling",)),
    (dict(drop_ragged=True), ("partial tile needs a scale",)),
    (dict(pow2=True), ("powers of two",)),
    (dict(floor=1e-12), ("all-zero tile's scale",)),
])
def test_fp8_tile_mistakes(mistake, fragments):
    _fails_with(exercises.check_fp8_tile_quant(lambda x: _quant(x, **mistake)), *fragments)


# ---------------------------------------------------------------------------------------------- solutions notebook
def test_the_solutions_notebook_solves_every_exercise():
    solutions = load_solutions(SOLUTIONS)
    for exercise in EXERCISES.values():
        if exercise.notebook == "70_sparse_attention":  # solved in the chapter notebook: tests/test_dsa_exercises.py
            continue
        assert exercise.function in solutions, f"02_solutions.ipynb defines no {exercise.function}"
        _passes(exercise.check(solutions[exercise.function]))


def test_load_solutions_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no notebook"):
        load_solutions(tmp_path / "missing.ipynb")
    (tmp_path / "bad.ipynb").write_text("not json")
    with pytest.raises(ValueError, match="not a notebook"):
        load_solutions(tmp_path / "bad.ipynb")
    (tmp_path / "empty.ipynb").write_text('{"cells": []}')
    with pytest.raises(ValueError, match="no code cell"):
        load_solutions(tmp_path / "empty.ipynb")


def test_checkers_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    exercises.check_gate(_route)
    exercises.check_mtp_combine(_combine)
    assert torch.equal(torch.rand(3), expected)
