"""DeepSeek Sparse Attention: the lightning indexer against the official formula, the top-k selection, DSA in MLA's
two modes (masked MHA mode and gathered MQA mode), caches, the indexer's training objective and its config."""

import math

import pytest
import torch
from torch.testing import assert_close

from dsv3_ref import MLA, KVCache, ModelConfig, Transformer
from dsv3_ref.nn.attention import causal_mask
from dsv3_ref.nn.indexer import Indexer, index_scores, sparse_latent_attention, sparse_mask, topk_indices
from dsv3_ref.nn.rope import apply_rotary_emb, precompute_freqs_cis
from dsv3_ref.objectives.indexer import indexer_kl_loss, indexer_loss, selection_recall

TOL = dict(rtol=1e-5, atol=1e-5)
# the tiny preset with an indexer of 4 heads x 16 (rotary part 8), keeping 5 tokens, YaRN on (mscale matters)
DSA = dict(index_n_heads=4, index_head_dim=16, index_topk=5, original_seq_len=64, rope_factor=4.0, mscale=1.0)


def _cfg(**overrides) -> ModelConfig:
    return ModelConfig.from_preset("tiny", **{**DSA, **overrides})


@torch.no_grad()
def _seeded(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Every weight N(0, std^2), every norm weight 1 + N(0, 0.2^2), every norm bias N(0, 0.2^2): all distinct."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "norm" in name:
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(std * torch.randn(p.shape, generator=gen))
    return module


def _mla(cfg: ModelConfig, seed: int = 0) -> MLA:
    return _seeded(MLA(cfg), seed).eval()


# ---------------------------------------------------------------------------------------------- RoPE layouts
def _rotate_half(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX / transformers' rotate_half formula: x cos + rotate_half(x) sin, cos/sin = cat(angles, angles)."""
    f = freqs_cis.view(1, x.shape[1], *([1] * (x.dim() - 3)), -1)
    cos, sin = torch.cat([f.real, f.real], -1), torch.cat([f.imag, f.imag], -1)
    m = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., m:], x[..., :m]], -1) * sin


def test_half_split_rope_is_rotate_half_and_not_interleaved():
    freqs = precompute_freqs_cis(_cfg())[:7]
    x = torch.randn(2, 7, 3, 8)
    half = apply_rotary_emb(x, freqs, interleaved=False)
    assert_close(half, _rotate_half(x, freqs), **TOL)
    assert (half - apply_rotary_emb(x, freqs)).abs().max() > 0.1  # the two layouts are different functions
    k = torch.randn(2, 7, 8)
    assert_close(apply_rotary_emb(k, freqs, interleaved=False), _rotate_half(k[:, :, None], freqs)[:, :, 0], **TOL)


def test_half_split_rope_depends_only_on_the_distance():
    freqs = precompute_freqs_cis(_cfg())
    q, k = torch.randn(1, 1, 8), torch.randn(1, 1, 8)

    def score(tq: int, tk: int) -> torch.Tensor:
        rq = apply_rotary_emb(q, freqs[tq:tq + 1], interleaved=False)
        rk = apply_rotary_emb(k, freqs[tk:tk + 1], interleaved=False)
        return (rq * rk).sum()

    assert_close(score(9, 4), score(25, 20), **TOL)


