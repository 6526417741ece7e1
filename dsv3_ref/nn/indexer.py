"""DeepSeek Sparse Attention (DSA) of DeepSeek-V3.2-Exp: the lightning indexer and the top-k token selection.

The V3.2-Exp report (§1, eqs. 1-2) adds one module to every MLA layer of DeepSeek-V3.1-Terminus. The *lightning
indexer* scores each query token t against every token s it may attend to,

    I(t, s) = sum_j w(t, j) * ReLU(q(t, j) . k(s))                                        (eq. 1)

with H^I = `index_n_heads` small heads of width d^I = `index_head_dim`, and the main attention then runs only over
the `index_topk` tokens of highest I(t, s) (eq. 2). Names and scales follow the official `Indexer`
(DeepSeek-V3.2-Exp `inference/model.py`):

* q(t, j): `wq_b` applied to the MLA query latent c^Q_t (after `q_norm`, the same latent MLA's own `wq_b` reads),
  split per head into a rotary part of `qk_rope_head_dim` values FIRST, then the rest (the main MLA puts its rotary
  part last);
* k(s): ONE key per token shared by all indexer heads, `wk` applied to the layer input h_s, then `k_norm` (a
  LayerNorm with weight and bias, eps 1e-6), rotary part first as well;
* w(t, j): `weights_proj` applied to h_t, times H^I ** -0.5 and the indexer's softmax_scale d^I ** -0.5 (the
  official code multiplies both into the head weights, not into q . k; ReLU commutes with a positive factor);
* RoPE on the rotary parts in the half-split layout (pairs (x_i, x_{i + d/2})), NOT the interleaved layout of the
  main MLA: DeepSeek fixed its inference demo to this layout in November 2025 ("rope in indexer is not interleaved"),
  transformers' `DeepseekV32Indexer` uses it, and the hub weights were trained with it.

What the reference computes in float32 and what it leaves out: the official kernel rotates q and k by a Hadamard
matrix and quantises both to FP8 (1 x 128 tiles) before the dot product. The Hadamard rotation is orthogonal
(H q . H k = q . k), so in exact arithmetic it changes nothing; the FP8 rounding only perturbs the scores. This module
is the exact-arithmetic indexer (the FP8 key cache is accounted for in `dsv3_ref.systems.accounting`).

The selection keeps, for every query, the `index_topk` positions of highest score among those the causal mask lets
it see (`topk_indices`), turned into an additive mask over MLA's scores (`sparse_mask`). When a query sees fewer
positions than `index_topk`, `topk` also returns masked (future) positions, so the causal mask must be added again
after the scatter, as the official code does (`index_mask += mask`). With `index_topk` >= the sequence length every
visible position is kept and DSA is exactly dense V3 attention.

`sparse_latent_attention` is the "MQA mode" the report runs DSA in (§1, Appendix A): with W_UK absorbed into the
query, every head attends over the same 576-wide latent entries [c^KV; k^R], so selecting a token means reading one
shared latent row, and a query only ever gathers its `index_topk` rows from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .rope import apply_rotary_emb


@dataclass
class IndexerRecord:
    """What one layer's last forward leaves for the indexer's training objective (`dsv3_ref.objectives.indexer`).
    All (B, S, T) over the T positions attended to.

    scores: the index scores I(t, s), -inf where the causal mask hides s (graph to the indexer's weights only: its
        inputs are detached); attn: the main attention probabilities summed over the heads (detached);
    selected: the positions the top-k selection kept (bool), or None when the layer ran dense attention."""

    scores: torch.Tensor
    attn: torch.Tensor
    selected: torch.Tensor | None


class Indexer(nn.Module):
    """The lightning indexer. forward: x (B, S, dim), qr (B, S, q_lora_rank) -> index scores (B, S, T)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rope_head_dim, self.index_topk = cfg.qk_rope_head_dim, cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(cfg.index_head_dim, eps=1e-6)  # the official LayerNorm: weight and bias
        self.weights_proj = nn.Linear(cfg.dim, cfg.index_n_heads, bias=False)
        self.softmax_scale = cfg.index_head_dim**-0.5

    def _rotate(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """Half-split RoPE on the first `rope_head_dim` values of the last dim (the indexer's rotary part)."""
        pe, nope = x.split([self.rope_head_dim, self.head_dim - self.rope_head_dim], dim=-1)
        return torch.cat([apply_rotary_emb(pe, freqs_cis, interleaved=False), nope], dim=-1)

    def queries(self, qr: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """q(t, j): qr (B, S, q_lora_rank) -> (B, S, H^I, d^I), rotary part first and rotated."""
        B, S, _ = qr.shape
        return self._rotate(self.wq_b(qr).view(B, S, self.n_heads, self.head_dim), freqs_cis)

    def keys(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """k(s): x (B, S, dim) -> (B, S, d^I), one key per token for all indexer heads."""
        k = F.layer_norm(self.wk(x).float(), (self.head_dim,), self.k_norm.weight.float(), self.k_norm.bias.float(),
                         self.k_norm.eps).type_as(x)
        return self._rotate(k, freqs_cis)

    def head_weights(self, x: torch.Tensor) -> torch.Tensor:
        """w(t, j): x (B, S, dim) -> (B, S, H^I), with the official H^I ** -0.5 and softmax_scale folded in."""
        return self.weights_proj(x) * (self.n_heads**-0.5 * self.softmax_scale)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None = None,
                cache: dict[str, torch.Tensor] | None = None, start_pos: int = 0) -> torch.Tensor:
        """x: (B, S, dim) the layer input; qr: (B, S, q_lora_rank) the normalised query latent; freqs_cis: (S, d_r/2)
        for positions start_pos ..; mask: (S, T) additive causal mask or None; cache: the layer's cache dict (its
        "index_k" (B, L, d^I) is written at [start_pos, start_pos + S)). Returns I (B, S, T), + mask."""
        B, S, _ = x.shape
        q = self.queries(qr, freqs_cis)  # (B, S, H^I, d^I)
        k = self.keys(x, freqs_cis)  # (B, S, d^I)
        if cache is not None:
            cache["index_k"][:B, start_pos:start_pos + S] = k
            k = cache["index_k"][:B, :start_pos + S]  # (B, T, d^I)
        scores = index_scores(q, k, self.head_weights(x))  # (B, S, T)
        return scores if mask is None else scores + mask


def index_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 1: I(t, s) = sum_j w(t, j) ReLU(q(t, j) . k(s)). q (B, S, H, d), k (B, T, d), weights (B, S, H) -> (B, S, T)
    in float32."""
    logits = torch.einsum("bshd,btd->bsht", q.float(), k.float()).relu()  # (B, S, H, T)
    return torch.einsum("bsht,bsh->bst", logits, weights.float())


def topk_indices(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """The `topk` positions of highest index score per query: scores (B, S, T) (causal mask already added) ->
    (B, S, min(topk, T)) int64. Rows that see fewer than `topk` positions also get masked ones (score -inf)."""
    return scores.topk(min(topk, scores.shape[-1]), dim=-1).indices


def sparse_mask(indices: torch.Tensor, T: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 2 as an additive mask: 0 at the selected positions, -inf elsewhere; indices (B, S, k) -> (B, S, T).

    The causal mask (S, T) is added back: the selection alone may hold future positions (see the module docstring)."""
    B, S, _ = indices.shape
    out = torch.full((B, S, T), float("-inf"), device=indices.device).scatter_(-1, indices, 0.0)
    return out if mask is None else out + mask


def sparse_latent_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
                            indices: torch.Tensor, softmax_scale: float,
                            valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DSA in MLA's MQA mode: every head attends over the SAME selected latent rows.

    q_lat (B, S, H, d_c) (W_UK absorbed), q_pe (B, S, H, d_r); the latent cache kv (B, T, d_c) and pe (B, T, d_r);
    indices (B, S, k) the selected positions; valid (B, S, k) bool, False for a selected position the query may not
    see (None: all valid). Only the k gathered rows of d_c + d_r values are read per query.
    Returns (o_lat (B, S, H, d_c), probs (B, S, H, k))."""
    B, S, k = indices.shape
    rows = indices.reshape(B, S * k, 1)
    kv_sel = kv.gather(1, rows.expand(-1, -1, kv.shape[-1])).view(B, S, k, -1)  # (B, S, k, d_c)
    pe_sel = pe.gather(1, rows.expand(-1, -1, pe.shape[-1])).view(B, S, k, -1)  # (B, S, k, d_r)
    scores = (torch.einsum("bshc,bskc->bshk", q_lat, kv_sel)
              + torch.einsum("bshr,bskr->bshk", q_pe, pe_sel)) * softmax_scale  # (B, S, H, k)
    if valid is not None:
        scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).type_as(q_lat)
    return torch.einsum("bshk,bskc->bshc", probs, kv_sel), probs
