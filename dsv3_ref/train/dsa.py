"""DeepSeek-V3.2-Exp's continued pre-training (report §2.1) as two trainer hooks.

1. `IndexerWarmup`, the dense warm-up: attention stays dense (`MLA.sparse = False`), every parameter except the
   lightning indexers' is frozen, and the only trained objective is the indexer's KL to the main attention (eq. 3).
   The report: 1,000 steps at learning rate 1e-3 (2.1B tokens).
2. `SparseTraining`, the sparse stage: top-k selection on (`MLA.sparse = True`), every parameter trained; the
   language-modelling loss trains the main model and the KL over the selected tokens (eq. 4) trains the indexers. The
   two never mix: the indexer's input and its target are detached (`dsv3_ref.objectives.indexer`). The report: 15,000
   steps at 7.3e-6 with 2,048 tokens kept per query (943.7B tokens).

Run them with two `Trainer`s, one after the other, on the same model (each with its own learning rate). The warm-up
freezes the main model when it starts and unfreezes it after its last step; build the sparse stage's `Trainer` after
that (its optimiser takes the parameters that are trainable when it is built, and `SparseTraining` checks it).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.attention import MLA
from ..objectives.indexer import indexer_loss, indexer_records, selection_recall
from .trainer import Trainer, TrainHook


def set_sparse(model: nn.Module, sparse: bool) -> int:
    """Switch every MLA layer with an indexer to top-k attention (True) or dense attention (False); returns how many
    layers were switched (ValueError if none: the model has no indexer)."""
    layers = [m for m in model.modules() if isinstance(m, MLA) and m.indexer is not None]
    if not layers:
        raise ValueError("set_sparse: the model has no lightning indexer (build it with index_n_heads > 0)")
    for m in layers:
        m.sparse = sparse
    return len(layers)


class IndexerWarmup(TrainHook):
    """The dense warm-up stage. Loss term "indexer_kl" (eq. 3, summed over layers); metrics "indexer_recall",
    "indexer_chance" and "indexer_mass" (`selection_recall` at k = index_topk, averaged over the layers) on the last
    batch the model ran: the last validation batch at evaluation steps."""

    def on_train_start(self, trainer: Trainer) -> None:
        set_sparse(trainer.model, False)
        for name, p in trainer.model.named_parameters():  # frozen: no gradient, so AdamW leaves them alone
            p.requires_grad_(".indexer." in name)

    def loss_terms(self, trainer: Trainer, tokens: torch.Tensor, targets: torch.Tensor, hidden: torch.Tensor,
                   logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"indexer_kl": indexer_loss(trainer.model)}

    def after_step(self, trainer: Trainer, step: int) -> None:
        if step == trainer.cfg.steps:  # the warm-up is over: every parameter trainable again
            for p in trainer.model.parameters():
                p.requires_grad_(True)

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        k = trainer.model.config.index_topk
        stats = [selection_recall(r, k) for r in indexer_records(trainer.model)]
        return {f"indexer_{key}": sum(s[key] for s in stats) / len(stats) for key in ("recall", "chance", "mass")}


class SparseTraining(TrainHook):
    """The sparse training stage: top-k attention, every parameter trainable, loss term "indexer_kl" (eq. 4)."""

    def on_train_start(self, trainer: Trainer) -> None:
        set_sparse(trainer.model, True)
        in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in trainer.model.named_parameters() if id(p) not in in_optimizer]
        if missing:
            raise ValueError(f"SparseTraining: the optimizer does not hold {len(missing)} parameter(s) (e.g. "
                             f"{missing[0]}): they were frozen when the Trainer was built; finish the warm-up (or "
                             "set requires_grad) before building the sparse stage's Trainer")

    def loss_terms(self, trainer: Trainer, tokens: torch.Tensor, targets: torch.Tensor, hidden: torch.Tensor,
                   logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"indexer_kl": indexer_loss(trainer.model)}