# ---------------------------------------------------------------------------------------------- the indexer
def _hadamard(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order n (a power of two), scaled to be orthogonal."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _official_scores(idx: Indexer, x, qr, freqs, mask) -> torch.Tensor:
    """The official `Indexer.forward` in float64 without its FP8 rounding: rotary part first and rotated (half-split),
    a Hadamard rotation of q and k, weights = weights_proj(x) * H^-0.5 * softmax_scale, ReLU(q . k) per head."""
    B, S, _ = x.shape
    d, r, H = idx.head_dim, idx.rope_head_dim, idx.n_heads
    q = (qr.double() @ idx.wq_b.weight.double().T).view(B, S, H, d)
    k = torch.nn.functional.layer_norm(x.double() @ idx.wk.weight.double().T, (d,), idx.k_norm.weight.double(),
                                       idx.k_norm.bias.double(), 1e-6)
    rope = lambda t: torch.cat([apply_rotary_emb(t[..., :r], freqs, interleaved=False).double(), t[..., r:]], -1)  # noqa: E731
    hd = _hadamard(d)
    q, k = rope(q) @ hd, rope(k) @ hd
    weights = (x.double() @ idx.weights_proj.weight.double().T) * H**-0.5 * d**-0.5  # (B, S, H)
    logits = torch.einsum("bshd,btd->bsht", q, k).relu()
    return torch.einsum("bsht,bsh->bst", logits, weights) + mask


def test_indexer_matches_the_official_formula_with_its_hadamard_rotation():
    cfg = _cfg()
    idx = _seeded(Indexer(cfg))
    x, qr = torch.randn(2, 9, cfg.dim), torch.randn(2, 9, cfg.q_lora_rank)
    freqs, mask = precompute_freqs_cis(cfg)[:9], causal_mask(9, 0)
    ours = idx(x, qr, freqs, mask)
    assert ours.shape == (2, 9, 9) and ours.dtype == torch.float32
    assert_close(ours.double(), _official_scores(idx, x, qr, freqs, mask), rtol=1e-5, atol=1e-5)
    assert torch.isinf(ours[:, 0, 1:]).all() and torch.isfinite(ours[:, -1]).all()  # causal


def test_index_score_is_relu_weighted_sum():
    q, k, w = torch.randn(1, 2, 3, 4), torch.randn(1, 5, 4), torch.randn(1, 2, 3)
    want = torch.stack([torch.stack([sum(w[0, t, j] * torch.relu(q[0, t, j] @ k[0, s]) for j in range(3))
                                     for s in range(5)]) for t in range(2)])
    assert_close(index_scores(q, k, w)[0], want, **TOL)


def test_indexer_cache_equals_uncached():
    cfg = _cfg()
    idx = _seeded(Indexer(cfg))
    x, qr = torch.randn(2, 10, cfg.dim), torch.randn(2, 10, cfg.q_lora_rank)
    freqs = precompute_freqs_cis(cfg)
    full = idx(x, qr, freqs[:10], causal_mask(10, 0))
    cache = KVCache(cfg, 2, max_len=10, n_layers=1).layers[0]
    first = idx(x[:, :6], qr[:, :6], freqs[:6], causal_mask(6, 0), cache, 0)
    steps = [idx(x[:, t:t + 1], qr[:, t:t + 1], freqs[t:t + 1], None, cache, t) for t in range(6, 10)]
    assert_close(first, full[:, :6, :6], **TOL)
    for t, s in zip(range(6, 10), steps, strict=True):
        assert_close(s[:, 0], full[:, t, :t + 1], **TOL)


# ---------------------------------------------------------------------------------------------- selection
def test_selection_never_keeps_a_future_token():
    """With fewer visible tokens than index_topk, topk returns masked (future) positions too: the causal mask must be
    added again after the scatter (the official `index_mask += mask`)."""
    T, k = 8, 5
    scores = torch.randn(1, T, T) + causal_mask(T, 0)
    idx = topk_indices(scores, k)
    assert (idx > torch.arange(T)[:, None]).any(), "the early queries' top-k includes future positions"
    keep = torch.isfinite(sparse_mask(idx, T, causal_mask(T, 0)))
    assert not (keep & torch.ones(T, T, dtype=torch.bool).triu(1)).any()
    assert (keep.sum(-1) == torch.arange(1, T + 1).clamp(max=k)).all()
    lost = torch.isfinite(sparse_mask(idx, T))  # the trap: selection without the causal mask
    assert (lost & torch.ones(T, T, dtype=torch.bool).triu(1)).any()


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_topk_at_least_the_length_is_dense_attention(impl):
    cfg = _cfg(index_topk=12)
    dense_cfg = cfg.replace(index_n_heads=0, index_head_dim=0, index_topk=0)
    mla = _mla(cfg)
    dense = MLA(dense_cfg).eval()
    dense.load_state_dict({k: v for k, v in mla.state_dict().items() if not k.startswith("indexer.")})
    x = torch.randn(2, 12, cfg.dim)
    freqs, mask = precompute_freqs_cis(cfg)[:12], causal_mask(12, 0)
    assert_close(mla(x, freqs, mask, attn_impl=impl), dense(x, freqs, mask, attn_impl=impl), **TOL)


def test_selection_changes_the_output_when_topk_is_below_the_length():
    cfg = _cfg()
    mla = _mla(cfg)
    x = torch.randn(2, 12, cfg.dim)
    freqs, mask = precompute_freqs_cis(cfg)[:12], causal_mask(12, 0)
    sparse = mla(x, freqs, mask)
    mla.sparse = False
    dense = mla(x, freqs, mask)
    assert_close(sparse[:, :cfg.index_topk], dense[:, :cfg.index_topk], **TOL)  # <= k visible: nothing dropped
    assert (sparse[:, cfg.index_topk:] - dense[:, cfg.index_topk:]).abs().max() > 1e-3


@pytest.mark.parametrize("chunks", [[12], [7, 1, 1, 1, 1, 1], [4, 5, 3]])
def test_sparse_mha_and_mqa_modes_agree_with_and_without_cache(chunks):
    """DSA in MHA mode (naive: expanded keys, additive top-k mask) and MQA mode (absorb: each query gathers its k
    latent rows) are the same function, prefilled at once or chunk by chunk through the cache.

    The input is seeded and checked to have no tie at any query's k-th score: ReLU makes a score exactly 0 whenever
    every head's q . k is negative, and which of several tied positions topk returns depends on the row's length."""
    cfg = _cfg()
    mla = _mla(cfg)
    x = torch.randn(2, 12, cfg.dim, generator=torch.Generator().manual_seed(1))
    freqs = precompute_freqs_cis(cfg)
    with torch.no_grad():
        index = mla.indexer(x, mla.query_latent(x), freqs[:12], causal_mask(12, 0))  # (B, T, T)
    kth = index[:, cfg.index_topk:].topk(cfg.index_topk + 1, dim=-1).values  # rows that drop a position
    assert (kth[..., -2] > kth[..., -1]).all(), "a tie at the selection boundary: pick another seed"
    want = mla(x, freqs[:12], causal_mask(12, 0), attn_impl="naive")
    for impl in ("naive", "absorb"):
        cache = KVCache(cfg, 2, max_len=12, attn_impl=impl, n_layers=1)
        outs, pos = [], 0
        for S in chunks:
            outs.append(mla(x[:, pos:pos + S], freqs[pos:pos + S], causal_mask(S, pos), cache.layers[0], pos, impl))
            pos += S
        assert_close(torch.cat(outs, 1), want, **TOL)


def test_mqa_mode_reads_only_the_selected_latent_rows():
    """sparse_latent_attention gathers k rows of [c_kv; k_pe]: the rows it does not select may hold anything."""
    B, S, H, T, k, dc, dr = 2, 3, 4, 20, 5, 16, 8
    q_lat, q_pe = torch.randn(B, S, H, dc), torch.randn(B, S, H, dr)
    kv, pe = torch.randn(B, T, dc), torch.randn(B, T, dr)
    idx = torch.stack([torch.randperm(T)[:k] for _ in range(B * S)]).view(B, S, k)
    o, probs = sparse_latent_attention(q_lat, q_pe, kv, pe, idx, 0.25)
    assert o.shape == (B, S, H, dc) and probs.shape == (B, S, H, k)
    unused = torch.ones(B, T, dtype=torch.bool)
    unused.scatter_(1, idx.flatten(1), False)
    kv2, pe2 = kv.masked_fill(unused[..., None], float("nan")), pe.masked_fill(unused[..., None], 1e9)
    assert_close(sparse_latent_attention(q_lat, q_pe, kv2, pe2, idx, 0.25)[0], o, **TOL)
    # equals dense attention over the latent with an additive mask that keeps the same rows
    scores = (torch.einsum("bshc,btc->bsht", q_lat, kv) + torch.einsum("bshr,btr->bsht", q_pe, pe)) * 0.25
    scores = scores + sparse_mask(idx, T).unsqueeze(2)
    assert_close(torch.einsum("bsht,btc->bshc", scores.softmax(-1), kv), o, **TOL)


def test_model_generates_the_same_with_and_without_cache():
    # 16 indexer heads: with few heads ReLU often zeroes a score in all of them, and which of several tokens tied at 0
    # the top-k keeps is arbitrary (it may differ between a prefill row and a decode row)
    cfg = _cfg(n_layers=2, index_topk=4, index_n_heads=16)
    model = _seeded(Transformer(cfg), 1, std=0.1).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        for impl in ("naive", "absorb"):
            cache = model.new_cache(2, max_len=14, attn_impl=impl)
            steps = [model(tokens[:, :9], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(9, 14)]
            assert_close(torch.cat(steps, 1), full, **TOL)
            layer = cache.layers[0]
            assert layer["index_k"].shape == (2, 14, cfg.index_head_dim)


def test_cache_counts_the_indexer_keys():
    cfg = _cfg()
    v3 = cfg.replace(index_n_heads=0, index_head_dim=0, index_topk=0)
    for impl in ("naive", "absorb"):
        extra = KVCache(cfg, 1, 10, impl).nbytes(10) - KVCache(v3, 1, 10, impl).nbytes(10)
        assert extra == cfg.n_layers * 10 * cfg.index_head_dim * 4  # float32


# ---------------------------------------------------------------------------------------------- training objective
def test_kl_is_zero_when_the_indexer_matches_the_attention():
    from dsv3_ref.nn.indexer import IndexerRecord

    p = torch.softmax(torch.randn(2, 6, 6) + causal_mask(6, 0), -1)
    rec = IndexerRecord(scores=p.log() + 3.0, attn=4 * p, selected=None)  # attn: 4 heads' probabilities summed
    assert indexer_kl_loss(rec).abs() < 1e-6
    rec_off = IndexerRecord(scores=torch.zeros(2, 6, 6) + causal_mask(6, 0), attn=4 * p, selected=None)
    assert indexer_kl_loss(rec_off) > 0.01


def test_kl_in_the_sparse_stage_covers_only_the_selected_tokens():
    from dsv3_ref.nn.indexer import IndexerRecord

    T = 6
    mask = causal_mask(T, 0)
    attn = torch.softmax(torch.randn(1, T, T) + mask, -1)
    selected = torch.isfinite(mask).expand(1, T, T) & (torch.rand(1, T, T) < 0.6) | torch.eye(T, dtype=torch.bool)
    p = attn * selected
    scores = torch.randn(1, T, T) + mask
    got = indexer_kl_loss(IndexerRecord(scores=scores, attn=p, selected=selected))
    want = []
    for t in range(T):
        s = selected[0, t].nonzero().flatten()
        pt = p[0, t, s] / p[0, t, s].sum()
        want.append((pt * (pt.log() - scores[0, t, s].log_softmax(-1))).sum())
    assert_close(got, torch.stack(want).mean(), **TOL)


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_loss_trains_only_the_indexer(sparse):
    """The report detaches the indexer's input and uses the attention only as a target: the KL's gradient reaches the
    indexer's weights and nothing else (the trap: forgetting to detach trains the main model towards the indexer)."""
    cfg = _cfg(n_layers=2)
    model = _seeded(Transformer(cfg), 2, std=0.1)
    for layer in model.layers:
        layer.attn.sparse = sparse
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model(tokens)
    loss = indexer_loss(model)
    loss.backward()
    for name, p in model.named_parameters():
        if ".indexer." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # and the language-modelling loss never reaches the indexer (the selection is not differentiable)
    model.zero_grad(set_to_none=True)
    model(tokens).logsumexp(-1).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".indexer." in n)


def test_selection_recall():
    from dsv3_ref.nn.indexer import IndexerRecord

    T, k = 10, 3
    mask = causal_mask(T, 0)
    attn = torch.softmax(torch.randn(1, T, T) + mask, -1)
    perfect = IndexerRecord(scores=attn.log(), attn=attn, selected=None)
    assert selection_recall(perfect, k)["recall"] == pytest.approx(1.0)
    reverse = IndexerRecord(scores=-attn + mask, attn=attn, selected=None)
    r = selection_recall(reverse, k)
    assert r["recall"] < 1.0 and 0 < r["chance"] < 1.0
    assert r["chance"] == pytest.approx(sum(k / (t + 1) for t in range(k, T)) / (T - k))


# ---------------------------------------------------------------------------------------------- config
def test_config_round_trips_through_the_hub_fields():
    cfg = ModelConfig.from_preset("671B-V3.2")
    hf = cfg.to_hf()
    assert hf["model_type"] == "deepseek_v32" and hf["architectures"] == ["DeepseekV32ForCausalLM"]
    assert (hf["index_n_heads"], hf["index_head_dim"], hf["index_topk"]) == (64, 128, 2048)
    assert ModelConfig.from_hf(hf) == cfg
    v3 = ModelConfig.from_preset("671B")
    assert "index_topk" not in v3.to_hf() and not v3.has_indexer
    assert cfg.replace(index_n_heads=0, index_head_dim=0, index_topk=0) == v3


def test_presets():
    big, small = ModelConfig.from_preset("671B-V3.2"), ModelConfig.from_preset("small-v3.2")
    assert big.replace(index_n_heads=0, index_head_dim=0, index_topk=0) == ModelConfig.from_preset("671B")
    assert small.has_indexer and small.index_topk < small.max_seq_len


@pytest.mark.parametrize("bad, field", [
    (dict(index_n_heads=4, index_head_dim=0), "index_head_dim"),
    (dict(index_n_heads=4, index_head_dim=6), "index_head_dim"),  # smaller than the rotary part (8)
    (dict(index_n_heads=4, index_head_dim=16, index_topk=0), "index_topk"),
    (dict(index_n_heads=4, index_head_dim=16, index_topk=4, q_lora_rank=0), "q_lora_rank"),
    (dict(index_n_heads=-1), "index_n_heads"),
])
def test_invalid_indexer_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_preset("tiny", **bad)


def test_checkpoint_keys_and_the_hubs_fp8_indexer_weights(tmp_path):
    """The hub names of the indexer (`self_attn.indexer.*`, as in the official code) round-trip, and wq_b / wk stored
    as E4M3 with a weight_scale_inv, as on the hub, load dequantized."""
    from safetensors.torch import load_file, save_file

    from dsv3_ref.fp8.formats import block_dequant, block_quant
    from dsv3_ref.io.checkpoint import WEIGHTS_NAME, from_pretrained, hub_key, save_pretrained

    model = _seeded(Transformer(_cfg(n_layers=2)), 3, std=0.1)
    assert hub_key("layers.1.attn.indexer.k_norm.bias", 2) == "model.layers.1.self_attn.indexer.k_norm.bias"
    save_pretrained(model, tmp_path)
    path = tmp_path / WEIGHTS_NAME
    tensors = load_file(path)
    expected = {}
    for key in [k for k in tensors if k.endswith(("indexer.wq_b.weight", "indexer.wk.weight"))]:
        q, scale = block_quant(tensors[key])
        tensors[key], tensors[key + "_scale_inv"] = q, scale
        expected[key] = block_dequant(q, scale)
    save_file(tensors, path, metadata={"format": "pt"})
    assert len(expected) == 4
    loaded = from_pretrained(tmp_path)
    sd = loaded.state_dict()
    for key, want in expected.items():
        name = key.removeprefix("model.").replace("self_attn", "attn")
        assert torch.equal(sd[name], want), key
    assert torch.equal(sd["layers.0.attn.indexer.k_norm.bias"], model.state_dict()["layers.0.attn.indexer.k_norm.bias"])
