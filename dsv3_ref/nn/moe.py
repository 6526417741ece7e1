"""DeepSeekMoE (report §2.1.2, eqs. 12-16): shared experts plus fine-grained routed experts behind a gate.

The gate follows the official `Gate`: affinities s = sigmoid(u e) (V3) or softmax (V2); the correction bias b
(`e_score_correction_bias`, V3 only) is added ONLY to choose experts; group-limited routing keeps the top
`n_limited_groups` of `n_expert_groups` groups, scoring a group by the sum of its top-2 biased affinities (V3) or
its best affinity (V2, no bias); the weights are the *unbiased* affinities of the chosen experts, renormalised
(sigmoid only, as in the official code) and multiplied by `route_scale`.

The routed experts run on their tokens sorted by expert (`run_experts`), in one of two ways (`EXPERT_IMPLS`): "loop"
calls the experts one after another, the reference; "grouped" (the default) runs all of them in two grouped GEMMs
(`grouped_swiglu`), the same SwiGLU with its gate and up projections fused, and falls back to the loop where grouped
GEMMs cannot run (`can_group`: FP8 experts, float64, torch < 2.10).

`Gate.group_score` chooses how a group is scored. "official" (default) is the inference code's rule above.
"node_limited" is the training form of report §2.1.2 (node-limited routing): the groups are the nodes the experts are
spread over, a token may use at most M = `n_limited_groups` of them, and a node scores the sum of its K_r/M highest
(biased, if there is a bias) affinities. For V3 (K_r/M = 8/4 = 2, with a bias) the two rules are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import ModelConfig
from .layers import MLP

GROUP_SCORES = ("official", "node_limited")
EXPERT_IMPLS = ("loop", "grouped")
GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the dtypes F.grouped_mm takes


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
    `expert_impl` ("grouped" or "loop", see `run_experts`) only changes how the experts are run, not what they compute.
    """

    def __init__(self, cfg: ModelConfig, expert_impl: str = "grouped"):
        super().__init__()
        self.dim, self.n_routed_experts = cfg.dim, cfg.n_routed_experts
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(Expert(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts))
        self.shared_experts = (MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim)
                               if cfg.n_shared_experts > 0 else None)
        self.expert_impl = expert_impl
        self.last_routing: Routing | None = None

    @property
    def expert_impl(self) -> str:
        """How the routed experts run: "grouped" (two grouped GEMMs for all of them) or "loop" (one at a time)."""
        return self._expert_impl

    @expert_impl.setter
    def expert_impl(self, value: str) -> None:
        self._expert_impl = check_expert_impl(value)

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
        """sum_k w_{t,k} expert_{i_{t,k}}(x_t) for x (N, dim): each expert on its sorted slice of tokens."""
        return run_experts(self.experts, x, routing.weights, routing.indices, self.expert_impl)


