"""Issue 14, everything but the crash tests (tests/test_crash_safety.py) and the fuzz suite (tests/test_fuzz.py):
paths that stay inside the checkpoint, the output folder checked before training, silent wrong results turned into
errors, a ValueError naming the file and field instead of a traceback, FP8 edge cases, and one file-permission
rule."""

import json
import os
import random
import re
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv3_ref import ModelConfig, Transformer, from_pretrained, save_pretrained
from dsv3_ref.cli import main
from dsv3_ref.data import CorpusData
from dsv3_ref.fp8.formats import ceil_pow2, dequantize, fake_quantize, quantization_error, quantize
from dsv3_ref.inference.generate import generate, sample
from dsv3_ref.io.checkpoint import INDEX_NAME, WEIGHTS_NAME
from dsv3_ref.nn.rope import precompute_freqs_cis
from dsv3_ref.teaching import validate
from dsv3_ref.train import TrainConfig, Trainer, TrainHook
from dsv3_ref.train.trainer import TRAIN_STATE_NAME

SMALL = dict(steps=2, batch_size=2, seq_len=16, warmup_steps=1, eval_every=0, eval_batches=1, log_every=1)


@pytest.fixture(scope="module")
def data() -> CorpusData:
    return CorpusData(seed=0, n_bytes=20_000)


