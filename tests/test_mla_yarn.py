"""YaRN against transformers' DeepSeek-V3 settings, and MLA's two paths through the prefill/decode phases with YaRN on.

Complements tests/test_rope.py (YaRN against the formulas and the 671B numbers of docs/facts.md),
tests/test_attention.py (naive == absorb and cached == uncached at the MLA level, positions inside the original
context) and tests/test_generate.py (prefill + decode == full forward, plain RoPE). Here:

* `rope_frequencies(cfg)` and `cfg.softmax_scale` against transformers' `ROPE_INIT_FUNCTIONS["yarn"]` inv_freq and
  `DeepseekV3Attention.scaling`, for the 671B hub settings and a few others, with YaRN active and inactive;
* the one place where the two disagree on purpose: HF applies YaRN whenever the rope type is
  "yarn", the official code (and dsv3_ref) only when max_seq_len > original_seq_len;
* whole-model prefill then decode steps (`dsv3_ref.inference.generate.prefill` / `decode_step`) with YaRN active and the
  671B rope geometry (d_r = 64, s = 40), crossing the original context length: naive == absorb at every step, and
  both == a full uncached forward.
"""

import logging
import math

import pytest
import torch
from torch.testing import assert_close

from dsv3_ref import ModelConfig, Transformer
from dsv3_ref.inference.generate import decode_step, prefill
from dsv3_ref.nn.rope import rope_frequencies

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)

# The rope_scaling block of deepseek-ai/DeepSeek-V3's config.json (docs/facts.md, Configuration)
HUB_ROPE_SCALING = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                    "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

YARN_CONFIGS = {
    "671B": lambda: ModelConfig.from_preset("671B"),  # max_seq_len 131072 > 4096
    "671B hub": lambda: ModelConfig.from_hf(
        ModelConfig.from_preset("671B").to_hf() | {"max_position_embeddings": 163840,
                                                   "rope_scaling": HUB_ROPE_SCALING}),
    "16B (mscale 0.707)": lambda: ModelConfig.from_preset("16B"),
    "tiny, s=4": lambda: ModelConfig.from_preset("tiny", original_seq_len=64, rope_factor=4.0),
    "small at 8K, s=16": lambda: ModelConfig.from_preset("small", max_seq_len=8192, rope_factor=16.0),
}
PLAIN_CONFIGS = {
    "671B at 4096": lambda: ModelConfig.from_preset("671B", max_seq_len=4096),
    "671B at 2048": lambda: ModelConfig.from_preset("671B", max_seq_len=2048),
    "tiny": lambda: ModelConfig.from_preset("tiny"),
    "small": lambda: ModelConfig.from_preset("small"),
}


