"""Block-scaled FP8 GEMMs (report §3.3.2, §3.5.2): C = A B^T with per-row, per-128-K-group scales, the official
`fp8_gemm` contract, on three backends (`GEMMS`), and a bit-level model of Hopper's limited accumulation precision
(`tensor_core_gemm`) with the report's experiment (`accumulation_error`). Notebook 50 teaches promotion.

"dequant" is a faithful emulation of FP32 accumulation: the scales are constant within a K group, so
sum_g s_a s_b sum_k q_a q_b = sum_k (q_a s_a)(q_b s_b), i.e. dequantise-then-matmul in float32 (up to rounding order).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .formats import FORMATS, dequantize, quantize, resolve_block, scale_shape

GEMMS = ("auto", "dequant", "scaled_mm", "tensor_core")
N_C = 128  # promotion interval of the report: 4 WGMMAs
WGMMA_K = 32  # products one Hopper FP8 WGMMA adds per accumulation step
TC_BITS = 14  # bits the tensor core keeps of each aligned product and of its accumulator


def _k_width(q: torch.Tensor, block: str | tuple[int | None, int | None]) -> int:
    """How many consecutive K elements (columns) of operand q share one scale."""
    return min(resolve_block(block, *q.shape)[1], q.shape[1])


def _row_group_scales(q: torch.Tensor, scale: torch.Tensor, block: str | tuple[int | None, int | None],
                      n_groups: int) -> torch.Tensor:
    """An operand's block scales -> per-row, per-K-group scales (rows, n_groups)."""
    rows, cols = q.shape
    bm, bk = resolve_block(block, rows, cols)
    mb, kb = math.ceil(rows / bm), math.ceil(cols / bk)
    if scale.numel() != mb * kb:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {scale_shape(q.shape, bm, mb, kb)} for "
                         f"a {tuple(q.shape)} operand in {bm} x {bk} blocks")
    return scale.float().reshape(mb, kb).repeat_interleave(bm, dim=0)[:rows].expand(-1, n_groups)


