"""Expert load balancing (report §2.1.2): loads and MaxVio, the auxiliary-loss-free bias, and the balance losses.

- Loads and MaxVio (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", eq. 4):
  load_i = number of tokens routed to expert i; MaxVio = (max_i load_i - mean load) / mean load, per MoE layer,
  over one training batch (MaxVio_batch) or over a whole validation set (MaxVio_global).
- Auxiliary-loss-free balancing (report eq. 16): each gate's bias b_i (the `gate.bias` buffer, the checkpoint's
  `e_score_correction_bias`) only chooses experts. After each optimizer step, from the loads c_i of the whole batch
  (every micro-batch), e_i = mean(c) - c_i and b_i += gamma * sign(e_i): an overloaded expert (c_i > mean) loses
  gamma, an underloaded one gains gamma. The "proportional" variant (Wang et al. §4.3) uses b_i += gamma * e_i /
  mean(c): normalised by the mean load so that gamma does not depend on the batch size (Wang et al. use the raw
  e_i). The bias is a buffer updated under no_grad: no gradient, never in the optimizer.
- Balance losses (f_i P_i with s'_{i,t} = s_{i,t} / sum_j s_{j,t}, the affinities normalised over all experts, which
  for a softmax gate are its probabilities): the complementary sequence-wise loss of DeepSeek-V3 (eqs. 17-20, alpha
  = 1e-4), f and P taken per sequence and the losses averaged over the sequences, and the classic expert-level
  auxiliary loss (DeepSeek-V2 / Switch), the same formula over the whole batch as one sequence.

`FreshRoutings` reads each MoE layer's `last_routing` once; the trainer hooks in `dsv3_ref.train.hooks` (LoadMonitor,
LossFreeBalancing, SequenceBalanceLoss, ExpertAuxLoss) apply these functions after every micro-batch and step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..nn.moe import MoE, Routing

PAPER_GAMMA = 1e-3  # bias update speed for the first 14.3T tokens (report §4.2)
PAPER_FREEZE_FRACTION = 0.5 / 14.8  # gamma = 0 for the last 500B of the 14.8T training tokens
PAPER_SEQ_ALPHA = 1e-4  # sequence-wise balance loss factor (report §4.2)
UPDATE_RULES = ("sign", "proportional")


# ---------------------------------------------------------------------------------------------- loads and MaxVio
def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """Every MoE layer of the model by module name (main blocks, then MTP blocks)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def expert_load(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) int64 number of tokens routed to each expert, for expert indices (N, K)."""
    return torch.bincount(indices.flatten(), minlength=n_experts)


def max_vio(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i load_i - mean load) / mean load over the last dim of load (..., E) -> (...)."""
    load = load.float()
    mean = load.mean(dim=-1)
    return (load.amax(dim=-1) - mean) / mean


class FreshRoutings:
    """Yields each MoE layer's `last_routing` once: a layer whose routing was already read (it did not run since,
    e.g. an MTP block outside the forward) is skipped."""

    def __init__(self) -> None:
        self._seen: dict[str, Routing] = {}

    def __call__(self, model: nn.Module) -> Iterable[tuple[str, MoE, Routing]]:
        for name, moe in moe_layers(model).items():
            routing = moe.last_routing
            if routing is not None and self._seen.get(name) is not routing:
                self._seen[name] = routing
                yield name, moe, routing