def _hf_config(hf_dict: dict) -> DeepseekV3Config:
    """transformers' config, with its logger's complaint that factor != max_position_embeddings / original (our 671B
    preset: 131072 / 4096 = 32 vs s = 40; the hub file's 163840 / 4096 = 40 agrees) silenced: YaRN uses the factor."""
    logger = logging.getLogger("transformers.modeling_rope_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return DeepseekV3Config(**hf_dict)
    finally:
        logger.setLevel(level)


def _hf_scaling(hf_cfg: DeepseekV3Config) -> float:
    with torch.device("meta"):  # 187M parameters at 671B: shapes only
        return DeepseekV3Attention(hf_cfg, layer_idx=0).scaling


# ---------------------------------------------------------------------------------------------------- YaRN vs HF
@pytest.mark.parametrize("name", YARN_CONFIGS)
def test_yarn_frequencies_and_scale_match_transformers(name):
    cfg = YARN_CONFIGS[name]()
    assert cfg.yarn_active and cfg.rope_factor > 1
    hf_cfg = _hf_config(cfg.to_hf())
    assert hf_cfg.rope_parameters["rope_type"] == "yarn"
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    ours = rope_frequencies(cfg)
    assert inv_freq.shape == ours.shape == (cfg.qk_rope_head_dim // 2,)
    assert_close(ours, inv_freq.float(), rtol=1e-6, atol=0)
    # HF would also scale cos/sin by get_mscale(s, mscale) / get_mscale(s, mscale_all_dim); the official code has no
    # such factor, so it must be 1 (the two are equal for every DeepSeek checkpoint; from_hf refuses otherwise)
    assert attention_factor == 1.0
    assert DeepseekV3RotaryEmbedding(hf_cfg).attention_scaling == 1.0
    # the softmax scale: 1/sqrt(d_h + d_r) * mscale^2 in both
    assert math.isclose(cfg.softmax_scale, _hf_scaling(hf_cfg), rel_tol=1e-12)
    m = 0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1
    assert math.isclose(cfg.softmax_scale, cfg.qk_head_dim**-0.5 * m * m, rel_tol=1e-12)


def test_hub_settings_give_the_numbers_of_docs_facts():
    cfg = YARN_CONFIGS["671B hub"]()
    assert (cfg.max_seq_len, cfg.original_seq_len, cfg.rope_factor, cfg.mscale) == (163840, 4096, 40.0, 1.0)
    assert math.isclose(_hf_scaling(_hf_config(cfg.to_hf())), 0.1352337789, abs_tol=1e-10)
    # the frequencies do not depend on max_seq_len once YaRN is on
    assert torch.equal(rope_frequencies(cfg), rope_frequencies(ModelConfig.from_preset("671B")))


@pytest.mark.parametrize("name", PLAIN_CONFIGS)
def test_plain_rope_matches_transformers_when_yarn_is_inactive(name):
    cfg = PLAIN_CONFIGS[name]()
    assert not cfg.yarn_active
    hf_cfg = _hf_config(cfg.to_hf())  # to_hf writes no rope_scaling: transformers' default RoPE
    rotary = DeepseekV3RotaryEmbedding(hf_cfg)
    assert rotary.rope_type == "default" and rotary.attention_scaling == 1.0
    assert_close(rope_frequencies(cfg), rotary.inv_freq.float(), rtol=1e-6, atol=0)
    assert math.isclose(cfg.softmax_scale, cfg.qk_head_dim**-0.5, rel_tol=1e-15)
    assert math.isclose(cfg.softmax_scale, _hf_scaling(hf_cfg), rel_tol=1e-12)


def test_hf_applies_yarn_where_the_official_code_does_not():
    """The hub's rope_scaling with max_position_embeddings = 4096: transformers stretches the frequencies and
    scales the logits by mscale^2 anyway; the official code (and dsv3_ref, which follows the checkpoint's code)
    falls back to plain RoPE and 1/sqrt(192). from_hf warns about it."""
    hub = ModelConfig.from_preset("671B").to_hf() | {"max_position_embeddings": 4096,
                                                     "rope_scaling": HUB_ROPE_SCALING}
    with pytest.warns(UserWarning, match="inactive"):
        cfg = ModelConfig.from_hf(hub)
    hf_cfg = _hf_config(hub)
    hf_freqs, _ = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    assert not cfg.yarn_active
    yarn_cfg = ModelConfig.from_preset("671B")
    assert_close(hf_freqs.float(), rope_frequencies(yarn_cfg), rtol=1e-6, atol=0)  # HF: YaRN
    plain = rope_frequencies(cfg)
    assert torch.equal(plain[:11], hf_freqs[:11].float())  # the high-frequency pairs agree...
    assert_close(plain[23:] / 40, hf_freqs[23:].float(), rtol=1e-6, atol=0)  # ...the low ones differ by s
    assert math.isclose(_hf_scaling(hf_cfg), yarn_cfg.softmax_scale, rel_tol=1e-12)
    assert math.isclose(cfg.softmax_scale, 192**-0.5, rel_tol=1e-15)


# ---------------------------------------------------------------------------------------------------- prefill/decode
# The 671B rope geometry (d_r = 64, s = 40, beta 32/1, mscale 1) on the tiny model, with an original context of 16
# positions so that a short sequence runs past it (YaRN's reason to exist). max_seq_len = 16 * 40.
YARN_TINY = dict(qk_rope_head_dim=64, original_seq_len=16, max_seq_len=640, rope_factor=40.0)
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def yarn_model():
    cfg = ModelConfig.from_preset("tiny", **YARN_TINY)
    assert cfg.yarn_active and cfg.softmax_scale > cfg.qk_head_dim**-0.5
    model = Transformer(cfg)
    model.reset_parameters(seed=0)
    with torch.no_grad():  # non-trivial latent norms, so the cached latent is visibly the normalised one
        for layer in model.layers:
            layer.attn.kv_norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    return model.eval()


@pytest.mark.parametrize("prompt_len", [10, 20])  # prefill inside the original 16 positions, or already past them
def test_prefill_then_decode_equals_full_forward_both_impls(yarn_model, prompt_len):
    cfg, steps, B = yarn_model.config, 10, 2
    tokens = torch.randint(0, cfg.vocab_size, (B, prompt_len + steps), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = yarn_model(tokens)  # (B, T, V) uncached, naive
        assert_close(yarn_model(tokens, attn_impl="absorb"), full, **TOL)
    caches = {impl: yarn_model.new_cache(B, prompt_len + steps, impl) for impl in ("naive", "absorb")}
    logits = {impl: prefill(yarn_model, tokens[:, :prompt_len], cache) for impl, cache in caches.items()}
    for k in range(steps + 1):
        pos = prompt_len + k - 1  # the position whose logits we hold
        assert_close(logits["absorb"], logits["naive"], **TOL)
        assert_close(logits["naive"], full[:, pos], **TOL)
        if k == steps:
            break
        logits = {impl: decode_step(yarn_model, tokens[:, pos + 1], cache) for impl, cache in caches.items()}
        assert all(cache.seq_len == pos + 2 for cache in caches.values())
    assert prompt_len + steps > cfg.original_seq_len  # the decode steps went past the original context


def test_yarn_changes_the_output_past_the_original_context(yarn_model):
    """The same weights with YaRN off (max_seq_len = original_seq_len = 640: plain RoPE, 1/sqrt(d) scale) give
    other logits: the tests above exercise the YaRN frequencies and mscale, not plain RoPE."""
    plain = Transformer(yarn_model.config.replace(original_seq_len=640))
    plain.load_state_dict(yarn_model.state_dict())
    tokens = torch.randint(0, 259, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (plain(tokens) - yarn_model(tokens)).abs().amax(dim=-1)  # (1, 24)
    assert diff[0, 0] < 1e-5 < diff[0, 1:].min()  # position 0 attends only to itself (RoPE = identity), then not