def _trainer(data, **overrides) -> Trainer:
    model = Transformer(ModelConfig.from_preset("tiny"))
    model.reset_parameters(0)
    return Trainer(model, TrainConfig(**{**SMALL, **overrides}), data, progress=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved as an index + shards."""
    folder = tmp_path_factory.mktemp("sharded")
    save_pretrained(Transformer(ModelConfig.from_preset("tiny")), folder, max_shard_bytes=200_000)
    return folder


# ---------------------------------------------------------------------------------------------- §3 paths
@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_shard_paths_stay_inside_the_folder(saved, tmp_path, where):
    """An index naming a shard outside the folder is refused, even when that file is a valid shard."""
    ck = tmp_path / "ck"
    ck.mkdir()
    for f in saved.iterdir():
        (ck / f.name).write_bytes(f.read_bytes())
    index = json.loads((ck / INDEX_NAME).read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / shard).write_bytes((ck / shard).read_bytes())  # the same shard, outside the folder
    target = {"absolute": str(tmp_path / shard), "dotdot": f"../{shard}", "symlink": "link.safetensors"}[where]
    if where == "symlink":
        os.symlink(tmp_path / shard, ck / "link.safetensors")
    index["weight_map"] = {k: target if v == shard else v for k, v in index["weight_map"].items()}
    (ck / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"leaves the checkpoint folder"):
        from_pretrained(ck)
    assert main(["generate", str(ck), "--prompt", "a", "--max-new-tokens", "1"]) == 2


def test_weights_file_symlinked_out_is_refused(tmp_path):
    save_pretrained(Transformer(ModelConfig.from_preset("tiny")), tmp_path / "real")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_bytes((tmp_path / "real" / "config.json").read_bytes())
    os.symlink(tmp_path / "real" / WEIGHTS_NAME, tmp_path / "ck" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="leaves the checkpoint folder"):
        from_pretrained(tmp_path / "ck")


@pytest.mark.parametrize("value", [3, ["model-00001-of-00002.safetensors"], None, ""])
def test_index_values_must_be_file_names(saved, tmp_path, value):
    ck = tmp_path / "ck"
    ck.mkdir()
    for f in saved.iterdir():
        (ck / f.name).write_bytes(f.read_bytes())
    index = json.loads((ck / INDEX_NAME).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = value
    (ck / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{INDEX_NAME}.*weight_map"):
        from_pretrained(ck)


# ---------------------------------------------------------------------------------------------- §2 --out
def _train_args(out) -> list[str]:
    return ["train", "--preset", "tiny", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches",
            "1", "--out", str(out), "--no-progress"]


def test_bad_out_is_refused_before_the_first_step(data, tmp_path, monkeypatch, capsys):
    steps = []
    monkeypatch.setattr(Trainer, "train_step", lambda self: steps.append(1) or {})
    (tmp_path / "file").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("keep me")
    cases = {tmp_path / "file": "exists and is not a folder", tmp_path / "notes": "not a training checkpoint",
             tmp_path / "file" / "sub": "is a file, not a folder"}
    for out, message in cases.items():
        with pytest.raises(ValueError, match=message):
            _trainer(data).fit(out=out)
        assert main(_train_args(out)) == 2 and message in capsys.readouterr().err
    assert steps == [] and (tmp_path / "notes" / "keep.txt").read_text() == "keep me"


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root may write anywhere")
def test_out_in_an_unwritable_folder_is_refused_before_training(data, tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        with pytest.raises(ValueError, match="no permission to write"):
            _trainer(data).fit(out=tmp_path / "ro" / "ck")
    finally:
        os.chmod(tmp_path / "ro", 0o755)


def test_out_symlink_to_a_checkpoint_is_followed(data, tmp_path):
    """Documented choice: a symlink names the folder it points to; the save replaces that folder, the link stays."""
    trainer = _trainer(data)
    trainer.fit(stop_at=1, out=tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "latest")
    trainer.fit(out=tmp_path / "latest")
    assert os.path.islink(tmp_path / "latest")
    resumed = _trainer(data)
    resumed.resume(tmp_path / "latest")
    assert resumed.step == 2
    assert sorted(os.listdir(tmp_path)) == ["latest", "real"]


# ---------------------------------------------------------------------------------------------- §4 export
def test_export_reference_does_not_replace_a_training_checkpoint(data, tmp_path, capsys):
    _trainer(data).fit(stop_at=1, out=tmp_path / "ck")
    before = (tmp_path / "ck" / TRAIN_STATE_NAME).read_bytes()
    name = next(iter(validate.REFERENCES))
    assert main(["validate", "--export-reference", name, str(tmp_path / "ck")]) == 2
    assert "not a reference export" in capsys.readouterr().err
    assert (tmp_path / "ck" / TRAIN_STATE_NAME).read_bytes() == before
    _trainer(data).resume(tmp_path / "ck")  # still resumable
    assert main(["validate", "--export-reference", name, str(tmp_path / "ck"), "--overwrite"]) == 0
    assert main(["validate", "--export-reference", name, str(tmp_path / "ck")]) == 0  # an export: replaced


# ---------------------------------------------------------------------------------------------- §7 permissions
def test_one_permission_rule_for_every_file(data, tmp_path):
    old = os.umask(0o022)
    try:
        _trainer(data).fit(stop_at=1, out=tmp_path / "ck")
        validate.export_reference(next(iter(validate.REFERENCES)), tmp_path / "ref")
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [*tmp_path.glob("ck/*"), *tmp_path.glob("ref/*")]}
    assert TRAIN_STATE_NAME in " ".join(modes) and validate.TOKENS_FILE in " ".join(modes)
    assert set(modes.values()) == {0o644}, modes
    assert {stat.S_IMODE((tmp_path / d).stat().st_mode) for d in ("ck", "ref")} == {0o755}



# ---------------------------------------------------------------------------------------------- §4, §5 configs
def _hf(**changes):
    hf = ModelConfig.from_preset("tiny").to_hf()
    return {k: v for k, v in {**hf, **changes}.items() if v != "ABSENT"}


@pytest.mark.parametrize("changes, field", [
    (dict(hidden_size=None), "hidden_size is null"),
    (dict(num_hidden_layers=None), "num_hidden_layers is null"),
    (dict(max_position_embeddings=None), "max_position_embeddings must be a finite number"),
    (dict(rope_scaling="yarn"), "rope_scaling must be an object"),
    (dict(max_position_embeddings=1024, rope_scaling={"type": "yarn", "mscale": 1.0, "mscale_all_dim": 1.0}),
     "rope_scaling.factor is missing"),
    (dict(max_position_embeddings=1024, rope_scaling={"type": "yarn", "factor": 4, "beta_fast": "32",
                                                       "mscale": 1.0, "mscale_all_dim": 1.0}),
     "rope_scaling.beta_fast must be a finite number"),
    (dict(max_position_embeddings=1024, rope_scaling={"type": "yarn", "factor": 4, "beta_fast": float("inf"),
                                                       "mscale": 1.0, "mscale_all_dim": 1.0}),
     "rope_scaling.beta_fast must be a finite number"),
    (dict(max_position_embeddings=1024, rope_scaling={"type": "yarn", "factor": 4, "mscale": float("inf"),
                                                       "mscale_all_dim": float("inf")}),
     "rope_scaling.mscale must be a finite number"),
])
def test_bad_config_json_names_the_file_and_field(tmp_path, changes, field):
    (tmp_path / "config.json").write_text(json.dumps(_hf(**changes)))
    with pytest.raises(ValueError, match=rf"config\.json: .*{re.escape(field)}"):
        ModelConfig.from_hf(tmp_path)


def test_config_json_that_is_not_json_names_the_file(tmp_path):
    for text in ("{", "[1, 2]", "\xff"):
        (tmp_path / "config.json").write_text(text, encoding="latin-1")
        with pytest.raises(ValueError, match=r"config\.json: "):
            ModelConfig.from_hf(tmp_path)


def test_absent_moe_keys_take_the_transformers_defaults():
    keys = ["n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"]
    cfg = ModelConfig.from_hf(_hf(**dict.fromkeys(keys, "ABSENT")))
    assert (cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_expert_groups, cfg.n_limited_groups) == (256, 8, 8, 4)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.DeepseekV3Config()
    assert (theirs.n_routed_experts, theirs.num_experts_per_tok, theirs.n_group, theirs.topk_group) == (256, 8, 8, 4)


@pytest.mark.parametrize("field", ["mscale", "beta_fast", "rope_theta"])
def test_infinite_rope_fields_are_refused(field):
    with pytest.raises(ValueError, match=rf"{field} must be a .*finite"):
        ModelConfig.from_preset("tiny", **{field: float("inf")})


# ---------------------------------------------------------------------------------------------- §4 training
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data, tmp_path):
    class Poison(TrainHook):
        def loss_terms(self, trainer, tokens, targets, hidden, logits):
            return {"poison": torch.tensor(float("nan") if trainer.step == 1 else 0.0)}

    model = Transformer(ModelConfig.from_preset("tiny"))
    trainer = Trainer(model, TrainConfig(**{**SMALL, "save_every": 1}), data, hooks=[Poison()], progress=False)
    with pytest.raises(ValueError, match=r"step 2: the loss is nan .* last checkpoint saved is kept"):
        trainer.fit(out=tmp_path / "ck")
    fresh = _trainer(data)
    fresh.resume(tmp_path / "ck")
    assert fresh.step == 1 and all(torch.isfinite(p).all() for p in fresh.model.parameters())
    with torch.no_grad():
        model.layers[0].attn_norm.weight[0] = float("inf")
    with pytest.raises(ValueError, match="non-finite weights in .*attn_norm"):
        trainer.save(tmp_path / "ck")


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--min-lr", "inf"), ("--eps", "nan"),
                                         ("--seed", str(10**23)), ("--threads", "0")])
def test_bad_train_flags_exit_2_before_training(tmp_path, capsys, flag, value):
    assert main([*_train_args(tmp_path / "ck"), flag, value]) == 2
    assert flag.lstrip("-").replace("-", "_") in capsys.readouterr().err.replace("-", "_")
    assert not (tmp_path / "ck").exists()


def _mutate_state(folder, tensors=None, meta=None):
    file = folder / TRAIN_STATE_NAME
    with safe_open(file, framework="pt") as f:
        old_meta, old = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    new = {**old, **(tensors or {})}
    save_file({k: v for k, v in new.items() if v is not None}, file, metadata={**old_meta, **(meta or {})})


def _moment_key(folder):
    return next(k for k in load_file(folder / TRAIN_STATE_NAME) if k.endswith(".exp_avg"))


@pytest.mark.parametrize("case, field", [
    ("step -5", "step"), ("history dict", "history"), ("accumulator list", "log_accumulator"),
    ("moment shape", "optimizer state of"), ("no moment step", "optimizer state of"), ("rng size", "rng.torch"),
    ("data rng size", "rng.data"), ("python random", "python_random"),
])
def test_damaged_train_state_names_the_field(data, tmp_path, case, field):
    ck = tmp_path / "ck"
    _trainer(data).fit(stop_at=1, out=ck)
    moment = _moment_key(ck)
    change = {
        "step -5": dict(tensors={"step": torch.tensor(-5)}),
        "history dict": dict(meta={"history": "{}"}),
        "accumulator list": dict(meta={"log_accumulator": "[]"}),
        "moment shape": dict(tensors={moment: torch.zeros(3)}),
        "no moment step": dict(tensors={moment[: -len("exp_avg")] + "step": None}),
        "rng size": dict(tensors={"rng.torch": torch.zeros(7, dtype=torch.uint8)}),
        "data rng size": dict(tensors={"rng.data": torch.zeros(7, dtype=torch.uint8)}),
        "python random": dict(meta={"python_random": "[3, [1, 2], null]"}),
    }[case]
    _mutate_state(ck, **change)
    with pytest.raises(ValueError, match=rf"{TRAIN_STATE_NAME}: .*{field}"):
        _trainer(data).resume(ck)


def test_python_random_is_seeded(tmp_path):
    for out in ("a", "b"):
        random.random()  # as another interpreter (or library) would leave it: a different state
        assert main(_train_args(tmp_path / out)) == 0
    states = [safe_open(tmp_path / out / TRAIN_STATE_NAME, framework="pt").metadata()["python_random"]
              for out in ("a", "b")]
    assert states[0] == states[1]


# ---------------------------------------------------------------------------------------------- §4 generate
def test_tiny_temperature_is_greedy_and_finite():
    logits = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -7.0, 0.5]])
    for t in (1e-40, 1e-300, 5e-324):
        assert sample(logits, temperature=t).tolist() == [1, 2]
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    greedy = generate(model, [[1, 2, 3]], max_new_tokens=5)
    assert generate(model, [[1, 2, 3]], max_new_tokens=5, temperature=1e-40, seed=0) == greedy


def test_generate_seed_out_of_range(tmp_path, capsys):
    save_pretrained(Transformer(ModelConfig.from_preset("tiny")), tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "a", "--temperature", "1", "--seed", str(10**23)]) == 2
    assert "seed must be" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- §6 FP8 edges
@pytest.mark.parametrize("shape", [(0, 128), (4, 0), (0,), (2, 0, 3)])
@pytest.mark.parametrize("block", ["1x128", "128x128", "tensor"])
def test_fp8_empty_tensors(shape, block):
    x = torch.zeros(shape)
    q, scale = quantize(x, block)
    assert q.shape == x.shape and q.dtype == torch.float8_e4m3fn and scale.numel() == 0
    assert dequantize(q, scale, block).shape == x.shape and fake_quantize(x, block).shape == x.shape


def test_fp8_fake_quantize_keeps_the_sign_of_zero():
    x = torch.tensor([-0.0, 0.0, -1e-10, 1e-10, 1.0, -3.0, -1e-3, float("nan")])
    fake, real = fake_quantize(x), dequantize(*quantize(x))
    assert torch.equal(torch.signbit(fake), torch.signbit(real)) and torch.equal(fake.isnan(), real.isnan())
    finite = ~real.isnan()
    assert torch.equal(fake[finite].view(torch.int32), real[finite].view(torch.int32))
    assert torch.signbit(fake[0]) and torch.signbit(fake[2])


def test_fp8_error_of_zeros_and_huge_ue8m0_scales():
    assert quantization_error(torch.zeros(4, 128)) == 0.0
    assert ceil_pow2(torch.tensor([3.4e38])).item() == 2.0**127
    for fmt in ("e4m3", "e5m2"):
        _, scale = quantize(torch.full((1, 128), 3.4e38), fmt=fmt, scale_fmt="ue8m0", amax_floor=3.4e38)
        assert torch.isfinite(scale).all()


@pytest.mark.parametrize("floor", [float("inf"), float("nan"), 0.0, -1.0, "1e-4", True])
def test_fp8_amax_floor_must_be_finite_and_positive(floor):
    with pytest.raises(ValueError, match="amax_floor must be a finite number > 0"):
        quantize(torch.ones(2, 128), amax_floor=floor)
    with pytest.raises(ValueError, match="amax_floor"):
        fake_quantize(torch.ones(2, 128), amax_floor=floor)


# ---------------------------------------------------------------------------------------------- §7 RoPE table
def test_rope_table_is_built_for_the_positions_used(random_tokens):
    cfg = ModelConfig.from_preset("tiny", max_seq_len=1 << 22, original_seq_len=256, rope_factor=4.0)
    model = Transformer(cfg).eval()
    tokens = random_tokens(1, 2)
    with torch.no_grad():
        logits = model(tokens)
    assert model._freqs[torch.device("cpu")].shape[0] == 2  # not 4M positions (+255 MB)
    model.freqs_cis("cpu")  # the full table ...
    assert model._freqs[torch.device("cpu")].shape[0] == 1 << 22
    with torch.no_grad():
        assert torch.equal(model(tokens), logits)  # ... gives the same rotations
    for n in (1, 3, 100, 257, 1000):
        assert torch.equal(precompute_freqs_cis(cfg, n), precompute_freqs_cis(cfg, 4096)[:n])
