"""Training-step throughput: dsv3_ref vs transformers' DeepseekV3ForCausalLM, side by side in one run.

Both models hold the same weights (dsv3_ref's, saved with `save_pretrained` and loaded by transformers'
`from_pretrained`, so both route every token alike) and run in float32 on the CPU with the same thread count, batch
and sequence length. One step = forward, next-token cross-entropy on the logits, backward (no optimizer).

Each model runs once per way of running its experts: dsv3_ref's `EXPERT_IMPLS` ("loop", the reference, and
"grouped"), and every experts implementation transformers registers ("eager" plus `ALL_EXPERTS_FUNCTIONS`:
batched_mm, grouped_mm, and the CUDA-only ones, reported as unavailable when their first step raises). One timed step
of each screens out the hopeless ones (more than `--screen` times the fastest; batched_mm gathers a weight matrix per
token). The rest alternate step by step (`timing.race`) so that machine noise hits all alike; the median step time
gives tokens/s. Printed ratios (> 1 means dsv3_ref is faster): dsv3_ref "grouped" against transformers' FASTEST
implementation, and dsv3_ref "loop" / "grouped" within dsv3_ref; beside each, the same ratio of process CPU time (with
one thread, on a machine shared with other jobs, it is steadier than the wall clock).

    python benchmarks/bench_train_step.py [--preset small] [--batch 8] [--seq 128] [--threads 2] [--reps 7]
    python benchmarks/bench_train_step.py --profile    # also print dsv3_ref's hottest ops (torch.profiler)
    python benchmarks/bench_train_step.py --ceiling    # also dsv3_ref with free routed experts: the upper bound
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
import torch.nn.functional as F
from timing import race  # benchmarks/timing.py (the script's folder is on sys.path)
from transformers import DeepseekV3ForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from dsv3_ref import ModelConfig, MoE, Routing, Transformer, save_pretrained
from dsv3_ref.nn.moe import EXPERT_IMPLS, set_expert_impl


def step_fn(model: torch.nn.Module, hf: bool, tokens: torch.Tensor, targets: torch.Tensor):
    """A closure running one forward + loss + backward."""

    def step() -> None:
        logits = model(input_ids=tokens, use_cache=False).logits if hf else model(tokens)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def free_routed_experts(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Stand-in for `MoE.routed` that costs next to nothing but keeps the gate in the graph: x (N, dim) scaled by
    each token's summed weights (N, 1). Not a model: it bounds what running the experts faster could gain."""
    return x * routing.weights.sum(dim=-1, keepdim=True)


def hf_experts_implementations() -> list[str]:
    """Every experts implementation transformers offers: "eager" (its per-expert loop) and the registered ones."""
    return ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--screen", type=float, default=3.0,
                    help="race only the variants whose screening step is within this factor of the fastest")
    ap.add_argument("--ceiling", action="store_true",
                    help="also race dsv3_ref with its routed experts replaced by a free stand-in (an upper bound on "
                         "what any expert dispatch can gain)")
    ap.add_argument("--profile", action="store_true", help="profile dsv3_ref's step and print the top ops")
    return ap.parse_args(argv)


def build_steps(args, ours, theirs, tokens, targets) -> tuple[dict, dict]:
    """One training-step closure per variant: dsv3_ref's expert paths, the optional ceiling, and every transformers
    experts implementation that runs here (the others are returned with the reason they do not)."""
    steps, unavailable = {}, {}
    for impl in EXPERT_IMPLS:
        model = copy.deepcopy(ours)
        set_expert_impl(model, impl)
        steps[f"dsv3_ref {impl}"] = step_fn(model, False, tokens, targets)
    if args.ceiling:
        model = copy.deepcopy(ours)
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            moe.routed = free_routed_experts
        steps["dsv3_ref no routed"] = step_fn(model, False, tokens, targets)
    for impl in hf_experts_implementations():
        model = copy.deepcopy(theirs)
        try:
            model.set_experts_implementation(impl)
            step = step_fn(model, True, tokens, targets)
            step()  # the CUDA-only implementations raise here
        except (ValueError, ImportError, RuntimeError, NotImplementedError) as e:
            unavailable[f"transformers {impl}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
            continue
        steps[f"transformers {impl}"] = step
    return steps, unavailable


def screen(steps: dict, factor: float) -> tuple[dict, dict]:
    """One timed step each; the variants within `factor` of the fastest go on to the race."""
    screened = {}
    for name, step in steps.items():  # one step each (after the availability check's warm-up for transformers)
        step()
        t0 = time.perf_counter()
        step()
        screened[name] = time.perf_counter() - t0
    fastest = min(screened.values())
    return screened, {name: step for name, step in steps.items() if screened[name] <= factor * fastest}


def report(args, steps, unavailable, screened, timed) -> None:
    n_tok = args.batch * args.seq
    med = {name: wall for name, (wall, _) in timed.items()}
    cpu = {name: c for name, (_, c) in timed.items()}
    for name in steps:
        if name in med:
            print(f"{name:>26}: median {med[name] * 1e3:8.1f} ms/step  {n_tok / med[name]:9.0f} tokens/s  "
                  f"(process CPU {cpu[name] * 1e3:8.1f} ms/step)")
        else:
            print(f"{name:>26}: one step {screened[name] * 1e3:8.1f} ms (> {args.screen:g}x the fastest: not raced)")
    for name, why in unavailable.items():
        print(f"{name:>26}: unavailable here ({why})")
    hf = {name: t for name, t in med.items() if name.startswith("transformers")}
    best = min(hf, key=hf.get)
    print(f"fastest transformers experts implementation: {best.split()[1]}")
    pairs = [("dsv3_ref grouped / transformers fastest", best, "dsv3_ref grouped"),
             ("dsv3_ref grouped / dsv3_ref loop", "dsv3_ref loop", "dsv3_ref grouped")]
    if "dsv3_ref no routed" in med:
        pairs.append(("dsv3_ref no routed (upper bound) / transformers fastest", best, "dsv3_ref no routed"))
    for label, a, b in pairs:
        if a not in med or b not in med:
            print(f"ratio {label}: not measured (one side was not raced)")
            continue
        print(f"ratio {label} (tokens/s): {med[a] / med[b]:.2f}  (process CPU time: {cpu[a] / cpu[b]:.2f})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = ModelConfig.from_preset(args.preset)
    ours = Transformer(cfg).train()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp)
        theirs = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    print(f"preset={args.preset} params: dsv3_ref {n_ours:,} transformers {n_theirs:,}; batch={args.batch} "
          f"seq={args.seq} threads={args.threads} attn(transformers)={theirs.config._attn_implementation}")

    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    tokens, targets = data[:, :-1], data[:, 1:]
    steps, unavailable = build_steps(args, ours, theirs, tokens, targets)
    screened, raced = screen(steps, args.screen)
    report(args, steps, unavailable, screened, race(raced, args.warmup, args.reps))

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps["dsv3_ref grouped"]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
