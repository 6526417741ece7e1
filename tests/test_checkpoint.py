"""Hub-format checkpoints (dsv3_ref.io.checkpoint): round trips, shards, FP8 block scales, MTP, and every bad input."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3_ref import ModelConfig, Transformer
from dsv3_ref.fp8.formats import block_dequant
from dsv3_ref.io.checkpoint import (
    INDEX_NAME,
    WEIGHTS_NAME,
    from_pretrained,
    hub_key,
    hub_state_dict,
    key_map,
    our_key,
    save_pretrained,
)
from dsv3_ref.objectives.mtp import mtp_logits

TOKENS = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))


def _model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", **overrides))
    with torch.no_grad():  # non-trivial norms and correction biases, so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
        for b in model.buffers():
            b.copy_(0.1 * torch.rand_like(b))
    return model


def _rewrite(folder, edit) -> None:
    """Apply edit(dict) to the tensors of folder/model.safetensors (a test helper, not the package's code path)."""
    path = os.path.join(folder, WEIGHTS_NAME)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _assert_same(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------ key mapping
def test_key_map_examples_and_inverse():
    model = _model(n_mtp_layers=1)
    n = model.config.n_layers
    km = key_map(model)
    assert km["embed.weight"] == "model.embed_tokens.weight"
    assert km["head.weight"] == "lm_head.weight"
    assert km["layers.0.attn_norm.weight"] == "model.layers.0.input_layernorm.weight"
    assert km["layers.0.ffn.w2.weight"] == "model.layers.0.mlp.down_proj.weight"
    assert km["layers.1.attn.wkv_a.weight"] == "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    assert km["layers.1.ffn.gate.bias"] == "model.layers.1.mlp.gate.e_score_correction_bias"
    assert km["layers.2.ffn.experts.7.w3.weight"] == "model.layers.2.mlp.experts.7.up_proj.weight"
    assert km["layers.2.ffn.shared_experts.w1.weight"] == "model.layers.2.mlp.shared_experts.gate_proj.weight"
    assert km["mtp.0.norm.weight"] == f"model.layers.{n}.shared_head.norm.weight"
    assert km["mtp.0.eh_proj.weight"] == f"model.layers.{n}.eh_proj.weight"
    assert km["mtp.0.block.attn.wq_b.weight"] == f"model.layers.{n}.self_attn.q_b_proj.weight"
    assert len(set(km.values())) == len(km)
    for ours, hub in km.items():
        assert our_key(hub, n) == ours
    assert hub_key("layers.0.attn.wq.weight", n) == "model.layers.0.self_attn.q_proj.weight"
    assert our_key(f"model.layers.{n}.embed_tokens.weight", n) is None  # an MTP copy of the embedding
    with pytest.raises(ValueError, match="no hub name"):
        hub_key("layers.0.attn.nonsense.weight", n)


# ------------------------------------------------------------------ round trips
def test_round_trip_is_exact(tmp_path):
    model = _model(n_mtp_layers=1)
    save_pretrained(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", WEIGHTS_NAME]  # no temp files left behind
    stored = load_file(tmp_path / WEIGHTS_NAME)
    assert stored["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in stored  # per-expert layout, as on the hub
    assert torch.equal(stored["model.layers.3.embed_tokens.weight"], stored["model.embed_tokens.weight"])
    assert torch.equal(stored["model.layers.3.shared_head.head.weight"], stored["lm_head.weight"])
    assert "model.layers.3.shared_head.norm.weight" in stored
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1

    loaded = from_pretrained(tmp_path)
    assert loaded.config == model.config
    _assert_same(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))
    assert all(not p.is_meta for p in loaded.state_dict().values())


def test_bf16_load_keeps_gate_bias_fp32(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.embed.weight.dtype == torch.bfloat16 and loaded.layers[0].attn_norm.weight.dtype == torch.bfloat16
    assert loaded.layers[1].ffn.gate.bias.dtype == torch.float32
    assert torch.equal(loaded.layers[1].ffn.gate.bias, model.layers[1].ffn.gate.bias)
    assert torch.equal(loaded.head.weight, model.head.weight.bfloat16())
    with pytest.raises(ValueError, match="dtype must be one of"):
        from_pretrained(tmp_path, dtype=torch.int8)


def test_sharded_round_trip(tmp_path):
    model = _model(n_mtp_layers=1)
    limit = 40_000
    save_pretrained(model, tmp_path, max_shard_bytes=limit)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / WEIGHTS_NAME).exists()
    assert set(index["weight_map"]) == set(hub_state_dict(model))
    for shard in shards:
        tensors = load_file(tmp_path / shard)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert nbytes <= limit or len(tensors) == 1
    loaded = from_pretrained(tmp_path)
    _assert_same(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))
    save_pretrained(model, tmp_path)  # back to one file: the stale shards and index are removed
    assert sorted(os.listdir(tmp_path)) == ["config.json", WEIGHTS_NAME]
    with pytest.raises(ValueError, match="max_shard_bytes"):
        save_pretrained(model, tmp_path, max_shard_bytes=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_shard_bytes", [None, 40_000], ids=["single-file", "sharded"])
def test_reload_reproduces_the_forward_bit_for_bit(tmp_path, dtype, max_shard_bytes):
    """A property the loader guarantees on one machine: the reloaded model's logits equal the saved model's exactly.
    safetensors hands out views at arbitrary offsets into its buffer (in shards often 24 or 32 bytes off 64-byte
    alignment), and MKL takes another kernel path for misaligned operands (a 1e-7 difference); the loader copies
    every tensor into fresh, aligned storage."""
    model = _model(n_mtp_layers=1).to(dtype)
    save_pretrained(model, tmp_path, max_shard_bytes=max_shard_bytes)
    loaded = from_pretrained(tmp_path, dtype=dtype)
    _assert_same(model, loaded)
    for name, t in loaded.state_dict().items():
        assert t.is_contiguous() and t.data_ptr() % 64 == 0, name
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))
        pairs = zip(mtp_logits(loaded, TOKENS), mtp_logits(model, TOKENS), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)


def test_fused_expert_layout_is_accepted(tmp_path):
    """transformers' in-memory layout: experts.gate_up_proj (E, 2I, H) = cat(gate, up), experts.down_proj (E, H, I)."""
    model = _model()
    save_pretrained(model, tmp_path)
    E = model.config.n_routed_experts

    def fuse(t):
        for layer in (1, 2):
            p = f"model.layers.{layer}.mlp.experts."
            gate = [t.pop(f"{p}{e}.gate_proj.weight") for e in range(E)]
            up = [t.pop(f"{p}{e}.up_proj.weight") for e in range(E)]
            down = [t.pop(f"{p}{e}.down_proj.weight") for e in range(E)]
            t[p + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up, strict=True)])
            t[p + "down_proj"] = torch.stack(down)

    _rewrite(tmp_path, fuse)
    loaded = from_pretrained(tmp_path)
    _assert_same(model, loaded)

    _rewrite(tmp_path, lambda t: t.update({"model.layers.1.mlp.experts.down_proj": torch.zeros(E, 64, 31)}))
    with pytest.raises(ValueError, match=r"mlp\.experts\.down_proj: checkpoint \(8, 64, 31\), "
                                         r"model expects \(8, 64, 32\)"):
        from_pretrained(tmp_path)


