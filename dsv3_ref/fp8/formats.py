"""FP8 formats and fine-grained quantisation (report §3.3.2): the numerics leaf the FP8 GEMMs and layers, the
checkpoint loader (`block_dequant`) and the accounting (`BLOCK`) build on. Notebook 50 teaches it.

E4M3 (`torch.float8_e4m3fn`, max 448, no infinity) serves every tensor, as in the report; E5M2 (max 57344) is there
for comparison. A 2-D view (rows, cols) of a tensor is cut into blocks (`BLOCKS`: "tensor", "row", "1x128" for
activations, "128x1" for both Wgrad operands, "128x128" for weights); block b stores q = cast(clamp(x / s_b)) with
one float32 dequantisation multiplier s_b = max(amax_b, amax_floor) / fp8_max (the checkpoints' `weight_scale_inv`).
Arithmetic on float8 is not implemented on the CPU: everything upcasts to float32 first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0
E5M2_MAX = torch.finfo(torch.float8_e5m2).max  # 57344.0
FP8_MAX = {torch.float8_e4m3fn: E4M3_MAX, torch.float8_e5m2: E5M2_MAX}
BLOCK = 128  # tile / block edge and K-group of the report and the checkpoint (its weight_block_size)
BLOCKS: dict[str, tuple[int | None, int | None]] = {
    "tensor": (None, None), "row": (1, None), "1x128": (1, BLOCK), "128x1": (BLOCK, 1), "128x128": (BLOCK, BLOCK)}
SCALE_FMTS = (None, "ue8m0")
AMAX_FLOOR = 1e-4  # official act_quant (inference/kernel.py at HEAD): amax = max(amax, 1e-4)
# gradients only guard 0/0: their magnitude scales with 1 / (tokens per batch), and a 1e-4 floor would push whole
# gradient tiles into E4M3's subnormal range
GRAD_AMAX_FLOOR = 1e-12


def fp8_dtype(fmt: str) -> torch.dtype:
    """'e4m3' -> torch.float8_e4m3fn, 'e5m2' -> torch.float8_e5m2."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {tuple(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def resolve_block(block: str | tuple[int | None, int | None], rows: int, cols: int) -> tuple[int, int]:
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


def as_2d(x: torch.Tensor) -> torch.Tensor:
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
    return rearrange(x2, "(mb bm) (kb bk) -> mb bm kb bk", bm=bm, bk=bk)


def scale_shape(x_shape: torch.Size, bm: int, mb: int, kb: int) -> tuple[int, ...]:
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


def _quantizer_args(x: torch.Tensor, block: str | tuple[int | None, int | None], fmt: str, scale_fmt: str | None,
                    amax_floor: float) -> tuple[torch.Tensor, int, int, torch.dtype]:
    """The public quantisers' argument checks: x (..., cols) -> (x as float32 (rows, cols), bm, bk, float8 dtype)."""
    dtype = fp8_dtype(fmt)
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")
    if not amax_floor > 0:
        raise ValueError(f"amax_floor must be > 0, got {amax_floor}")
    x2 = as_2d(x).float()  # (rows, cols)
    return x2, *resolve_block(block, *x2.shape), dtype


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
    v = blocks / rearrange(scale, "mb kb -> mb 1 kb 1")
    if not finite:
        v.clamp_(-fmax, fmax)  # inf -> fmax; NaN stays NaN
    return v, scale


def _crop(blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(Mb, bm, Kb, bk) padded blocks -> the tensor of `shape` they cover."""
    flat = rearrange(blocks, "mb bm kb bk -> (mb bm) (kb bk)")
    rows, cols = math.prod(shape[:-1]), shape[-1]
    return (flat if flat.shape == (rows, cols) else flat[:rows, :cols]).reshape(shape)


def quantize(x: torch.Tensor, block: str | tuple[int | None, int | None] = "1x128", fmt: str = "e4m3",
             scale_fmt: str | None = None, amax_floor: float = AMAX_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., cols) -> (q, scale): q float8 of x's shape, scale float32 dequant multipliers per block.

    scale = max(amax, amax_floor) / fp8_max per block over the finite values; q = cast(clamp(x / scale, -fp8_max,
    fp8_max)). Scale shapes: (*leading, ceil(cols / bk)) for one-row blocks, else (ceil(rows / bm), ceil(cols / bk)),
    with leading dims flattened into rows; ragged blocks are zero-padded for the amax (zeros never raise it).
    The amax floor keeps an all-zero block at exact zeros, never 0/0. Non-finite values never enter the scale: NaN
    stays NaN (that element only) and +-inf saturates to +-fp8_max * s; we clamp before the cast rather than rely on
    torch's cast saturation (e4m3fn saturates in torch 2.13, older versions returned NaN, e5m2 overflows to inf).
    scale_fmt="ue8m0" rounds each scale UP to a power of two (DeepGEMM's `ceil_to_ue8m0`, DeepSeek-V3.1), so
    amax / s <= fp8_max still holds.
    """
    x2, bm, bk, dtype = _quantizer_args(x, block, fmt, scale_fmt, amax_floor)
    v, scale = _scaled_blocks(x2, bm, bk, dtype, scale_fmt, amax_floor)
    return _crop(v.to(dtype), x.shape), scale.reshape(scale_shape(x.shape, bm, *scale.shape))


def fake_quantize_2d(x2: torch.Tensor, bm: int, bk: int, dtype: torch.dtype, scale_fmt: str | None,
                      amax_floor: float) -> torch.Tensor:
    """`fake_quantize` of a float32 (rows, cols) matrix in bm x bk blocks, arguments already checked (FP8Linear's
    hot path): x / s rounded onto the format's grid (`round_to_fp8_`) times s, (rows, cols) float32."""
    v, scale = _scaled_blocks(x2, bm, bk, dtype, scale_fmt, amax_floor)
    return _crop(round_to_fp8_(v, dtype).mul_(rearrange(scale, "mb kb -> mb 1 kb 1")), x2.shape)


def fake_quantize(x: torch.Tensor, block: str | tuple[int | None, int | None] = "1x128", fmt: str = "e4m3",
                  scale_fmt: str | None = None, amax_floor: float = AMAX_FLOOR) -> torch.Tensor:
    """dequantize(*quantize(x, ...)) bit for bit (float32, x's shape), without a float8 tensor: x / s is rounded onto
    the format's grid in float32 (`round_to_fp8_`) and multiplied back by s."""
    x2, bm, bk, dtype = _quantizer_args(x, block, fmt, scale_fmt, amax_floor)
    return fake_quantize_2d(x2, bm, bk, dtype, scale_fmt, amax_floor).reshape(x.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: str | tuple[int | None, int | None] = "1x128",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize`: q (..., cols) float8 times its block's scale -> `dtype`, q's shape."""
    q2 = to_float(as_2d(q))  # float8 arithmetic is not implemented on the CPU: upcast first
    rows, cols = q2.shape
    bm, bk = resolve_block(block, rows, cols)
    blocks = _blocks(q2, bm, bk)  # (Mb, bm, Kb, bk)
    mb, kb = blocks.shape[0], blocks.shape[2]
    if scale.numel() != mb * kb:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {scale_shape(q.shape, bm, mb, kb)} for "
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
