"""Multi-token prediction (report §2.2, eqs. 21-25): the sequential forward pass of the MTP modules
(`dsv3_ref.nn.model.MTPModule`, as the released checkpoint stores them) over a training sequence, the training
objective and its lambda schedule.

Module k (k = 1..D) combines the previous depth's hidden state h^{k-1}_i with the embedding of token t_{i+k}:
    h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]                                       (eq. 21)
then runs one Transformer block (eq. 22) and a final RMSNorm; the shared output head turns h^k_i into
P^k_{i+k+1}, the distribution of token t_{i+k+1} (eq. 23). The report's eq. 21 writes the concatenation as
[h; Emb]; the checkpoint's `eh_proj` (as every serving stack reads it) takes the embedding first, and we follow the
checkpoint. Embedding and head are the main model's (shared).

Choices the report leaves open, settled as the serving stacks run the released weights:

* h^0 is the main model's hidden state **after** its final RMSNorm (`Transformer.hidden_states`), the input
  transformers' `MtpLayer` feeds the hub's layer 61. `hnorm` then normalises it again, which is cheap to learn
  around: the result is norm's output divided by one scalar per token and multiplied by hnorm's gain. (The report
  says only "the representation given by the main model"; the pre-norm residual would be the other reading.)
* Depth k has T - k slots (eq. 22: h^k_{1:T-k}); slot i of depth k reads slot i of depth k - 1, so the chain is
  causal at every depth: slot i of depth k sees tokens t_0 .. t_{i+k} and nothing later.
* RoPE: slot i of depth k sits at position i + k, the position of the token it embeds (transformers puts depth-1
  slot i at i + 1). Attention scores depend only on position differences, so any common offset gives the same
  result; this one also keeps the rotations those of real token positions.

`mtp_hidden_states` / `mtp_logits` run all depths over a sequence; `mtp_loss` is eq. 25 (with the per-depth
cross-entropies and accuracies); `paper_lambda` is the paper's lambda schedule (0.3 for the first 10T of 14.8T
tokens, then 0.1). `dsv3_ref.train.hooks.MTPLoss` plugs the objective into the trainer; speculative decoding with
the MTP module as drafter lives in `dsv3_ref.inference.speculative`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..data import PAD_ID
from ..nn.attention import causal_mask
from .lm import cross_entropy

# report §4.2: lambda = 0.3 for the first 10T training tokens, 0.1 for the remaining 4.8T (of 14.8T)
PAPER_LAMBDAS = (0.3, 0.1)
PAPER_SWITCH_FRACTION = 10.0 / 14.8


# ---------------------------------------------------------------------------------------------- forward over a sequence
def _check_mtp(model: nn.Module, tokens: torch.Tensor) -> None:
    D = len(model.mtp)
    if D == 0:
        raise ValueError("the model has no MTP module (config n_mtp_layers = 0); build it with n_mtp_layers >= 1")
    model.check_tokens(tokens)
    if tokens.size(1) <= D:
        raise ValueError(f"tokens must have more than n_mtp_layers={D} positions (depth k uses T - k slots), "
                         f"got T={tokens.size(1)}")


def mtp_hidden_states(model: nn.Module, tokens: torch.Tensor, hidden: torch.Tensor | None = None,
                      attn_impl: str | None = None) -> list[torch.Tensor]:
    """The hidden states of every MTP depth over a sequence: [h^1, ..., h^D], h^k (B, T - k, dim).

    tokens: (B, T) the main model's input t_0 .. t_{T-1}; hidden: (B, T, dim) the main model's final-norm hidden
    states h^0 for those tokens (computed here if None). Slot i of depth k combines h^{k-1}_i with Emb(t_{i+k}) and
    predicts t_{i+k+1}.
    """
    _check_mtp(model, tokens)
    if hidden is None:
        hidden = model.hidden_states(tokens, attn_impl=attn_impl)  # (B, T, dim)
    attn_impl = attn_impl or model.config.attn_impl
    T = tokens.size(1)
    freqs = model.freqs_cis(hidden.device)  # (max_seq_len, d_r / 2)
    h, out = hidden, []
    for k, module in enumerate(model.mtp, start=1):
        S = T - k
        emb = model.embed(tokens[:, k:])  # (B, S, dim): Emb(t_{i+k}) for slot i
        h = module(h[:, :S], emb, freqs[k:T], causal_mask(S, 0, hidden.device), None, 0, attn_impl)  # (B, S, dim)
        out.append(h)
    return out


def mtp_logits(model: nn.Module, tokens: torch.Tensor, hidden: torch.Tensor | None = None,
               attn_impl: str | None = None) -> list[torch.Tensor]:
    """[logits^1, ..., logits^D] with logits^k (B, T - k, vocab): slot i predicts t_{i+k+1} (shared output head).
    Arguments as `mtp_hidden_states`."""
    return [model.head(h) for h in mtp_hidden_states(model, tokens, hidden, attn_impl)]


def _ce_and_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, S, V), targets (B, S) -> cross-entropy (with gradients) and top-1 accuracy (detached), both
    ignoring <pad> targets."""
    ce = cross_entropy(logits, targets)
    valid = targets != PAD_ID
    hits = (logits.detach().argmax(-1) == targets) & valid
    return ce, hits.sum() / valid.sum().clamp(min=1)