@torch.no_grad()
def collect_loads(model: nn.Module, batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Expert loads (E,) per MoE layer summed over `batches` (token tensors (B, T) or `data.Batch`es, e.g.
    `data.val_batches(...)`), from a forward pass of each. MaxVio_global per layer is
    `max_vio(torch.stack(list(loads.values())))`."""
    fresh, loads = FreshRoutings(), {}
    list(fresh(model))  # routings left over from before do not count
    for batch in batches:
        model(getattr(batch, "inputs", batch))
        for name, moe, routing in fresh(model):
            loads[name] = loads.get(name, 0) + expert_load(routing.indices, moe.n_routed_experts)
    return loads


@torch.no_grad()
def loads_by_label(model: nn.Module, batches: Iterable[Any], n_labels: int) -> dict[str, torch.Tensor]:
    """Expert loads split by a label of every token: (n_labels, E) int64 per MoE layer, summed over `batches`.

    Each batch is a `data.Batch` (its `domains` (B, T) label every input token, e.g. `data.val_batches(...)`) or a
    pair (tokens (B, T), labels (B, T)) with labels in [0, n_labels). Row l counts how often tokens labelled l chose
    each expert (K choices per token); the rows sum to `collect_loads` over the same batches.
    """
    fresh, loads = FreshRoutings(), {}
    list(fresh(model))  # routings left over from before do not count
    for batch in batches:
        tokens, labels = (batch.inputs, batch.domains) if hasattr(batch, "inputs") else batch
        if labels.shape != tokens.shape:
            raise ValueError(f"labels must have the tokens' shape {tuple(tokens.shape)}, got {tuple(labels.shape)}")
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < n_labels:
            raise ValueError(f"labels must be in [0, n_labels={n_labels}), got [{int(labels.min())}, "
                             f"{int(labels.max())}]")
        model(tokens)
        for name, moe, routing in fresh(model):
            E = moe.n_routed_experts
            # routing rows follow tokens.flatten() (the MoE flattens (B, T)); pair every choice with its token's label
            cell = labels.reshape(-1, 1).to(routing.indices.device) * E + routing.indices  # (N, K) in [0, L * E)
            counts = torch.bincount(cell.flatten(), minlength=n_labels * E).view(n_labels, E)
            loads[name] = loads.get(name, 0) + counts
    return loads


# ---------------------------------------------------------------------------------------------- loss-free bias
@torch.no_grad()
def update_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float, rule: str = "sign") -> None:
    """In place: b_i += gamma * sign(mean - load_i) ("sign") or gamma * (mean - load_i) / mean ("proportional")."""
    if rule not in UPDATE_RULES:
        raise ValueError(f"rule must be one of {UPDATE_RULES}, got {rule!r}")
    load = load.to(device=bias.device, dtype=torch.float32)
    mean = load.mean()
    if mean == 0:  # no tokens: nothing to learn from
        return
    error = mean - load  # e_i > 0: underloaded expert
    bias.add_(gamma * (error.sign() if rule == "sign" else error / mean))


def freeze_schedule(total_tokens: int, freeze_fraction: float = PAPER_FREEZE_FRACTION) -> Callable[[int], float]:
    """The paper's gamma schedule as a factor of gamma by tokens seen (counted at the end of the step being updated):
    1 for the first (1 - freeze_fraction) * total_tokens, 0 for the last `freeze_fraction` (DeepSeek-V3: gamma =
    0.001 for the first 14.3T tokens, 0 for the last 500B of 14.8T)."""
    if not 0 <= freeze_fraction <= 1:
        raise ValueError(f"freeze_fraction must be in [0, 1], got {freeze_fraction!r}")
    limit = total_tokens * (1 - freeze_fraction)
    return lambda tokens_seen: 1.0 if tokens_seen <= limit else 0.0


# ---------------------------------------------------------------------------------------------- balance losses
def sequence_balance_loss(routing: Routing, batch_size: int, alpha: float = PAPER_SEQ_ALPHA) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (report eqs. 17-20) for one MoE layer.

    The routing covers batch_size sequences of T tokens each (N = batch_size * T rows, sequence-major as the MoE
    flattens (B, T)). Per sequence: f_i = N_r / (K_r T) * sum_t 1[i chosen for t], P_i = (1/T) sum_t s'_{i,t},
    L = alpha * sum_i f_i P_i; returns the mean over the sequences. Differentiable w.r.t. the gate through P.
    """
    N, E = routing.scores.shape
    K = routing.indices.size(1)
    if batch_size < 1 or N % batch_size:
        raise ValueError(f"batch_size must be a positive divisor of the {N} routed tokens, got {batch_size}")
    T = N // batch_size
    s = routing.scores.view(batch_size, T, E)
    p = (s / s.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E) P_i: mean normalised affinity
    chosen = torch.zeros(batch_size, E, device=s.device).scatter_add_(
        1, routing.indices.view(batch_size, T * K), torch.ones(batch_size, T * K, device=s.device))  # (B, E)
    f = chosen * E / (K * T)  # f_i = 1 for every expert under perfect balance
    return alpha * (f * p).sum(dim=-1).mean()


def expert_aux_loss(routing: Routing, alpha: float = 1e-3) -> torch.Tensor:
    """The classic expert-level auxiliary loss (DeepSeek-V2 / Switch): alpha * sum_i f_i P_i over the whole batch,
    i.e. `sequence_balance_loss` with every token in one sequence (alpha 1e-3: Wang et al.'s baseline)."""
    return sequence_balance_loss(routing, 1, alpha)
