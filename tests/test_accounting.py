"""Parameter / KV-cache / FLOP accounting: the exact numbers of docs/facts.md (Parameters, KV cache, FLOPs), in
closed form and from the model built on the meta device, plus the `info` CLI."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dsv3_ref import PRESETS, KVCache, ModelConfig, Transformer
from dsv3_ref.cli import main
from dsv3_ref.nn import model as model_module
from dsv3_ref.nn.moe import set_expert_impl
from dsv3_ref.systems import accounting as acc

# docs/facts.md, Parameters: the 671B model by component (the gate bias counted as a parameter, as the official code
# stores it)
FULL_671B = {
    "embed": 926_679_040,
    "attention": 61 * 187_107_328,  # 11,413,547,008
    "block_norms": 61 * 14_336,
    "dense_mlp": 3 * 396_361_728,  # 1,189,085,184
    "routed_experts": 653_908_770_816,
    "shared_experts": 2_554_331_136,
    "gate_weight": 58 * 1_835_008,
    "gate_bias": 14_848,
    "final_norm": 7_168,
    "head": 926_679_040,
    "mtp": 11_610_068_224,
}


@pytest.fixture(scope="module")
def cfg671():
    return ModelConfig.from_preset("671B")


@pytest.fixture(scope="module")
def meta671(cfg671):
    return acc.check_counts(cfg671, full=True)  # the whole model, ~10 s: built once for the module


# ------------------------------------------------------------------------------------------ 671B, closed form
def test_671b_mla_per_projection(cfg671):
    mla = acc.mla_params(cfg671)
    assert mla == {"wq_a": 11_010_048, "q_norm": 1_536, "wq_b": 37_748_736, "wkv_a": 4_128_768, "kv_norm": 512,
                   "wkv_b": 16_777_216, "wo": 117_440_512, "total": 187_107_328}


def test_671b_building_blocks(cfg671):
    p = acc.layer_params(cfg671)
    assert p["mla"] == 187_107_328
    assert p["dense_mlp"] == 396_361_728
    assert p["expert"] == 44_040_192
    assert p["shared_experts"] == 44_040_192
    assert p["routed_experts"] == 11_274_289_152
    assert (p["gate_weight"], p["gate_bias"]) == (1_835_008, 256)
    assert p["block_norms"] == 14_336
    assert p["dense_layer"] == 583_483_392
    assert p["moe_layer"] == 11_507_286_272
    assert p["moe_layer_activated"] == 585_318_656
    assert p["eh_proj"] == 102_760_448
    assert p["mtp_module"] == 11_610_068_224


def test_671b_totals_closed_form(cfg671):
    counts = acc.param_counts(cfg671)
    assert counts == FULL_671B
    assert acc.total_params(cfg671) == 671_026_419_200
    assert acc.mtp_params(cfg671) == 11_610_068_224
    assert counts["gate_weight"] + counts["gate_bias"] == 106_445_312
    assert counts["block_norms"] + counts["final_norm"] == 881_664  # norms outside MLA


def test_671b_activated_three_conventions(cfg671):
    assert acc.activated_params(cfg671, head=False) == 35_698_939_392
    assert acc.activated_params(cfg671) == 36_625_618_432  # the report's "37B"
    assert acc.activated_params(cfg671, embedding=True) == 37_552_297_472
    assert acc.mtp_activated_params(cfg671) == 688_100_608


def test_671b_softmax_scale(cfg671):
    assert cfg671.softmax_scale == pytest.approx(0.1352337789, abs=1e-10)


# ------------------------------------------------------------------------------------------ 671B, meta device
def test_671b_meta_device_agrees(meta671):
    assert meta671 == FULL_671B
    assert sum(meta671[k] for k in acc.MAIN_COMPONENTS) == 671_026_419_200
    assert meta671["mtp"] == 11_610_068_224


def test_671b_small_models_give_the_full_builds_counts(cfg671, meta671):
    """The default: 4 models of at most 6 layers, extrapolated to 3 dense + 58 MoE layers (what `info` checks)."""
    counts = acc.meta_param_counts(cfg671)
    assert counts == meta671 and list(counts) == list(acc.COMPONENTS)
    assert acc.check_counts(cfg671) == meta671


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "671B"])  # 671B: above, with the module's build
def test_small_models_give_the_full_builds_counts(preset):
    cfg = ModelConfig.from_preset(preset)
    assert acc.meta_param_counts(cfg) == acc.meta_param_counts(cfg, full=True) == acc.param_counts(cfg)


def test_the_small_models_built(monkeypatch):
    """(1, 1), one more layer of each kind, then the check at (3, 3); a kind the config has none of stays at 0."""
    built = []
    real = acc._meta_build_counts

    def recording(cfg):
        built.append((cfg.n_dense_layers, cfg.n_moe_layers, cfg.n_mtp_layers))
        return real(cfg)

    monkeypatch.setattr(acc, "_meta_build_counts", recording)
    for overrides, layers in [({"n_mtp_layers": 2}, [(1, 1), (2, 1), (1, 2), (3, 3)]),
                              ({"n_dense_layers": 0}, [(0, 1), (0, 2), (0, 3)]),
                              ({"n_dense_layers": 3}, [(1, 0), (2, 0), (3, 0)])]:
        built.clear()
        cfg = ModelConfig.from_preset("tiny", **overrides)
        assert acc.meta_param_counts(cfg) == acc.param_counts(cfg)
        assert built == [(*n, cfg.n_mtp_layers) for n in layers]


def test_small_models_check_the_counts_are_linear(monkeypatch):
    """A block whose parameters depended on its layer id (here: one of layer_id + 1 values in the attention) would
    make the counts quadratic in the layer count: the fourth small model sees it."""
    init = model_module.Block.__init__

    def init_with_a_layer_sized_parameter(self, layer_id, cfg):
        init(self, layer_id, cfg)
        self.attn.extra = torch.nn.Parameter(torch.empty(layer_id + 1))

    monkeypatch.setattr(model_module.Block, "__init__", init_with_a_layer_sized_parameter)
    cfg = ModelConfig.from_preset("tiny")
    with pytest.raises(RuntimeError, match=r"not linear in the layer counts at .* \(3, 3\): attention: predicted"):
        acc.meta_param_counts(cfg)
    with pytest.raises(RuntimeError, match="attention: closed form"):
        acc.check_counts(cfg, full=True)


# ------------------------------------------------------------------------------------------ V2 and V2-Lite
@pytest.mark.parametrize("preset, total, activated", [
    ("16B", 15_706_484_224, 2_451_435_008),
    ("236B", 235_741_434_880, 20_851_512_320),
])
def test_v2_totals_closed_form_and_meta(preset, total, activated):
    cfg = ModelConfig.from_preset(preset)
    assert acc.total_params(cfg) == total
    assert acc.activated_params(cfg) == activated  # "2.4B" / "21B": body + head
    meta = acc.check_counts(cfg)
    assert sum(meta[k] for k in acc.MAIN_COMPONENTS) == total
    assert meta["gate_bias"] == 0 and meta["mtp"] == 0  # softmax scoring: no correction bias


# ------------------------------------------------------------------------------------------ small configs
VARIANTS = [
    {},
    {"q_lora_rank": 0},
    {"n_shared_experts": 0},
    {"n_mtp_layers": 2},
    {"score_func": "softmax"},
    {"n_dense_layers": 0},
    {"n_dense_layers": 3},
    {"q_lora_rank": 0, "n_shared_experts": 2, "n_mtp_layers": 1, "score_func": "softmax", "n_expert_groups": 1,
     "n_limited_groups": 1},
]


def test_meta_build_leaves_torch_as_it_was():
    """meta_param_counts skips nn.Linear / nn.Embedding initialisation and pauses the garbage collector only inside."""
    import gc

    linear_init, embedding_init = torch.nn.Linear.reset_parameters, torch.nn.Embedding.reset_parameters
    assert gc.isenabled()
    acc.meta_param_counts(ModelConfig.from_preset("tiny"))
    with pytest.raises(RuntimeError, match="inside"), acc._shapes_only():
        assert not gc.isenabled()
        raise RuntimeError("inside")
    assert gc.isenabled()
    assert torch.nn.Linear.reset_parameters is linear_init and torch.nn.Embedding.reset_parameters is embedding_init
    torch.manual_seed(0)
    weight = torch.nn.Linear(4, 3, bias=False).weight
    torch.manual_seed(0)
    assert torch.equal(weight, torch.nn.init.kaiming_uniform_(torch.empty(3, 4), a=5**0.5))  # initialised as usual


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "tiny")
def test_small_configs_agree_both_ways(overrides):
    cfg = ModelConfig.from_preset("tiny", **overrides)
    closed = acc.param_counts(cfg)
    assert acc.check_counts(cfg) == closed
    assert acc.meta_param_counts(cfg, full=True) == closed
    model = Transformer(cfg)  # a real model: the same grouping, and every tensor is counted once
    assert acc.count_by_component(model) == closed
    n_tensors = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert sum(closed.values()) == n_tensors
    assert acc.total_params(cfg) + acc.mtp_params(cfg) == n_tensors
    if cfg.n_mtp_layers:
        assert closed["mtp"] == sum(p.numel() for p in model.mtp.parameters()) + sum(
            b.numel() for b in model.mtp.buffers())


def test_tiny_variant_details():
    cfg = ModelConfig.from_preset("tiny", q_lora_rank=0)
    assert set(acc.mla_params(cfg)) == {"wq", "wkv_a", "kv_norm", "wkv_b", "wo", "total"}
    assert acc.layer_params(ModelConfig.from_preset("tiny", n_shared_experts=0))["shared_experts"] == 0
    assert acc.param_counts(ModelConfig.from_preset("tiny", score_func="softmax"))["gate_bias"] == 0
    two = ModelConfig.from_preset("tiny", n_mtp_layers=2)
    assert acc.mtp_params(two) == 2 * acc.layer_params(two)["mtp_module"]
    assert acc.mtp_activated_params(two) == 2 * acc.mtp_activated_params(two.replace(n_mtp_layers=1))


def test_component_of_rejects_unknown_names():
    assert acc.component_of("layers.4.ffn.gate.bias") == "gate_bias"
    assert acc.component_of("mtp.0.block.ffn.experts.3.w1.weight") == "mtp"
    with pytest.raises(ValueError, match="cannot classify"):
        acc.component_of("layers.0.ffn.router.weight")


# ------------------------------------------------------------------------------------------ KV cache
def test_kv_cache_671b(cfg671):
    assert acc.kv_cache_elements(cfg671, "mla") == 576
    assert acc.kv_cache_bytes(cfg671, "mla") == 70_272
    assert acc.kv_cache_bytes(cfg671, "mha") == 3_997_696
    assert acc.kv_cache_bytes(cfg671, "naive") == 4_997_120
    assert acc.kv_cache_bytes(cfg671, "mla", seq_len=131_072) == 9_210_691_584
    assert acc.kv_cache_bytes(cfg671, "mha", seq_len=131_072) == 523_986_010_112
    assert acc.kv_cache_bytes(cfg671, "mla", dtype_bytes=4, seq_len=10, batch_size=3) == 70_272 * 2 * 10 * 3
    assert acc.kv_cache_bytes(cfg671, "gqa", n_kv_heads=128) == acc.kv_cache_bytes(cfg671, "mha")
    assert acc.kv_cache_bytes(cfg671, "gqa", n_kv_heads=1) == acc.kv_cache_bytes(cfg671, "mqa") == 31_232
    assert acc.kv_cache_elements(cfg671, "mla") / acc.kv_cache_elements(cfg671, "mqa") == 2.25


@pytest.mark.parametrize("preset", ["tiny", "671B"])
def test_kv_cache_matches_the_models_cache(preset):
    cfg = ModelConfig.from_preset(preset)
    for impl, scheme in (("absorb", "mla"), ("naive", "naive")):
        cache = KVCache(cfg, batch_size=2, max_len=16, attn_impl=impl, dtype=torch.bfloat16, device="meta")
        assert cache.nbytes(16) == acc.kv_cache_bytes(cfg, scheme, dtype_bytes=2, seq_len=16, batch_size=2)


def test_kv_cache_bad_input(cfg671):
    with pytest.raises(ValueError, match="scheme must be one of"):
        acc.kv_cache_bytes(cfg671, "paged")
    with pytest.raises(ValueError, match="n_kv_heads"):
        acc.kv_cache_bytes(cfg671, "gqa")
    with pytest.raises(ValueError, match="n_kv_heads"):
        acc.kv_cache_bytes(cfg671, "gqa", n_kv_heads=129)
    with pytest.raises(ValueError, match="dtype_bytes"):
        acc.kv_cache_bytes(cfg671, "mla", dtype_bytes=0)


# ------------------------------------------------------------------------------------------ FP8 storage
def test_checkpoint_bytes_671b(cfg671):
    """The hub's FP8 checkpoint, reconstructed (docs/facts.md, Parameters): 688,574,839,360 bytes."""
    hub = acc.checkpoint_bytes(cfg671)
    assert hub["total"] == 688_574_839_360
    assert hub["scale_inv"] == 4 * 41_540_496
    main = acc.checkpoint_bytes(cfg671, mtp=False)
    assert main["e4m3"] == 669_065_609_216 and main["bf16"] == 2 * 1_960_795_136
    assert main["fp32"] + main["scale_inv"] == 4 * 40_853_080  # the official fp8-mode model's fp32 tensors
    bf16 = acc.checkpoint_bytes(cfg671, fp8=False, mtp=False)
    assert bf16 == {"e4m3": 0, "bf16": 2 * (671_026_419_200 - 14_848), "fp32": 4 * 14_848, "scale_inv": 0,
                    "total": 2 * 671_026_419_200 + 2 * 14_848}
    assert sum(o * i for o, i in acc.fp8_linear_shapes(cfg671, moe=False)[:5]) == 187_107_328 - 1_536 - 512


