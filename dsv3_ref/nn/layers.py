"""Small building blocks: RMSNorm and the SwiGLU MLP (dense FFN, shared and routed experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension (computed in float32, as `F.rms_norm`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (self.dim,), self.weight.float(), self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward network: w2(silu(w1 x) * w3 x). x: (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate_proj
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down_proj
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
