"""GPU training throughput, side by side in one run: a ~1B-parameter MoE configuration trained by `dsv3_ref.train`
in bf16 autocast, in FP8 with the one-call blockwise GEMM (`fp8_gemm="blockwise"`, Hopper) and in FP8 with the
faithful per-K-group GEMM (`"scaled_mm"`). Prints tokens/s and model FLOPs utilisation (MFU: the accounting module's
training FLOPs per token x tokens/s over the GPU's dense BF16 peak) and writes benchmarks/results/<gpu>_train.json
and .txt with the GPU named.

    python benchmarks/bench_gpu_train.py [--batch-size 8] [--seq-len 1024] [--reps 5]

Needs a CUDA GPU (FP8 variants: compute capability 9.0); elsewhere it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from dsv3_ref.config import ModelConfig
from dsv3_ref.data import CorpusData
from dsv3_ref.fp8.gemm import blockwise_capable
from dsv3_ref.nn.model import Transformer
from dsv3_ref.systems.accounting import activated_params, total_params, training_flops_per_token
from dsv3_ref.train import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import race  # noqa: E402

# ~1.0B parameters, ~0.25B activated per token: 12 layers (1 dense), 32 experts of width 512, top-4 in 2 of 4 groups
CONFIG = ModelConfig(dim=1536, inter_dim=4096, moe_inter_dim=512, n_layers=12, n_dense_layers=1, n_heads=12,
                     n_routed_experts=32, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4,
                     n_limited_groups=2, q_lora_rank=768, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                     v_head_dim=64, max_seq_len=4096, original_seq_len=4096)
# dense BF16 tensor-core peaks (FLOP/s, without sparsity) of the GPUs this was meant for; FP8's is twice these
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "H20": 148e12}
VARIANTS = {"bf16": dict(precision="bf16"), "fp8 blockwise": dict(precision="fp8", fp8_gemm="blockwise"),
            "fp8 per-group": dict(precision="fp8", fp8_gemm="scaled_mm")}


def peak_of(name: str) -> float | None:
    hits = [peak for key, peak in BF16_PEAK.items() if re.search(rf"\b{key}\b", name)]
    return hits[0] if hits else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_train: no CUDA device here; nothing measured")
        return 0
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    variants = {k: v for k, v in VARIANTS.items() if v["precision"] != "fp8" or blockwise_capable(device)}
    data = CorpusData(seed=0)
    trainers = {}
    for name, overrides in variants.items():
        model = Transformer(CONFIG)
        model.reset_parameters(0)
        cfg = TrainConfig(steps=10**6, batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=10, **overrides)
        trainers[name] = Trainer(model.to(device), cfg, data, progress=False)

    def step(trainer: Trainer):
        def run():
            trainer.train_step()
            torch.cuda.synchronize()
        return run

    times = race({name: step(t) for name, t in trainers.items()}, warmup=args.warmup, reps=args.reps)
    tokens = args.batch_size * args.seq_len
    flops = training_flops_per_token(CONFIG, args.seq_len)
    peak = peak_of(gpu)
    rows = {}
    for name, (wall, _) in times.items():
        tok_s = tokens / wall
        rows[name] = {"ms_per_step": 1e3 * wall, "tokens_per_s": tok_s,
                      "mfu_vs_bf16_peak": None if peak is None else flops * tok_s / peak}
    lines = [f"GPU: {gpu}; torch {torch.__version__}; config: {total_params(CONFIG):,} parameters, "
             f"{activated_params(CONFIG):,} activated per token; batch {args.batch_size} x {args.seq_len}; "
             f"{flops:,} training FLOPs per token; medians of {args.reps} alternating steps"]
    for name, row in rows.items():
        mfu = "n/a (unknown peak)" if row["mfu_vs_bf16_peak"] is None else f"{100 * row['mfu_vs_bf16_peak']:.1f}%"
        lines.append(f"  {name:<14} {row['ms_per_step']:8.1f} ms/step  {row['tokens_per_s']:10,.0f} tokens/s  "
                     f"MFU {mfu}  ({rows['bf16']['ms_per_step'] / row['ms_per_step']:.2f}x bf16)")
    print("\n".join(lines))
    out = Path(__file__).resolve().parent / "results"
    stem = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_") + "_train"
    (out / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "batch_size":
                                                  args.batch_size, "seq_len": args.seq_len, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
