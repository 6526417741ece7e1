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

The hooks plug into `dsv3_ref.train.Trainer`; they read each MoE layer's `last_routing` after every micro-batch
(each routing once). A hook that runs more MoE layers inside `loss_terms` (an MTP block) must come before them in the
trainer's hook list, so that its routings are read in the same micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..nn.moe import MoE, Routing
from ..train.trainer import TrainHook

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


class _FreshRoutings:
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
    fresh, loads = _FreshRoutings(), {}
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
    fresh, loads = _FreshRoutings(), {}
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


# ---------------------------------------------------------------------------------------------- trainer hooks
class LoadMonitor(TrainHook):
    """Counts every MoE layer's expert loads over each optimizer step (all its micro-batches) and reports the
    step's MaxVio_batch (mean over layers). Changes nothing; `last_loads` holds the last step's loads per layer."""

    def __init__(self) -> None:
        self.loads: dict[str, torch.Tensor] = {}  # the step being accumulated
        self.last_loads: dict[str, torch.Tensor] = {}  # the last finished step
        self._fresh = _FreshRoutings()

    def loss_terms(self, trainer, tokens, targets, hidden, logits) -> dict[str, torch.Tensor]:
        for name, moe, routing in self._fresh(trainer.model):
            self.loads[name] = self.loads.get(name, 0) + expert_load(routing.indices, moe.n_routed_experts)
        return {}

    def after_step(self, trainer, step: int) -> None:
        self.last_loads, self.loads = self.loads, {}

    def metrics(self, trainer) -> dict[str, float]:
        if not self.last_loads:
            return {}
        return {"maxvio_batch": float(max_vio(torch.stack(list(self.last_loads.values()))).mean())}


class LossFreeBalancing(LoadMonitor):
    """Auxiliary-loss-free balancing: after each optimizer step, `update_bias` on every MoE gate from that step's
    loads (all its micro-batches), with gamma * schedule(tokens seen), tokens seen = steps done *
    trainer.tokens_per_step (schedule None: constant gamma; see `freeze_schedule`)."""

    def __init__(self, gamma: float = PAPER_GAMMA, schedule: Callable[[int], float] | None = None,
                 rule: str = "sign"):
        super().__init__()
        if rule not in UPDATE_RULES:
            raise ValueError(f"rule must be one of {UPDATE_RULES}, got {rule!r}")
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        self.gamma, self.schedule, self.rule = gamma, schedule, rule
        self.n_updates = 0

    def current_gamma(self, tokens_seen: int) -> float:
        return self.gamma * (1.0 if self.schedule is None else self.schedule(tokens_seen))

    def on_train_start(self, trainer) -> None:
        no_bias = [name for name, moe in moe_layers(trainer.model).items() if moe.gate.bias is None]
        if no_bias:
            raise ValueError(f"LossFreeBalancing needs gates with a bias (score_func='sigmoid'); {no_bias} have none")

    def after_step(self, trainer, step: int) -> None:
        gamma, layers = self.current_gamma(step * trainer.tokens_per_step), moe_layers(trainer.model)
        for name, load in self.loads.items():
            update_bias(layers[name].gate.bias, load, gamma, self.rule)
        self.n_updates += 1
        super().after_step(trainer, step)

    def metrics(self, trainer) -> dict[str, float]:
        gamma = self.current_gamma(trainer.step * trainer.tokens_per_step)
        return {**super().metrics(trainer), "balance_gamma": gamma}


class SequenceBalanceLoss(TrainHook):
    """Adds `seq_balance_loss` = sum over MoE layers of `sequence_balance_loss` to each micro-batch's loss."""

    def __init__(self, alpha: float = PAPER_SEQ_ALPHA):
        self.alpha = alpha
        self._fresh = _FreshRoutings()

    def loss_terms(self, trainer, tokens, targets, hidden, logits) -> dict[str, torch.Tensor]:
        losses = [sequence_balance_loss(r, tokens.size(0), self.alpha) for _, _, r in self._fresh(trainer.model)]
        return {"seq_balance_loss": torch.stack(losses).sum()} if losses else {}


class ExpertAuxLoss(TrainHook):
    """Adds `aux_loss` = sum over MoE layers of `expert_aux_loss` to each micro-batch's loss (the baseline)."""

    def __init__(self, alpha: float = 1e-3):
        self.alpha = alpha
        self._fresh = _FreshRoutings()

    def loss_terms(self, trainer, tokens, targets, hidden, logits) -> dict[str, torch.Tensor]:
        losses = [expert_aux_loss(r, self.alpha) for _, _, r in self._fresh(trainer.model)]
        return {"aux_loss": torch.stack(losses).sum()} if losses else {}