def check_expert_impl(impl: str) -> str:
    """impl if it is one of `EXPERT_IMPLS`, else a ValueError naming the allowed values."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"expert_impl must be one of {EXPERT_IMPLS}, got {impl!r}")
    return impl


def set_expert_impl(model: nn.Module, impl: str) -> None:
    """Set `expert_impl` on every `MoE` layer of `model` (the main layers and the MTP modules' blocks)."""
    check_expert_impl(impl)
    for module in model.modules():
        if isinstance(module, MoE):
            module.expert_impl = impl


def run_experts(experts: nn.ModuleList, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                impl: str = "grouped") -> torch.Tensor:
    """sum_k weights[t, k] * experts[indices[t, k]](x_t) for x (N, dim), weights and indices (N, K) -> (N, dim).

    The (token, slot) pairs are sorted by expert so that each expert runs once on a contiguous slice (shared by `MoE`
    and the expert-parallel layer in `dsv3_ref.parallel`, which passes only its local experts). impl "loop" calls the
    experts one by one; "grouped" computes the same with `grouped_swiglu` where `can_group` allows, else the loop.
    """
    check_expert_impl(impl)
    K = indices.size(1)
    flat = indices.flatten()  # (N*K,) expert of each (token, slot) pair
    order = flat.argsort(stable=True)  # pairs grouped by expert
    token = order // K  # (N*K,) token of each sorted pair
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    xs = x.index_select(0, token)  # (N*K, dim) sorted rows (index_select: its backward adds in a fixed order, so
    # training repeats exactly with any number of threads; x[token] does not)
    w = weights.flatten()[order].unsqueeze(-1)  # (N*K, 1) gate weight of each sorted pair
    if impl == "grouped" and can_group(experts, xs):
        out = grouped_swiglu(experts, xs, counts, w)  # (N*K, dim), weighted
    else:
        out = torch.cat([experts[e](xe) for e, xe in enumerate(xs.split(counts)) if xe.numel()]) * w  # (N*K, dim)
    return torch.zeros_like(x).index_add_(0, token, out)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear` would compute in: the autocast dtype inside an autocast region, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def can_group(experts: nn.ModuleList, xs: torch.Tensor) -> bool:
    """Whether `grouped_swiglu` can run the experts on xs (P, dim): torch has `F.grouped_mm` (2.10+), every expert's
    w1, w2, w3 is a plain `nn.Linear` (FP8 experts, `fp8.FP8Linear`, run in the loop), the compute dtype is one
    grouped GEMMs take, and dim and moe_inter_dim are whole multiples of 16 bytes (the kernels' stride rule)."""
    if not hasattr(F, "grouped_mm"):
        return False
    dtype = _compute_dtype(xs)
    plain = all(type(getattr(e, w)) is nn.Linear for e in experts for w in ("w1", "w2", "w3"))
    return dtype in GROUPED_DTYPES and plain and all(n * dtype.itemsize % 16 == 0 for n in experts[0].w1.weight.shape)


def grouped_swiglu(experts: nn.ModuleList, xs: torch.Tensor, counts: list[int], weights: torch.Tensor) -> torch.Tensor:
    """weights[p] * experts[e](xs[p]) for the rows p of expert e, xs (P, dim) sorted by expert, counts[e] rows each,
    weights (P, 1) -> (P, dim), in two grouped GEMMs: [w1; w3] x (gate and up fused) and w2 h, each group one expert's
    GEMM on its slice of rows. In float32 the weights scale h (P, moe_inter_dim), the narrower side: w2 (h * w) =
    (w2 h) * w (the small preset's CPU training step about 5% faster than scaling the (P, dim) output; equal to
    rounding); in bfloat16 / float16 they scale the output, as the loop does (scaling h there would round once more).

    The experts' weights are stacked per call (the state dict keeps experts.{e}.w1/w2/w3); idle experts are left out,
    so that, as in the loop, their weights get no gradient. Inside an autocast region it computes in the autocast
    dtype, as `nn.Linear` would.
    """
    active = [e for e, n in enumerate(counts) if n]
    ends = torch.tensor(list(accumulate(counts[e] for e in active)), dtype=torch.int32, device=xs.device)  # (E',)
    dtype = _compute_dtype(xs)
    w1, w2, w3 = (torch.stack([getattr(experts[e], w).weight for e in active]) for w in ("w1", "w2", "w3"))
    w13 = torch.cat([w1, w3], dim=1)  # (E', 2 inter, dim): gate and up projections, one GEMM per expert
    gate, up = F.grouped_mm(xs.to(dtype), rearrange(w13.to(dtype), "e out dim -> e dim out"),
                            offs=ends).chunk(2, dim=-1)  # (P, inter) each
    h = F.silu(gate) * up  # (P, inter)
    w2 = rearrange(w2.to(dtype), "e dim inter -> e inter dim")
    if dtype == torch.float32:
        return F.grouped_mm(h * weights, w2, offs=ends)  # (P, dim)
    return F.grouped_mm(h, w2, offs=ends) * weights
