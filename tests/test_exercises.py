"""Exercise checkers: each passes the package's own function and a from-scratch solution, and each plausible wrong
answer in `WRONG_ANSWERS` (written here the way a student would write it) gets a diagnosis that names the mistake,
never an exception and never only a generic error figure."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsv3_ref.fp8 import formats as fp8
from dsv3_ref.nn.rope import apply_rotary_emb
from dsv3_ref.objectives import balance
from dsv3_ref.teaching import exercises
from dsv3_ref.teaching.exercises import EXERCISES, CheckResult, load_solutions

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "notebooks" / "exercises" / "02_solutions.ipynb"
GENERIC = ("max abs error", "chose different experts")  # the generic fallbacks: never the diagnosis of a known mistake


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
def _rope(x, freqs_cis, layout="interleaved", direction=1, keep_dtype=True, signs=(1, 1), swap=False,
          write_back="interleave", freqs_view=None, to_float=True):
    """A from-scratch RoPE with the mistakes as switches. signs: the signs of the sin terms of the two lines
    (x'_even = a cos - s0 b sin, x'_odd = s1 a sin + b cos); swap: sin and cos exchanged; freqs_view: a fixed
    broadcast shape for freqs_cis (the right one depends on x.dim())."""
    view = freqs_view(x) if freqs_view else (1, x.shape[1], *([1] * (x.dim() - 3)), -1)
    f = freqs_cis.view(*view)
    cos, sin = f.real, direction * f.imag
    if swap:
        cos, sin = sin, cos
    xf = x.float() if to_float else x
    if layout == "interleaved":
        a, b = xf[..., 0::2], xf[..., 1::2]
    else:  # half-split
        m = x.shape[-1] // 2
        a, b = xf[..., :m], xf[..., m:]
    even, odd = a * cos - signs[0] * b * sin, signs[1] * a * sin + b * cos
    if layout == "interleaved" and write_back == "interleave":
        y = torch.stack([even, odd], dim=-1).flatten(-2)
    else:
        y = torch.cat([even, odd], dim=-1)
    return y.to(x.dtype) if keep_dtype else y


def _rope_own_angles(x, freqs_cis, first=0):
    """Ignores freqs_cis: angles from positions first, first + 1, ... and RoPE's base frequencies."""
    d = x.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    angle = torch.outer(torch.arange(first, first + x.shape[1], dtype=torch.float32), theta)
    return _rope(x, torch.polar(torch.ones_like(angle), angle))


