"""Worker launched by tests/test_parallel.py with `torchrun --nproc-per-node 2` (gloo, CPU).

Every rank builds the same single-process `MoE` (same seed), feeds it its own tokens (a different number per rank),
and compares it with the expert-parallel layer built from it: outputs, input gradients, gate / shared-expert
gradients (per rank) and routed-expert gradients (summed over ranks, as the reference's experts see every rank's
tokens). Writes `rank{r}.json` into the folder given as argv[1].
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from dsv3_ref.config import ModelConfig
from dsv3_ref.nn.moe import MoE
from dsv3_ref.systems.parallel import ExpertParallelMoE, distinct_destinations

CASES = {
    # name: (config, group score, tokens per rank (sequence length, batch 2), bias on rank 0's experts)
    # tiny preset: 8 experts, 4 groups, top-2 groups, top-2 experts, sigmoid + bias, one shared expert
    "tiny_official": (ModelConfig(), "official", (5, 9), 0.0),
    # 16 experts in 4 groups, K = 4, at most M = 2 groups ("nodes") per token, node score = top-2 sum
    "node_limited": (ModelConfig(n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2),
                     "node_limited", (5, 9), 0.0),
    # DeepSeek-V2 style: softmax scores, no bias, no shared expert, no groups
    "softmax": (ModelConfig(score_func="softmax", n_expert_groups=1, n_limited_groups=1, n_shared_experts=0,
                            route_scale=1.0), "official", (5, 9), 0.0),
    # a large bias sends every token to rank 0's experts: rank 1 receives nothing (and still joins the backward)
    "one_sided": (ModelConfig(), "official", (6, 3), 10.0),
}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    return p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)


@torch.no_grad()
def init_weights(moe: MoE, rank0_bias: float) -> None:
    for p in moe.parameters():
        p.normal_(0.0, 0.1)
    if moe.gate.bias is not None:
        moe.gate.bias.normal_(0.0, 0.05)  # a live correction bias: it must change the selection only
        moe.gate.bias[: moe.n_routed_experts // dist.get_world_size()] += rank0_bias


def run_case(cfg: ModelConfig, group_score: str, lengths: tuple[int, int], rank0_bias: float, rank: int) -> dict:
    torch.manual_seed(0)  # identical weights on every rank
    moe = MoE(cfg)
    moe.gate.group_score = group_score
    init_weights(moe, rank0_bias)
    ep = ExpertParallelMoE.from_moe(moe)

    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens, and a different count
    x = torch.randn(2, lengths[rank], cfg.dim, generator=gen)
    probe = torch.randn(x.shape, generator=gen)
    x_ep = x.clone().requires_grad_()
    y_ep = ep(x_ep)
    (y_ep * probe).sum().backward()
    x_ref = x.clone().requires_grad_()
    y_ref = moe(x_ref)
    (y_ref * probe).sum().backward()

    # the single-process experts see only this rank's tokens: sum their gradients over the ranks
    ref_expert_grads = [grad_or_zeros(p) for e in moe.experts for p in e.parameters()]
    for g in ref_expert_grads:
        dist.all_reduce(g)
    n_per_expert = len(list(moe.experts[0].parameters()))
    local_ref = ref_expert_grads[rank * ep.n_local * n_per_expert:(rank + 1) * ep.n_local * n_per_expert]
    ep_expert_grads = [grad_or_zeros(p) for e in ep.experts for p in e.parameters()]
    expert_diff = max(max_diff(a, b) for a, b in zip(ep_expert_grads, local_ref, strict=True))
    shared_diff = 0.0
    if moe.shared_experts is not None:
        shared_diff = max(max_diff(grad_or_zeros(a), grad_or_zeros(b)) for a, b in
                          zip(ep.shared_experts.parameters(), moe.shared_experts.parameters(), strict=True))
    indices = ep.last_routing.indices
    return {
        "tokens": x.shape[0] * x.shape[1],
        "n_local": ep.n_local,
        "out_diff": max_diff(y_ep.detach(), y_ref.detach()),
        "out_scale": float(y_ref.detach().abs().max()),
        "x_grad_diff": max_diff(x_ep.grad, x_ref.grad),
        "gate_grad_diff": max_diff(grad_or_zeros(ep.gate.weight), grad_or_zeros(moe.gate.weight)),
        "expert_grad_diff": expert_diff,
        "expert_grad_scale": max(float(g.abs().max()) for g in ep_expert_grads),
        "shared_grad_diff": shared_diff,
        "same_indices": bool(torch.equal(indices, moe.last_routing.indices)),
        "sent_rows": ep.last_sent_rows,
        "distinct_ranks": int(distinct_destinations(indices, ep.n_local).sum()),
        "max_rank_used": int(indices.max()) // ep.n_local,
    }


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"world": world, "cases": {}}
    for name, case in CASES.items():
        result["cases"][name] = run_case(*case, rank)
    odd = MoE(ModelConfig(n_routed_experts=3, n_expert_groups=1, n_limited_groups=1))
    try:
        ExpertParallelMoE.from_moe(odd)
        result["odd_split_error"] = None
    except ValueError as e:
        result["odd_split_error"] = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
