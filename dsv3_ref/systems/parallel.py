"""Expert parallelism: one MoE layer's routed experts split over the ranks of a `torch.distributed` group.

Every rank holds a replica of the gate and of the shared expert, runs them on its own tokens, and owns the contiguous
slice of routed experts [r E/W, (r+1) E/W) (as the official demo splits them). Two all-to-alls move the tokens:

- dispatch: each token goes ONCE to every rank that owns at least one of its K chosen experts, with its K weights
  and the local index of each expert on that rank (-1 for the slots that rank does not own); the row counts are
  exchanged first so every rank knows how much it receives;
- the receiving rank runs each local expert once on its sorted slice (`moe.run_experts`, the code `MoE` uses) and
  adds up the weighted outputs of each received token: one partial sum per (token, rank);
- combine: the partial sums go back to the token's rank (the reverse all-to-all) and are added.

The float all-to-alls carry gradients (`AllToAll`: the backward is the reverse all-to-all), so the layer trains
too. Nothing names a device: gloo on CPU and NCCL on GPU run the same code.

Communication: a rank sends (distinct destination ranks) x dim values per token on dispatch, and receives as many on
combine. When the ranks of one node hold exactly the experts of one group, node-limited routing (at most M groups per
token) bounds the distinct destination NODES per token by M, which is what crosses the slow inter-node links.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig
from ..nn.moe import Gate, MoE, Routing, run_experts


def _world_and_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        raise ValueError("ExpertParallelMoE needs an initialised torch.distributed process group")
    return dist.get_world_size(group), dist.get_rank(group)


def _check_split(n_experts: int, world: int) -> None:
    if n_experts % world:
        raise ValueError(f"n_routed_experts ({n_experts}) must be divisible by the expert-parallel world size "
                         f"({world})")


class ExpertParallelMoE(nn.Module):
    """The `MoE` layer with its routed experts split over `group`; forward: x (B, T, dim) -> (B, T, dim).

    `experts` are this rank's experts, global ids [rank * E/W, (rank + 1) * E/W). Build it with `from_moe` to copy
    a single-process `MoE`. Each rank may pass a different number of tokens (also none).
    """

    def __init__(self, gate: Gate, experts: list[nn.Module], shared_experts: nn.Module | None,
                 group: dist.ProcessGroup | None = None):
        super().__init__()
        self.group = group
        self.world_size, self.rank = _world_and_rank(group)
        self.n_routed_experts = gate.weight.size(0)
        _check_split(self.n_routed_experts, self.world_size)
        self.n_local = self.n_routed_experts // self.world_size
        if len(experts) != self.n_local:
            raise ValueError(f"experts: rank {self.rank} must hold n_routed_experts / world_size = {self.n_local} "
                             f"experts, got {len(experts)}")
        self.dim = gate.dim
        self.gate = gate
        self.experts = nn.ModuleList(experts)
        self.shared_experts = shared_experts
        self.last_routing: Routing | None = None
        self.last_sent_rows = 0  # token rows this rank sent on the last dispatch (all destinations, itself included)

    @classmethod
    def from_moe(cls, moe: MoE, group: dist.ProcessGroup | None = None) -> ExpertParallelMoE:
        """This rank's share of a single-process `MoE` (copies: gate, shared expert and the local experts)."""
        world, rank = _world_and_rank(group)
        _check_split(moe.n_routed_experts, world)
        n_local = moe.n_routed_experts // world
        local = [copy.deepcopy(e) for e in moe.experts[rank * n_local:(rank + 1) * n_local]]
        return cls(copy.deepcopy(moe.gate), local, copy.deepcopy(moe.shared_experts), group)

    forward = MoE.forward  # gate, routed experts, shared expert: the same layer; only `routed` below differs

    def routed(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """sum_k w_{t,k} expert_{i_{t,k}}(x_t) for this rank's x (N, dim), the experts living on all ranks."""
        W, n_local, K = self.world_size, self.n_local, routing.indices.size(1)
        dest = routing.indices // n_local  # (N, K) rank owning each chosen expert
        needs = torch.zeros(x.size(0), W, dtype=torch.bool, device=x.device).scatter_(1, dest, True)  # (N, W)
        row_rank, token = needs.T.nonzero(as_tuple=True)  # (S,) send rows, grouped by destination rank
        mine = dest[token] == row_rank.unsqueeze(1)  # (S, K) slots owned by the row's destination
        local_idx = torch.where(mine, routing.indices[token] - row_rank.unsqueeze(1) * n_local, -1)  # (S, K)
        send_counts = needs.sum(dim=0)  # (W,) rows for each rank
        recv_counts = all_to_all(send_counts, [1] * W, [1] * W, self.group)  # counts first
        send, recv = send_counts.tolist(), recv_counts.tolist()
        self.last_sent_rows = len(token)
        # dispatch: token rows with their K weights (one tensor), then the local expert indices
        payload = torch.cat([x[token], routing.weights[token]], dim=1)  # (S, dim + K)
        received = AllToAll.apply(payload, recv, send, self.group)  # (R, dim + K)
        recv_x, recv_w = received.split([self.dim, K], dim=1)  # (R, dim), (R, K)
        recv_idx = all_to_all(local_idx, recv, send, self.group)  # (R, K) local expert or -1
        # local experts: one weighted partial sum per received row (every row has at least one local slot)
        rows, slots = (recv_idx >= 0).nonzero(as_tuple=True)  # (P,) the (row, slot) pairs this rank computes
        partial = recv_x  # no rows received: still part of the graph, so both ranks run the same backward
        if rows.numel():
            out = run_experts(self.experts, recv_x[rows], recv_w[rows, slots].unsqueeze(1),
                              recv_idx[rows, slots].unsqueeze(1))  # (P, dim)
            partial = torch.zeros_like(recv_x).index_add(0, rows, out)  # (R, dim)
        # combine: the partial sums go back to the tokens' ranks
        back = AllToAll.apply(partial, send, recv, self.group)  # (S, dim)
        return torch.zeros_like(x).index_add(0, token, back)


def all_to_all(t: torch.Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Rows of t, split in_splits over the ranks, go to those ranks; returns the sum(out_splits) rows received
    (out_splits[r] of them from rank r)."""
    out = t.new_empty((sum(out_splits), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), out_splits, in_splits, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """`all_to_all` with a gradient: the backward sends the output gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return all_to_all(t, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def distinct_destinations(indices: torch.Tensor, experts_per_destination: int) -> torch.Tensor:
    """(N,) number of distinct destinations (ranks or nodes) each token's experts live on, for indices (N, K) and
    destinations holding `experts_per_destination` consecutive experts each."""
    dest = (indices // experts_per_destination).sort(dim=-1).values  # (N, K)
    return (dest[:, 1:] != dest[:, :-1]).sum(dim=-1) + 1


def dispatch_bytes_per_token(indices: torch.Tensor, experts_per_destination: int, dim: int,
                             bytes_per_value: float = 2.0) -> float:
    """Mean bytes sent per token on dispatch: distinct destinations x dim x bytes_per_value (one copy per
    destination, the routing metadata not counted). The combine returns as many bytes. With destinations = ranks
    this counts the token's own rank too (a local copy); with destinations = nodes it is the inter-node traffic of
    a dispatch that crosses to each node once (as DeepSeek-V3's does, then forwards over NVLink)."""
    return float(distinct_destinations(indices, experts_per_destination).float().mean()) * dim * bytes_per_value


# ---------------------------------------------------------------------------------------------- demo
DEMO_CASES = {
    # 16 experts in 4 groups, 8 per rank (2 groups per rank), top-4 within 2 groups: a token may need both ranks
    "group-limited, 2 of 4 groups": (ModelConfig.from_preset("small"), "official"),
    # one group per rank ("node"), at most M = 1 node per token: every token is sent to exactly one rank
    "node-limited, 1 of 2 nodes": (ModelConfig.from_preset("small", n_expert_groups=2, n_limited_groups=1),
                                   "node_limited"),
}


def demo(tokens_per_rank: int = 64) -> list[str]:
    """On an initialised 2+ rank group: for each `DEMO_CASES` entry, every rank runs the same seeded `MoE` on its own
    tokens both whole and expert-parallel; returns (on every rank) one line per case and rank: the max difference,
    the token copies sent per token and the dispatch bytes per token (fp32)."""
    world, rank = _world_and_rank(None)
    lines = []
    for name, (cfg, group_score) in DEMO_CASES.items():
        torch.manual_seed(0)  # identical weights on every rank
        moe = MoE(cfg)
        moe.gate.group_score = group_score
        for p in moe.parameters():
            nn.init.normal_(p, std=cfg.dim**-0.5)
        ep = ExpertParallelMoE.from_moe(moe)
        gen = torch.Generator().manual_seed(1 + rank)  # each rank its own tokens
        x = torch.randn(1, tokens_per_rank, cfg.dim, generator=gen)  # (1, T, dim)
        with torch.no_grad():
            diff = float((ep(x) - moe(x)).abs().max())
        copies = ep.last_sent_rows / tokens_per_rank
        mine = (rank, diff, copies, copies * cfg.dim * 4)
        every = [None] * world
        dist.all_gather_object(every, mine)
        lines.append(f"{name}: {cfg.n_routed_experts} experts, {ep.n_local} per rank, top-{cfg.n_activated_experts}")
        lines += [f"  rank {r}: max |EP - single| = {d:.6f}, sends {c:.2f} copies/token = {b:.0f} bytes/token "
                  f"(fp32, dim {cfg.dim})" for r, d, c, b in every]
    return lines


if __name__ == "__main__":  # torchrun --standalone --nproc-per-node 2 -m dsv3_ref.parallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    report = demo()
    if dist.get_rank() == 0:
        print("\n".join(report))
    dist.destroy_process_group()