def mtp_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, hidden: torch.Tensor | None = None,
             lam: float = 1.0, logits: list[torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Eq. 25: L_MTP = (lam / D) * sum_k CE(P^k, t_{k+2:T+1}).

    tokens, targets: (B, T) a training window (targets = tokens shifted by one: targets[:, j] = t_{j+1}), so the
    targets of depth k are targets[:, k:] (slot i: t_{i+k+1}); <pad> targets are ignored. hidden: (B, T, dim) the
    main model's final-norm hidden states (computed if None); logits: `mtp_logits(model, tokens, hidden)` if
    already computed. Returns (L_MTP, [CE^k], [accuracy^k]): the per-depth cross-entropies (with gradients) and
    top-1 accuracies (detached), k = 1..D.
    """
    if targets.shape != tokens.shape:
        raise ValueError(f"targets must have the shape of tokens {tuple(tokens.shape)}, got {tuple(targets.shape)}")
    if logits is None:
        logits = mtp_logits(model, tokens, hidden)
    stats = [_ce_and_accuracy(lk, targets[:, k:]) for k, lk in enumerate(logits, start=1)]  # t_{i+k+1} at slot i
    ces, accs = [ce for ce, _ in stats], [acc for _, acc in stats]
    return lam / len(ces) * torch.stack(ces).sum(), ces, accs


@torch.no_grad()
def evaluate_mtp(model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """Means over `batches` (objects with `.inputs` and `.targets` (B, T), e.g. `TokenData.val_batches(...)`) of the
    main model's cross-entropy and top-1 accuracy ("main_ce", "main_acc") and, per depth k, the MTP module's
    ("mtp_ce_{k}", "mtp_acc_{k}") and "mtp_agree_{k}": how often its top-1 guess for t_{i+k+1} equals the main
    model's own top-1 guess at position i + k, given the true prefix. For k = 1 that is the acceptance rate greedy
    speculative decoding would see on this text (teacher-forced)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    device = model.embed.weight.device
    for batch in batches:
        tokens, targets = batch.inputs.to(device), batch.targets.to(device)  # (B, T)
        hidden = model.hidden_states(tokens)  # (B, T, dim)
        logits = model.head(hidden)  # (B, T, vocab)
        row = dict(zip(("main_ce", "main_acc"), _ce_and_accuracy(logits, targets), strict=True))
        depth_logits = mtp_logits(model, tokens, hidden)
        _, ces, accs = mtp_loss(model, tokens, targets, logits=depth_logits)
        for k, (ce, acc, lk) in enumerate(zip(ces, accs, depth_logits, strict=True), start=1):
            row[f"mtp_ce_{k}"], row[f"mtp_acc_{k}"] = ce, acc
            row[f"mtp_agree_{k}"] = (lk.argmax(-1) == logits[:, k:].argmax(-1)).float().mean()
        for name, value in row.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        n += 1
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate_mtp: batches is empty")
    return {name: total / n for name, total in sums.items()}


# ---------------------------------------------------------------------------------------------- lambda schedule
def paper_lambda(fraction: float, lambdas: tuple[float, float] = PAPER_LAMBDAS,
                 switch: float = PAPER_SWITCH_FRACTION) -> float:
    """The report's MTP loss weight as a function of the fraction of training done (in [0, 1]): lambdas[0] = 0.3
    before `switch` (10T / 14.8T = 0.676 of the tokens), then lambdas[1] = 0.1."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction of training must be in [0, 1], got {fraction!r}")
    return lambdas[0] if fraction < switch else lambdas[1]
