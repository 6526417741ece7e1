"""DeepSeek-V3.2-Exp in the accounting: the indexer's parameters (closed form = the meta-device model), its key cache,
the FP8 latent cache of the serving stack (656 bytes), the attention cost of V3 vs V3.2 and the crossover points,
and the attention error that the FP8 latent cache causes."""

import pytest
import torch

from dsv3_ref import KVCache, ModelConfig, Transformer
from dsv3_ref.fp8 import formats as fp8
from dsv3_ref.nn.attention import causal_mask
from dsv3_ref.systems import accounting as acc

V32 = ModelConfig.from_preset("671B-V3.2")
V3 = ModelConfig.from_preset("671B")


def test_indexer_parameters_at_full_scale():
    p = acc.indexer_params(V32)
    assert p == {"wq_b": 1536 * 64 * 128, "wk": 7168 * 128, "k_norm": 256, "weights_proj": 7168 * 64,
                 "total": 13_959_424}
    assert acc.mla_params(V32)["total"] == acc.mla_params(V3)["total"] + 13_959_424 == 201_066_752
    assert acc.total_params(V32) - acc.total_params(V3) == 61 * 13_959_424
    assert acc.indexer_params(V3)["total"] == 0


@pytest.mark.parametrize("name", ["small-V3.2", "671B-V3.2"])
def test_closed_form_matches_the_meta_model(name):
    acc.check_counts(ModelConfig.from_preset(name))  # raises if any component differs


def test_latent_and_indexer_cache_bytes():
    assert acc.latent_cache_bytes(V3, "bf16") == 1152 and acc.latent_cache_bytes(V3, "fp8") == 656
    assert acc.index_key_bytes(V32, "bf16") == 256 and acc.index_key_bytes(V32, "fp8") == 132
    assert acc.index_key_bytes(V3, "fp8") == 0
    assert acc.cache_bytes_per_token(V3) == acc.kv_cache_bytes(V3, "mla") == 70_272
    assert acc.cache_bytes_per_token(V32, "bf16") == 61 * 1408 and acc.cache_bytes_per_token(V32, "fp8") == 61 * 788
    with pytest.raises(ValueError, match="format"):
        acc.latent_cache_bytes(V3, "int4")


def test_the_model_cache_agrees_with_the_accounting():
    cfg = ModelConfig.from_preset("small-V3.2")
    cache = KVCache(cfg, 1, 100, "absorb")
    assert cache.nbytes(100) == 100 * 2 * acc.cache_bytes_per_token(cfg, "bf16")  # float32 = 2 x bf16


def test_attention_cost_at_full_scale():
    ctx = 131072
    v3_decode = acc.attention_cost(V3, ctx, "decode")
    assert v3_decode == {"flops": acc.attention_flops(V3, ctx, "absorb"), "bytes": ctx * 1152}
    assert acc.attention_cost(V3, ctx, "prefill")["flops"] == acc.attention_flops(V3, ctx, "naive")
    v32 = acc.attention_cost(V32, ctx, "decode")
    indexer = 2 * 64 * 129 * ctx
    assert v32["flops"] == indexer + acc.attention_flops(V3, 2048, "absorb") + 2 * (13_959_424 - 256)
    assert v32["bytes"] == ctx * 256 + 2048 * 1152
    assert acc.attention_cost(V32, 1000, "decode")["bytes"] == 1000 * (256 + 1152)  # short: nothing dropped
    assert v3_decode["flops"] / v32["flops"] > 13 and v3_decode["bytes"] / v32["bytes"] > 4


def test_crossover_points():
    assert acc.dsa_crossover(V32, "decode", "flops") == 2284
    assert acc.dsa_crossover(V32, "decode", "bytes") == 2634
    assert acc.dsa_crossover(V32, "prefill", "flops") == 9148
    for phase, metric in (("decode", "flops"), ("decode", "bytes"), ("prefill", "flops")):
        c = acc.dsa_crossover(V32, phase, metric)
        dense = acc.dense_config(V32)
        assert acc.attention_cost(V32, c, phase)[metric] < acc.attention_cost(dense, c, phase)[metric]
        assert acc.attention_cost(V32, c - 1, phase)[metric] >= acc.attention_cost(dense, c - 1, phase)[metric]
    with pytest.raises(ValueError, match="no indexer"):
        acc.dsa_crossover(V3)


def test_forward_flops_count_the_indexer_and_the_selection():
    ctx = 8192
    per_layer = acc.forward_flops_per_token(V32, ctx) - 2 * acc.matmul_params_per_token(V32)
    assert per_layer == 61 * (2 * 64 * 129 * ctx + acc.attention_flops(V3, 2048))
    assert acc.matmul_params_per_token(V32) - acc.matmul_params_per_token(V3) == 61 * (13_959_424 - 256)


def test_report_prints_v3_vs_v32_at_4k_32k_128k():
    text = acc.report(V32, name="671B-V3.2")
    for needle in ("ctx 4,096", "ctx 32,768", "ctx 131,072", "decode GFLOP", "prefill GFLOP", "FP8 serving layout",
                   "+ indexer keys"):
        assert needle in text
    assert "ctx 131,072" not in acc.report(V3)


@torch.no_grad()
def test_fp8_latent_cache_error():
    """Storing the latent c_kv as E4M3 in 1 x 128 tiles with power-of-two scales (FlashMLA's serving layout; the RoPE
    part stays exact) perturbs the absorbed attention output by about a percent. Simulated as the official demo does
    (quantise and dequantise the latent right after kv_norm), here with a forward hook on kv_norm."""
    cfg = ModelConfig.from_preset("small", kv_lora_rank=256)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    mla = model.layers[0].attn
    x = model.layers[0].attn_norm(model.embed(torch.randint(0, cfg.vocab_size, (2, 64))))
    freqs, mask = model.freqs_cis(x.device)[:64], causal_mask(64, 0)
    cache = KVCache(cfg, 2, 64, "absorb", n_layers=1)
    exact = mla(x, freqs, mask, cache.layers[0], 0, "absorb")
    handle = mla.kv_norm.register_forward_hook(lambda m, i, out: fp8.fake_quantize(out, "1x128", scale_fmt="ue8m0"))
    try:
        q_cache = KVCache(cfg, 2, 64, "absorb", n_layers=1)
        quantized = mla(x, freqs, mask, q_cache.layers[0], 0, "absorb")
    finally:
        handle.remove()
    kv, q_kv = cache.layers[0]["kv"], q_cache.layers[0]["kv"]
    assert torch.equal(q_kv, fp8.fake_quantize(kv, "1x128", scale_fmt="ue8m0"))  # the cache holds E4M3 values
    assert torch.equal(q_cache.layers[0]["pe"], cache.layers[0]["pe"])  # RoPE part untouched
    rel_kv = ((q_kv - kv).norm() / kv.norm()).item()
    rel_out = ((quantized - exact).norm() / exact.norm()).item()
    print(f"relative error: latent {rel_kv:.4f}, attention output {rel_out:.4f}")
    assert 0.005 < rel_kv < 0.05 and 0 < rel_out < 0.05
