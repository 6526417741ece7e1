"""FP8 on a real FP8 GPU (Hopper, Ada, or later): what the CPU emulation stands in for, measured side by side.

1. accumulation precision, the report's §3.5.2 experiment: C = A B^T for A (m, K), B (n, K) with U(0, 1) entries,
   quantised to E4M3 with one scale per tensor, against the float64 product of the same quantised inputs (so only
   the accumulation is measured); the maximum relative error over the m x n outputs, per K, for
   * "cuBLAS fast accum": `torch._scaled_mm(..., use_fast_accum=True)`, the tensor core's own accumulator all the
     way along K (no promotion: what the report measured, "nearly 2%" at K = 4096);
   * "cuBLAS default": `use_fast_accum=False` (cuBLASLt promotes partial sums to FP32 itself);
   * "promote every 128": `dsv3_ref.fp8.formats.fp8_gemm(gemm="scaled_mm")`, one FP8 GEMM per 128-wide K group summed in
     FP32 (the report's fix, in software);
   * "128-groups, fast accum": one fast-accumulation GEMM per 128-wide K group, summed in FP32 (promotion exactly
     every N_C = 128, as the report's Fig. 7b);
   * the package's bit-level model `gemm="tensor_core"`, without promotion and with promotion every N_C = 128, run
     on the same inputs (on the GPU, in float64); and the fraction of outputs where the model and the hardware agree
     bit for bit.
2. the CUDA path of FP8Linear: a short training run of a preset on the GPU in FP32, BF16 and FP8
   (`TrainConfig(precision=...)`, FP8Linear picks "scaled_mm" on its own), same seed and data: final losses and
   the median step time of each.

Needs a CUDA device with FP8 tensor cores (compute capability >= 8.9); exits with a message elsewhere.

    python benchmarks/bench_fp8_cuda.py [--json out.json] [--ks 128 512 1024 2048 4096 8192 16384] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dsv3_ref import ModelConfig, Transformer
from dsv3_ref.data import CorpusData
from dsv3_ref.fp8.formats import quantize
from dsv3_ref.fp8.gemm import fp8_capable, fp8_gemm
from dsv3_ref.train import TrainConfig, Trainer


def max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs() / ref.abs()).max().item()


def per_group_scaled_mm(qa: torch.Tensor, qb: torch.Tensor, fast: bool, group: int = 128) -> torch.Tensor:
    """sum over 128-wide K groups of one `_scaled_mm` each (unit scales, FP32 output), accumulated in FP32."""
    one = torch.ones((), device=qa.device)
    out = torch.zeros(qa.shape[0], qb.shape[0], device=qa.device)
    for k in range(0, qa.shape[1], group):
        out += torch._scaled_mm(qa[:, k:k + group].contiguous(), qb[:, k:k + group].contiguous().t(), scale_a=one,
                                scale_b=one, out_dtype=torch.float32, use_fast_accum=fast)
    return out


# (hardware, model) pairs whose outputs are compared element by element
PAIRS = (("cuBLAS fast accum", "model, no promotion"), ("128-groups, fast accum", "model, promote every 128"))


def accumulation(ks: list[int], m: int, n: int, seeds: int, device: torch.device, dist: str) -> list[dict]:
    """Max relative error (U(0, 1) inputs) or max |error| / max |C| (N(0, 1) inputs) per method and K, and the
    fraction of outputs where a hardware result and a model result are bit-identical."""
    rows = []
    for k in ks:
        errs: dict[str, list[float]] = {}
        same: dict[str, list[float]] = {}
        for seed in range(seeds):
            gen = torch.Generator().manual_seed(seed)
            draw = torch.rand if dist == "uniform" else torch.randn
            qa, sa = quantize(draw(m, k, generator=gen).to(device), "tensor")
            qb, sb = quantize(draw(n, k, generator=gen).to(device), "tensor")
            ref = qa.double() @ qb.double().T  # unit scales below: the products of the stored E4M3 values
            one = torch.ones((), device=device)
            results = {}
            for name, fast in (("cuBLAS fast accum", True), ("cuBLAS default", False)):
                results[name] = torch._scaled_mm(qa, qb.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                                                 use_fast_accum=fast)
            results["128-groups, fast accum"] = per_group_scaled_mm(qa, qb, True)
            unit = torch.ones(1, 1, device=device)
            for name, promote in (("model, no promotion", None), ("model, promote every 128", 128)):
                results[name] = fp8_gemm(qa, unit, qb, unit, "tensor", "tensor", gemm="tensor_core",
                                         promote_every=promote)
            for name, out in results.items():
                err = (out.double() - ref).abs()
                errs.setdefault(name, []).append(
                    (err / ref.abs()).max().item() if dist == "uniform" else (err.max() / ref.abs().max()).item())
            for hw, model in PAIRS:
                same.setdefault(f"{hw} == {model}", []).append((results[hw] == results[model]).double().mean().item())
        row = {"K": k, "error": {name: max(v) for name, v in errs.items()},
               "bit-identical fraction": {name: min(v) for name, v in same.items()}}
        rows.append(row)
        print(f"[{dist}] K={k:6d} error: " + " | ".join(f"{name} {100 * v:.3f}%" for name, v in row["error"].items()),
              flush=True)
        print(f"[{dist}] K={k:6d} identical: " + " | ".join(
            f"{name}: {v:.4f}" for name, v in row["bit-identical fraction"].items()), flush=True)
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training(preset: str, steps: int, device: torch.device) -> dict:
    data = CorpusData(seed=0)
    out = {}
    for precision in ("fp32", "bf16", "fp8"):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset(preset))
        model.reset_parameters(0)
        cfg = TrainConfig.for_preset(preset, steps=steps, eval_every=0, eval_batches=4, log_every=1, seed=0,
                                     precision=precision)
        trainer = Trainer(model.to(device), cfg, data, progress=False)
        times = []
        for _ in range(steps):
            sync(device)
            t0 = time.perf_counter()
            step = trainer.train_step()
            sync(device)
            times.append(time.perf_counter() - t0)
        val = trainer.evaluate()
        out[precision] = {"train_loss": step["train_loss"], "val_loss": val,
                          "step_ms": 1000 * statistics.median(times[3:])}
        print(f"{precision}: train loss {out[precision]['train_loss']:.4f}, val loss {val:.4f}, "
              f"median step {out[precision]['step_ms']:.1f} ms", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of the script (torch's CPU "
                   "_scaled_mm is a reference kernel, not a tensor core)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and fp8_capable(device)):
        raise SystemExit("needs a CUDA device with FP8 tensor cores (compute capability >= 8.9)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}", flush=True)
    result = {"device": name, "torch": torch.__version__,
              **{f"accumulation, {dist}": accumulation(args.ks, args.m, args.n, args.seeds, device, dist)
                 for dist in ("uniform", "normal")}}
    if args.steps:
        result["training"] = training(args.preset, args.steps, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
