"""MLA: naive and absorbed paths agree, cached equals uncached, and the absorb cache holds only the latent."""

import pytest
import torch
from torch.testing import assert_close

from dsv3_ref import MLA, KVCache, ModelConfig, Transformer
from dsv3_ref.nn.attention import causal_mask
from dsv3_ref.nn.rope import apply_rotary_emb, precompute_freqs_cis

TOL = dict(rtol=1e-5, atol=1e-5)
# tiny, plus YaRN switched on (max_seq_len 256 > original 64, s = 4) so the mscale^2 softmax scale is exercised
YARN = dict(original_seq_len=64, rope_factor=4.0, mscale=1.0)


def _mla(q_lora_rank: int | None = None, seed: int = 0, **overrides) -> tuple[ModelConfig, MLA]:
    cfg = ModelConfig.from_preset("tiny", **YARN, **overrides)
    if q_lora_rank is not None:
        cfg = cfg.replace(q_lora_rank=q_lora_rank)
    torch.manual_seed(seed)
    mla = MLA(cfg)
    with torch.no_grad():  # non-trivial norm weights, so that "normalised" is visible in the cache
        for norm in (mla.kv_norm, getattr(mla, "q_norm", None)):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
    return cfg, mla


def _full(mla: MLA, cfg: ModelConfig, x: torch.Tensor, impl: str) -> torch.Tensor:
    """Uncached causal forward over all of x (B, T, dim)."""
    T = x.size(1)
    return mla(x, precompute_freqs_cis(cfg)[:T], causal_mask(T, 0), None, 0, impl)


def _chunked(mla: MLA, cfg: ModelConfig, x: torch.Tensor, impl: str, chunks: list[int],
             cache: KVCache | None = None) -> torch.Tensor:
    """Forward x chunk by chunk through a KV cache; returns the concatenated outputs."""
    B = x.size(0)
    cache = cache or KVCache(cfg, B, max_len=sum(chunks), attn_impl=impl, n_layers=1)
    fc, outs, pos = precompute_freqs_cis(cfg), [], 0
    for S in chunks:
        outs.append(mla(x[:, pos:pos + S], fc[pos:pos + S], causal_mask(S, pos), cache.layers[0], pos, impl))
        pos += S
    return torch.cat(outs, dim=1)


def test_softmax_scale_includes_mscale():
    cfg, mla = _mla()
    assert cfg.yarn_active and mla.softmax_scale == cfg.softmax_scale > cfg.qk_head_dim**-0.5


@pytest.mark.parametrize("q_lora_rank", [None, 0])
def test_absorb_equals_naive_prefill(q_lora_rank):
    cfg, mla = _mla(q_lora_rank)
    x = torch.randn(2, 11, cfg.dim)
    naive, absorb = _full(mla, cfg, x, "naive"), _full(mla, cfg, x, "absorb")
    assert naive.shape == (2, 11, cfg.dim)
    assert_close(absorb, naive, **TOL)


def test_absorb_equals_naive_at_each_decode_step():
    cfg, mla = _mla()
    x = torch.randn(2, 12, cfg.dim)
    fc = precompute_freqs_cis(cfg)
    caches = {impl: KVCache(cfg, 2, max_len=12, attn_impl=impl, n_layers=1) for impl in ("naive", "absorb")}
    out = {impl: mla(x[:, :7], fc[:7], causal_mask(7, 0), caches[impl].layers[0], 0, impl) for impl in caches}
    assert_close(out["absorb"], out["naive"], **TOL)
    for pos in range(7, 12):  # five single-token decode steps
        out = {impl: mla(x[:, pos:pos + 1], fc[pos:pos + 1], None, caches[impl].layers[0], pos, impl)
               for impl in caches}
        assert out["naive"].shape == (2, 1, cfg.dim)
        assert_close(out["absorb"], out["naive"], **TOL)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