@pytest.mark.parametrize("overrides", [dict(n_mtp_layers=1, dim=160, inter_dim=272, moe_inter_dim=136),
                                       dict(q_lora_rank=0, n_shared_experts=0)])
def test_checkpoint_bytes_match_the_converted_model(overrides):
    """Closed form vs the tensors the hub format stores for a model converted by `convert_to_fp8`: every FP8Linear
    weight is E4M3 with a ceil(out/128) x ceil(in/128) scale, the gate biases fp32, the rest (MTP copies too) BF16."""
    from dsv3_ref.fp8.linear import FP8Linear, convert_to_fp8
    from dsv3_ref.io.checkpoint import hub_state_dict

    cfg = ModelConfig.from_preset("tiny", **overrides)
    with torch.device("meta"):
        model = Transformer(cfg)
    convert_to_fp8(model)
    sd = dict(model.named_parameters())
    want = {"e4m3": 0, "bf16": 0, "fp32": 0, "scale_inv": 0}
    fp8_names = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    for name, t in model.state_dict().items():
        if name.removesuffix(".weight") in fp8_names:
            want["e4m3"] += t.numel()
            want["scale_inv"] += 4 * -(-t.shape[0] // 128) * -(-t.shape[1] // 128)
        elif name.endswith("gate.bias"):
            want["fp32"] += 4 * t.numel()
        else:
            want["bf16"] += 2 * t.numel()
    n_copies = len(hub_state_dict(model)) - len(model.state_dict())  # each MTP layer's embedding and head
    assert n_copies == 2 * cfg.n_mtp_layers and sd["embed.weight"].numel() == sd["head.weight"].numel()
    want["bf16"] += 2 * n_copies * sd["embed.weight"].numel()
    assert acc.checkpoint_bytes(cfg) == {**want, "total": sum(want.values())}
    if cfg.dim > 128:  # ragged 128 x 128 blocks: more than one scale per matrix
        assert want["scale_inv"] > 4 * len(fp8_names)


def test_fp8_linear_inputs_match_the_model():
    """Per token, the distinct input tensors of the FP8 linear layers in a forward pass (w1 and w3, wq_a and wkv_a
    share theirs) hold exactly `fp8_linear_inputs(cfg)["total"]` values; per layer type too."""
    from dsv3_ref.fp8.linear import FP8Linear, convert_to_fp8

    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg)
    convert_to_fp8(model)
    seen: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (layer, input); holding the input keeps its id unique

    def record(name: str, x: torch.Tensor) -> None:
        seen.setdefault(id(x), (name, x))

    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            m.register_forward_hook(lambda mod, args, out, name=name: record(name, args[0]))
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        model(tokens)
    per_layer = [0] * cfg.n_layers
    for name, x in seen.values():
        per_layer[int(name.split(".")[1])] += x.numel()
    n = tokens.numel()
    want = acc.fp8_linear_inputs(cfg)
    assert sum(per_layer) == want["total"] * n
    assert per_layer[0] == (want["attention"] + want["dense_mlp"]) * n
    assert per_layer[1:] == [(want["attention"] + want["moe"]) * n] * (cfg.n_layers - 1)


