"""FP8 mixed-precision training as DeepSeek-V3 does it (report §3.3, Figs. 6-7, §3.5.2), emulated on the CPU.

Formats. E4M3 (`torch.float8_e4m3fn`: 1 sign, 4 exponent, 3 mantissa bits, max 448, no infinity) for every tensor,
forward and backward, as in the report; E5M2 (`torch.float8_e5m2`, max 57344) is available for comparison.

Fine-grained scaling. A 2-D view (rows, cols) of the tensor (leading dims flattened into rows) is cut into blocks;
block b gets one FP32 scale s_b = amax_b / fp8_max, the *dequantisation multiplier* (the released checkpoints'
`weight_scale_inv`, the official `act_quant`'s `s`), and stores q = cast(clamp(x / s_b, -fp8_max, fp8_max)).
Granularities (`BLOCKS`, or any (rows, cols) tuple, None = the whole dim):

    "tensor"   one scale                      (classic per-tensor scaling, for comparison)
    "row"      one per row
    "1x128"    per token per 128 channels      activations and output gradients in Fprop / Dgrad (`act_quant`)
    "128x1"    per channel per 128 tokens      both operands of Wgrad: groups never cross the contracted token dim
    "128x128"  per 128 x 128 weight block      weights (the checkpoint's `weight_block_size`)

Scale shapes: (*leading, ceil(cols / bk)) for one-row blocks, else (ceil(rows / bm), ceil(cols / bk)). Dims that are
not multiples of the block are zero-padded to compute the amax (zeros never raise it) and the result is cropped.

Edge cases, by design:
* the amax is clamped to >= `amax_floor` (default 1e-4, as the official `act_quant` at HEAD and DeepGEMM): an
  all-zero block gets a tiny positive scale and dequantises to exact zeros, never 0/0 = NaN. Gradients use the
  smaller `GRAD_AMAX_FLOOR`: their magnitude scales with 1 / (tokens per batch), and a 1e-4 floor would push whole
  gradient tiles into E4M3's subnormal range.
* non-finite inputs never enter the scale (the amax is over the finite values): NaN stays NaN (that element only, so
  it still poisons the GEMM outputs it touches), and +-inf saturates to +-fp8_max * s, the largest magnitude of its
  block. We never rely on torch's cast saturation (torch 2.13 saturates e4m3fn, older versions returned NaN, and e5m2
  overflows to inf): a finite x has |x / s| <= fp8_max up to one float32 rounding, which rounds back to fp8_max, and
  a block with a non-finite value is clamped to +-fp8_max before the cast.
* `scale_fmt="ue8m0"` rounds each scale UP to a power of two, s = 2^ceil(log2(amax / fp8_max)) (DeepGEMM's
  `ceil_to_ue8m0`, DeepSeek-V3.1's `scale_fmt`); rounding up keeps amax / s <= fp8_max, so it never overflows.

Arithmetic on float8 tensors is not implemented on the CPU: everything upcasts to float32 (or float64) first
(`to_float`: a lookup in the format's 256-entry table, bit for bit torch's cast and about 6x faster on the CPU).
`fake_quantize` (quantise then dequantise, what the emulated GEMMs consume) never materialises the float8 tensor: it
rounds x / s onto the format's grid in float32 (`round_to_fp8_`, bit for bit the cast round trip, in half the time).

GEMMs (`fp8_gemm`, C = A B^T with per-row, per-128-K-group scales, the official `fp8_gemm` contract):
* "dequant": dequantise both operands, float32 matmul. The tensor core's partial sum over one 128-wide K group is
  sum_k q_a q_b; the report promotes it to FP32 and multiplies by s_a s_b on the CUDA cores. Since the scales are
  constant within a group, sum_g s_a s_b sum_k q_a q_b = sum_k (q_a s_a)(q_b s_b): dequantise-then-matmul in FP32 is a
  faithful emulation of block-scaled GEMM with FP32 accumulation (up to float32 rounding order).
* "scaled_mm": `torch._scaled_mm` on each 128-wide K group (unit scales, FP32 output), then scaled and accumulated in
  FP32: promotion in software. Real FP8 tensor cores on CUDA (compute capability >= 8.9); torch also runs it on the
  CPU, which is how it is tested here. "auto" picks it only on such a CUDA device, else "dequant".
* "tensor_core": a bit-level model of Hopper's limited accumulation precision (see `tensor_core_gemm`; calibrated on
  an H200, where it reproduces cuBLAS's FP8 GEMM bit for bit for most outputs), with or without promotion to FP32
  every N_C = 128 elements.

`FP8Linear` runs Fprop, Dgrad and Wgrad on E4M3 operands with the report's tiles and keeps the FP32 master weight
(each GEMM type can be switched back to FP32 for ablations); `convert_to_fp8(model)` swaps in exactly the layers the
report computes in FP8.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import MLA
from ..nn.layers import MLP, RMSNorm
from ..nn.moe import Gate

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0
E5M2_MAX = torch.finfo(torch.float8_e5m2).max  # 57344.0
FP8_MAX = {torch.float8_e4m3fn: E4M3_MAX, torch.float8_e5m2: E5M2_MAX}
BLOCK = 128  # tile / block edge and K-group of the report and the checkpoint
BLOCKS: dict[str, tuple[int | None, int | None]] = {
    "tensor": (None, None), "row": (1, None), "1x128": (1, BLOCK), "128x1": (BLOCK, 1), "128x128": (BLOCK, BLOCK)}
SCALE_FMTS = (None, "ue8m0")
AMAX_FLOOR = 1e-4  # official act_quant (inference/kernel.py at HEAD): amax = max(amax, 1e-4)
GRAD_AMAX_FLOOR = 1e-12  # gradients: only guards 0/0 (see the module docstring)
GEMMS = ("auto", "dequant", "scaled_mm", "tensor_core")
GEMM_TYPES = ("fprop", "dgrad", "wgrad")  # the three GEMMs of a linear layer (report Fig. 6)
N_C = 128  # promotion interval of the report: 4 WGMMAs
WGMMA_K = 32  # products one Hopper FP8 WGMMA adds per accumulation step
TC_BITS = 14  # bits the tensor core keeps of each aligned product and of its accumulator


# ------------------------------------------------------------------ quantisation
def fp8_dtype(fmt: str) -> torch.dtype:
    """'e4m3' -> torch.float8_e4m3fn, 'e5m2' -> torch.float8_e5m2."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {tuple(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def _resolve_block(block: str | tuple[int | None, int | None], rows: int, cols: int) -> tuple[int, int]:
    """A granularity name or (bm, bk) tuple -> concrete (bm, bk) for a (rows, cols) matrix (None = whole dim)."""
    if isinstance(block, str):
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {tuple(BLOCKS)} or a (rows, cols) tuple, got {block!r}")
        block = BLOCKS[block]
    if not (isinstance(block, tuple) and len(block) == 2
            and all(b is None or (isinstance(b, int) and b >= 1) for b in block)):
        raise ValueError(f"block must be one of {tuple(BLOCKS)} or a (rows, cols) tuple of ints >= 1 or None, "
                         f"got {block!r}")
    bm, bk = block
    return (max(rows, 1) if bm is None else bm), (max(cols, 1) if bk is None else bk)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a scalar")
    return x.reshape(-1, x.shape[-1])