@pytest.mark.parametrize("chunks", [[13], [5, 1, 1, 1, 5], [4, 3, 6], [1] * 13])
def test_cached_equals_uncached(impl, chunks):
    """Prefill, decode steps, and multi-token chunks at start_pos > 0 (the official mask would mis-broadcast)."""
    cfg, mla = _mla()
    x = torch.randn(2, 13, cfg.dim)
    assert_close(_chunked(mla, cfg, x, impl, chunks), _full(mla, cfg, x, "naive"), **TOL)


def test_cache_with_larger_batch_than_input():
    cfg, mla = _mla()
    x = torch.randn(2, 6, cfg.dim)
    cache = KVCache(cfg, batch_size=4, max_len=6, attn_impl="absorb", n_layers=1)
    assert_close(_chunked(mla, cfg, x, "absorb", [4, 2], cache), _full(mla, cfg, x, "absorb"), **TOL)


def test_absorb_cache_holds_only_the_latent():
    cfg, mla = _mla()
    B, L, T = 2, 10, 7
    cache = KVCache(cfg, B, max_len=L, attn_impl="absorb", n_layers=1)
    layer = cache.layers[0]
    assert set(layer) == {"kv", "pe"}
    assert layer["kv"].shape == (B, L, cfg.kv_lora_rank) and layer["pe"].shape == (B, L, cfg.qk_rope_head_dim)
    assert all(t.dtype == torch.float32 for t in layer.values())
    assert cache.nbytes(1) == B * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # per token per layer, fp32

    x = torch.randn(B, T, cfg.dim)
    fc = precompute_freqs_cis(cfg)[:T]
    mla(x, fc, causal_mask(T, 0), layer, 0, "absorb")
    with torch.no_grad():
        c_kv, k_pe = mla.wkv_a(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        rms = c_kv * torch.rsqrt(c_kv.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * mla.kv_norm.weight
        assert_close(layer["kv"][:, :T], rms, rtol=1e-5, atol=1e-6)  # kv_norm(c_kv): after the RMSNorm
        # exact: MLA.latent computes this very wkv_a product and RoPE on the same input
        assert_close(layer["pe"][:, :T], apply_rotary_emb(k_pe, fc), rtol=0, atol=0)  # k_pe after RoPE
        assert not torch.allclose(layer["pe"][:, 1:T], k_pe[:, 1:])  # ... really rotated
    assert layer["kv"][:, T:].abs().sum() == 0 and layer["pe"][:, T:].abs().sum() == 0  # nothing written beyond


def test_naive_cache_shapes_and_one_shared_rope_key():
    cfg, mla = _mla()
    B, T, H = 2, 6, cfg.n_heads
    cache = KVCache(cfg, B, max_len=T, attn_impl="naive", n_layers=1)
    layer = cache.layers[0]
    assert layer["k"].shape == (B, T, H, cfg.qk_head_dim) and layer["v"].shape == (B, T, H, cfg.v_head_dim)
    assert cache.nbytes(1) == B * H * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    mla(torch.randn(B, T, cfg.dim), precompute_freqs_cis(cfg)[:T], causal_mask(T, 0), layer, 0, "naive")
    k_rope = layer["k"][..., cfg.qk_nope_head_dim:]  # (B, T, H, d_r)
    for h in range(1, H):
        assert torch.equal(k_rope[:, :, h], k_rope[:, :, 0])  # ONE rope key for all heads (MQA-like)
    k_nope = layer["k"][..., : cfg.qk_nope_head_dim]
    assert not torch.allclose(k_nope[:, :, 1], k_nope[:, :, 0])  # while the content keys are per head


def test_671b_cache_bytes_per_token():
    """576 values per token per layer; 70,272 B/token over 61 layers in bf16 (docs/facts.md, KV cache)."""
    cfg = ModelConfig.from_preset("671B")
    cache = KVCache(cfg, 1, max_len=1, attn_impl="absorb", dtype=torch.bfloat16, device="meta")
    assert cache.nbytes(1) == 61 * 576 * 2 == 70_272
    naive = KVCache(cfg, 1, max_len=1, attn_impl="naive", dtype=torch.bfloat16, device="meta")
    assert naive.nbytes(1) == 61 * 128 * (192 + 128) * 2


def test_q_lora_rank_zero_uses_plain_wq():
    cfg, mla = _mla(q_lora_rank=0)
    assert hasattr(mla, "wq") and not hasattr(mla, "wq_a") and not hasattr(mla, "q_norm")
    assert mla.wq.weight.shape == (cfg.n_heads * cfg.qk_head_dim, cfg.dim)
    x = torch.randn(1, 9, cfg.dim)
    assert_close(_chunked(mla, cfg, x, "absorb", [4, 1, 4]), _full(mla, cfg, x, "naive"), **TOL)


def test_causality():
    cfg, mla = _mla()
    x = torch.randn(2, 10, cfg.dim)
    x2 = x.clone()
    x2[:, 6] += 3.0  # change a "future" token
    for impl in ("naive", "absorb"):
        a, b = _full(mla, cfg, x, impl), _full(mla, cfg, x2, impl)
        assert_close(b[:, :6], a[:, :6], rtol=0, atol=1e-6)
        assert (b[:, 6:] - a[:, 6:]).abs().amax(dim=-1).min() > 1e-4  # and every later position sees it


def test_causal_mask():
    assert causal_mask(1, 5) is None
    m = causal_mask(3, 2)
    assert m.shape == (3, 5)
    visible = m == 0
    assert visible.tolist() == [[True, True, True, False, False],
                                [True, True, True, True, False],
                                [True, True, True, True, True]]
    assert bool(torch.isneginf(m[~visible]).all())


def test_unknown_attn_impl_in_forward():
    cfg, mla = _mla()
    with pytest.raises(ValueError, match="attn_impl"):
        mla(torch.randn(1, 2, cfg.dim), precompute_freqs_cis(cfg)[:2], None, None, 0, "flash")


# ---------------------------------------------------------------------------------------------------- KVCache errors
def test_kvcache_constructor_errors():
    cfg = ModelConfig.from_preset("tiny")
    with pytest.raises(ValueError, match=r"attn_impl must be one of \('naive', 'absorb'\), got 'flash'"):
        KVCache(cfg, 1, attn_impl="flash")
    with pytest.raises(ValueError, match="max_len"):
        KVCache(cfg, 1, max_len=cfg.max_seq_len + 1)
    with pytest.raises(ValueError, match="max_len"):
        KVCache(cfg, 1, max_len=0)
    with pytest.raises(ValueError, match="batch_size"):
        KVCache(cfg, 0)
    cache = KVCache(cfg, 1)
    assert cache.max_len == cfg.max_seq_len and cache.attn_impl == cfg.attn_impl and len(cache.layers) == cfg.n_layers


def test_kvcache_model_errors_and_truncate():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    tokens = torch.randint(0, 259, (2, 8))
    cache = model.new_cache(2, max_len=8, attn_impl="naive")
    with pytest.raises(ValueError, match=r"attn_impl='absorb' but the cache was built for 'naive'"):
        model(tokens[:, :3], cache=cache, attn_impl="absorb")
    with pytest.raises(ValueError, match="batch 2"):
        model(torch.randint(0, 259, (3, 2)), cache=cache)  # more sequences than the cache holds
    model(tokens[:, :5], cache=cache)
    assert cache.seq_len == 5
    with pytest.raises(ValueError, match="positions up to 9"):
        model(tokens[:, :4], cache=cache)  # 5 + 4 > max_len 8
    assert cache.seq_len == 5  # a refused call leaves the cache alone
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(6)
    # truncate forgets positions (e.g. rejected speculative tokens): re-feeding them gives the same logits
    full = model(tokens)
    cache.truncate(3)
    assert_close(model(tokens[:, 3:], cache=cache), full[:, 3:], **TOL)
