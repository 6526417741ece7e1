"""Multi-head Latent Attention (MLA), report §2.1.1, eqs. 1-11, with the official code's two paths side by side.

Shapes use B = batch, S = new tokens, T = all positions attended to (cached + new), H = n_heads,
d_h = qk_nope_head_dim, d_r = qk_rope_head_dim, d_v = v_head_dim, d_c = kv_lora_rank.

* naive: expand the latent c_kv into per-head keys and values (eqs. 2, 3, 5), cache K (B, T, H, d_h + d_r) and
  V (B, T, H, d_v).
* absorb: never expand. Fold W_UK into the query (q_nope W_UK lives in the d_c-dim latent space) and W_UV into
  the output; cache only the normalised latent c_kv (B, T, d_c) and the rotated shared key k_pe (B, T, d_r):
  d_c + d_r values per token per layer (576 at 671B), the "only c^KV and k^R need to be cached" of the report.
Both compute the same function (a test checks it to 1e-5 in float32).

With `cfg.has_indexer` (DeepSeek-V3.2-Exp) every layer also has a lightning indexer (`dsv3_ref.nn.indexer`) that keeps
the `index_topk` best-scored positions per query: the naive path adds the top-k mask to its scores (the report's MHA
mode, the official prefill), the absorb path gathers each query's k latent rows (the MQA mode DSA is built on). Both
caches then also hold the indexer's key per token ("index_k" (B, L, index_head_dim)). `MLA.sparse = False` runs
dense attention with the indexer still scoring (the dense warm-up of the report's §2.1).
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn

from ..config import ATTN_IMPLS, ModelConfig
from .indexer import Indexer, IndexerRecord, sparse_latent_attention, sparse_mask, topk_indices
from .layers import RMSNorm
from .rope import apply_rotary_emb


class KVCache:
    """Pre-allocated attention cache for `n_layers` MLA layers and up to `max_len` positions.

    naive layers hold {"k": (B, L, H, d_h + d_r), "v": (B, L, H, d_v)}; absorb layers hold
    {"kv": (B, L, d_c), "pe": (B, L, d_r)}; with an indexer (V3.2) both also hold "index_k" (B, L, index_head_dim).
    `seq_len` counts the positions already written; the model advances it.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None, attn_impl: str | None = None,
                 n_layers: int | None = None, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        attn_impl = attn_impl or cfg.attn_impl
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len must be in [1, max_seq_len={cfg.max_seq_len}], got {max_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.attn_impl, self.batch_size, self.max_len, self.seq_len = attn_impl, batch_size, max_len, 0
        n_layers = cfg.n_layers if n_layers is None else n_layers
        B, L, H = batch_size, max_len, cfg.n_heads
        if attn_impl == "naive":
            shapes = {"k": (B, L, H, cfg.qk_head_dim), "v": (B, L, H, cfg.v_head_dim)}
        else:
            shapes = {"kv": (B, L, cfg.kv_lora_rank), "pe": (B, L, cfg.qk_rope_head_dim)}
        if cfg.has_indexer:
            shapes["index_k"] = (B, L, cfg.index_head_dim)
        self.layers = [{k: torch.zeros(s, dtype=dtype, device=device) for k, s in shapes.items()}
                       for _ in range(n_layers)]

    def nbytes(self, positions: int | None = None) -> int:
        """Bytes the cache holds for `positions` positions (default: those written so far), all layers."""
        positions = self.seq_len if positions is None else positions
        return sum(t[:, :positions].numel() * t.element_size() for layer in self.layers for t in layer.values())

    def truncate(self, seq_len: int) -> None:
        """Forget every position from `seq_len` on (e.g. rejected speculative tokens)."""
        if not 0 <= seq_len <= self.seq_len:
            raise ValueError(f"truncate: seq_len must be in [0, {self.seq_len}], got {seq_len}")
        self.seq_len = seq_len


class MLA(nn.Module):
    """Multi-head Latent Attention. forward: x (B, S, dim) -> (B, S, dim).

    With an indexer, `last_index` holds the last forward's `IndexerRecord` (the indexer objective's input)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = cfg.qk_head_dim, cfg.v_head_dim
        self.softmax_scale = cfg.softmax_scale
        if self.q_lora_rank == 0:  # DeepSeek-V2-Lite: no query compression
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)  # W^DQ (eq. 6)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * cfg.qk_head_dim, bias=False)  # [W^UQ; W^QR] (7, 8)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)  # [W^DKV; W^KR] (1, 3)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                               bias=False)  # [W^UK; W^UV] per head (2, 5)
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)  # W^O (11)
        self.indexer = Indexer(cfg) if cfg.has_indexer else None  # DSA (V3.2-Exp)
        self.sparse = cfg.has_indexer  # False: dense attention, the indexer only scores (its warm-up)
        self.last_index: IndexerRecord | None = None

    def queries(self, x: torch.Tensor, freqs_cis: torch.Tensor,
                qr: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 6-9: q_nope (B, S, H, d_h) and the rotated q_pe (B, S, H, d_r). qr: the query latent c^Q
        (B, S, d_c'), if already computed (`query_latent`)."""
        if self.q_lora_rank == 0:
            q = self.wq(x)
        else:
            q = self.wq_b(self.query_latent(x) if qr is None else qr)
        q = rearrange(q, "b s (h d) -> b s h d", h=self.n_heads)  # (B, S, H, d_h + d_r)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rotary_emb(q_pe, freqs_cis)

    def query_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 6 and q_norm: the compressed query c^Q (B, S, d_c'), which the indexer reads too."""
        return self.q_norm(self.wq_a(x))

    def latent(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 1 and 3: the normalised latent c_kv (B, S, d_c) and ONE rotated key k_pe (B, S, d_r) for all heads."""
        c_kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_norm(c_kv), apply_rotary_emb(k_pe, freqs_cis)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None = None,
                cache: dict[str, torch.Tensor] | None = None, start_pos: int = 0,
                attn_impl: str = "naive") -> torch.Tensor:
        """x: (B, S, dim); freqs_cis: (S, d_r/2) for positions start_pos..start_pos+S-1; mask: (S, T) additive or
        None; cache: this layer's `KVCache.layers[i]` (written at [start_pos, start_pos + S)) or None."""
        B, S, _ = x.shape
        end = start_pos + S
        qr = None if self.q_lora_rank == 0 else self.query_latent(x)  # (B, S, d_c')
        q_nope, q_pe = self.queries(x, freqs_cis, qr)  # (B, S, H, d_h), (B, S, H, d_r)
        c_kv, k_pe = self.latent(x, freqs_cis)  # (B, S, d_c), (B, S, d_r)
        wkv_b = rearrange(self.wkv_b.weight, "(h d) c -> h d c", h=self.n_heads)  # (H, d_h + d_v, d_c)
        selected = None
        if self.indexer is not None:  # its input is detached: it learns only from its own loss (report §2.1)
            index = self.indexer(x.detach(), qr.detach(), freqs_cis, mask, cache, start_pos)  # (B, S, T)
            if self.sparse:
                selected = topk_indices(index, self.indexer.index_topk)  # (B, S, k)
        if attn_impl == "naive":
            kv = rearrange(self.wkv_b(c_kv), "b s (h d) -> b s h d", h=self.n_heads)  # (B, S, H, d_h + d_v)
            k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            k_pe_heads = repeat(k_pe, "b s r -> b s h r", h=self.n_heads)  # one shared key, a view per head
            k = torch.cat([k_nope, k_pe_heads], dim=-1)  # (B, S, H, d_h + d_r)
            if cache is not None:
                cache["k"][:B, start_pos:end] = k
                cache["v"][:B, start_pos:end] = v
                k, v = cache["k"][:B, :end], cache["v"][:B, :end]  # (B, T, H, .)
            q = torch.cat([q_nope, q_pe], dim=-1)  # (B, S, H, d_h + d_r)
            # heads first, (B, H, S, T): the layout the batched GEMM writes, so the mask, the softmax and their
            # backward run over contiguous rows ((B, S, H, T) made a CPU training step about 10% slower)
            scores = torch.einsum("bshd,bthd->bhst", q, k) * self.softmax_scale  # (B, H, S, T)
            if selected is not None:  # MHA mode: the top-k mask (with the causal mask) over all positions
                mask = sparse_mask(selected, end, mask)  # (B, S, T)
        elif attn_impl == "absorb":
            q_lat = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, : self.qk_nope_head_dim])  # (B, S, H, d_c)
            if cache is not None:
                cache["kv"][:B, start_pos:end] = c_kv
                cache["pe"][:B, start_pos:end] = k_pe
                c_kv, k_pe = cache["kv"][:B, :end], cache["pe"][:B, :end]  # (B, T, d_c), (B, T, d_r)
            if selected is not None:  # MQA mode: each query reads only its k latent rows
                valid = None if mask is None else torch.isfinite(mask).expand(B, -1, -1).gather(-1, selected)
                o, probs = sparse_latent_attention(q_lat, q_pe, c_kv, k_pe, selected, self.softmax_scale, valid)
                self._record(index, probs.sum(2).detach(), selected, valid, end)
                o = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, -self.v_head_dim:])  # (B, S, H, d_v)
                return self.wo(rearrange(o, "b s h d -> b s (h d)"))  # merge the heads
            scores = (torch.einsum("bshc,btc->bhst", q_lat, c_kv)
                      + torch.einsum("bshr,btr->bhst", q_pe, k_pe)) * self.softmax_scale  # (B, H, S, T)
        else:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        if mask is not None:
            scores = scores + (mask if mask.dim() == 2 else mask.unsqueeze(1))  # (S, T) or (B, 1, S, T)
        scores = scores.softmax(dim=-1, dtype=torch.float32).type_as(x)
        if self.indexer is not None:
            self.last_index = IndexerRecord(index, scores.detach().sum(1),
                                            None if selected is None else torch.isfinite(mask).expand(B, -1, -1))
        if attn_impl == "naive":
            o = torch.einsum("bhst,bthd->bshd", scores, v)  # (B, S, H, d_v)
        else:
            o = torch.einsum("bhst,btc->bshc", scores, c_kv)  # (B, S, H, d_c)
            o = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, -self.v_head_dim:])  # (B, S, H, d_v)
        return self.wo(rearrange(o, "b s h d -> b s (h d)"))  # merge the heads: (B, S, H * d_v) -> (B, S, dim)

    def _record(self, index: torch.Tensor, attn: torch.Tensor, selected: torch.Tensor, valid: torch.Tensor | None,
                T: int) -> None:
        """`last_index` for the gathered (MQA) path: its (B, S, k) probabilities put back on the T positions."""
        keep = torch.ones_like(selected, dtype=torch.bool) if valid is None else valid
        B, S, _ = selected.shape
        self.last_index = IndexerRecord(
            index, torch.zeros(B, S, T, dtype=attn.dtype, device=attn.device).scatter_(-1, selected, attn),
            torch.zeros(B, S, T, dtype=torch.bool, device=keep.device).scatter_(-1, selected, keep))


def causal_mask(S: int, start_pos: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """(S, start_pos + S) additive mask: query i (position start_pos + i) sees keys 0 .. start_pos + i.

    None when S == 1 (a single new token may attend to everything cached)."""
    if S == 1:
        return None
    return torch.full((S, start_pos + S), float("-inf"), device=device).triu_(start_pos + 1)