def _pad_fp8(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a float8 matrix to (rows, cols) (through its bytes: 0x00 is +0 in both formats)."""
    r, c = q.shape
    if (r, c) == (rows, cols):
        return q.contiguous()
    return F.pad(q.contiguous().view(torch.uint8), (0, cols - c, 0, rows - r)).view(q.dtype)


def fp8_capable(device: torch.device) -> bool:
    """True on a CUDA device with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper and later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_gemm(gemm: str, device: torch.device) -> str:
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    if gemm == "auto":
        return "scaled_mm" if fp8_capable(device) else "dequant"
    return gemm


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             a_block: str | tuple[int | None, int | None] = "1x128",
             b_block: str | tuple[int | None, int | None] = "128x128", gemm: str = "auto",
             promote_every: int | None = N_C) -> torch.Tensor:
    """C = dequant(a) dequant(b)^T in float32, (M, N), computed the way a block-scaled FP8 GEMM does.

    a (M, K), b (N, K): float8 with their `quantize` scales in `a_block` / `b_block` layout. The blocks of both must
    cut K the same way (both 128 wide, or one whole-K scale), as the official `fp8_gemm`'s 1x128 x 128x128. `gemm`:
    one of GEMMS: "dequant" (module docstring); "scaled_mm", `torch._scaled_mm` per 128-wide K group with unit scales,
    then scaled and accumulated in FP32 (promotion in software; real FP8 tensor cores on CUDA with compute capability
    >= 8.9, and torch runs it on the CPU too); "tensor_core", the accumulation model (`tensor_core_gemm`); "auto",
    "scaled_mm" on a capable CUDA device, else "dequant". promote_every only matters for "tensor_core".
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_gemm needs a (M, K) and b (N, K), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype not in FORMATS.values() or b.dtype not in FORMATS.values():
        raise ValueError(f"fp8_gemm operands must be float8, got {a.dtype} and {b.dtype}")
    cols = a.shape[1]
    width_a, width_b = _k_width(a, a_block), _k_width(b, b_block)
    if width_a < cols and width_b < cols and width_a != width_b:
        raise ValueError(f"a_block and b_block cut K differently ({width_a} vs {width_b} wide groups)")
    gemm = resolve_gemm(gemm, a.device)
    if gemm == "dequant":
        return dequantize(a, a_scale, a_block) @ dequantize(b, b_scale, b_block).T
    group = min(width_a, width_b)
    n_groups = math.ceil(cols / group)
    sa, sb = _row_group_scales(a, a_scale, a_block, n_groups), _row_group_scales(b, b_scale, b_block, n_groups)
    if gemm == "scaled_mm":
        return _scaled_mm_gemm(a, b, sa, sb, group)
    return tensor_core_gemm(a, b, sa, sb, group, promote_every)


def _scaled_mm_gemm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, group: int) -> torch.Tensor:
    """One `torch._scaled_mm` per K group (FP8 inputs, FP32 output), scaled and summed in FP32: the report's
    promotion done in software. Rows and K are zero-padded to multiples of 16 (cuBLASLt's FP8 alignment)."""
    (rows, cols), n = a.shape, b.shape[0]
    n_groups = sa.shape[1]
    width = group if n_groups > 1 else 16 * math.ceil(cols / 16)
    rows_p, n_p = 16 * math.ceil(rows / 16), 16 * math.ceil(n / 16)
    a_p, b_p = _pad_fp8(a, rows_p, n_groups * width), _pad_fp8(b, n_p, n_groups * width)
    one = torch.ones((), device=a.device)
    out = torch.zeros(rows, n, device=a.device)
    for g in range(n_groups):
        k = slice(g * width, (g + 1) * width)
        part = torch._scaled_mm(a_p[:, k].contiguous(), b_p[:, k].contiguous().t(), scale_a=one, scale_b=one,
                                out_dtype=torch.float32)[:rows, :n]  # (M, N) = sum over the group of q_a q_b
        out += part * sa[:, g:g + 1] * sb[:, g].unsqueeze(0)
    return out


# ------------------------------------------------------------------ the tensor core's accumulation precision
def _truncate(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the `bits` leading significant bits of each float64 value, rounding toward zero."""
    ulp = torch.ldexp(torch.ones_like(v), torch.frexp(v).exponent - bits)
    return torch.trunc(v / ulp) * ulp


def _align(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Align the last dim's values to the largest exponent among them and keep `bits` bits of each: the fixed-point
    grid 2^(E - bits + 1) below the largest leading bit, each value truncated toward zero (sign and magnitude: what an
    H200 does; a two's-complement floor matched it on only 25-60% of outputs with mixed signs, this on ~90%)."""
    ulp = torch.ldexp(torch.ones_like(p[..., :1]), torch.frexp(p.abs().amax(-1, keepdim=True)).exponent - bits)
    return torch.trunc(p / ulp) * ulp


def tensor_core_gemm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, group: int,
                     promote_every: int | None = N_C) -> torch.Tensor:
    """A model of Hopper's FP8 GEMM accumulation: C = A B^T (float32) for float8 a (M, K), b (N, K) with per-row,
    per-K-group scales sa (M, G), sb (N, G) (group = K-group width; G = 1 for one scale along K).

    The report (§3.5.2): "fixed-point accumulation, aligning the mantissa products by right-shifting based on the
    maximum exponent ... it only uses the highest 14 bits of each mantissa product ... and truncates bits exceeding
    this range". Per output, per WGMMA step of WGMMA_K = 32 products p_i = q_a q_b (exact; the scales are not in the
    tensor core):
      1. find the largest exponent E among the 32 products and the running accumulator;
      2. put all 33 on the fixed-point grid 2^(E - 13) (14 bits from the largest leading bit down), truncating each
         toward zero, and add them exactly;
      3. keep 14 significant bits of the sum (truncation toward zero): the new accumulator.
    Every `promote_every` elements of K (None: never) the accumulator is multiplied by s_a s_b, added to an FP32
    accumulator on the "CUDA cores" and restarted at zero: the report's fix with N_C = 128 (4 WGMMAs). Without
    promotion the scales must be uniform along K (G = 1).

    Calibrated against a real H200 (torch 2.11, cuBLAS `_scaled_mm` with `use_fast_accum=True`, i.e. no promotion;
    `benchmarks/bench_fp8_cuda.py`, results in `benchmarks/results/`): for 64 x 64 outputs at K = 128 ... 4096 the
    model's maximum errors equal the hardware's to the printed digits, and its outputs are bit-identical to the
    hardware's for 99.7-100% of them with U(0, 1) inputs and ~90% with N(0, 1) inputs (the rest differ by one unit
    in the 14th bit). Step 1 is what makes the error large: once the accumulator is big, each new product keeps only
    the bits above the accumulator's 14-bit grid.
    """
    if promote_every is not None and (promote_every % WGMMA_K or promote_every < WGMMA_K):
        raise ValueError(f"promote_every must be a positive multiple of {WGMMA_K} or None, got {promote_every}")
    n_groups = sa.shape[1]
    if n_groups > 1 and (promote_every is None or group % promote_every):
        raise ValueError(f"scales that change every {group} elements of K need promote_every to divide {group}, "
                         f"got {promote_every}")
    qa, qb = a.double(), b.double()  # E4M3 x E4M3 products are exact in float64
    (rows, cols), n = qa.shape, qb.shape[0]
    interval = promote_every or cols
    out = torch.zeros(rows, n, device=a.device)  # FP32 accumulator on the CUDA cores
    acc = torch.zeros(rows, n, dtype=torch.float64, device=a.device)  # the tensor core's, always on a 14-bit grid
    for k0 in range(0, cols, WGMMA_K):
        k1 = min(k0 + WGMMA_K, cols)
        p = qa[:, None, k0:k1] * qb[None, :, k0:k1]  # (M, N, <=32) exact products
        acc = _truncate(_align(torch.cat([acc.unsqueeze(-1), p], dim=-1), TC_BITS).sum(-1), TC_BITS)
        if k1 % interval == 0 or k1 == cols:  # promotion: scale on the CUDA cores, accumulate in FP32
            g = min(k0 // group, n_groups - 1)
            out += acc.float() * sa[:, g:g + 1] * sb[:, g].unsqueeze(0)
            acc.zero_()
    return out


ACCUMULATION_INPUTS = ("uniform", "normal")


def accumulation_error(k: int, promote_every: int | None = N_C, m: int = 64, n: int = 64, seed: int = 0,
                       inputs: str = "uniform") -> float:
    """The report's experiment ("GEMM operations of two random matrices with K = 4096"), on the tensor-core model.

    A (m, k), B (n, k) with U(0, 1) ("uniform") or N(0, 1) ("normal") entries, quantised to E4M3 with one scale per
    tensor, against the float64 GEMM of the same quantised inputs (so only the accumulation is measured). Returns
    the maximum relative error max |C - C_ref| / |C_ref| for "uniform" (positive sums, no cancellation: the hard case
    for a truncating accumulator), and the normwise max |C - C_ref| / max |C_ref| for "normal" (where single outputs
    near zero would make the elementwise ratio meaningless).
    """
    if inputs not in ACCUMULATION_INPUTS:
        raise ValueError(f"inputs must be one of {ACCUMULATION_INPUTS}, got {inputs!r}")
    gen = torch.Generator().manual_seed(seed)
    draw = torch.rand if inputs == "uniform" else torch.randn
    qa, sa = quantize(draw(m, k, generator=gen), "tensor")
    qb, sb = quantize(draw(n, k, generator=gen), "tensor")
    ref = (qa.double() @ qb.double().T) * (sa.double() * sb.double())
    out = fp8_gemm(qa, sa, qb, sb, "tensor", "tensor", gemm="tensor_core", promote_every=promote_every)
    err = (out.double() - ref).abs()
    return (err / ref.abs()).max().item() if inputs == "uniform" else (err.max() / ref.abs().max()).item()
