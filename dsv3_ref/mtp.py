"""Multi-token prediction modules (report §2.2, eqs. 21-25), laid out as the released checkpoint stores them.

Module k (k = 1..D) combines the previous depth's hidden state h^{k-1}_i with the embedding of token t_{i+k}:
    h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]
then runs one Transformer block and a final RMSNorm; the shared output head predicts t_{i+k+1}. The report's
eq. 21 writes the concatenation as [h; Emb]; the checkpoint's `eh_proj` (as every serving stack reads it) takes
the embedding first, and we follow the checkpoint. Embedding and head are the main model's (shared).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm


class MTPModule(nn.Module):
    """The hub's `model.layers.{n_layers + k - 1}`: enorm, hnorm, eh_proj (dim x 2 dim), block, norm
    (`shared_head.norm`). forward: h_prev (B, S, dim), emb (B, S, dim) -> h^k (B, S, dim), normalised."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        from .model import Block

        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)  # M_k
        self.block = Block(layer_id, cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, freqs_cis: torch.Tensor,
                mask: torch.Tensor | None = None, cache: dict[str, torch.Tensor] | None = None, start_pos: int = 0,
                attn_impl: str = "naive") -> torch.Tensor:
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))  # (B, S, dim), embedding first
        return self.norm(self.block(h, freqs_cis, mask, cache, start_pos, attn_impl))
