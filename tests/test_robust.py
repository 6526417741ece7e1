"""Issue 14, everything but the crash tests (tests/test_crash_safety.py) and the fuzz suite (tests/test_fuzz.py):
paths that stay inside the checkpoint, the output folder checked before training, silent wrong results turned into
errors, a ValueError naming the file and field instead of a traceback, FP8 edge cases, and one file-permission
rule."""

import json
import os
import stat

import pytest

from dsv3_ref import ModelConfig, Transformer, from_pretrained, save_pretrained
from dsv3_ref.cli import main
from dsv3_ref.data import CorpusData
from dsv3_ref.io.checkpoint import INDEX_NAME, WEIGHTS_NAME
from dsv3_ref.teaching import validate
from dsv3_ref.train import TrainConfig, Trainer
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

