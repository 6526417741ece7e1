"""Trainer hooks over the objectives: expert-load monitoring and the auxiliary-loss-free bias update
(report §2.1.2), the sequence-wise and expert-level balance losses, and the MTP loss (report §2.2). The math lives in
`dsv3_ref.objectives`; these classes only schedule it inside `Trainer`.

The balancing hooks read each MoE layer's `last_routing` after every micro-batch (each routing once). A hook that
runs more MoE layers inside `loss_terms` (MTPLoss: the MTP blocks) must come before them in the trainer's hook list,
so that its routings are read in the same micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..objectives.balance import (
    PAPER_GAMMA,
    PAPER_SEQ_ALPHA,
    UPDATE_RULES,
    FreshRoutings,
    expert_aux_loss,
    expert_load,
    max_vio,
    moe_layers,
    sequence_balance_loss,
    update_bias,
)
from ..objectives.mtp import mtp_loss, paper_lambda
from .trainer import TrainHook


class LoadMonitor(TrainHook):
    """Counts every MoE layer's expert loads over each optimizer step (all its micro-batches) and reports the
    step's MaxVio_batch (mean over layers). Changes nothing; `last_loads` holds the last step's loads per layer."""

    def __init__(self) -> None:
        self.loads: dict[str, torch.Tensor] = {}  # the step being accumulated
        self.last_loads: dict[str, torch.Tensor] = {}  # the last finished step
        self._fresh = FreshRoutings()

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
        self._fresh = FreshRoutings()

    def loss_terms(self, trainer, tokens, targets, hidden, logits) -> dict[str, torch.Tensor]:
        losses = [sequence_balance_loss(r, tokens.size(0), self.alpha) for _, _, r in self._fresh(trainer.model)]
        return {"seq_balance_loss": torch.stack(losses).sum()} if losses else {}


class ExpertAuxLoss(TrainHook):
    """Adds `aux_loss` = sum over MoE layers of `expert_aux_loss` to each micro-batch's loss (the baseline)."""

    def __init__(self, alpha: float = 1e-3):
        self.alpha = alpha
        self._fresh = FreshRoutings()

    def loss_terms(self, trainer, tokens, targets, hidden, logits) -> dict[str, torch.Tensor]:
        losses = [expert_aux_loss(r, self.alpha) for _, _, r in self._fresh(trainer.model)]
        return {"aux_loss": torch.stack(losses).sum()} if losses else {}


class MTPLoss(TrainHook):
    """Adds the MTP objective to the trainer's loss: {"mtp": (lambda / D) * sum_k CE^k} (eq. 25), so the trainer
    minimises L_main + L_MTP as in the report.

    lambda: a constant `lam`, or `schedule(fraction)` with fraction = optimiser steps done / total steps in [0, 1]
    (at step s of a run of N steps, s / N); with neither, the paper's `paper_lambda` (0.3, then 0.1 from 67.6% of
    training on). Metrics (means since the previous log): mtp_lambda, and per depth k mtp_ce_{k} (the unweighted
    cross-entropy) and mtp_acc_{k} (top-1 accuracy of the training predictions).
    """

    def __init__(self, lam: float | None = None, schedule: Callable[[float], float] | None = None):
        if lam is not None and schedule is not None:
            raise ValueError("MTPLoss: give lam (a constant) or schedule (fraction of training -> lambda), not both")
        if lam is not None and not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and lam >= 0):
            raise ValueError(f"MTPLoss: lam must be a number >= 0, got {lam!r}")
        if schedule is not None and not callable(schedule):
            raise ValueError(f"MTPLoss: schedule must be a callable fraction -> lambda, got {schedule!r}")
        self.lam, self.schedule = lam, schedule
        self._sums: dict[str, float] = {}
        self._n = 0

    def current_lambda(self, fraction: float) -> float:
        """lambda at `fraction` of training done."""
        if self.lam is not None:
            return float(self.lam)
        return float((self.schedule or paper_lambda)(fraction))

    def on_train_start(self, trainer) -> None:
        if len(trainer.model.mtp) == 0:
            raise ValueError("MTPLoss needs a model with MTP modules (config n_mtp_layers >= 1)")

    def loss_terms(self, trainer, tokens, targets, hidden, logits) -> dict[str, torch.Tensor]:
        lam = self.current_lambda(trainer.step / trainer.cfg.steps)
        loss, ces, accs = mtp_loss(trainer.model, tokens, targets, hidden, lam)
        row = {"mtp_lambda": lam}
        for k, (ce, acc) in enumerate(zip(ces, accs, strict=True), start=1):
            row[f"mtp_ce_{k}"], row[f"mtp_acc_{k}"] = ce.item(), acc.item()
        for name, value in row.items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._n += 1
        return {"mtp": loss}

    def metrics(self, trainer) -> dict[str, float]:
        out = {name: total / self._n for name, total in self._sums.items()} if self._n else {}
        self._sums, self._n = {}, 0
        return out
