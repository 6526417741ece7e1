"""The language-modelling objective: next-token cross-entropy with <pad> targets ignored (report §4.2 trains on it;
the MTP objective applies it per depth)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import PAD_ID


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats per token of logits (..., V) against targets (...), computed in float32; positions
    whose target is <pad> do not count."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=PAD_ID)
