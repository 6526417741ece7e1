"""DeepSeekMoE (report §2.1.2, eqs. 12-16): shared experts plus fine-grained routed experts behind a gate.

The gate follows the official `Gate`: affinities s = sigmoid(u e) (V3) or softmax (V2); the correction bias b
(`e_score_correction_bias`, V3 only) is added ONLY to choose experts; group-limited routing keeps the top
`n_limited_groups` of `n_expert_groups` groups, scoring a group by the sum of its top-2 biased affinities (V3) or
its best affinity (V2, no bias); the weights are the *unbiased* affinities of the chosen experts, renormalised
(sigmoid only, as in the official code) and multiplied by `route_scale`.

`Gate.group_score` chooses how a group is scored. "official" (default) is the inference code's rule above.
"node_limited" is the training form of report §2.1.2 (node-limited routing): the groups are the nodes the experts are
spread over, a token may use at most M = `n_limited_groups` of them, and a node scores the sum of its K_r/M highest
(biased, if there is a bias) affinities. For V3 (K_r/M = 8/4 = 2, with a bias) the two rules are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP

GROUP_SCORES = ("official", "node_limited")


@dataclass
class Routing:
    """The gate's decision for N tokens: weights (N, K), expert indices (N, K), affinities s (N, E), unbiased."""

    weights: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor


class Gate(nn.Module):
    """Router. forward: x (N, dim) -> Routing with weights (N, K) summing to route_scale (sigmoid)."""

    def __init__(self, cfg: ModelConfig, group_score: str = "official"):
        super().__init__()
        self.dim, self.topk = cfg.dim, cfg.n_activated_experts
        self.n_groups, self.topk_groups = cfg.n_expert_groups, cfg.n_limited_groups
        self.score_func, self.route_scale = cfg.score_func, cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # the aux-loss-free balancing bias b_i: a buffer (no gradient, not in the optimizer), kept in fp32
        if cfg.score_func == "sigmoid":
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.bias = None
        self.group_score = group_score

    @property
    def group_score(self) -> str:
        """How a group is scored: "official" (inference code) or "node_limited" (training form, sum of top K_r/M)."""
        return self._group_score

    @group_score.setter
    def group_score(self, value: str) -> None:
        if value not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {value!r}")
        if value == "node_limited" and self.topk % self.topk_groups:
            raise ValueError(f"group_score='node_limited' needs n_activated_experts ({self.topk}) divisible by "
                             f"n_limited_groups ({self.topk_groups}): a node scores its top K_r/M affinities")
        self._group_score = value

    @property
    def group_topk(self) -> int:
        """How many of a group's highest (biased) affinities sum to its score: official 2 with a bias, else 1 (the
        max); node_limited K_r/M."""
        if self.group_score == "node_limited":
            return self.topk // self.topk_groups
        return 1 if self.bias is None else 2

    def _apply(self, fn, recurse=True):
        """Keep the bias in fp32 through `.to(dtype)` / `.half()` (it still follows device moves): in bf16 its
        small balancing updates would round away."""
        bias = self.bias
        super()._apply(fn, recurse)
        if bias is not None and self.bias.dtype != torch.float32:
            self.bias = bias.to(self.bias.device)
        return self

    def forward(self, x: torch.Tensor) -> Routing:
        with torch.autocast(x.device.type, enabled=False):  # the router stays fp32 even under bf16 autocast
            scores = F.linear(x.float(), self.weight.float())  # (N, E) router logits
        scores = scores.sigmoid() if self.score_func == "sigmoid" else scores.softmax(dim=-1)
        original = scores  # s_{i,t}: gives the weights
        if self.bias is not None:
            scores = scores + self.bias  # s_{i,t} + b_i: only chooses experts (eq. 16)
        if self.n_groups > 1:
            grouped = scores.view(x.size(0), self.n_groups, -1)  # (N, G, E/G)
            group_scores = grouped.topk(self.group_topk, dim=-1).values.sum(dim=-1)  # (N, G); top-1 sum = max
            keep = group_scores.topk(self.topk_groups, dim=-1).indices  # (N, topk_groups)
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            scores = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)
        indices = scores.topk(self.topk, dim=-1).indices  # (N, K)
        weights = original.gather(1, indices)  # unbiased affinities of the chosen experts
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)  # eq. 13
        weights = weights * self.route_scale
        return Routing(weights.type_as(x), indices, original)


class Expert(MLP):
    """One routed expert: a SwiGLU MLP of width `moe_inter_dim`."""


class MoE(nn.Module):
    """h' = x + sum shared(x) + sum_i g_i routed_i(x) (eq. 12; the residual is added by the Block).

    forward: x (B, T, dim) -> (B, T, dim). Tokens are dispatched by sorting the (token, expert) pairs by expert, so
    each expert runs once on a contiguous slice; `last_routing` keeps the gate's decision for statistics.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dim, self.n_routed_experts = cfg.dim, cfg.n_routed_experts
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(Expert(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts))
        self.shared_experts = (MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim)
                               if cfg.n_shared_experts > 0 else None)
        self.last_routing: Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)  # (N, dim)
        routing = self.gate(x)
        self.last_routing = routing
        y = self.routed(x, routing)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def routed(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """sum_k w_{t,k} expert_{i_{t,k}}(x_t) for x (N, dim): one call per expert on its sorted slice of tokens."""
        return run_experts(self.experts, x, routing.weights, routing.indices)


def run_experts(experts: nn.ModuleList, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t, k] * experts[indices[t, k]](x_t) for x (N, dim), weights and indices (N, K) -> (N, dim).

    The (token, slot) pairs are sorted by expert so that each expert runs once on a contiguous slice (shared by `MoE`
    and the expert-parallel layer in `dsv3_ref.parallel`, which passes only its local experts).
    """
    K = indices.size(1)
    flat = indices.flatten()  # (N*K,) expert of each (token, slot) pair
    order = flat.argsort(stable=True)  # pairs grouped by expert
    token = order // K  # (N*K,) token of each sorted pair
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    xs = x.index_select(0, token).split(counts)  # one contiguous (n_e, dim) slice per expert (index_select: its
    # backward adds in a fixed order, so training repeats exactly with any number of threads; x[token] does not)
    out = torch.cat([experts[e](xe) for e, xe in enumerate(xs) if xe.numel()])  # (N*K, dim)
    out = out * weights.flatten()[order].unsqueeze(-1)
    return torch.zeros_like(x).index_add_(0, token, out)
