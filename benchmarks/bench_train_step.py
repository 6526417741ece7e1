"""Training-step throughput: dsv3_ref vs transformers' DeepseekV3ForCausalLM, side by side in one run.

Both models are built from the same `ModelConfig` (transformers via `DeepseekV3Config(**cfg.to_hf())`), run in
float32 on the CPU with the same thread count, batch and sequence length. One step = forward, next-token
cross-entropy on the logits, backward (no optimizer). After warm-up, the two models alternate step by step so that
machine noise hits both alike; the median step time of each gives tokens/s, and the ratio dsv3_ref / transformers
(> 1 means dsv3_ref is faster) is what to compare across machines.

    python benchmarks/bench_train_step.py [--preset small] [--batch 8] [--seq 128] [--threads 2] [--reps 7]
    python benchmarks/bench_train_step.py --profile    # also print dsv3_ref's hottest ops (torch.profiler)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import race  # benchmarks/timing.py (the script's folder is on sys.path)
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from dsv3_ref import ModelConfig, Transformer


def step_fn(model: torch.nn.Module, hf: bool):
    """A closure running one forward + loss + backward on (tokens, targets)."""

    def step(tokens: torch.Tensor, targets: torch.Tensor) -> None:
        logits = model(input_ids=tokens, use_cache=False).logits if hf else model(tokens)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--profile", action="store_true", help="profile dsv3_ref's step and print the top ops")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = ModelConfig.from_preset(args.preset)
    ours = Transformer(cfg).train()
    theirs = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg.to_hf())).train()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    print(f"preset={args.preset} params: dsv3_ref {n_ours:,} transformers {n_theirs:,}; batch={args.batch} "
          f"seq={args.seq} threads={args.threads} attn(transformers)={theirs.config._attn_implementation}")

    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    tokens, targets = data[:, :-1], data[:, 1:]
    steps = {"dsv3_ref": step_fn(ours, hf=False), "transformers": step_fn(theirs, hf=True)}
    timed = race({name: (lambda step=step: step(tokens, targets)) for name, step in steps.items()}, args.warmup,
                 args.reps)

    n_tok = args.batch * args.seq
    med = {name: wall for name, (wall, _) in timed.items()}
    for name in steps:
        print(f"{name:>13}: median {med[name] * 1e3:8.1f} ms/step  {n_tok / med[name]:9.0f} tokens/s")
    print(f"ratio dsv3_ref / transformers (tokens/s): {med['transformers'] / med['dsv3_ref']:.2f}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps["dsv3_ref"](tokens, targets)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
