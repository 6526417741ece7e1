"""Rotary position embedding with YaRN context extension, as the released DeepSeek-V3 checkpoints expect it.

YaRN (Peng et al. 2023; report §4.3) keeps the high-frequency pairs (wavelength much shorter than the original
context) unchanged, divides the low-frequency pairs by the stretch factor s, and ramps linearly in between. The
ramp's ends are the pairs whose wavelength makes `beta_fast` resp. `beta_slow` full turns over `original_seq_len`.
As in the official code, the correction (and the mscale in `ModelConfig.softmax_scale`) is applied only when
`max_seq_len > original_seq_len`.

The rotation acts on *interleaved* pairs (x0, x1), (x2, x3), ... exactly like the official `apply_rotary_emb`;
the hub weights are laid out for it.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def find_correction_dim(num_rotations: float, dim: int, base: float, max_seq_len: int) -> float:
    """The (fractional) pair index whose wavelength fits `num_rotations` times into `max_seq_len`."""
    return dim * math.log(max_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def find_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                          max_seq_len: int) -> tuple[int, int]:
    """Integer pair indices (low, high) where the YaRN ramp starts and ends, clamped to [0, dim - 1]."""
    low = math.floor(find_correction_dim(beta_fast, dim, base, max_seq_len))
    high = math.ceil(find_correction_dim(beta_slow, dim, base, max_seq_len))
    return max(low, 0), min(high, dim - 1)


def linear_ramp(low: float, high: float, n: int) -> torch.Tensor:
    """(n,) values rising linearly from 0 at index `low` to 1 at index `high`, clamped to [0, 1]."""
    if low == high:
        high += 0.001
    return ((torch.arange(n, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """(qk_rope_head_dim / 2,) angular frequencies per pair, YaRN-corrected when `cfg.yarn_active`."""
    dim = cfg.qk_rope_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.yarn_active:
        low, high = find_correction_range(cfg.beta_fast, cfg.beta_slow, dim, cfg.rope_theta, cfg.original_seq_len)
        smooth = 1 - linear_ramp(low, high, dim // 2)  # 1 = keep (high frequency), 0 = divide by s
        freqs = freqs / cfg.rope_factor * (1 - smooth) + freqs * smooth
    return freqs


def precompute_freqs_cis(cfg: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """(seq_len, qk_rope_head_dim / 2) complex64 rotations e^{i t theta_j} for positions t = 0 .. seq_len-1."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    t = torch.arange(seq_len, dtype=torch.float32)
    return torch.polar(torch.ones(seq_len, cfg.qk_rope_head_dim // 2), torch.outer(t, rope_frequencies(cfg)))


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dimension.

    x: (B, T, H, rope_dim) or (B, T, rope_dim); freqs_cis: (T, rope_dim / 2) complex. Returns x's shape and dtype.
    """
    dtype = x.dtype
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (..., rope_dim/2)
    shape = [1] * xc.ndim
    shape[1], shape[-1] = xc.shape[1], xc.shape[-1]
    y = torch.view_as_real(xc * freqs_cis.view(shape)).flatten(-2)
    return y.to(dtype)
