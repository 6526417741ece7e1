"""RoPE / YaRN: the 671B correction range, the softmax scale, when YaRN is off, and the interleaved rotation."""

import math

import pytest
import torch
from torch.testing import assert_close

from dsv3_ref.config import ModelConfig
from dsv3_ref.nn.rope import (
    apply_rotary_emb,
    find_correction_range,
    linear_ramp,
    precompute_freqs_cis,
    rope_frequencies,
)


def _plain_freqs(dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


# ---------------------------------------------------------------------------------------------------- YaRN at 671B
def test_671b_correction_range():
    assert find_correction_range(32, 1, 64, 10000.0, 4096) == (10, 23)  # raw 10.47 / 22.51


def test_671b_yarn_frequencies():
    cfg = ModelConfig.from_preset("671B")
    plain, yarn = _plain_freqs(64), rope_frequencies(cfg)
    assert yarn.shape == (32,) and yarn.dtype == torch.float32
    assert torch.equal(yarn[:11], plain[:11])  # pairs 0-10: high frequency, unchanged
    assert_close(yarn[23:], plain[23:] / 40, rtol=1e-6, atol=0)  # pairs 23-31: stretched by s = 40
    between = yarn[11:23]
    assert between.numel() == 12
    assert bool(((between < plain[11:23]) & (between > plain[11:23] / 40)).all())  # strictly in between
    # the ramp is linear in the pair index: the weight on the stretched value is (i - 10) / 13
    ramp = (torch.arange(11, 23, dtype=torch.float32) - 10) / 13
    assert_close(between, plain[11:23] / 40 * ramp + plain[11:23] * (1 - ramp), rtol=1e-6, atol=0)


def test_671b_softmax_scale_and_mscale():
    cfg = ModelConfig.from_preset("671B")
    m = 0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1
    assert math.isclose(m * m, 1.8738542071, abs_tol=1e-10)
    assert math.isclose(cfg.softmax_scale, 0.1352337789, abs_tol=1e-10)
    assert math.isclose(cfg.softmax_scale, 192**-0.5 * m * m, rel_tol=1e-15)


def test_v2_lite_mscale():
    cfg = ModelConfig.from_preset("16B")
    m = 0.1 * 0.707 * math.log(40) + 1
    assert math.isclose(cfg.softmax_scale, 192**-0.5 * m * m, rel_tol=1e-15)


@pytest.mark.parametrize("max_seq_len", [4096, 2048])
def test_yarn_inactive_when_context_not_extended(max_seq_len):
    """Official rule: no frequency correction and no mscale unless max_seq_len > original_seq_len (4096)."""
    cfg = ModelConfig.from_preset("671B", max_seq_len=max_seq_len)
    assert not cfg.yarn_active
    assert torch.equal(rope_frequencies(cfg), _plain_freqs(64))
    assert cfg.softmax_scale == 192**-0.5
    assert ModelConfig.from_preset("671B", max_seq_len=4097).yarn_active


def test_tiny_is_plain_rope():
    cfg = ModelConfig.from_preset("tiny")
    assert not cfg.yarn_active and cfg.softmax_scale == cfg.qk_head_dim**-0.5
    assert torch.equal(rope_frequencies(cfg), _plain_freqs(cfg.qk_rope_head_dim))


def test_linear_ramp_degenerate_range():
    r = linear_ramp(3, 3, 6)
    assert r[:4].tolist() == [0, 0, 0, 0] and r[4:].tolist() == [1, 1]


def test_freqs_cis_shape_dtype_values():
    cfg = ModelConfig.from_preset("tiny", max_seq_len=64, original_seq_len=16, rope_factor=4.0)
    fc = precompute_freqs_cis(cfg)
    assert fc.shape == (64, cfg.qk_rope_head_dim // 2) and fc.dtype == torch.complex64
    assert_close(fc.abs(), torch.ones(64, 4), rtol=0, atol=1e-6)
    t = torch.arange(64, dtype=torch.float64)[:, None]
    angle = t * rope_frequencies(cfg).double()[None]
    assert_close(fc, torch.polar(torch.ones_like(angle), angle).to(torch.complex64), rtol=0, atol=2e-5)
    assert precompute_freqs_cis(cfg, 10).shape == (10, 4)


# ---------------------------------------------------------------------------------------------------- rotation
def test_apply_rotary_emb_rotates_interleaved_pairs():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    T, H, D = 5, 3, cfg.qk_rope_head_dim
    x = torch.randn(2, T, H, D)
    fc = precompute_freqs_cis(cfg)[:T]
    y = apply_rotary_emb(x, fc)
    freqs = rope_frequencies(cfg)
    expected = torch.empty_like(x)
    for t in range(T):
        for j in range(D // 2):  # pair (x_{2j}, x_{2j+1}) rotated by t * theta_j
            c, s = math.cos(t * freqs[j].item()), math.sin(t * freqs[j].item())
            x0, x1 = x[:, t, :, 2 * j], x[:, t, :, 2 * j + 1]
            expected[:, t, :, 2 * j] = x0 * c - x1 * s
            expected[:, t, :, 2 * j + 1] = x0 * s + x1 * c
    assert_close(y, expected, rtol=0, atol=1e-5)
    assert torch.equal(y[:, 0], x[:, 0])  # position 0: identity
    # NOT the GPT-NeoX half-split layout, which would rotate (x_j, x_{j + D/2})
    angle = torch.arange(T, dtype=torch.float32)[:, None] * freqs[None]  # (T, D/2)
    c, s = angle.cos()[None, :, None], angle.sin()[None, :, None]
    lo, hi = x[..., : D // 2], x[..., D // 2:]
    neox = torch.cat([lo * c - hi * s, lo * s + hi * c], dim=-1)
    assert (y[:, 1:] - neox[:, 1:]).abs().max() > 0.1


def test_apply_rotary_emb_3d_input_and_dtype():
    torch.manual_seed(1)
    cfg = ModelConfig.from_preset("tiny")
    fc = precompute_freqs_cis(cfg)[:7]
    k = torch.randn(2, 7, cfg.qk_rope_head_dim)  # the shared key: (B, T, d_r), no head axis
    # exact: the same elementwise complex products over the same contiguous layout (a head axis of size 1)
    assert_close(apply_rotary_emb(k, fc), apply_rotary_emb(k[:, :, None], fc)[:, :, 0], rtol=0, atol=0)
    yb = apply_rotary_emb(k.bfloat16(), fc)
    assert yb.dtype == torch.bfloat16
    assert_close(yb.float(), apply_rotary_emb(k, fc), rtol=1e-2, atol=1e-2)


def test_rotation_preserves_norms():
    torch.manual_seed(2)
    cfg = ModelConfig.from_preset("671B")
    fc = precompute_freqs_cis(cfg, 300)
    x = torch.randn(1, 300, 2, 64)
    y = apply_rotary_emb(x, fc)
    assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # each pair keeps its own norm (a rotation within the pair)
    assert_close(y.view(1, 300, 2, 32, 2).norm(dim=-1), x.view(1, 300, 2, 32, 2).norm(dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "671B"])
def test_relative_position_property(preset):
    """<R(m) q, R(n) k> depends only on m - n."""
    torch.manual_seed(3)
    cfg = ModelConfig.from_preset(preset)
    D = cfg.qk_rope_head_dim
    fc = precompute_freqs_cis(cfg, 200)
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)

    def dot(m: int, n: int) -> torch.Tensor:
        qm = apply_rotary_emb(q.view(1, 1, D).float(), fc[m:m + 1]).double()
        kn = apply_rotary_emb(k.view(1, 1, D).float(), fc[n:n + 1]).double()
        return (qm * kn).sum()

    for delta in (0, 1, 7, 40):
        ref = dot(delta, 0)
        for n in (3, 50, 150):
            assert_close(dot(n + delta, n), ref, rtol=0, atol=1e-4 * q.norm() * k.norm())
    assert not torch.isclose(dot(5, 0), dot(6, 0))  # and it does depend on the offset
