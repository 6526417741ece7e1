"""Reference-output validation: the shipped outputs are a fresh regeneration, an exported reference validates, a
corrupted layer is found at exactly that layer, an independent implementation (transformers) validates through the
outputs format, and bad input is a ValueError / exit code 2."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv3_ref import ModelConfig, save_pretrained
from dsv3_ref.cli import main
from dsv3_ref.teaching import validate
from dsv3_ref.teaching.validate import REFERENCES, collect_outputs, reference_model, reference_tokens


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each reference exported once as a checkpoint folder."""
    root = tmp_path_factory.mktemp("refs")
    return {name: validate.export_reference(name, root / name) for name in REFERENCES}


def _outputs(name):
    return collect_outputs(reference_model(name), reference_tokens(name))


# ---------------------------------------------------------------------------------------------- shipped data
@pytest.mark.parametrize("name", list(REFERENCES))
def test_shipped_outputs_match_a_fresh_regeneration(name):
    shipped, fresh = validate.expected_outputs(name), validate.make_expected(name)
    assert shipped.keys() == fresh.keys()
    for key in fresh:
        assert shipped[key].dtype == fresh[key].dtype, key
        # floats within 1e-5 (the files were written on another machine); the routing indices exactly: the reference
        # inputs keep every group and top-k choice at least 4e-4 from a tie (measured), far above float32 rounding
        torch.testing.assert_close(shipped[key], fresh[key], rtol=1e-5, atol=1e-5, msg=key)
    with safe_open(str(validate.REFERENCE_DIR / f"{name}.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert ModelConfig.from_dict(json.loads(meta["config"])) == REFERENCES[name].config()


def test_shipped_outputs_are_small_and_cover_every_layer():
    files = sorted(validate.REFERENCE_DIR.glob("*.safetensors"))
    assert [f.stem for f in files] == sorted(REFERENCES)
    assert sum(f.stat().st_size for f in files) < 1_000_000  # well under the 5 MB budget
    for name in REFERENCES:
        cfg, keys = REFERENCES[name].config(), set(validate.expected_outputs(name))
        assert {k for k, _ in validate._order(cfg)} | {"tokens"} == keys


def test_references_exercise_what_they_claim():
    v3 = reference_model("v3_groups")
    tokens = reference_tokens("v3_groups")
    with torch.no_grad():
        v3(tokens)
        moe = v3.layers[1].ffn
        chosen = moe.last_routing.indices.sort(-1).values
        bias = moe.gate.bias.clone()
        moe.gate.bias.zero_()
        v3(tokens)
        unbiased = moe.last_routing.indices.sort(-1).values
        moe.gate.bias.copy_(bias)
    assert bool((bias > 0).all()) and (chosen != unbiased).any(), "the correction bias never changes the routing"
    groups = chosen.div(4, rounding_mode="floor")  # 4 experts per group
    assert max(len(set(row.tolist())) for row in groups) == 2  # top-2 groups bound the choice
    v2 = REFERENCES["v2_softmax"].config()
    assert v2.score_func == "softmax" and v2.q_lora_rank == 0
    assert reference_model("v2_softmax").layers[1].ffn.gate.bias is None
    mtp = REFERENCES["v3_yarn_mtp"].config()
    assert mtp.yarn_active and mtp.softmax_scale > mtp.qk_head_dim ** -0.5 and mtp.n_mtp_layers == 1


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", list(REFERENCES))
def test_the_exported_reference_validates(name, exported, capsys):
    assert main(["validate", str(exported[name])]) == 0
    out = capsys.readouterr().out
    assert f"validation against reference {name!r}" in out and "PASS" in out
    assert load_file(str(exported[name] / validate.TOKENS_FILE))["tokens"].equal(reference_tokens(name))


def _corrupt(src, dst, key):
    """A copy of checkpoint src with one tensor perturbed."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[key] = tensors[key] + 0.05 * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("name, key, layer", [
    ("v3_groups", "model.layers.0.mlp.up_proj.weight", 0),
    ("v3_groups", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", 1),
    ("v3_groups", "model.layers.2.mlp.shared_experts.down_proj.weight", 2),
    ("v2_softmax", "model.layers.1.self_attn.q_proj.weight", 1),
    ("v3_yarn_mtp", "model.layers.3.eh_proj.weight", 3),  # the MTP module: the main model still agrees
    ("v3_yarn_mtp", "lm_head.weight", None),
])
@pytest.mark.filterwarnings("ignore:from_pretrained.*differs from lm_head")  # the MTP layer's stale head copy
def test_a_corrupted_layer_is_reported_at_exactly_that_layer(name, key, layer, exported, tmp_path, capsys):
    folder = _corrupt(exported[name], tmp_path / "bad", key)
    report = validate.validate_checkpoint(folder)
    first = report.first_divergence
    assert not report.passed and first.layer == layer, str(report)
    before = report.entries[: report.entries.index(first)]
    assert all(e.status == "ok" for e in before) and len(before) >= (layer or 0)
    assert first.max_error is not None and first.max_error > 1e-3 or first.key.endswith(".indices")
    assert main(["validate", str(folder)]) == 1
    where = "the main logits" if layer is None else f"layer {layer}"
    assert f"FAIL: first divergence at {where}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- outputs files
def test_outputs_file_round_trip_and_divergence(tmp_path, capsys):
    outputs = _outputs("v3_groups")
    good = tmp_path / "good.safetensors"
    save_file(outputs, str(good))
    assert main(["validate", "--outputs", str(good), "--reference", "v3_groups"]) == 0
    assert "PASS: all 8 compared outputs" in capsys.readouterr().out

    bad = dict(outputs)
    bad["hidden.1"] = bad["hidden.1"].clone()
    bad["hidden.1"][1, 3, 5] += 0.5
    report = validate.compare(bad, "v3_groups")
    first = report.first_divergence
    assert (first.key, first.layer, first.index) == ("hidden.1", 1, (1, 3, 5))
    assert abs(first.max_error - 0.5) < 1e-5 and "1 of 2048 values" in first.message


def test_routing_compares_sets_and_aligned_weights():
    outputs = _outputs("v3_groups")
    perm = torch.tensor([2, 0, 3, 1])  # another order of the 4 chosen experts, weights following them
    shuffled = dict(outputs, **{k: outputs[k][:, perm] for k in ("routing.1.indices", "routing.1.weights")})
    assert validate.compare(shuffled, "v3_groups").passed
    detached = dict(outputs, **{"routing.1.weights": outputs["routing.1.weights"][:, perm]})  # weights misaligned
    first = validate.compare(detached, "v3_groups").first_divergence
    assert first.key == "routing.1.weights"
    other = outputs["routing.2.indices"].clone()
    other[7] = torch.tensor([0, 1, 2, 3]) if not torch.equal(other[7].sort().values, torch.arange(4)) else 4 + other[7]
    first = validate.compare(dict(outputs, **{"routing.2.indices": other}), "v3_groups").first_divergence
    assert first.key == "routing.2.indices" and first.index == (7,) and "1 of 32 tokens" in first.message


def test_optional_entries_may_be_absent():
    outputs = _outputs("v3_yarn_mtp")
    report = validate.compare({"logits": outputs["logits"]}, "v3_yarn_mtp")
    assert report.passed
    assert [e.key for e in report.entries if e.status == "ok"] == ["logits"]


def _transformers_outputs(model, tokens) -> dict:
    """What a user of transformers writes: logits, block outputs and router choices, collected with hooks."""
    out = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(
            lambda m, a, o, i=i: out.__setitem__(f"hidden.{i}", o[0] if isinstance(o, tuple) else o)))
        if hasattr(layer.mlp, "gate"):  # the router returns (logits, topk weights, topk indices)
            hooks.append(layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: out.update(
                {f"routing.{i}.weights": o[1], f"routing.{i}.indices": o[2]})))
    with torch.no_grad():
        out["logits"] = model(tokens).logits
    for h in hooks:
        h.remove()
    return {k: v.contiguous() for k, v in out.items()}


def test_independent_implementation_transformers_validates(exported, tmp_path):
    """transformers' DeepseekV3ForCausalLM on the exported checkpoint validates through the outputs format (it has
    no MTP module: those entries are absent)."""
    transformers = pytest.importorskip("transformers")
    for name in ("v3_groups", "v3_yarn_mtp"):
        model = transformers.DeepseekV3ForCausalLM.from_pretrained(exported[name], attn_implementation="eager",
                                                                   dtype=torch.float32).eval()
        tokens = load_file(str(exported[name] / validate.TOKENS_FILE))["tokens"]
        path = tmp_path / f"{name}.safetensors"
        save_file(_transformers_outputs(model, tokens), str(path))
        report = validate.validate_outputs(path, name)
        assert report.passed, str(report)
        assert sum(e.status == "ok" for e in report.entries) == 8


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_a_value_error(tmp_path, exported):
    with pytest.raises(ValueError, match="unknown reference 'nope'; allowed"):
        validate.reference_model("nope")
    with pytest.raises(ValueError, match="no such file"):
        validate.validate_outputs(tmp_path / "missing.safetensors", "v3_groups")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        validate.validate_outputs(tmp_path / "junk.safetensors", "v3_groups")
    outputs = _outputs("v3_groups")
    with pytest.raises(ValueError, match="unknown key.*hidden.9.*layers 0..2"):
        validate.compare(dict(outputs, **{"hidden.9": outputs["hidden.0"]}), "v3_groups")
    with pytest.raises(ValueError, match="unknown key.*'extra'.*keys are logits"):
        validate.compare(dict(outputs, extra=outputs["hidden.0"]), "v3_groups")
    with pytest.raises(ValueError, match="'logits'.*missing"):
        validate.compare({"hidden.0": outputs["hidden.0"]}, "v3_groups")
    with pytest.raises(ValueError, match="tokens' differ"):
        validate.compare(dict(outputs, tokens=reference_tokens("v2_softmax")), "v3_groups")
    with pytest.raises(ValueError, match="not 'v2_softmax'"):
        validate.validate_checkpoint(exported["v3_groups"], reference="v2_softmax")
    other = reference_model("v3_groups")
    other.config = other.config.replace(route_scale=1.5)
    save_pretrained(other, tmp_path / "other")
    with pytest.raises(ValueError, match=r"matches no shipped reference.*'v3_groups', differs in \['route_scale'\]"):
        validate.validate_checkpoint(tmp_path / "other")


@pytest.mark.parametrize("argv, fragment", [
    (["validate"], "exactly one of"),
    (["validate", "x", "--list"], "exactly one of"),
    (["validate", "--outputs", "f.safetensors"], "needs --reference"),
    (["validate", "--outputs", "missing.safetensors", "--reference", "v3_groups"], "no such file"),
    (["validate", "--outputs", "missing.safetensors", "--reference", "nope"], "unknown reference"),
    (["validate", "--export-reference", "nope", "out"], "unknown reference"),
    (["validate", "no_such_dir"], "no such checkpoint folder"),
    (["validate", "--list", "--atol", "-1"], "must be >= 0"),
])
def test_cli_bad_input_exits_2(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err


def test_cli_list(capsys):
    assert main(["validate", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REFERENCES)
