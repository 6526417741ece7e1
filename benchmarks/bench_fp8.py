"""FP8 emulation cost: quantisation overhead, FP8 GEMM throughput, FP8Linear and a full training step, each as a
ratio to the float32 baseline measured side by side in one run.

1. quantisation: `quantize` of a (tokens, dim) activation in 1x128 and 128x1 tiles and of a (dim, dim) weight in
   128x128 blocks, relative to one float32 matmul of the same activation and weight; and the quantise-dequantise
   round trip the emulated GEMMs consume, `fake_quantize` (rounds in float32) vs `dequantize(*quantize(...))`;
2. GEMM: `fp8_gemm` on pre-quantised operands vs a float32 matmul, in GFLOP/s: "dequant" (the FP32-accumulation
   emulation FP8Linear uses on the CPU) on (tokens x dim x dim), and the bit-level "tensor_core" model on a smaller
   (64 x 64 x 4096) problem. ("scaled_mm" is left out: torch's CPU `_scaled_mm` is a slow reference kernel, about
   1000x a float32 matmul; on an FP8 GPU it is the real tensor-core GEMM.)
3. layer: FP8Linear forward + backward vs nn.Linear forward + backward (same weight, same input; the weight is
   touched before every rep, as an optimizer step would, so the FP8 layer re-quantises it each time), with each GEMM
   type alone in FP8 (`fp8_gemms`) to show what each one costs;
4. training step: `Trainer.train_step` on a preset with `TrainConfig(precision="fp8")` vs `precision="fp32"` (same
   initial weights and data), at the preset's training batch (16 x 128 tokens for small). The emulation's goal is
   to cost at most 2x. The small preset is the hard case: its GEMMs are tiny (K = 64 or 128, a few hundred tokens
   per expert), so the ~10 elementwise passes and ~20 op dispatches of each quantisation weigh as much as the GEMM
   itself; at dim 1024 (section 3) a whole FP8Linear costs about 1.4x. Smaller batches raise the ratio (--batch 8).

Each group alternates rep by rep so machine noise hits all alike; medians of wall-clock and of process CPU time are
reported (on a shared machine the CPU time is the steadier one), with the load average before and after.

    python benchmarks/bench_fp8.py [--tokens 2048] [--dim 1024] [--preset small] [--threads 2] [--reps 7]
    python benchmarks/bench_fp8.py --skip-train        # kernels and layer only
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from timing import race  # benchmarks/timing.py (the script's folder is on sys.path)
from torch import nn

from dsv3_ref import ModelConfig, Transformer
from dsv3_ref.fp8.formats import dequantize, fake_quantize, quantize
from dsv3_ref.fp8.gemm import fp8_gemm
from dsv3_ref.fp8.linear import GEMM_TYPES, FP8Linear
from dsv3_ref.train import TrainConfig, Trainer


def report(title: str, med: dict[str, tuple[float, float]], baseline: str, flops: float | None = None) -> None:
    print(f"\n{title}")
    (base_wall, base_cpu) = med[baseline]
    for name, (wall, cpu) in med.items():
        rate = f"  {flops / wall / 1e9:7.2f} GFLOP/s" if flops else ""
        print(f"  {name:>28}: {wall * 1e3:9.2f} ms wall x{wall / base_wall:6.2f}, {cpu * 1e3:9.2f} ms CPU "
              f"x{cpu / base_cpu:6.2f} of {baseline}{rate}")


def bench_kernels(tokens: int, dim: int, warmup: int, reps: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(tokens, dim, generator=gen), torch.randn(dim, dim, generator=gen) * 0.02
    report(f"quantisation overhead (activation {tokens} x {dim}, weight {dim} x {dim})", race({
        "fp32 matmul x W^T": lambda: x @ w.T,
        "quantize x 1x128": lambda: quantize(x, "1x128"),
        "quantize x 128x1": lambda: quantize(x, "128x1"),
        "quantize W 128x128": lambda: quantize(w, "128x128"),
        "fake_quantize x 1x128": lambda: fake_quantize(x, "1x128"),
        "dequantize(quantize x 1x128)": lambda: dequantize(*quantize(x, "1x128"), "1x128"),
    }, warmup, reps), "fp32 matmul x W^T")

    (qx, sx), (qw, sw) = quantize(x, "1x128"), quantize(w, "128x128")
    report(f"FP8 GEMM emulation, quantised operands ({tokens} x {dim} x {dim})", race({
        "fp32 matmul": lambda: x @ w.T,
        "fp8_gemm dequant": lambda: fp8_gemm(qx, sx, qw, sw, gemm="dequant"),
    }, warmup, reps), "fp32 matmul", flops=2 * tokens * dim * dim)

    m = n = 64
    k = 4096
    a, b = torch.rand(m, k, generator=gen), torch.rand(n, k, generator=gen)
    (qa, sa), (qb, sb) = quantize(a, "1x128"), quantize(b, "1x128")
    report(f"tensor-core accumulation model ({m} x {n} x {k}, promotion every 128)", race({
        "fp32 matmul": lambda: a @ b.T,
        "fp8_gemm tensor_core": lambda: fp8_gemm(qa, sa, qb, sb, "1x128", "1x128", gemm="tensor_core"),
    }, min(warmup, 1), max(reps // 2, 1)), "fp32 matmul", flops=2 * m * n * k)


def bench_layer(tokens: int, dim: int, warmup: int, reps: int) -> None:
    torch.manual_seed(0)
    ref = nn.Linear(dim, dim, bias=False)
    layers: dict[str, nn.Module] = {"nn.Linear": ref, "FP8Linear (dequant)": FP8Linear.from_linear(ref, "dequant")}
    for gemm in GEMM_TYPES:
        layers[f"  {gemm} alone in FP8"] = FP8Linear.from_linear(ref, "dequant", fp8_gemms=(gemm,))
    x = torch.randn(tokens, dim)

    def step(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                layer.weight.mul_(1.0)  # a new version of the weight, as after an optimizer step
            xr = x.clone().requires_grad_()
            layer(xr).square().mean().backward()
            layer.zero_grad(set_to_none=True)
        return run

    report(f"linear layer forward + backward ({tokens} tokens, {dim} -> {dim})",
           race({name: step(layer) for name, layer in layers.items()}, warmup, reps), "nn.Linear")


def bench_train(preset: str, batch: int, seq: int, warmup: int, reps: int) -> None:
    trainers = {}
    for precision in ("fp32", "fp8"):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset(preset))
        cfg = TrainConfig.for_preset(preset, batch_size=batch, seq_len=seq, precision=precision)
        trainers[precision] = Trainer(model, cfg, progress=False)
    n_tok = batch * seq
    med = race({f"train_step {p}": t.train_step for p, t in trainers.items()}, warmup, reps)
    report(f"training step ({preset} preset, batch {batch} x {seq} tokens, AdamW, fp32 master weights)", med,
           "train_step fp32")
    for name, (wall, _) in med.items():
        print(f"  {name:>28}: {n_tok / wall:9.0f} tokens/s")
    (wall8, cpu8), (wall32, cpu32) = med["train_step fp8"], med["train_step fp32"]
    print(f"  ratio fp8 / fp32 step time: {wall8 / wall32:.2f} wall, {cpu8 / cpu32:.2f} CPU (goal: <= 2)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: the preset's training "
                    "batch, TrainConfig.for_preset: 16 for small)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--skip-train", action="store_true", help="skip the training-step comparison")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = "load average {:.2f} {:.2f} {:.2f} (1, 5, 15 min)"
    print(f"torch {torch.__version__}, threads={args.threads}, reps={args.reps} (medians), {os.cpu_count()} CPUs, "
          f"{load.format(*os.getloadavg())}")
    bench_kernels(args.tokens, args.dim, args.warmup, args.reps)
    bench_layer(args.tokens, args.dim, args.warmup, args.reps)
    if not args.skip_train:
        batch = args.batch or TrainConfig.for_preset(args.preset).batch_size
        bench_train(args.preset, batch, args.seq, args.warmup, args.reps)
    print(f"\nafter: {load.format(*os.getloadavg())}")


if __name__ == "__main__":
    main()
