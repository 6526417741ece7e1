"""The DeepSeek-V3 Transformer: embedding, `n_layers` pre-norm blocks (dense FFN first, then MoE), final norm,
untied output head, and the optional multi-token-prediction modules (report §2.2; their training objective and
speculative decoding live in `dsv3_ref.objectives.mtp` and `dsv3_ref.inference.speculative`; checkpoints in
`dsv3_ref.io.checkpoint`).

MTP module k combines the previous depth's hidden state with the embedding of the token k ahead:
    h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]
embedding first, as the checkpoint's `eh_proj` expects (the report's eq. 21 writes [h; Emb])."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ATTN_IMPLS, ModelConfig
from .attention import MLA, KVCache, causal_mask
from .layers import MLP, RMSNorm
from .moe import MoE
from .rope import precompute_freqs_cis


class Block(nn.Module):
    """x + attn(attn_norm(x)), then + ffn(ffn_norm(x)); ffn is a dense MLP for layer_id < n_dense_layers, else MoE."""

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None = None,
                cache: dict[str, torch.Tensor] | None = None, start_pos: int = 0,
                attn_impl: str = "naive") -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), freqs_cis, mask, cache, start_pos, attn_impl)  # (B, S, dim)
        return x + self.ffn(self.ffn_norm(x))


class MTPModule(nn.Module):
    """Multi-token prediction module k (report eqs. 21-22), the hub's `model.layers.{n_layers + k - 1}`: enorm,
    hnorm, eh_proj (dim x 2 dim), block, norm (`shared_head.norm`).

    forward: h_prev (B, S, dim), emb (B, S, dim) -> h^k (B, S, dim), normalised."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
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


class Transformer(nn.Module):
    """DeepSeek-V3. `model(tokens)` with tokens (B, T) int64 returns logits (B, T, vocab_size) for every position.

    With a `KVCache` (see `new_cache`), `model(tokens, cache=cache)` processes the next S tokens after the
    `cache.seq_len` already cached ones (prefill: S = prompt length; decode: S = 1) and advances the cache.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.n_layers + k) for k in range(cfg.n_mtp_layers))
        self._freqs: dict[torch.device, torch.Tensor] = {}
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, init_std) for every matrix and embedding, ones for norms, zero correction biases."""
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * self.config.init_std)
        for name, b in self.named_buffers():
            if name.endswith("gate.bias"):
                b.zero_()

    # ------------------------------------------------------------------ forward
    def freqs_cis(self, device: torch.device) -> torch.Tensor:
        """(max_seq_len, d_r/2) complex64 RoPE/YaRN rotations, computed once per device (not a buffer: it must stay
        complex64 whatever dtype the weights are cast to)."""
        device = torch.device(device)
        if device not in self._freqs:
            self._freqs[device] = precompute_freqs_cis(self.config).to(device)
        return self._freqs[device]

    def check_tokens(self, tokens: torch.Tensor, start_pos: int = 0) -> None:
        """ValueError unless tokens is an int64/int32 (B, S) tensor of ids in [0, vocab_size) fitting max_seq_len."""
        cfg = self.config
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens must be a 2-D (batch, seq) tensor, got {getattr(tokens, 'shape', type(tokens))}")
        if tokens.dtype not in (torch.int64, torch.int32):  # the ones nn.Embedding accepts
            raise ValueError(f"tokens must have dtype torch.int64 or torch.int32, got {tokens.dtype}")
        if tokens.numel() == 0:
            raise ValueError(f"tokens must hold at least one sequence and one position, got shape "
                             f"{tuple(tokens.shape)}")
        if start_pos + tokens.size(1) > cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + tokens.size(1)} positions exceeds "
                             f"max_seq_len={cfg.max_seq_len}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={cfg.vocab_size}), got values in [{lo}, {hi}]")

    def hidden_states(self, tokens: torch.Tensor, cache: KVCache | None = None,
                      attn_impl: str | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, S, dim) for `tokens` (B, S), continuing after `cache.seq_len` positions."""
        start_pos = 0 if cache is None else cache.seq_len
        self.check_tokens(tokens, start_pos)
        attn_impl = self._resolve_impl(cache, attn_impl)
        B, S = tokens.shape
        if cache is not None and (B > cache.batch_size or start_pos + S > cache.max_len):
            raise ValueError(f"cache holds batch {cache.batch_size} x {cache.max_len} positions; got batch {B} "
                             f"and positions up to {start_pos + S}")
        h = self.embed(tokens)  # (B, S, dim)
        freqs = self.freqs_cis(h.device)[start_pos:start_pos + S]
        mask = causal_mask(S, start_pos, h.device)
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, mask, None if cache is None else cache.layers[i], start_pos, attn_impl)
        if cache is not None:
            cache.seq_len = start_pos + S
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, attn_impl: str | None = None) -> torch.Tensor:
        """tokens (B, S) -> logits (B, S, vocab_size)."""
        return self.head(self.hidden_states(tokens, cache, attn_impl))

    def _resolve_impl(self, cache: KVCache | None, attn_impl: str | None) -> str:
        impl = attn_impl or (cache.attn_impl if cache is not None else self.config.attn_impl)
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        if cache is not None and impl != cache.attn_impl:
            raise ValueError(f"attn_impl={impl!r} but the cache was built for {cache.attn_impl!r}")
        return impl

    def new_cache(self, batch_size: int, max_len: int | None = None, attn_impl: str | None = None) -> KVCache:
        """An empty KV cache for this model's layers (dtype and device of its weights)."""
        p = self.embed.weight
        return KVCache(self.config, batch_size, max_len, attn_impl, dtype=p.dtype, device=p.device)