def _blocks(x2: torch.Tensor, bm: int, bk: int) -> torch.Tensor:
    """(rows, cols) float -> (Mb, bm', Kb, bk') view of its blocks, zero-padded where a dim is ragged. A dim that fits
    in one block is taken whole (bm' = rows or bk' = cols): its zero padding could change neither the amax nor the
    values, so it is skipped (no copy, and no copy to crop it off again)."""
    rows, cols = x2.shape
    mb, kb = math.ceil(rows / bm), math.ceil(cols / bk)
    bm, bk = (rows if mb == 1 else bm), (cols if kb == 1 else bk)
    if (mb * bm, kb * bk) != (rows, cols):
        x2 = F.pad(x2, (0, kb * bk - cols, 0, mb * bm - rows))
    return x2.reshape(mb, bm, kb, bk)


def _scale_shape(x_shape: torch.Size, bm: int, mb: int, kb: int) -> tuple[int, ...]:
    return (*x_shape[:-1], kb) if bm == 1 else (mb, kb)


_CODES = {dtype: torch.arange(256, dtype=torch.uint8).view(dtype).float() for dtype in FORMATS.values()}


def to_float(q: torch.Tensor) -> torch.Tensor:
    """float8 -> float32, bit for bit `q.float()`, by table lookup over the format's 256 codes: torch 2.13's CPU
    cast is about 6x slower (~5 ns per element), and dequantisation is the emulation's hot loop."""
    codes = _CODES[q.dtype].to(q.device)
    return codes.index_select(0, q.view(torch.uint8).flatten().int()).view(q.shape)


