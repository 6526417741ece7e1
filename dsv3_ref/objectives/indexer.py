"""The lightning indexer's training objective (DeepSeek-V3.2-Exp report §2.1, eqs. 3-4) and its recall metric.

Target. For query t, the main attention's probabilities are summed over all heads and L1-normalised along the
sequence: p(t, :). The indexer is trained to match it with a KL divergence,

    L^I = sum_t D_KL( p(t, :) || Softmax(I(t, :)) )                 dense warm-up (eq. 3)
    L^I = sum_t D_KL( p(t, S_t) || Softmax(I(t, S_t)) )             sparse training, S_t the selected set (eq. 4)

Both the target and the indexer's input are detached from the main model's graph (the MLA layer records them so,
`IndexerRecord`), so L^I trains the indexer only and the language-modelling loss trains the main model only.

Reduction: the report sums over t; we take the mean over the query tokens (and the batch), so the loss does not
grow with the batch and the sequence length; that changes only the effective learning rate. `indexer_loss` sums the
layers' losses (each layer's indexer has its own weights, so each one sees exactly its own KL's gradient).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.attention import MLA
from ..nn.indexer import IndexerRecord


def indexer_kl_loss(record: IndexerRecord) -> torch.Tensor:
    """Eq. 3 (record.selected is None) or eq. 4: the mean over the B * S queries of D_KL(p || softmax(I)) over the
    positions the query sees (and, in the sparse stage, that were selected). Returns a scalar (float32)."""
    support = torch.isfinite(record.scores)  # (B, S, T): causally visible
    if record.selected is not None:
        support = support & record.selected
    p = record.attn.float() * support
    p = p / p.sum(-1, keepdim=True)  # L1-normalised: the heads' probabilities summed, then divided by their total
    log_q = record.scores.float().masked_fill(~support, float("-inf")).log_softmax(-1)  # (B, S, T)
    kl = torch.xlogy(p, p) - p * log_q.masked_fill(~support, 0.0)  # 0 log 0 = 0 outside the support
    return kl.sum(-1).mean()


def indexer_records(model: nn.Module) -> list[IndexerRecord]:
    """The `IndexerRecord` of every MLA layer with an indexer (main blocks and MTP blocks) from the last forward."""
    return [m.last_index for m in model.modules() if isinstance(m, MLA) and m.last_index is not None]


def indexer_loss(model: nn.Module) -> torch.Tensor:
    """L^I of the last forward, summed over the layers (ValueError if the model has no indexer or did not run)."""
    records = indexer_records(model)
    if not records:
        raise ValueError("indexer_loss: no MLA layer holds an indexer record; build the model with index_n_heads > 0 "
                         "and run a forward pass first")
    return torch.stack([indexer_kl_loss(r) for r in records]).sum()


@torch.no_grad()
def selection_recall(record: IndexerRecord, k: int) -> dict[str, float]:
    """How well the indexer's top-k matches the main attention's, over the queries that see more than k positions
    (the others keep everything).

    recall: the mean fraction of the attention's k highest positions (summed over heads) that the indexer's top k also
        holds; chance: the same for a uniformly random choice of k of the n visible positions (k / n);
    mass: the mean share of the attention probability that falls on the indexer's top k.
    Meaningful for dense attention (the warm-up, or `MLA.sparse = False`): in the sparse stage the attention is
    already restricted to the selection."""
    visible = torch.isfinite(record.scores)  # (B, S, T)
    n = visible.sum(-1)  # (B, S)
    rows = n > k
    if not rows.any():
        raise ValueError(f"selection_recall: no query sees more than k={k} positions")
    attn = record.attn.float().masked_fill(~visible, -1.0)  # never prefer an invisible position
    top_attn = attn.topk(k, dim=-1).indices  # (B, S, k)
    top_index = record.scores.topk(k, dim=-1).indices
    hit = (torch.zeros_like(visible).scatter_(-1, top_attn, True)
           & torch.zeros_like(visible).scatter_(-1, top_index, True))  # (B, S, T): in both top-k sets
    recall = hit.sum(-1)[rows].float() / k
    p = record.attn.float() / record.attn.float().sum(-1, keepdim=True)
    mass = p.gather(-1, top_index).sum(-1)[rows]
    return {"recall": recall.mean().item(), "chance": (k / n[rows].float()).mean().item(), "mass": mass.mean().item()}