# ------------------------------------------------------------------------------------------ FLOPs
def test_flops_671b(cfg671):
    n = acc.matmul_params_per_token(cfg671)
    norms = 61 * (1_536 + 512 + 14_336) + 7_168
    assert n == 36_625_618_432 - norms - 14_848 == 36_624_596_992
    assert acc.attention_flops(cfg671, 1, "naive") == 81_920
    assert acc.attention_flops(cfg671, 1, "absorb") == 278_528
    fwd = acc.forward_flops_per_token(cfg671, 4096)
    assert fwd == 2 * n + 61 * 81_920 * 4096
    assert acc.training_flops_per_token(cfg671, 4096) == 3 * fwd
    assert acc.training_flops_per_token(cfg671, 4096, mtp=True) == 3 * (
        fwd + acc.mtp_forward_flops_per_token(cfg671, 4096))
    with pytest.raises(ValueError, match="attn_impl"):
        acc.attention_flops(cfg671, 8, "flash")
    with pytest.raises(ValueError, match="ctx"):
        acc.attention_flops(cfg671, -1)


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": 0}, {"n_shared_experts": 0, "score_func": "softmax"}])
@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_flops_match_torch_flop_counter(overrides, attn_impl):
    """torch's FlopCounterMode (matmuls only) on the tiny model agrees exactly with the closed form."""
    cfg = ModelConfig.from_preset("tiny", **overrides)
    model = Transformer(cfg)
    set_expert_impl(model, "loop")  # FlopCounterMode has no formula for grouped_mm (torch 2.13); it sees the loop's
    B, S = 2, 5
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(tokens[:, :S], attn_impl=attn_impl)  # prefill: every query scores all S positions (masked or not)
    assert counter.get_total_flops() == B * S * acc.forward_flops_per_token(cfg, S, attn_impl)
    cache = model.new_cache(B, S + 1, attn_impl)
    model(tokens[:, :S], cache=cache)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(tokens[:, S:], cache=cache)  # one decode step attending to S + 1 positions
    assert counter.get_total_flops() == B * acc.forward_flops_per_token(cfg, S + 1, attn_impl)


