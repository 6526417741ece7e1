"""ModelConfig: presets, validation (ValueError naming the field), and the Hugging Face config.json crosswalk."""

import dataclasses
import json
import math
import warnings

import pytest

from dsv3_ref.config import HF_FIELDS, PRESETS, ModelConfig

# DeepSeek-V3's hub config.json (deepseek-ai/DeepSeek-V3), the fields that matter (docs/facts.md, Configuration).
V3_HUB = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "first_k_dense_replace": 3, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "initializer_range": 0.02, "hidden_act": "silu",
    "tie_word_embeddings": False, "aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1, "moe_layer_freq": 1,
    "bos_token_id": 0, "eos_token_id": 1,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}

# DeepSeek-V2-Lite's hub config.json (deepseek-ai/DeepSeek-V2-Lite): no query compression, softmax router.
V2_LITE_HUB = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "first_k_dense_replace": 1, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 1.0, "scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False,
    "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "rms_norm_eps": 1e-6, "initializer_range": 0.02, "tie_word_embeddings": False,
}


def _diff(a: ModelConfig, b: ModelConfig) -> set[str]:
    return {f.name for f in dataclasses.fields(ModelConfig) if getattr(a, f.name) != getattr(b, f.name)}


def _strict_from_hf(d):
    """from_hf with every warning an error (the hub files must load silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ModelConfig.from_hf(d)


# ---------------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates(name):
    cfg = ModelConfig.from_preset(name)
    cfg.validate()
    assert ModelConfig.from_preset(name.lower()) == cfg  # case-insensitive


def test_tiny_is_tiny_and_every_mechanism_is_live():
    import torch

    from dsv3_ref import Transformer

    cfg = ModelConfig.from_preset("tiny")
    with torch.device("meta"):
        model = Transformer(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n < 1_000_000, n
    assert cfg.vocab_size == 259
    assert cfg.n_expert_groups > 1 and cfg.n_limited_groups < cfg.n_expert_groups  # group-limited routing
    assert cfg.q_lora_rank > 0 and cfg.n_shared_experts > 0 and cfg.score_func == "sigmoid"  # q LoRA, shared, bias
    assert 0 < cfg.n_dense_layers < cfg.n_layers  # dense and MoE layers


def test_671b_preset_derived_quantities():
    cfg = ModelConfig.from_preset("671B")
    assert cfg.qk_head_dim == 192 and cfg.yarn_active and cfg.n_moe_layers == 58
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    assert math.isclose(cfg.softmax_scale, 0.1352337789, abs_tol=1e-10)


def test_unknown_preset_is_value_error():
    with pytest.raises(ValueError, match=r"unknown preset 'gpt5'.*tiny"):
        ModelConfig.from_preset("gpt5")


def test_replace_validates_and_overrides():
    cfg = ModelConfig.from_preset("tiny", n_layers=5)
    assert cfg.n_layers == 5
    assert cfg.replace(dim=32).dim == 32
    with pytest.raises(ValueError, match="n_layers"):
        cfg.replace(n_layers=0)


# ---------------------------------------------------------------------------------------------------- validation
POSITIVE_INT = ["vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "n_routed_experts",
                "n_activated_experts", "n_expert_groups", "n_limited_groups", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len"]
POSITIVE_FLOAT = ["rope_theta", "route_scale", "norm_eps", "init_std", "rope_factor"]
NON_NEGATIVE_INT = ["n_dense_layers", "n_shared_experts", "q_lora_rank", "n_mtp_layers"]


@pytest.mark.parametrize("name", POSITIVE_INT)
@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_positive_int_fields(name, bad):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        ModelConfig.from_preset("tiny", **{name: bad})


@pytest.mark.parametrize("name", POSITIVE_FLOAT)
@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_positive_float_fields(name, bad):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        ModelConfig.from_preset("tiny", **{name: bad})


@pytest.mark.parametrize("name", NON_NEGATIVE_INT)
def test_non_negative_int_fields(name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        ModelConfig.from_preset("tiny", **{name: -1})
    ModelConfig.from_preset("tiny", **{name: 0})  # zero is allowed (0 = feature off)


@pytest.mark.parametrize("overrides, field", [
    (dict(n_routed_experts=10, n_expert_groups=4), "n_routed_experts"),  # 10 experts do not split into 4 groups
    (dict(n_limited_groups=5, n_expert_groups=4), "n_limited_groups"),  # more kept groups than groups
    (dict(n_activated_experts=5), "n_activated_experts"),  # 2 kept groups x 2 experts hold only 4
    (dict(n_activated_experts=9), "n_activated_experts"),  # more than all 8 experts
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),  # RoPE rotates pairs
    (dict(score_func="relu"), "score_func"),
    (dict(n_dense_layers=4, n_layers=3), "n_dense_layers"),
    (dict(attn_impl="flash"), "attn_impl"),
    (dict(beta_fast=1, beta_slow=32), "beta_fast"),  # order swapped
    (dict(beta_fast=32, beta_slow=0), "beta_slow"),
    (dict(rope_factor=0.5), "rope_factor"),
    (dict(mscale=-0.1), "mscale"),
    (dict(n_routed_experts=4, n_expert_groups=4, n_limited_groups=2, n_activated_experts=2), "group"),  # top-2 sum
])
def test_invalid_combinations(overrides, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_preset("tiny", **overrides)


def test_error_message_names_allowed_values():
    with pytest.raises(ValueError, match=r"score_func must be one of \('softmax', 'sigmoid'\), got 'relu'"):
        ModelConfig.from_preset("tiny", score_func="relu")
    with pytest.raises(ValueError, match=r"attn_impl must be one of \('naive', 'absorb'\)"):
        ModelConfig.from_preset("tiny", attn_impl="flash")


def test_softmax_router_allows_one_expert_per_group():
    # the top-2 group score exists only with the sigmoid bias; V2's amax works with one expert per group
    ModelConfig.from_preset("tiny", score_func="softmax", n_routed_experts=4, n_expert_groups=4, n_limited_groups=2,
                            n_activated_experts=2)


# ---------------------------------------------------------------------------------------------------- dict round trip
@pytest.mark.parametrize("name", list(PRESETS))
def test_to_dict_from_dict_round_trip(name):
    cfg = ModelConfig.from_preset(name)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-serialisable
    assert ModelConfig.from_dict(d) == cfg


def test_from_dict_unknown_field():
    d = ModelConfig().to_dict() | {"hidden_size": 64, "n_expert": 3}
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['hidden_size', 'n_expert'\]"):
        ModelConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------------- Hugging Face
def test_from_hf_deepseek_v3_hub_config():
    cfg = _strict_from_hf(V3_HUB)
    preset = ModelConfig.from_preset("671B")
    # hub: 163840 positions and HF's default initializer_range 0.02; preset: 128K and the report's 0.006 (TR p.22)
    assert _diff(cfg, preset) == {"max_seq_len", "init_std"}
    assert (cfg.max_seq_len, preset.max_seq_len) == (163840, 131072)
    assert (cfg.init_std, preset.init_std) == (0.02, 0.006)
    assert cfg.replace(max_seq_len=131072, init_std=0.006) == preset
    # what matters for the numerics is identical: same YaRN frequencies (they depend on original_seq_len only)
    assert cfg.softmax_scale == preset.softmax_scale
    assert cfg.n_mtp_layers == 1 and cfg.q_lora_rank == 1536 and cfg.score_func == "sigmoid"


def test_from_hf_deepseek_v2_lite_hub_config():
    cfg = _strict_from_hf(V2_LITE_HUB)
    preset = ModelConfig.from_preset("16B")
    assert _diff(cfg, preset) <= {"max_seq_len"}
    assert cfg == preset.replace(max_seq_len=cfg.max_seq_len)
    assert cfg.q_lora_rank == 0 and cfg.score_func == "softmax" and cfg.mscale == 0.707
    assert (cfg.n_expert_groups, cfg.n_limited_groups) == (1, 1)


def test_from_hf_rope_parameters_form():
    """transformers 5 writes `rope_parameters` (with rope_theta and rope_type inside) instead of rope_scaling."""
    d = {k: v for k, v in V2_LITE_HUB.items() if k not in ("rope_scaling", "rope_theta")}
    d["rope_parameters"] = {"rope_type": "yarn", "type": "yarn", "rope_theta": 10000, "factor": 40,
                            "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                            "mscale": 0.707, "mscale_all_dim": 0.707}
    assert _strict_from_hf(d) == _strict_from_hf(V2_LITE_HUB)
    plain = {k: v for k, v in d.items()} | {"rope_parameters": {"rope_type": "default", "rope_theta": 50000.0},
                                            "max_position_embeddings": 2048}
    cfg = _strict_from_hf(plain)
    assert cfg.rope_theta == 50000.0 and not cfg.yarn_active and cfg.original_seq_len == 2048


def test_from_hf_null_defaults():
    d = dict(V3_HUB) | {"n_group": None, "topk_group": None, "first_k_dense_replace": None, "q_lora_rank": None}
    cfg = _strict_from_hf(d)
    assert (cfg.n_expert_groups, cfg.n_limited_groups, cfg.n_dense_layers, cfg.q_lora_rank) == (1, 1, 0, 0)


@pytest.mark.parametrize("name", list(PRESETS))
def test_to_hf_from_hf_round_trip(name):
    cfg = ModelConfig.from_preset(name)
    hf = cfg.to_hf()
    assert json.loads(json.dumps(hf)) == hf
    assert _strict_from_hf(hf) == cfg
    assert hf["q_lora_rank"] == (cfg.q_lora_rank or None)
    assert (hf["rope_scaling"] is not None) == cfg.yarn_active
    assert set(HF_FIELDS.values()) <= set(hf)


def test_from_hf_file_and_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V3_HUB))
    expected = _strict_from_hf(V3_HUB)
    assert ModelConfig.from_hf(tmp_path / "config.json") == expected
    assert ModelConfig.from_hf(str(tmp_path)) == expected
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig.from_hf(tmp_path / "missing")


def test_from_hf_missing_required_field():
    d = {k: v for k, v in V3_HUB.items() if k != "hidden_size"}
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf(d)


@pytest.mark.parametrize("mscale, mscale_all_dim", [(0.707, 1.0), (1.0, 0.707), (1.0, None), (None, 1.0), (0, 0)])
def test_from_hf_mscale_must_equal_mscale_all_dim(mscale, mscale_all_dim):
    # HF then rescales cos/sin by get_mscale(s, mscale) / get_mscale(s, mscale_all_dim) (or 0.1 ln s + 1 when one
    # is missing); the official code has no such factor
    rope = {k: v for k, v in V3_HUB["rope_scaling"].items() if k not in ("mscale", "mscale_all_dim")}
    rope |= {k: v for k, v in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)) if v is not None}
    with pytest.raises(ValueError, match="mscale_all_dim"):
        ModelConfig.from_hf(dict(V3_HUB) | {"rope_scaling": rope})


def test_from_hf_unsupported_rope_type():
    d = dict(V3_HUB) | {"rope_scaling": {"type": "linear", "factor": 4.0}}
    with pytest.raises(ValueError, match="'linear'"):
        ModelConfig.from_hf(d)


def test_from_hf_inactive_yarn_warns():
    d = dict(V3_HUB) | {"max_position_embeddings": 4096}
    with pytest.warns(UserWarning, match="inactive"):
        cfg = ModelConfig.from_hf(d)
    assert not cfg.yarn_active and math.isclose(cfg.softmax_scale, 192**-0.5)


def test_round_trip_through_transformers_config():
    """Our to_hf dict, loaded by transformers' DeepseekV3Config and written back (rope_parameters form)."""
    transformers = pytest.importorskip("transformers")
    for name in ("tiny", "671B"):
        cfg = ModelConfig.from_preset(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # HF warns that factor != max_position_embeddings / original
            hf = transformers.DeepseekV3Config(**cfg.to_hf()).to_dict()
        assert ModelConfig.from_hf(hf) == cfg