# ------------------------------------------------------------------ FP8
def _quantize_block_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference 128 x 128 block quantization: scale = amax/448 per (zero-padded) tile. Returns the FP8 weight,
    its scale_inv (R, C) and the exact dequantized weight, computed tile by tile."""
    rows, cols = w.shape
    R, C = math.ceil(rows / block), math.ceil(cols / block)
    padded = torch.zeros(R * block, C * block)
    padded[:rows, :cols] = w
    tiles = padded.view(R, block, C, block)
    scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)  # (R, C)
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn)  # (R, b, C, b)
    deq = (q.float() * scale[:, None, :, None]).view(R * block, C * block)[:rows, :cols]
    return q.view(R * block, C * block)[:rows, :cols].contiguous(), scale, deq


def test_block_dequant_ragged_blocks():
    w = torch.randn(130, 260)
    q, scale, deq = _quantize_block_fp8(w)
    assert scale.shape == (2, 3)
    out = block_dequant(q, scale)
    assert out.dtype == torch.float32 and torch.equal(out, deq)
    i, j = 129, 259  # the last, ragged tile (1 x 4 elements) uses scale[1, 2]
    assert out[i, j] == q[i, j].float() * scale[1, 2]
    with pytest.raises(ValueError, match=r"scale_inv has shape \(2, 2\), expected \(2, 3\)"):
        block_dequant(q, scale[:, :2])


FP8_MODULES = ("self_attn.", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.experts.", "mlp.shared_experts.")


def test_fp8_checkpoint_is_dequantized(tmp_path):
    """Quantize the linears the hub stores in FP8 (attention, dense MLP, experts; dims 136, 160, 272 are ragged,
    moe_inter_dim 128 is whole), store weight_scale_inv, and load: the weights equal the block dequantization."""
    cfg = dict(dim=160, inter_dim=272, moe_inter_dim=128, n_layers=2, n_dense_layers=1, n_heads=2, q_lora_rank=136,
               kv_lora_rank=64, n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2)
    model = _model(**cfg)
    save_pretrained(model, tmp_path)
    expected = {}

    def quantize(t):
        for key in list(t):
            if key.endswith(".weight") and t[key].dim() == 2 and any(m in key for m in FP8_MODULES):
                q, scale, deq = _quantize_block_fp8(t[key])
                t[key], t[key + "_scale_inv"] = q, scale
                expected[key] = deq

    _rewrite(tmp_path, quantize)
    stored = load_file(tmp_path / WEIGHTS_NAME)
    assert stored["model.layers.0.mlp.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert stored["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (3, 2)  # 272 x 160
    assert stored["model.layers.1.self_attn.q_a_proj.weight_scale_inv"].shape == (2, 2)  # 136 x 160
    assert len(expected) == 2 * 5 + 3 + 4 * 3 + 3  # attention x 2 layers, dense MLP, 4 experts, shared expert

    loaded = from_pretrained(tmp_path)
    sd, original = loaded.state_dict(), model.state_dict()
    names = {hub_key(name, 2): name for name in sd}
    for key, deq in expected.items():
        w, w0 = sd[names[key]], original[names[key]]
        assert w.dtype == torch.float32 and torch.equal(w, deq), key
        # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, absolute <= 2^-10 * scale in the subnormal range
        assert ((w - w0).abs() <= w0.abs() / 16 + w0.abs().max() / 448 * 2**-10 + 1e-12).all(), key
    assert torch.equal(sd["embed.weight"], original["embed.weight"])  # BF16/FP32 tensors pass through
    reference = _model(**cfg)  # the dequantized weights in storage of its own: the loaded forward is the same, bitwise
    reference.load_state_dict({**original, **{names[key]: deq for key, deq in expected.items()}})
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), reference(TOKENS))
    bf16 = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(bf16.layers[0].ffn.w1.weight, expected["model.layers.0.mlp.gate_proj.weight"].bfloat16())

    _rewrite(tmp_path, lambda t: t.pop("model.layers.0.mlp.up_proj.weight_scale_inv"))
    with pytest.raises(ValueError, match=r"without their '_scale_inv' companion 1: "
                                         r"\[model\.layers\.0\.mlp\.up_proj\.weight\]"):
        from_pretrained(tmp_path)


# ------------------------------------------------------------------ MTP
def test_mtp_loaded_or_skipped(tmp_path):
    model = _model(n_mtp_layers=1)
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)  # config asks for MTP: loaded
    assert loaded.config.n_mtp_layers == 1
    _assert_same(model, loaded)

    with pytest.warns(UserWarning, match=r"skipping the MTP layer\(s\) \[model\.layers\.3\] \(load_mtp=False\)"):
        skipped = from_pretrained(tmp_path, load_mtp=False)
    assert skipped.config.n_mtp_layers == 0 and len(skipped.mtp) == 0
    with torch.no_grad():
        assert torch.equal(skipped(TOKENS), model(TOKENS))

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.warns(UserWarning, match=r"declares no MTP module .* \[model\.layers\.3\] are skipped"):
        assert from_pretrained(tmp_path).config.n_mtp_layers == 0
    with pytest.raises(ValueError, match="load_mtp=True but config.json declares num_nextn_predict_layers=0"):
        from_pretrained(tmp_path, load_mtp=True)


def test_extra_mtp_layer_is_unexpected(tmp_path):
    save_pretrained(_model(n_mtp_layers=2), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \d+: \[model\.layers\.4\."):
        from_pretrained(tmp_path)


def test_mtp_declared_but_not_stored(tmp_path):
    """A config with num_nextn_predict_layers > 0 over weights without the layer (what transformers'
    DeepseekV3ForCausalLM.save_pretrained writes): built without MTP, with a warning; load_mtp=True requires it."""
    save_pretrained(_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    with pytest.warns(UserWarning, match="declares num_nextn_predict_layers=1 but the checkpoint stores no"):
        assert from_pretrained(tmp_path).config.n_mtp_layers == 0
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \(hub names\) \d+: \[model\.layers\.3\.enorm\.weight"):
        from_pretrained(tmp_path, load_mtp=True)


def test_mtp_duplicates_are_checked_not_loaded(tmp_path):
    model = _model(n_mtp_layers=1)
    save_pretrained(model, tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.3.shared_head.head.weight"))
    _assert_same(model, from_pretrained(tmp_path))  # the copies are optional
    _rewrite(tmp_path, lambda t: t["model.layers.3.embed_tokens.weight"].mul_(2))
    with pytest.warns(UserWarning, match=r"model\.layers\.3\.embed_tokens\.weight differs from model\.embed_tokens"):
        loaded = from_pretrained(tmp_path)
    assert torch.equal(loaded.embed.weight, model.embed.weight)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.3.embed_tokens.weight": torch.zeros(3, 3)}))
    with pytest.raises(ValueError, match=r"mis-shaped .*model\.layers\.3\.embed_tokens\.weight: checkpoint "
                                         r"\(3, 3\), but it duplicates model\.embed_tokens\.weight \(259, 64\)"):
        from_pretrained(tmp_path)


# ------------------------------------------------------------------ bad checkpoints
@pytest.fixture
def saved(tmp_path):
    save_pretrained(_model(), tmp_path)
    return tmp_path


def test_missing_keys(saved):
    _rewrite(saved, lambda t: [t.pop(k) for k in list(t) if ".experts." in k or k == "model.norm.weight"])
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \(hub names\) 49: \[model\.layers\.1\.mlp\.experts\.0"
                                         r"\.gate_proj\.weight, .*\.\.\. \(39 more\)\]") as e:
        from_pretrained(saved)
    assert "model.norm.weight" not in str(e.value)  # only the first 10 names are listed...
    with pytest.warns(UserWarning, match=r"missing 49: .* \(kept randomly initialised\)"):
        model = from_pretrained(saved, strict=False)  # ...and strict=False keeps a fresh initialisation
    assert torch.equal(model.norm.weight, torch.ones(64))


def test_unexpected_keys(saved):
    _rewrite(saved, lambda t: t.update({"model.layers.0.mlp.gate.weight": torch.zeros(8, 64),
                                        "model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) 2: \[model\.extra\.weight, "
                                         r"model\.layers\.0\.mlp\.gate\.weight\]"):
        from_pretrained(saved)
    with pytest.warns(UserWarning, match=r"unexpected 2: .* \(ignored\)"):
        from_pretrained(saved, strict=False)


def test_wrong_shape(saved):
    _rewrite(saved, lambda t: t.update({"model.layers.1.self_attn.kv_b_proj.weight": torch.zeros(128, 31)}))
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"mis-shaped tensor\(s\) 1: \[model\.layers\.1\.self_attn\.kv_b_proj"
                                             r"\.weight: checkpoint \(128, 31\), model expects \(128, 32\)\]"):
            from_pretrained(saved, strict=strict)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig().to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(ValueError, match=r"found only \['pytorch_model\.bin'\]; only safetensors"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="only safetensors checkpoints are supported"):
        from_pretrained(tmp_path / "pytorch_model.bin")


def test_corrupt_safetensors(saved):
    (saved / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!garbage!")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
        from_pretrained(saved)


def test_truncated_safetensors(saved):
    data = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: "):
        from_pretrained(saved)


def test_missing_config(saved):
    os.remove(saved / "config.json")
    with pytest.raises(ValueError, match=r"no config\.json"):
        from_pretrained(saved)


def test_missing_weights_and_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig().to_hf()))
    with pytest.raises(ValueError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        from_pretrained(tmp_path / "absent")


def test_bad_index(tmp_path):
    save_pretrained(_model(), tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.9.extra.weight"] = first
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{first}: the index lists tensor\(s\) this file lacks, 1: "
                                         r"\[model\.layers\.9\.extra\.weight\]"):
        from_pretrained(tmp_path)
    os.remove(tmp_path / first)
    with pytest.raises(ValueError, match=rf"lists shard file\(s\) that do not exist: \['{first}'\]"):
        from_pretrained(tmp_path)
    (tmp_path / INDEX_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: not a valid safetensors index"):
        from_pretrained(tmp_path)


def test_meta_model_cannot_be_saved(tmp_path):
    with torch.device("meta"):
        model = Transformer(ModelConfig())
    with pytest.raises(ValueError, match="meta device"):
        save_pretrained(model, tmp_path)