# (mantissa bits m, exponent of the smallest normal emin) of each format: E4M3 (3, -6), E5M2 (2, -14)
_GRIDS = {dtype: (round(-math.log2(torch.finfo(dtype).eps)), round(math.log2(torch.finfo(dtype).smallest_normal)))
          for dtype in FORMATS.values()}


def round_to_fp8_(v: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """Round float32 `v` in place to the nearest value of the float8 `dtype` (ties to even) and return it: bit for bit
    `v.to(dtype).float()` for |v| <= the format's max (and NaN), without a float8 tensor, in float32 arithmetic.

    With m mantissa bits and smallest normal 2^emin, the format's values near v (|v| in [2^e, 2^(e+1))) are spaced
    2^(max(e, emin) - m) apart (the subnormals below 2^emin share the spacing of the first binade). Adding
    M = 1.5 * 2^(max(e, emin) + 23 - m) moves v into M's binade, where float32's spacing is exactly that: the addition
    rounds v to the nearest grid point, ties to even (M is an even number of those steps), and subtracting M again is
    exact. 2^e is v's exponent field alone (its bits AND 0x7F800000). Larger |v| would round past the format's max
    (the cast saturates or returns NaN there): callers clamp first.
    """
    mbits, emin = _GRIDS[dtype]
    p = (v.view(torch.int32) & 0x7F800000).view(torch.float32)  # 2^e (0 for zeros and float32 subnormals)
    p.clamp_(min=2.0**emin)  # 2^max(e, emin)
    k = 1.5 * 2.0 ** (23 - mbits)  # M = k * p; k * p is exact, so v + k * p is rounded once, fused or not
    return v.add_(p, alpha=k).sub_(p, alpha=k)


def ceil_pow2(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s (s > 0), exactly: the UE8M0 scale rounding of DeepGEMM / DeepSeek-V3.1."""
    mantissa, exponent = torch.frexp(s)  # s = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.where(mantissa == 0.5, s, torch.ldexp(torch.ones_like(s), exponent))


def _check_args(x: torch.Tensor, block: str | tuple[int | None, int | None], fmt: str, scale_fmt: str | None,
                amax_floor: float) -> tuple[torch.Tensor, int, int, torch.dtype]:
    """The public quantisers' argument checks: x (..., cols) -> (x as float32 (rows, cols), bm, bk, float8 dtype)."""
    dtype = fp8_dtype(fmt)
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")
    if not amax_floor > 0:
        raise ValueError(f"amax_floor must be > 0, got {amax_floor}")
    x2 = _as_2d(x).float()  # (rows, cols)
    return x2, *_resolve_block(block, *x2.shape), dtype


def _scaled_blocks(x2: torch.Tensor, bm: int, bk: int, dtype: torch.dtype, scale_fmt: str | None,
                   amax_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantiser up to the cast (arguments already checked): x2 (rows, cols) float32 in bm x bk blocks ->
    (x / s in blocks (Mb, bm', Kb, bk') float32, padded, within +-fp8_max up to one rounding; scales s (Mb, Kb))."""
    fmax = FP8_MAX[dtype]
    blocks = _blocks(x2, bm, bk)  # (Mb, bm', Kb, bk')
    # (Mb, Kb) max |x| as max(max x, -min x): two reductions and no |x| temporary, faster on the CPU
    amax = torch.maximum(blocks.amax(dim=(1, 3)), blocks.amin(dim=(1, 3)).neg_())
    finite = math.isfinite(amax.sum().item())
    if not finite:  # NaN or inf (or a huge sum): the amax of the finite values only
        amax = blocks.abs().nan_to_num(nan=0.0, posinf=0.0).amax(dim=(1, 3))
    scale = amax.clamp_(min=amax_floor).div_(fmax)
    if scale_fmt == "ue8m0":
        scale = ceil_pow2(scale)
    v = blocks / scale.view(scale.shape[0], 1, scale.shape[1], 1)
    if not finite:
        v.clamp_(-fmax, fmax)  # inf -> fmax; NaN stays NaN
    return v, scale


def _crop(blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(Mb, bm, Kb, bk) padded blocks -> the tensor of `shape` they cover."""
    mb, bm = blocks.shape[:2]
    flat = blocks.reshape(mb * bm, -1)
    rows, cols = math.prod(shape[:-1]), shape[-1]
    return (flat if flat.shape == (rows, cols) else flat[:rows, :cols]).reshape(shape)


def quantize(x: torch.Tensor, block: str | tuple[int | None, int | None] = "1x128", fmt: str = "e4m3",
             scale_fmt: str | None = None, amax_floor: float = AMAX_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., cols) -> (q, scale): q float8 of x's shape, scale float32 dequant multipliers per block.

    scale = max(amax, amax_floor) / fp8_max per block over the finite values (rounded up to a power of two with
    scale_fmt="ue8m0"); q = cast(clamp(x / scale, -fp8_max, fp8_max)). Shapes: see the module docstring.
    """
    x2, bm, bk, dtype = _check_args(x, block, fmt, scale_fmt, amax_floor)
    v, scale = _scaled_blocks(x2, bm, bk, dtype, scale_fmt, amax_floor)
    return _crop(v.to(dtype), x.shape), scale.reshape(_scale_shape(x.shape, bm, *scale.shape))


def _fake_quantize_2d(x2: torch.Tensor, bm: int, bk: int, dtype: torch.dtype, scale_fmt: str | None,
                      amax_floor: float) -> torch.Tensor:
    """`fake_quantize` of a float32 (rows, cols) matrix in bm x bk blocks, arguments already checked (FP8Linear's
    hot path): x / s rounded onto the format's grid (`round_to_fp8_`) times s, (rows, cols) float32."""
    v, scale = _scaled_blocks(x2, bm, bk, dtype, scale_fmt, amax_floor)
    return _crop(round_to_fp8_(v, dtype).mul_(scale.view(scale.shape[0], 1, scale.shape[1], 1)), x2.shape)


def fake_quantize(x: torch.Tensor, block: str | tuple[int | None, int | None] = "1x128", fmt: str = "e4m3",
                  scale_fmt: str | None = None, amax_floor: float = AMAX_FLOOR) -> torch.Tensor:
    """dequantize(*quantize(x, ...)) bit for bit (float32, x's shape), without a float8 tensor: x / s is rounded onto
    the format's grid in float32 (`round_to_fp8_`) and multiplied back by s."""
    x2, bm, bk, dtype = _check_args(x, block, fmt, scale_fmt, amax_floor)
    return _fake_quantize_2d(x2, bm, bk, dtype, scale_fmt, amax_floor).reshape(x.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: str | tuple[int | None, int | None] = "1x128",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize`: q (..., cols) float8 times its block's scale -> `dtype`, q's shape."""
    q2 = to_float(_as_2d(q))  # float8 arithmetic is not implemented on the CPU: upcast first
    rows, cols = q2.shape
    bm, bk = _resolve_block(block, rows, cols)
    blocks = _blocks(q2, bm, bk)  # (Mb, bm, Kb, bk)
    mb, kb = blocks.shape[0], blocks.shape[2]
    if scale.numel() != mb * kb:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {_scale_shape(q.shape, bm, mb, kb)} for "
                         f"a {tuple(q.shape)} tensor in {bm} x {bk} blocks")
    return _crop(blocks * scale.float().reshape(mb, 1, kb, 1), q.shape).to(dtype)


def block_quant(w: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (out, in) -> (E4M3 weight, weight_scale_inv (ceil(out / block), ceil(in / block))), the hub format."""
    if w.dim() != 2:
        raise ValueError(f"block_quant: weight must be 2-D, got shape {tuple(w.shape)}")
    return quantize(w, (block, block), "e4m3", scale_fmt)


def block_dequant(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Hub FP8 weight (out, in) times its `weight_scale_inv` (ceil(out / block), ceil(in / block)) -> `dtype`.

    Blocks at ragged edges (out or in not a multiple of `block`) are partial; `scale_inv` is the dequantisation
    multiplier (amax / 448 of the block), as the official `weight_dequant` and `fp8_cast_bf16.py` use it.
    """
    if w_fp8.dim() != 2:
        raise ValueError(f"block_dequant: weight must be 2-D, got shape {tuple(w_fp8.shape)}")
    expected = (math.ceil(w_fp8.shape[0] / block), math.ceil(w_fp8.shape[1] / block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"block_dequant: scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
                         f"{tuple(w_fp8.shape)} weight in {block} x {block} blocks")
    return dequantize(w_fp8, scale_inv, (block, block), dtype)


def quantization_error(x: torch.Tensor, block: str | tuple[int | None, int | None] = "1x128", fmt: str = "e4m3",
                       scale_fmt: str | None = None, mask: torch.Tensor | None = None) -> float:
    """Relative Frobenius error ||dequant(quant(x)) - x|| / ||x|| of a round trip, over the entries where `mask`
    (bool, x's shape) is True if given (e.g. the ordinary channels next to outlier ones)."""
    err = fake_quantize(x, block, fmt, scale_fmt) - x.float()
    ref = x.float()
    if mask is not None:
        err, ref = err[mask], ref[mask]
    return (err.norm() / ref.norm()).item()


# ------------------------------------------------------------------ GEMM
def _k_width(q: torch.Tensor, block: str | tuple[int | None, int | None]) -> int:
    """How many consecutive K elements (columns) of operand q share one scale."""
    return min(_resolve_block(block, *q.shape)[1], q.shape[1])


def _row_group_scales(q: torch.Tensor, scale: torch.Tensor, block: str | tuple[int | None, int | None],
                      n_groups: int) -> torch.Tensor:
    """An operand's block scales -> per-row, per-K-group scales (rows, n_groups)."""
    rows, cols = q.shape
    bm, bk = _resolve_block(block, rows, cols)
    mb, kb = math.ceil(rows / bm), math.ceil(cols / bk)
    if scale.numel() != mb * kb:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {_scale_shape(q.shape, bm, mb, kb)} for "
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


def _resolve_gemm(gemm: str, device: torch.device) -> str:
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
    one of GEMMS (module docstring); promote_every only matters for "tensor_core".
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_gemm needs a (M, K) and b (N, K), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype not in FORMATS.values() or b.dtype not in FORMATS.values():
        raise ValueError(f"fp8_gemm operands must be float8, got {a.dtype} and {b.dtype}")
    cols = a.shape[1]
    width_a, width_b = _k_width(a, a_block), _k_width(b, b_block)
    if width_a < cols and width_b < cols and width_a != width_b:
        raise ValueError(f"a_block and b_block cut K differently ({width_a} vs {width_b} wide groups)")
    gemm = _resolve_gemm(gemm, a.device)
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


# ------------------------------------------------------------------ FP8 linear layer
def _operand(t: torch.Tensor, block: str, gemm: str, scale_fmt: str | None, amax_floor: float = AMAX_FLOOR):
    """A 2-D float32 GEMM operand quantised to E4M3 as backend `gemm` consumes it: fake-quantised float32 for
    "dequant" (straight into the hot path: the layer checked its arguments once), else (q, scale, block)."""
    if gemm == "dequant":
        return _fake_quantize_2d(t, *BLOCKS[block], torch.float8_e4m3fn, scale_fmt, amax_floor)
    return (*quantize(t, block, scale_fmt=scale_fmt, amax_floor=amax_floor), block)


def _transpose(op):
    """The operand of t^T: the same values and scales, the block shape mirrored."""
    if isinstance(op, torch.Tensor):
        return op.t()
    q, scale, block = op
    return q.t(), scale.t(), {"1x128": "128x1", "128x1": "1x128"}.get(block, block)


def _matmul(a, b, gemm: str) -> torch.Tensor:
    """a b^T for two operands (M, K), (N, K) from `_operand`."""
    if gemm == "dequant":
        return a @ b.T
    return fp8_gemm(a[0], a[1], b[0], b[1], a[2], b[2], gemm)


def _check_fp8_gemms(fp8_gemms) -> tuple[str, ...]:
    """A collection of GEMM_TYPES names -> the tuple of them in GEMM_TYPES order; ValueError for anything else."""
    if isinstance(fp8_gemms, str) or not set(fp8_gemms) <= set(GEMM_TYPES):
        raise ValueError(f"fp8_gemms must be a collection of {GEMM_TYPES}, got {fp8_gemms!r}")
    return tuple(g for g in GEMM_TYPES if g in fp8_gemms)


# block -> (weak reference to the layer input, what its operand was computed from, the operand)
_last_activation: dict[str, tuple[weakref.ref, tuple, object]] = {}


def _activation_operand(x: torch.Tensor, x2: torch.Tensor, block: str, gemm: str, scale_fmt: str | None):
    """The operand of x2 = x as (T, in) float32 in `block` tiles, reused when the previous call quantised the same
    tensor x, unchanged, the same way: SwiGLU's w1 and w3, and MLA's wq_a and wkv_a, read one input, which an FP8
    kernel quantises once. (At most one operand per block shape stays referenced between calls.)"""
    if x.is_inference():  # inference tensors have no version counter
        return _operand(x2, block, gemm, scale_fmt)
    key = (x._version, gemm, scale_fmt)
    last = _last_activation.get(block)
    if last is not None and last[0]() is x and last[1] == key:
        return last[2]
    op = _operand(x2, block, gemm, scale_fmt)
    _last_activation[block] = (weakref.ref(x), key, op)
    return op


def _fprop(x_op, weight: torch.Tensor, w_op, gemm: str, fp8: bool) -> torch.Tensor:
    """The Fprop GEMM y = x W^T (T, out): x's 1x128 operand times the weight's 128x128 operand `w_op`, or float32
    x (T, in) times the master weight (fp8=False)."""
    return _matmul(x_op, w_op, gemm) if fp8 else x_op @ weight.float().T


class _FP8LinearFunction(torch.autograd.Function):
    """y = x W^T with the three GEMMs on E4M3 operands (report Fig. 6):
    Fprop  y  = x (1x128 tiles) . W^T (128x128 blocks)
    Dgrad  dx = dy (1x128 tiles) . W (the same 128x128 blocks)
    Wgrad  dW = dy^T . x, both in 128x1 tiles (per channel, per 128 tokens): no scaling group crosses the
           contracted token dim.
    A GEMM left out of `fp8_gemms` runs in float32 on the unquantised operands instead (for ablations).
    `FP8Linear.forward` prepares the operands: x_fprop (x's 1x128 operand, or x (T, in) float32), x_wgrad (its 128x1
    operand, or x, kept for Wgrad as the report caches the activations in FP8; "dequant" keeps them dequantised, in
    float32; None without Wgrad), w_op (the weight's 128x128 operand; None if neither Fprop nor Dgrad is in FP8). The
    backward pass quantises dy with the amax floor GRAD_AMAX_FLOOR."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, x_fprop, x_wgrad, w_op, gemm: str, scale_fmt: str | None,
                fp8_gemms: tuple[str, ...]) -> torch.Tensor:
        y = _fprop(x_fprop, weight, w_op, gemm, "fprop" in fp8_gemms)  # (T, out)
        ctx.gemm, ctx.scale_fmt, ctx.fp8_gemms, ctx.weight_dtype = gemm, scale_fmt, fp8_gemms, weight.dtype
        ctx.w, ctx.x = (w_op if "dgrad" in fp8_gemms else weight), x_wgrad
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gemm, scale_fmt = ctx.gemm, ctx.scale_fmt
        dy2 = dy.reshape(-1, dy.shape[-1]).float()  # (T, out)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad (T, in): contracts `out`
            if "dgrad" in ctx.fp8_gemms:
                dx = _matmul(_operand(dy2, "1x128", gemm, scale_fmt, GRAD_AMAX_FLOOR), _transpose(ctx.w), gemm)
            else:
                dx = dy2 @ ctx.w.float()
            dx = dx.to(dy.dtype).view(*dy.shape[:-1], -1)
        if ctx.needs_input_grad[1]:  # Wgrad (out, in): contracts the tokens
            if "wgrad" in ctx.fp8_gemms:
                dy_t = _transpose(_operand(dy2, "128x1", gemm, scale_fmt, GRAD_AMAX_FLOOR))
                dw = _matmul(dy_t, _transpose(ctx.x), gemm)
            else:
                dw = dy2.T @ ctx.x
            dw = dw.to(ctx.weight_dtype)
        ctx.w = ctx.x = None
        return dx, dw, None, None, None, None, None, None


class FP8Linear(nn.Module):
    """Drop-in for `nn.Linear(in_features, out_features, bias=False)` whose Fprop, Dgrad and Wgrad GEMMs run on E4M3
    operands with the report's tiling; `weight` (out, in) stays the high-precision (FP32) master the optimizer
    updates. forward: x (..., in) -> (..., out), in x's dtype; without autograd (inference, evaluation) only Fprop.

    gemm: one of GEMMS ("auto": real FP8 GEMMs on a capable CUDA device, else "dequant", the FP32-accumulation
    emulation; "tensor_core": the limited-precision model with promotion every N_C). scale_fmt: None or "ue8m0".
    fp8_gemms: the GEMMs that run in FP8, a subset of GEMM_TYPES ("fprop", "dgrad", "wgrad"; default all three, as
    the report); the others run in float32 on unquantised operands, to measure what each one costs in accuracy.

    Each operand is quantised once and reused while it is unchanged. The weight (128x128 blocks, online amax):
    `weight_operand` keeps it until the weight changes (the optimizer step, `load_state_dict` and any in-place write
    under `torch.no_grad()` bump `weight._version`; writes through `weight.data` do not, so don't use them); Fprop
    and Dgrad share it, and so do evaluation batches and accumulated micro-batches. An input that the previous
    FP8Linear quantised already (the same tensor, unchanged) reuses that quantisation (`_activation_operand`).
    Code that reads `weight` directly (the absorb attention path's W_UK / W_UV) sees the master weight.
    """

    def __init__(self, in_features: int, out_features: int, gemm: str = "auto", scale_fmt: str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 fp8_gemms: tuple[str, ...] = GEMM_TYPES):
        super().__init__()
        if gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
        if scale_fmt not in SCALE_FMTS:
            raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")
        self.in_features, self.out_features, self.gemm, self.scale_fmt = in_features, out_features, gemm, scale_fmt
        self.fp8_gemms = _check_fp8_gemms(fp8_gemms)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        self._weight_cache: tuple[tuple, object] | None = None  # (what the operand was computed from, operand)

    @classmethod
    def from_linear(cls, linear: nn.Linear, gemm: str = "auto", scale_fmt: str | None = None,
                    fp8_gemms: tuple[str, ...] = GEMM_TYPES) -> FP8Linear:
        """An FP8Linear sharing `linear.weight` (the same Parameter object: optimizers and state dicts still work)."""
        if linear.bias is not None:
            raise ValueError("FP8Linear has no bias; DeepSeek-V3's linear layers have none")
        layer = cls(linear.in_features, linear.out_features, gemm, scale_fmt, device="meta", fp8_gemms=fp8_gemms)
        layer.weight = linear.weight
        return layer

    def weight_operand(self):
        """The weight in 128x128 blocks as the backend consumes it (fake-quantised float32 (out, in) for "dequant",
        else (q, scale, "128x128")), recomputed only when the weight, the backend or the scale format changed."""
        w = self.weight.detach()
        gemm = _resolve_gemm(self.gemm, w.device)
        if w.is_inference():  # no version counter to tell whether it changed
            return _operand(w.float(), "128x128", gemm, self.scale_fmt)
        key = (w._version, w.data_ptr(), w.dtype, gemm, self.scale_fmt)
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, _operand(w.float(), "128x128", gemm, self.scale_fmt))
        return self._weight_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gemm, scale_fmt, fp8 = _resolve_gemm(self.gemm, x.device), self.scale_fmt, self.fp8_gemms
        w_op = self.weight_operand() if "fprop" in fp8 or "dgrad" in fp8 else None
        x2 = x.detach().reshape(-1, self.in_features).float()  # (T, in)
        x_fprop = _activation_operand(x, x2, "1x128", gemm, scale_fmt) if "fprop" in fp8 else x2
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):  # Fprop only
            return _fprop(x_fprop, self.weight, w_op, gemm, "fprop" in fp8).to(x.dtype).view(*x.shape[:-1], -1)
        x_wgrad = None
        if self.weight.requires_grad:
            x_wgrad = _activation_operand(x, x2, "128x1", gemm, scale_fmt) if "wgrad" in fp8 else x2
        return _FP8LinearFunction.apply(x, self.weight, x_fprop, x_wgrad, w_op, gemm, scale_fmt, fp8)

    def extra_repr(self) -> str:
        fp8_gemms = "" if self.fp8_gemms == GEMM_TYPES else f", fp8_gemms={self.fp8_gemms}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, gemm={self.gemm!r}, "
                f"scale_fmt={self.scale_fmt!r}{fp8_gemms}")


# ------------------------------------------------------------------ model conversion
FP8_ATTN_LINEARS = ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo")
FP8_MLP_LINEARS = ("w1", "w2", "w3")


@dataclass
class FP8Conversion:
    """What `convert_to_fp8` did: the swapped layers' names and the parameterised modules left in high precision."""

    swapped: list[str]
    kept: list[str]

    @property
    def n_swapped(self) -> int:
        return len(self.swapped)


def convert_to_fp8(model: nn.Module, gemm: str = "auto", scale_fmt: str | None = None,
                   fp8_gemms: tuple[str, ...] = GEMM_TYPES) -> FP8Conversion:
    """Swap, in place, exactly the linear layers DeepSeek-V3 computes in FP8 for `FP8Linear` (sharing their weights).

    FP8 (report §3.3.1; the hub checkpoint stores exactly these as E4M3 + weight_scale_inv): every attention linear
    (wq_a, wq_b or wq, wkv_a, wkv_b, wo), the dense MLPs' and every routed and shared expert's w1, w2, w3, including
    those in the MTP modules' blocks. Kept in high precision: the embedding, the output head, the MoE gates, the
    norms, the attention core (scores, softmax: not linear layers) and the MTP `eh_proj` (BF16 in the checkpoint).
    The absorb attention path reads `wkv_b.weight` directly, i.e. the master weight (training uses the naive path).
    Layers already converted are left alone. `fp8_gemms` (FP8Linear's) keeps some GEMM types in float32 for ablations;
    to convert one part only (e.g. the attention layers), call it on that submodule.
    """
    fp8_gemms = _check_fp8_gemms(fp8_gemms)
    swapped = []
    for name, module in list(model.named_modules()):
        attrs = FP8_ATTN_LINEARS if isinstance(module, MLA) else FP8_MLP_LINEARS if isinstance(module, MLP) else ()
        for attr in attrs:
            linear = getattr(module, attr, None)
            if isinstance(linear, nn.Linear):
                setattr(module, attr, FP8Linear.from_linear(linear, gemm, scale_fmt, fp8_gemms))
                swapped.append(f"{name}.{attr}" if name else attr)
    kept = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding, Gate, RMSNorm))]
    return FP8Conversion(swapped, kept)