# ------------------------------------------------------------------------------------------ report and CLI
def test_report_671b(cfg671):
    text = acc.report(cfg671, name="671B")
    for s in ["671,026,419,200", "35,698,939,392", "36,625,618,432", "37,552,297,472", "11,610,068,224",
              "70,272", "3,997,696", "187,107,328", "0.1352337789"]:
        assert s in text


def test_cli_info_671b(capsys):
    assert main(["info", "671B", "--no-check-meta"]) == 0
    out = capsys.readouterr().out
    assert "671,026,419,200" in out and "36,625,618,432" in out and "agrees exactly" not in out


def test_cli_info_checks_meta_by_default(capsys):
    assert main(["info", "tiny"]) == 0
    assert "agrees exactly" in capsys.readouterr().out


def test_cli_info_reads_hf_config(tmp_path, capsys):
    cfg = ModelConfig.from_preset("small")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    for arg in (tmp_path, tmp_path / "config.json"):
        assert main(["info", str(arg), "--ctx", "64"]) == 0
        out = capsys.readouterr().out
        assert f"{acc.total_params(cfg):,}" in out and "attending to 64 positions" in out


def test_cli_info_bad_model(capsys):
    assert main(["info", "700B"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model '700B'") and "'671B'" in err


def test_training_state_bytes_by_hand():
    """tiny: 217,616 parameters (MTP none), of which 2 MoE layers x 8 experts x 3 x 64 x 32 routed and 2 x 8 bias
    buffers; 16 bytes per parameter, 4 per bias; EP = 8 keeps one expert per layer."""
    training_state_bytes = acc.training_state_bytes
    cfg = ModelConfig.from_preset("tiny")
    routed, biases = 2 * 8 * 3 * 64 * 32, 2 * 8
    one = training_state_bytes(cfg)
    assert one == {"replicated": (217_616 - routed - biases) * 16 + biases * 4, "routed_experts": routed * 16,
                   "total": (217_616 - biases) * 16 + biases * 4}
    assert training_state_bytes(cfg, ep_size=8)["routed_experts"] == routed * 16 // 8
    with pytest.raises(ValueError, match="ep_size must be a positive divisor of n_routed_experts"):
        training_state_bytes(cfg, ep_size=3)


def test_scaling_doc_memory_table_is_the_accounting_modules():
    """docs/scaling.md's per-rank memory table is `training_memory_table` over the presets, not typed in."""
    import re
    from pathlib import Path

    from dsv3_ref.config import PRESETS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "scaling.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- memory-table[^\n]*-->\n(.*?)\n<!-- /memory-table -->", doc, re.S).group(1)
    assert table == acc.training_memory_table({name: ModelConfig.from_preset(name) for name in PRESETS})