def _rope_complex_no_float(x, freqs_cis):
    """view_as_complex on x as it comes (fails for bfloat16)."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 3) + [-1]
    return torch.view_as_real(xc * freqs_cis.view(shape)).flatten(-2).to(x.dtype)


def test_rope_passes_reference_and_scratch():
    _passes(exercises.check_rope(apply_rotary_emb))
    _passes(exercises.check_rope(_rope))


def test_rope_generic_error_reports_max_error_and_index():
    def off(x, f):
        y = _rope(x, f).clone()
        y[1, 4, 2, 3] += 0.5
        return y

    result = exercises.check_rope(off)
    _fails_with(result, "max abs error 0.5", "at index (1, 4, 2, 3)", "1 of 672 values", "not a rotation")
    assert result.index == (1, 4, 2, 3) and math.isclose(result.max_error, 0.5, rel_tol=1e-5)


def test_rope_non_finite_output_is_reported():
    _fails_with(exercises.check_rope(lambda x, f: _rope(x, f) * torch.nan), "672 non-finite value(s)", "first NaN")


def test_rope_unknown_angles_are_located():
    def wrong_base(x, f):  # base frequencies 10000^(-j/d) instead of 10000^(-2j/d): a rotation, wrong angles
        d = x.shape[-1]
        theta = 10000.0 ** (-torch.arange(d // 2, dtype=torch.float32) / d)
        angle = torch.outer(torch.arange(x.shape[1], dtype=torch.float32), theta)
        return _rope(x, torch.polar(torch.ones_like(angle), angle))

    _fails_with(exercises.check_rope(wrong_base), "keeps its length", "wrong angle", "rad")


# ---------------------------------------------------------------------------------------------- 2. MLA projections
def _mla_proj(mla, x, freqs, q_norm=True, kv_norm=True, rotate_q=True, rotate_k=True, per_head_k=False,
              swap_split=False, rope_all_q=False, rope_q_nope=False, kv_split_reversed=False, split_before_heads=False,
              kv_norm_all=False, k_layout="interleaved"):
    B, S, _ = x.shape
    H, dh, dr, dc = mla.n_heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
    if mla.q_lora_rank == 0:
        q = mla.wq(x)
    else:
        c_q = mla.wq_a(x)
        q = mla.wq_b(mla.q_norm(c_q) if q_norm else c_q)
    if split_before_heads:  # [all heads' q_nope; all heads' q_pe]
        q_nope, q_pe = q[..., : H * dh].view(B, S, H, dh), q[..., H * dh:].view(B, S, H, dr)
    else:
        q = q.view(B, S, H, mla.qk_head_dim)
        if rope_all_q:
            q = _rope(q, freqs)
        q_nope, q_pe = (q[..., dr:], q[..., :dr]) if swap_split else (q[..., :dh], q[..., dh:])
    if rope_q_nope:
        q_nope = _rope(q_nope, freqs)
    kv = mla.wkv_a(x)
    if kv_norm_all:
        kv = mla.kv_norm(kv)
    k_pe, c_kv = kv.split([dr, dc], dim=-1) if kv_split_reversed else kv.split([dc, dr], dim=-1)[::-1]
    if per_head_k:
        k_pe = k_pe.unsqueeze(2).expand(-1, -1, H, -1)
    return (q_nope, _rope(q_pe, freqs) if rotate_q and not rope_all_q else q_pe,
            mla.kv_norm(c_kv) if kv_norm and not kv_norm_all else c_kv,
            _rope(k_pe, freqs, layout=k_layout) if rotate_k else k_pe)


def test_mla_projections_pass_reference_and_scratch():
    _passes(exercises.check_mla_projections(lambda m, x, f: (*m.queries(x, f), *m.latent(x, f))))
    _passes(exercises.check_mla_projections(_mla_proj))


def test_mla_projections_without_query_compression_are_checked_too():
    def only_lora(m, x, f):  # forgets the q_lora_rank = 0 case (no wq_a on such a module)
        return _mla_proj(m, x, f) if m.q_lora_rank else (None, None, None, None)

    _fails_with(exercises.check_mla_projections(only_lora), "q_lora_rank=0 q_nope", "expected a torch.Tensor")


# ---------------------------------------------------------------------------------------------- 3. absorption
def _masked(scores, mask, mask_op):
    """The mask applied right ("add") or in one of the classic wrong ways."""
    if mask_op == "add":
        return scores + mask[:, None, :]
    if mask_op == "mul":
        return scores * mask[:, None, :]
    if mask_op == "no_unsqueeze":
        return scores + mask
    return scores


def _absorbed(mla, x, freqs, mask, scale=None, use_mask=True, rope_term=True, softmax_dim=-1, wo=True,
              swap_uk_uv=False, wrong_view=False, expand=False, mask_op="add", scale_after=False, apply_w_uv=True,
              check_none=True):
    """From scratch: scores in the latent space, W_UV after the softmax."""
    H, dh, dv, dc = mla.n_heads, mla.qk_nope_head_dim, mla.v_head_dim, mla.kv_lora_rank
    q_nope, q_pe = mla.queries(x, freqs)  # (B, S, H, d_h), (B, S, H, d_r)
    c_kv, k_pe = mla.latent(x, freqs)  # (B, S, d_c), (B, S, d_r)
    if wrong_view:
        w = mla.wkv_b.weight.view(H, dc, dh + dv).transpose(1, 2)
    else:
        w = mla.wkv_b.weight.view(H, -1, dc)  # (H, d_h + d_v, d_c)
    w_uk, w_uv = (w[:, -dh:], w[:, :dv]) if swap_uk_uv else (w[:, :dh], w[:, dh:])
    if expand:  # per-head keys and values from the weight slices: the naive path without calling wkv_b
        k_nope = torch.einsum("btc,hdc->bthd", c_kv, w_uk)
        v = torch.einsum("btc,hdc->bthd", c_kv, w_uv)
        scores = torch.einsum("bshd,bthd->bsht", q_nope, k_nope) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
    else:
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        scores = torch.einsum("bshc,btc->bsht", q_lat, c_kv)
        if rope_term:
            scores = scores + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
    s = mla.softmax_scale if scale is None else scale
    if not scale_after:
        scores = scores * s
    if (mask is not None or not check_none) and use_mask:
        scores = _masked(scores, mask, mask_op)
    p = scores.softmax(dim=softmax_dim)
    if mask is not None and use_mask and mask_op == "after":
        p = p + mask[:, None, :]
    if scale_after:
        p = p * s
    if expand:
        o = torch.einsum("bsht,bthd->bshd", p, v)
    elif apply_w_uv:
        o = torch.einsum("bshc,hdc->bshd", torch.einsum("bsht,btc->bshc", p, c_kv), w_uv)
    else:
        o = torch.einsum("bsht,btc->bshc", p, c_kv)
    return mla.wo(o.flatten(2)) if wo else o.flatten(2)


def test_absorbed_attention_passes_reference_and_scratch():
    _passes(exercises.check_absorbed_attention(lambda m, x, f, mask: m(x, f, mask, attn_impl="absorb")))
    _passes(exercises.check_absorbed_attention(_absorbed))


def test_absorbed_attention_in_one_einsum_is_not_called_expanding():
    """q_nope, W_UK and c_kv in one einsum: torch contracts left to right, the latent meets the query first."""
    def one_einsum(mla, x, freqs, mask):
        q_nope, q_pe = mla.queries(x, freqs)
        c_kv, k_pe = mla.latent(x, freqs)
        w = mla.wkv_b.weight.view(mla.n_heads, -1, mla.kv_lora_rank)
        scores = torch.einsum("bshd,hdc,btc->bsht", q_nope, w[:, : mla.qk_nope_head_dim], c_kv)
        scores = (scores + torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * mla.softmax_scale
        if mask is not None:
            scores = scores + mask[:, None, :]
        o = torch.einsum("bsht,btc,hdc->bshd", scores.softmax(-1), c_kv, w[:, mla.qk_nope_head_dim:])
        return mla.wo(o.flatten(2))

    _passes(exercises.check_absorbed_attention(one_einsum))


def test_absorb_model_is_mla_forward():
    mla = exercises._mla_module(3)
    freqs = exercises.precompute_freqs_cis(exercises.ModelConfig(**exercises._YARN_CFG))[:6]
    x, mask = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(0)), exercises.causal_mask(6, 0)
    torch.testing.assert_close(exercises._absorb_model(mla, x, freqs, mask), mla(x, freqs, mask, attn_impl="absorb"))


# ---------------------------------------------------------------------------------------------- 4. the gate
def _route(gate, x, bias_in_weights=False, ignore_bias=False, ignore_groups=False, group_max=None, scale=True,
           renorm=None, sort_indices=False, score=None, subtract_bias=False, group_sum_all=False, strided=False,
           invert_keep=False, topk_unbiased=False, softmax_weights=False, weights_from_logits=False, skip_best=False,
           check_none=True):
    """From scratch, the mistakes as switches (group_max None: the right rule for the gate's score function)."""
    logits = F.linear(x.float(), gate.weight.float())
    score = score or gate.score_func
    s = {"sigmoid": logits.sigmoid(), "softmax": logits.softmax(dim=-1), "tokens": logits.softmax(dim=0),
         "logits": logits}[score]
    if (gate.bias is not None or not check_none) and not ignore_bias:
        biased = s - gate.bias if subtract_bias else s + gate.bias
    else:
        biased = s
    choose = s if topk_unbiased else biased
    if gate.n_groups > 1 and not ignore_groups:
        E, G = logits.shape[1], gate.n_groups
        g = biased.view(len(x), E // G, G).transpose(1, 2) if strided else biased.view(len(x), G, -1)
        use_max = (gate.bias is None) if group_max is None else group_max
        if group_sum_all:
            group_score = g.sum(-1)
        else:
            group_score = g.amax(-1) if use_max else g.topk(2, dim=-1).values.sum(-1)
        keep = group_score.topk(gate.topk_groups, dim=-1).indices
        drop = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
        if invert_keep:
            drop = ~drop
        if strided:
            drop = drop[:, None, :].expand(-1, E // G, -1).reshape(len(x), E)
        else:
            drop = drop[..., None].expand(-1, -1, E // G).reshape(len(x), E)
        choose = choose.masked_fill(drop, float("-inf"))
    idx = choose.topk(gate.topk + 1, dim=-1).indices[:, 1:] if skip_best else choose.topk(gate.topk, dim=-1).indices
    w = (logits if weights_from_logits else biased if bias_in_weights else s).gather(1, idx)
    if softmax_weights:
        w = w.softmax(dim=-1)
    elif (gate.score_func == "sigmoid") if renorm is None else renorm:
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


def test_gate_swapped_outputs_and_float_indices():
    _fails_with(exercises.check_gate(lambda g, x: _route(g, x)[::-1]), "indices have dtype torch.float32")
    _fails_with(exercises.check_gate(lambda g, x: (_route(g, x)[0], _route(g, x)[1].int())), "indices",
                "wrong dtype torch.int32")


def test_gate_unmodelled_selection_is_located_by_step():
    """A selection no route models (the experts ranked 2..K+1 inside the right groups) is located at step 5."""
    _fails_with(exercises.check_gate(lambda g, x: _route(g, x, skip_best=True)), "step 5 (top-k)", "kept groups",
                "tokens chose different experts")


def test_gate_route_model_is_the_gate():
    """The checker's step-by-step model, with no mistake, routes exactly as Gate.forward."""
    for _, gate, x in exercises._gate_cases():
        ref = gate(x)
        logits = F.linear(x.float(), gate.weight.float())
        steps = exercises._route_select(gate, logits, exercises._Route())
        assert torch.equal(steps["indices"], ref.indices)
        assert torch.equal(exercises._route_weights(gate, exercises._Route(), steps, ref.indices), ref.weights)


# ---------------------------------------------------------------------------------------------- 5. the bias update
def _update(bias, load, gamma, sign=1, two_way=False, use_gamma=True, delta_only=False, dtype=None,
            proportional_e=False, against="mean", in_place_too=False, forget_return=False):
    load = load.float()
    e = (load.mean() if against == "mean" else load.sum()) - load
    step = e if proportional_e else torch.where(e >= 0, 1.0, -1.0) if two_way else e.sign()
    delta = sign * (gamma if use_gamma else 1.0) * step
    if forget_return:
        bias + delta  # noqa: B018 - the mistake: the result is dropped
        return None
    if in_place_too:
        bias += delta
    out = delta if delta_only else bias + delta
    return out if dtype is None else out.to(dtype)


def test_bias_update_passes_reference_scratch_and_in_place():
    _passes(exercises.check_bias_update(lambda b, load, g: balance.update_bias(b, load, g)))  # in place, None
    _passes(exercises.check_bias_update(_update))


def _proportional(b, load, g):
    balance.update_bias(b, load, g, "proportional")


def _int_mean(b, load, g):
    return b + g * (load.mean() - load).sign()  # int64 mean raises in torch


# ---------------------------------------------------------------------------------------------- 6. the MTP combine
def _combine(mtp, h, e, order="emb_first", norms=True, swap_norms=False, enorm=True, hnorm=True, join="cat",
             residual=False):
    en, hn = (mtp.hnorm, mtp.enorm) if swap_norms else (mtp.enorm, mtp.hnorm)
    a = en(e) if norms and enorm else e
    b = hn(h) if norms and hnorm else h
    first, second = (a, b) if order == "emb_first" else (b, a)
    joined = first + second if join == "add" else torch.cat([first, second], dim=1 if join == "cat_seq" else -1)
    out = mtp.eh_proj(joined)
    return out + h if residual else out


def test_mtp_combine_passes():
    _passes(exercises.check_mtp_combine(_combine))


# ---------------------------------------------------------------------------------------------- 7. FP8 1x128
_E4M3_GRID = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
_E4M3_GRID = _E4M3_GRID[torch.isfinite(_E4M3_GRID)].unique()  # sorted, one zero


def _round_grid(v, mode):
    """v (within +-448) onto the E4M3 grid, by the rounding `mode` (trunc toward zero, away from zero)."""
    lo = _E4M3_GRID[torch.searchsorted(_E4M3_GRID, v, right=True) - 1]  # largest grid value <= v
    hi = _E4M3_GRID[torch.searchsorted(_E4M3_GRID, v)]  # smallest grid value >= v
    return torch.where(v >= 0, lo, hi) if mode == "trunc" else torch.where(v >= 0, hi, lo)


def _quant(x, floor=1e-4, invert=False, divide=True, fmt=torch.float8_e4m3fn, cast=True, per_tensor=False,
           drop_ragged=False, pow2=False, fmax=448.0, tile=(1, 128), expand_scales=False, signed_amax=False,
           multiply=False, crop=True, rounding="rne"):
    *lead, cols = x.shape
    x2 = x.reshape(-1, cols).float()
    rows = len(x2)
    bm, bk = tile
    mb, n = math.ceil(rows / bm), math.ceil(cols / bk)
    blocks = F.pad(x2, (0, n * bk - cols, 0, mb * bm - rows)).view(mb, bm, n, bk)
    amax = (blocks.amax((1, 3)) if signed_amax else blocks.abs().amax((1, 3))).clamp(min=floor)  # (mb, n)
    if per_tensor:
        amax = amax.amax().expand(mb, n)
    scale = amax / fmax if divide else amax
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    s4 = scale.view(mb, 1, n, 1)
    v = (blocks * s4 if multiply else blocks / s4).clamp(-448, 448)
    if rounding == "e5m2":
        v = v.to(torch.float8_e5m2).float()
    elif rounding in ("trunc", "away"):
        v = _round_grid(v, rounding)
    q = v.reshape(mb * bm, n * bk)
    q = q[:rows, :cols].reshape(x.shape) if crop else q[:rows].reshape(*lead, n * bk)
    if rounding == "up1":  # every code one E4M3 step larger in magnitude
        q8 = q.to(torch.float8_e4m3fn).view(torch.uint8)
        q = ((q8 & 0x80) | ((q8 & 0x7F) + 1).clamp(max=0x7E)).view(torch.float8_e4m3fn).float()
    q = q.to(fmt) if cast else q
    scale = 1 / scale if invert else scale
    if per_tensor and not expand_scales:
        return q, scale[0, 0]
    if expand_scales or bm > 1:  # a block scale per row: (mb, n) -> (rows, n)
        scale = scale.repeat_interleave(bm, dim=0)[:rows] if expand_scales else scale
        return q, scale.reshape(*lead, n) if expand_scales else scale
    return q, scale.reshape(*lead, n)[..., : cols // bk] if drop_ragged else scale.reshape(*lead, n)


def test_fp8_tile_passes_reference_and_scratch():
    _passes(exercises.check_fp8_tile_quant(lambda x: fp8.quantize(x, "1x128")))
    _passes(exercises.check_fp8_tile_quant(_quant))


def test_fp8_tile_accepts_multiplying_by_the_inverse_scale():
    def by_inverse(x):  # x * (1 / s) instead of x / s: float32 may differ by one ulp, E4M3 codes must not
        q, s = _quant(x, cast=False)
        *lead, cols = x.shape
        inv = (1.0 / s).repeat_interleave(128, dim=-1)[..., :cols]
        return (x * inv).clamp(-448, 448).to(torch.float8_e4m3fn), s

    _passes(exercises.check_fp8_tile_quant(by_inverse))


def test_fp8_tile_codes_must_be_exact():
    """A single code one step off (away from a rounding tie) fails: the codes are compared exactly."""
    def one_code_off(x):
        q, s = fp8.quantize(x, "1x128")
        q = q.float()
        q[0, 0] = _E4M3_GRID[torch.searchsorted(_E4M3_GRID, q[0, 0]) + 1]
        return q.to(torch.float8_e4m3fn), s

    _fails_with(exercises.check_fp8_tile_quant(one_code_off), "1 of", "codes differ", "round-to-nearest-even")


# ---------------------------------------------------------------------------------------------- the catalog
def _w(exercise, fn, *fragments, id):  # noqa: A002 - pytest's name
    return pytest.param(exercise, fn, fragments, id=f"{exercise}-{id}")


WRONG_ANSWERS = [
    # 1. RoPE
    _w("rope", lambda x, f: _rope(x, f, layout="half"), "half-split", "interleaved", "permutation", id="half-split"),
    _w("rope", lambda x, f: _rope(x, f, direction=-1), "wrong way", id="conjugate"),
    _w("rope", lambda x, f: x.clone(), "nothing was rotated", id="identity"),
    _w("rope", lambda x, f: _rope(x, f, keep_dtype=False), "bfloat16 queries", "wrong dtype torch.float32",
       "x's dtype", id="dtype"),
    _w("rope", lambda x, f: _rope(x, f).unflatten(-1, (-1, 2)), "wrong shape", id="shape"),
    _w("rope", lambda x, f: _rope(x, f, signs=(-1, 1)), "one sign is wrong", "+ x_{2j+1} sin", id="sign-even"),
    _w("rope", lambda x, f: _rope(x, f, signs=(1, -1)), "one sign is wrong", "- x_{2j} sin", id="sign-odd"),
    _w("rope", lambda x, f: _rope(x, f, swap=True), "sin where cos belongs", id="sin-cos-swapped"),
    _w("rope", lambda x, f: _rope(x, f.flip(0)), "positions are reversed", id="positions-reversed"),
    _w("rope", lambda x, f: _rope_own_angles(x, f, first=1), "off by one", "positions 1-7", id="positions-1-based"),
    _w("rope", _rope_own_angles, "shared key", "positions 0-8", "positions 5-13", "use the freqs_cis",
       id="positions-from-0"),
    _w("rope", lambda x, f: _rope(x, f, write_back="cat"), "concatenated", "interleave", id="write-back-cat"),
    _w("rope", lambda x, f: _rope(x, f, freqs_view=lambda x: (1, 1, x.shape[1], -1)), "raised RuntimeError",
       "(1, T, 1, d_r/2)", id="freqs-on-heads-axis"),
    _w("rope", lambda x, f: _rope(x, f, freqs_view=lambda x: (1, x.shape[1], 1, -1)), "shared key",
       "raised RuntimeError", "no head axis", id="only-4d"),
    _w("rope", _rope_complex_no_float, "bfloat16 queries", "raised RuntimeError", "float32", id="bf16-complex"),
    # 2. MLA projections
    _w("mla_proj", lambda m, x, f: _mla_proj(m, x, f, q_norm=False), "q_norm", id="no-q-norm"),
    _w("mla_proj", lambda m, x, f: _mla_proj(m, x, f, kv_norm=False), "c_kv is not normalised", "kv_norm",
       id="no-kv-norm"),
    _w("mla_proj", lambda m, x, f: _mla_proj(m, x, f, rotate_q=False), "q_pe is not rotated", id="q-pe-not-rotated"),
    _w("mla_proj", lambda m, x, f: _mla_proj(m, x, f, rotate_k=False), "k_pe is not rotated", id="k-pe-not-rotated"),
    _w("mla_proj", lambda m, x, f: _mla_proj(m, x, f, k_layout="half"), "half-split", id="k-pe-half-split"),
    _w("mla_proj", lambda m, x, f: _mla_proj(m, x, f, per_head_k=True), "k_pe: wrong shape",
       "ONE rotary key shared by all heads", id="k-pe-per-head"),
    _w("mla_proj", lambda m, x, f: _mla_proj(m, x, f, swap_split=True), "wrong end", "[q_nope (16); q_pe (8)]",
       id="q-split-reversed"),
    _w("mla_proj", lambda m, x, f: _mla_proj(m, x, f, rope_all_q=True), "raised RuntimeError",
       "apply RoPE only to the last qk_rope_head_dim", id="rope-all-q-dims"),
    _w("mla_proj", lambda m, x, f: _mla_proj(m, x, f, rope_q_nope=True), "raised RuntimeError", "q_nope",
       "rotate q_pe", id="rope-on-q-nope"),
    _w("mla_proj", lambda m, x, f: _mla_proj(m, x, f, kv_split_reversed=True), "c_kv",
       "wrong way round", "[c_kv (d_c); k_pe (d_r)]", id="kv-split-reversed"),
    _w("mla_proj", lambda m, x, f: _mla_proj(m, x, f, split_before_heads=True), "before viewing it per head",
       id="q-split-before-heads"),
    _w("mla_proj", lambda m, x, f: _mla_proj(m, x, f, kv_norm_all=True), "raised RuntimeError",
       "kv_norm normalises c_kv only", id="kv-norm-on-k-pe"),
    # 3. absorption
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, scale=m.qk_head_dim ** -0.5),
       "forgot YaRN's mscale^2", "mla.softmax_scale", id="plain-scale"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, scale=1.0), "forgot the softmax scale", id="no-scale"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, scale=1 / m.softmax_scale), "divided the scores",
       id="divided-scale"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, use_mask=False), "causal mask", id="no-mask"),
    _w("absorb", lambda m, x, f, mask: m(x, f, mask, attn_impl="naive"), "mla.wkv_b(...)", "naive path",
       id="naive-wkv-b"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, rope_term=False), "dropped the rotary term",
       "q_pe . k_pe", id="no-rope-term"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, softmax_dim=2), "softmax over the heads",
       "the keys", id="softmax-over-heads"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, softmax_dim=1), "softmax over the queries",
       "the keys", id="softmax-over-queries"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, wo=False), "output projection", "mla.wo",
       id="no-wo"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, apply_w_uv=False), "raised RuntimeError",
       "apply W_UV", id="no-w-uv"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, check_none=False), "one token S=1",
       "raised TypeError", "mask", "only when it is not None", id="mask-none-unchecked"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, swap_uk_uv=True), "W_UK and W_UV are swapped",
       id="uk-uv-swapped"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, wrong_view=True), "(H, d_h + d_v, d_c)",
       "not (H, d_c, d_h + d_v)", id="wkv-b-wrong-view"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, expand=True), "expands per-head keys",
       "without calling mla.wkv_b", id="expanded-by-einsum"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, mask_op="mul"), "multiplied the scores by the mask",
       id="mask-multiplied"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, mask_op="after"), "after the softmax",
       id="mask-after-softmax"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, mask_op="no_unsqueeze"), "raised RuntimeError",
       "only when a mask is given", "mask[:, None, :]", id="mask-broadcast"),
    _w("absorb", lambda m, x, f, mask: _absorbed(m, x, f, mask, scale_after=True), "after the softmax",
       "scores", id="scale-after-softmax"),
    # 4. the gate
    _w("gate", lambda g, x: _route(g, x, bias_in_weights=True), "V3 sigmoid", "bias leaked into the weights",
       id="bias-in-weights"),
    _w("gate", lambda g, x: _route(g, x, ignore_bias=True), "step 2 (biased scores)",
       "ignored the bias when choosing", id="bias-ignored"),
    _w("gate", lambda g, x: _route(g, x, subtract_bias=True), "step 2 (biased scores)", "subtracted the bias",
       id="bias-subtracted"),
    _w("gate", lambda g, x: _route(g, x, ignore_groups=True), "step 3", "ignored the expert groups",
       id="groups-ignored"),
    _w("gate", lambda g, x: _route(g, x, group_max=True), "step 3 (group scores)",
       "sum of its top-2 biased affinities", id="v3-group-max"),
    _w("gate", lambda g, x: _route(g, x, group_sum_all=True), "step 3 (group scores)", "not of all its experts",
       id="group-sum-all"),
    _w("gate", lambda g, x: _route(g, x, strided=True), "step 3 (group scores)", "contiguous blocks",
       id="groups-strided"),
    _w("gate", lambda g, x: _route(g, x, invert_keep=True), "step 4 (kept groups)", "masked the kept groups",
       id="kept-groups-inverted"),
    _w("gate", lambda g, x: _route(g, x, topk_unbiased=True), "step 5 (top-k)", "the bias takes part in the top-k",
       id="topk-unbiased"),
    _w("gate", lambda g, x: _route(g, x, scale=False), "weights: you forgot route_scale", id="no-route-scale"),
    _w("gate", lambda g, x: _route(g, x, renorm=False), "renormalised over the chosen experts", id="no-renorm"),
    _w("gate", lambda g, x: _route(g, x, softmax_weights=True), "softmax over the chosen experts", id="softmax-topk"),
    _w("gate", lambda g, x: _route(g, x, weights_from_logits=True), "raw logits", id="weights-from-logits"),
    _w("gate", lambda g, x: _route(g, x, sort_indices=True), "same experts with the same weights, in a different order",
       id="indices-sorted"),
    _w("gate", lambda g, x: _route(g, x, score="softmax"), "V3 sigmoid", "step 1 (scores)", "softmax",
       "score_func is 'sigmoid'", id="v3-softmax"),
    _w("gate", lambda g, x: _route(g, x, score="sigmoid"), "V2 softmax", "step 1 (scores)",
       "score_func is 'softmax'", id="v2-sigmoid"),
    _w("gate", lambda g, x: _route(g, x, score="tokens" if g.score_func == "softmax" else None), "V2 softmax",
       "over the tokens", id="v2-softmax-over-tokens"),
    _w("gate", lambda g, x: _route(g, x, score="logits"), "step 1 (scores)", "raw logits", id="no-score-function"),
    _w("gate", lambda g, x: _route(g, x, renorm=True), "V2 softmax", "not renormalised", id="v2-renorm"),
    _w("gate", lambda g, x: _route(g, x, check_none=False), "V2 softmax", "raised TypeError", "gate.bias",
       "only when it is not None", id="v2-bias-none-unchecked"),
    _w("gate", lambda g, x: _route(g, x, group_max=False), "V2 softmax", "best affinity (the max)", id="v2-top2"),
    _w("gate", lambda g, x: _route(g, x, score="softmax", bias_in_weights=True), "step 1 (scores)",
       "then also", "bias leaked into the weights", id="compound-softmax-bias-leak"),
    _w("gate", lambda g, x: _route(g, x, ignore_bias=True, scale=False), "step 2 (biased scores)", "then also",
       "forgot route_scale", id="compound-no-bias-no-scale"),
    _w("gate", lambda g, x: _route(g, x, subtract_bias=True, group_max=True), "step 2 (biased scores)",
       "subtracted the bias", "then also", "step 3", id="compound-bias-subtracted-group-max"),
    _w("gate", lambda g, x: _route(g, x, strided=True, renorm=False),
       "step 3", "contiguous blocks", "then also", "renormalised", id="compound-strided-no-renorm"),
    # 5. the bias update
    _w("bias_update", lambda b, load, g: _update(b, load, g, sign=-1), "sign is inverted", "LOWER bias",
       id="sign-inverted"),
    _w("bias_update", lambda b, load, g: _update(b, load, g, two_way=True), "exactly at the mean", "sign(0) = 0",
       id="two-way"),
    _w("bias_update", lambda b, load, g: _update(b, load, g, use_gamma=False), "forgot gamma", id="no-gamma"),
    _w("bias_update", lambda b, load, g: _update(b, load, g, delta_only=True), "returned the change", id="delta"),
    _w("bias_update", lambda b, load, g: _update(b, load, g, dtype=torch.float64), "wrong dtype torch.float64",
       "float32", id="float64"),
    _w("bias_update", lambda b, load, g: _update(b, load, g, proportional_e=True), "gamma * sign(e_i), not gamma * e_i",
       id="no-sign"),
    _w("bias_update", _proportional, "proportional variant", id="proportional"),
    _w("bias_update", _int_mean, "raised RuntimeError", "load.float()", id="int-mean"),
    _w("bias_update", lambda b, load, g: _update(b, load, g, forget_return=True), "did not change",
       "return the updated bias", id="no-return"),
    _w("bias_update", lambda b, load, g: _update(b, load, g, in_place_too=True), "twice", id="applied-twice"),
    _w("bias_update", lambda b, load, g: _update(b, load, g, against="total"), "the total", "mean load",
       id="against-total"),
    # 6. the MTP combine
    _w("mtp_combine", lambda m, h, e: _combine(m, h, e, order="h_first"), "concatenation order is reversed",
       "embedding first", id="order"),
    _w("mtp_combine", lambda m, h, e: _combine(m, h, e, norms=False), "forgot the RMSNorms", id="no-norms"),
    _w("mtp_combine", lambda m, h, e: _combine(m, h, e, norms=False, order="h_first"), "no RMSNorms",
       "order reversed", id="no-norms-order"),
    _w("mtp_combine", lambda m, h, e: _combine(m, h, e, swap_norms=True), "norms are swapped", id="norms-swapped"),
    _w("mtp_combine", lambda m, h, e: _combine(m, h, e, enorm=False), "forgot enorm", id="no-enorm"),
    _w("mtp_combine", lambda m, h, e: _combine(m, h, e, hnorm=False), "forgot hnorm", id="no-hnorm"),
    _w("mtp_combine", lambda m, h, e: torch.cat([m.enorm(e), m.hnorm(h)], -1), "wrong shape (2, 5, 128)", "eh_proj",
       id="no-projection"),
    _w("mtp_combine", lambda m, h, e: _combine(m, h, e, join="add"), "raised RuntimeError", "concatenate",
       "last axis", id="added-not-concatenated"),
    _w("mtp_combine", lambda m, h, e: _combine(m, h, e, join="cat_seq"), "raised RuntimeError", "last axis",
       id="concatenated-along-tokens"),
    _w("mtp_combine", lambda m, h, e: _combine(m, h, e, residual=True), "residual", id="residual-added"),
    # 7. FP8 1x128 tiles
    _w("fp8_tile", lambda x: _quant(x, floor=0), "NaN", "all-zero tile", "1e-4", id="no-floor"),
    _w("fp8_tile", lambda x: _quant(x, invert=True), "scale is inverted", id="scale-inverted"),
    _w("fp8_tile", lambda x: _quant(x, divide=False), "divide it by 448", id="scale-is-amax"),
    _w("fp8_tile", lambda x: _quant(x, fmt=torch.float8_e5m2), "E5M2", "E4M3", id="e5m2-dtype"),
    _w("fp8_tile", lambda x: _quant(x, cast=False), "torch.float32", "float8_e4m3fn", id="no-cast"),
    _w("fp8_tile", lambda x: _quant(x, per_tensor=True), "per-tensor scaling", id="per-tensor"),
    _w("fp8_tile", lambda x: _quant(x, per_tensor=True, expand_scales=True), "per-tensor", id="per-tensor-expanded"),
    _w("fp8_tile", lambda x: _quant(x, drop_ragged=True), "partial tile needs a scale", id="ragged-dropped"),
    _w("fp8_tile", lambda x: _quant(x, pow2=True), "powers of two", id="ue8m0"),
    _w("fp8_tile", lambda x: _quant(x, floor=1e-12), "all-zero tile's scale", id="floor-1e-12"),
    _w("fp8_tile", lambda x: _quant(x, fmax=127.0), "127", "INT8", "448", id="int8-127"),
    _w("fp8_tile", lambda x: _quant(x, tile=(128, 128)), "128x128", "1x128", id="tiles-128x128"),
    _w("fp8_tile", lambda x: _quant(x, tile=(128, 128), expand_scales=True), "128x128", id="tiles-128x128-expanded"),
    _w("fp8_tile", lambda x: _quant(x, tile=(1, 64)), "1x64", "128 columns", id="tiles-1x64"),
    _w("fp8_tile", lambda x: _quant(x, signed_amax=True), "max |x|", id="signed-amax"),
    _w("fp8_tile", lambda x: _quant(x, multiply=True), "multiplied x by the scale", id="multiplied"),
    _w("fp8_tile", lambda x: _quant(x, crop=False), "q: wrong shape", "crop", id="q-not-cropped"),
    _w("fp8_tile", lambda x: _quant(x, rounding="trunc"), "toward zero", "round-to-nearest-even",
       "quantisation error", id="truncation"),
    _w("fp8_tile", lambda x: _quant(x, rounding="away"), "away from zero", id="rounding-away"),
    _w("fp8_tile", lambda x: _quant(x, rounding="up1"), "one E4M3 step", id="one-step-off"),
    _w("fp8_tile", lambda x: _quant(x, rounding="e5m2"), "E5M2 grid", id="e5m2-grid"),
]


@pytest.mark.parametrize("exercise, fn, fragments", WRONG_ANSWERS)
def test_wrong_answer_gets_its_diagnosis(exercise, fn, fragments):
    result = EXERCISES[exercise].check(fn)
    _fails_with(result, *fragments)
    assert not any(g in result.message for g in GENERIC) and "Traceback" not in result.message


# ---------------------------------------------------------------------------------------------- solutions notebook
def test_the_solutions_notebook_solves_every_exercise():
    solutions = load_solutions(SOLUTIONS)
    for exercise in EXERCISES.values():
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
