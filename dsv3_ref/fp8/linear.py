"""FP8 training layers (report §3.3.1, Fig. 6): `FP8Linear` runs Fprop, Dgrad and Wgrad on E4M3 operands with the
report's tiles and keeps the FP32 master weight; `convert_to_fp8(model)` swaps in exactly the layers the report
computes in FP8. Notebooks 50 and 55 teach them.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.attention import MLA
from ..nn.layers import MLP, RMSNorm
from ..nn.moe import Gate
from .formats import AMAX_FLOOR, BLOCKS, GRAD_AMAX_FLOOR, SCALE_FMTS, fake_quantize_2d, quantize
from .gemm import GEMMS, fp8_gemm, resolve_gemm

GEMM_TYPES = ("fprop", "dgrad", "wgrad")  # the three GEMMs of a linear layer (report Fig. 6)


def _operand(t: torch.Tensor, block: str, gemm: str, scale_fmt: str | None, amax_floor: float = AMAX_FLOOR):
    """A 2-D float32 GEMM operand quantised to E4M3 as backend `gemm` consumes it: fake-quantised float32 for
    "dequant" (straight into the hot path: the layer checked its arguments once), else (q, scale, block)."""
    if gemm == "dequant":
        return fake_quantize_2d(t, *BLOCKS[block], torch.float8_e4m3fn, scale_fmt, amax_floor)
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


class InputQuantCache:
    """The last quantised layer input per tile shape, for FP8Linear layers that read the same tensor: SwiGLU's w1 and
    w3, and MLA's wq_a and wkv_a, read one input, which an FP8 kernel quantises once. `convert_to_fp8` gives the
    layers it creates one shared cache; an FP8Linear built alone gets its own. At most one operand per tile shape
    stays referenced, and only a weak reference to the input; copies (deepcopy, pickle) start empty."""

    def __init__(self) -> None:
        # block -> (weak reference to the layer input, what its operand was computed from, the operand)
        self._last: dict[str, tuple[weakref.ref, tuple, object]] = {}

    def __getstate__(self) -> dict:
        return {"_last": {}}

    def operand(self, x: torch.Tensor, x2: torch.Tensor, block: str, gemm: str, scale_fmt: str | None):
        """The operand of x2 = x as (T, in) float32 in `block` tiles, reused when the previous call quantised the same
        tensor x, unchanged, the same way."""
        if x.is_inference():  # inference tensors have no version counter
            return _operand(x2, block, gemm, scale_fmt)
        key = (x._version, gemm, scale_fmt)
        last = self._last.get(block)
        if last is not None and last[0]() is x and last[1] == key:
            return last[2]
        op = _operand(x2, block, gemm, scale_fmt)
        self._last[block] = (weakref.ref(x), key, op)
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
    FP8Linear sharing its `input_cache` quantised already (the same tensor, unchanged) reuses that quantisation.
    Code that reads `weight` directly (the absorb attention path's W_UK / W_UV) sees the master weight.
    """

    def __init__(self, in_features: int, out_features: int, gemm: str = "auto", scale_fmt: str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 fp8_gemms: tuple[str, ...] = GEMM_TYPES, input_cache: InputQuantCache | None = None):
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
        self.input_cache = InputQuantCache() if input_cache is None else input_cache

    @classmethod
    def from_linear(cls, linear: nn.Linear, gemm: str = "auto", scale_fmt: str | None = None,
                    fp8_gemms: tuple[str, ...] = GEMM_TYPES, input_cache: InputQuantCache | None = None) -> FP8Linear:
        """An FP8Linear sharing `linear.weight` (the same Parameter object: optimizers and state dicts still work)."""
        if linear.bias is not None:
            raise ValueError("FP8Linear has no bias; DeepSeek-V3's linear layers have none")
        layer = cls(linear.in_features, linear.out_features, gemm, scale_fmt, device="meta", fp8_gemms=fp8_gemms,
                    input_cache=input_cache)
        layer.weight = linear.weight
        return layer

    def weight_operand(self):
        """The weight in 128x128 blocks as the backend consumes it (fake-quantised float32 (out, in) for "dequant",
        else (q, scale, "128x128")), recomputed only when the weight, the backend or the scale format changed."""
        w = self.weight.detach()
        gemm = resolve_gemm(self.gemm, w.device)
        if w.is_inference():  # no version counter to tell whether it changed
            return _operand(w.float(), "128x128", gemm, self.scale_fmt)
        key = (w._version, w.data_ptr(), w.dtype, gemm, self.scale_fmt)
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, _operand(w.float(), "128x128", gemm, self.scale_fmt))
        return self._weight_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gemm, scale_fmt, fp8 = resolve_gemm(self.gemm, x.device), self.scale_fmt, self.fp8_gemms
        w_op = self.weight_operand() if "fprop" in fp8 or "dgrad" in fp8 else None
        x2 = x.detach().reshape(-1, self.in_features).float()  # (T, in)
        x_fprop = self.input_cache.operand(x, x2, "1x128", gemm, scale_fmt) if "fprop" in fp8 else x2
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):  # Fprop only
            return _fprop(x_fprop, self.weight, w_op, gemm, "fprop" in fp8).to(x.dtype).view(*x.shape[:-1], -1)
        x_wgrad = None
        if self.weight.requires_grad:
            x_wgrad = self.input_cache.operand(x, x2, "128x1", gemm, scale_fmt) if "wgrad" in fp8 else x2
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
    input_cache = InputQuantCache()  # shared: layers reading one input quantise it once
    swapped = []
    for name, module in list(model.named_modules()):
        attrs = FP8_ATTN_LINEARS if isinstance(module, MLA) else FP8_MLP_LINEARS if isinstance(module, MLP) else ()
        for attr in attrs:
            linear = getattr(module, attr, None)
            if isinstance(linear, nn.Linear):
                setattr(module, attr, FP8Linear.from_linear(linear, gemm, scale_fmt, fp8_gemms, input_cache))
                swapped.append(f"{name}.{attr}" if name else attr)
    kept = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding, Gate, RMSNorm))]
    return FP8Conversion(swapped, kept)
