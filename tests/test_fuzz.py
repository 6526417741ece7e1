"""Property-based fuzzing (issue 14 §8, hypothesis): config dicts, mutated checkpoint folders (headers, tensors,
index, config, train_state), CLI arguments and FP8 quantizer inputs. Every failure must be a ValueError (or an
argparse exit) that names what is wrong: never another exception, never silent NaN weights, never a lost
checkpoint. Derandomized (the same examples on every run, so CI is reproducible) and bounded by max_examples."""

import json
import math
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3_ref import ModelConfig, Transformer, from_pretrained, save_pretrained
from dsv3_ref.cli import main
from dsv3_ref.data import CorpusData
from dsv3_ref.fp8.formats import dequantize, fake_quantize, quantize
from dsv3_ref.nn.rope import rope_frequencies
from dsv3_ref.train import TrainConfig, Trainer
from dsv3_ref.train.trainer import TRAIN_STATE_NAME

FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])

# values a careless or hostile config, index or state might hold
ODD = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([0, -1, 2**40, 2**64]),
                st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "yarn", "64", "nan"]),
                st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.sampled_from(["type", "factor"]),
                                                                         st.integers(0, 3), max_size=2))
HF = ModelConfig.from_preset("tiny").to_hf()
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
ABSENT = object()


def _mutated(base: dict, changes: dict) -> dict:
    return {k: v for k, v in {**base, **changes}.items() if v is not ABSENT}


config_changes = st.dictionaries(st.sampled_from(sorted(HF) + ["rope_scaling"]), st.one_of(ODD, st.just(ABSENT)),
                                 max_size=4)
yarn_changes = st.dictionaries(st.sampled_from(sorted(YARN)), st.one_of(ODD, st.just(ABSENT)), max_size=3)


# ---------------------------------------------------------------------------------------------- configs
@settings(FUZZ, max_examples=300)
@given(changes=config_changes, yarn=st.one_of(st.none(), yarn_changes))
def test_config_dicts(changes, yarn):
    hf = _mutated(HF, changes)
    if yarn is not None:
        hf = {**hf, "max_position_embeddings": 256, "rope_scaling": _mutated(YARN, yarn)}
    try:
        cfg = ModelConfig.from_hf(hf)
    except ValueError as e:
        assert str(e).startswith("from_hf: ") and len(str(e)) > len("from_hf: ")
        return
    assert math.isfinite(cfg.softmax_scale) and cfg.softmax_scale > 0
    if cfg.qk_rope_head_dim <= 1024:
        assert torch.isfinite(rope_frequencies(cfg)).all()


@settings(FUZZ, max_examples=20)
@given(text=st.one_of(st.text(max_size=40), st.sampled_from(["{", "[]", "null", '{"hidden_size": 64}', "1e999"])))
def test_config_files(tmp_path, text):
    (tmp_path / "config.json").write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"config\.json"):
        ModelConfig.from_hf(tmp_path)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model, saved once as one file and once as an index + shards."""
    root = tmp_path_factory.mktemp("fuzz")
    model = Transformer(ModelConfig.from_preset("tiny"))
    save_pretrained(model, root / "single")
    save_pretrained(model, root / "sharded", max_shard_bytes=150_000)
    return root


def _copy(src) -> str:
    dst = tempfile.mkdtemp(prefix="fuzz-")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def _load_or_value_error(folder: str) -> None:
    """from_pretrained loads finite weights, or raises ValueError; the folder is never removed."""
    try:
        model = from_pretrained(folder)
    except ValueError as e:
        assert str(e)
    else:
        assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    assert os.path.isdir(folder)


@settings(FUZZ, max_examples=40)
@given(offset=st.integers(0, 2**20), data=st.binary(min_size=1, max_size=8), truncate=st.booleans(),
       which=st.sampled_from(["single", "sharded"]))
def test_corrupted_weight_files(saved, offset, data, truncate, which):
    folder = _copy(saved / which)
    try:
        name = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[0]
        path = os.path.join(folder, name)
        raw = bytearray(open(path, "rb").read())
        offset %= len(raw)
        raw = raw[:offset] if truncate else raw[:offset] + data + raw[offset + len(data):]
        open(path, "wb").write(bytes(raw))
        _load_or_value_error(folder)
    finally:
        shutil.rmtree(folder)


@settings(FUZZ, max_examples=60)
@given(changes=st.dictionaries(st.integers(0, 500), st.one_of(ODD, st.sampled_from(
    ["/etc/passwd", "../x.safetensors", "model-00001-of-00002.safetensors", "config.json", "."]), st.just(ABSENT)),
    max_size=3), top=st.one_of(st.none(), ODD))
def test_mutated_index(saved, changes, top):
    folder = _copy(saved / "sharded")
    try:
        index_file = os.path.join(folder, "model.safetensors.index.json")
        index = json.load(open(index_file))
        keys = sorted(index["weight_map"])
        for i, value in changes.items():
            key = keys[i % len(keys)]
            if value is ABSENT:
                index["weight_map"].pop(key, None)
            else:
                index["weight_map"][key] = value
        json.dump(index if top is None else {"weight_map": top}, open(index_file, "w"))
        _load_or_value_error(folder)
    finally:
        shutil.rmtree(folder)


@settings(FUZZ, max_examples=60)
@given(changes=config_changes)
def test_mutated_config_over_saved_weights(saved, changes):
    folder = _copy(saved / "single")
    try:
        json.dump(_mutated(HF, changes), open(os.path.join(folder, "config.json"), "w"))
        _load_or_value_error(folder)
    finally:
        shutil.rmtree(folder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained") / "ck"
    _trainer().fit(stop_at=1, out=folder)
    return folder


def _trainer() -> Trainer:
    model = Transformer(ModelConfig.from_preset("tiny"))
    model.reset_parameters(0)
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, eval_every=0, eval_batches=1)
    return Trainer(model, cfg, CorpusData(seed=0, n_bytes=20_000), progress=False)


TENSOR_VALUES = st.one_of(
    st.sampled_from([torch.tensor(-5), torch.tensor(2**40), torch.tensor(1.5), torch.zeros(3), torch.zeros(0),
                     torch.zeros(7, dtype=torch.uint8), torch.tensor([float("nan")]), torch.zeros(2, 2)]),
    st.just(ABSENT))
META_VALUES = st.sampled_from(["{}", "[]", "null", "1", '"x"', "[3, [1, 2], null]", "{", '{"a": "b"}', '[{"a": 1}]'])


@settings(FUZZ, max_examples=15)
@given(tensors=st.dictionaries(st.integers(0, 100), TENSOR_VALUES, max_size=3),
       meta=st.dictionaries(st.sampled_from(["format", "model_config", "python_random", "history",
                                             "log_accumulator"]), META_VALUES, max_size=2))
def test_mutated_train_state(trained, tensors, meta):
    folder = _copy(trained)
    try:
        file = os.path.join(folder, TRAIN_STATE_NAME)
        with safe_open(file, framework="pt") as f:
            old_meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        keys = sorted(state)
        for i, value in tensors.items():
            key = keys[i % len(keys)]
            if value is ABSENT:
                state.pop(key, None)
            else:
                state[key] = value.clone()
        save_file(state, file, metadata={**old_meta, **meta})
        trainer = _trainer()
        try:
            trainer.resume(folder)
        except ValueError as e:
            assert TRAIN_STATE_NAME in str(e) or "checkpoint" in str(e)
        else:
            trainer.train_step()  # a state that loads also trains
    finally:
        shutil.rmtree(folder)


# ---------------------------------------------------------------------------------------------- CLI
NASTY = st.sampled_from(["0", "-1", "1", "2", "inf", "-inf", "nan", "1e23", str(10**23), "", "abc", "0.5", "1e-40"])
TRAIN_FLAGS = ["--lr", "--min-lr", "--warmup-steps", "--eps", "--grad-clip", "--seed", "--threads", "--eval-every",
               "--save-every", "--log-every", "--eval-batches", "--weight-decay", "--precision", "--grad-accum"]


def _run(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return main(argv)
    except SystemExit as e:  # argparse: a usage line and exit 2
        return e.code
    finally:
        torch.set_num_threads(threads)


@settings(FUZZ, max_examples=12)
@given(flags=st.dictionaries(st.sampled_from(TRAIN_FLAGS), NASTY, max_size=2))
def test_train_arguments(tmp_path_factory, flags):
    out = tmp_path_factory.mktemp("cli") / "ck"
    argv = ["train", "--preset", "tiny", "--steps", "1", "--batch-size", "1", "--seq-len", "8", "--eval-batches", "1",
            "--out", str(out), "--no-progress", *[x for kv in flags.items() for x in kv]]
    code = _run(argv)
    assert code in (0, 2)
    if code == 0:
        assert torch.isfinite(from_pretrained(out).embed.weight).all()


@settings(FUZZ, max_examples=15)
@given(flags=st.dictionaries(st.sampled_from(["--max-new-tokens", "--temperature", "--top-p", "--seed"]), NASTY,
                             max_size=3), prompt=st.text(max_size=8))
def test_generate_arguments(saved, flags, prompt):
    code = _run(["generate", str(saved / "single"), "--prompt", prompt, "--max-new-tokens", "2",
                 *[x for kv in flags.items() for x in kv]])
    assert code in (0, 2)


@settings(FUZZ, max_examples=30)
@given(argv=st.lists(st.sampled_from(["--atol", "--rtol", "--reference", "--outputs", "--list", "tiny", "0", "-1",
                                      "nan", "/nonexistent", "--export-reference", "info", "--ctx", "671B"]),
                     max_size=5), command=st.sampled_from(["validate", "info"]))
def test_validate_and_info_arguments(argv, command):
    args = [command, *argv] + (["--no-check-meta"] if command == "info" else [])
    assert _run(args) in (0, 1, 2)


# ---------------------------------------------------------------------------------------------- FP8
FLOATS = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 448.0, 3.4e38, -3.4e38]))


@settings(FUZZ, max_examples=80)
@given(shape=st.lists(st.integers(0, 140), min_size=0, max_size=3), fill=st.lists(FLOATS, min_size=1, max_size=8),
       block=st.sampled_from(["1x128", "128x128", "tensor", "row", "128x1", (2, 3), (0, 1), "bad"]),
       fmt=st.sampled_from(["e4m3", "e5m2", "e3m4"]), scale_fmt=st.sampled_from([None, "ue8m0", "x"]),
       amax_floor=st.one_of(st.sampled_from([1e-4, 1e-12]), FLOATS))
def test_fp8_quantizers(shape, fill, block, fmt, scale_fmt, amax_floor):
    n = math.prod(shape)
    x = torch.tensor(fill, dtype=torch.float32).repeat(n // len(fill) + 1)[:n].reshape(shape)
    try:
        q, scale = quantize(x, block, fmt, scale_fmt, amax_floor)
        fake = fake_quantize(x, block, fmt, scale_fmt, amax_floor)
    except ValueError as e:
        assert str(e)
        return
    assert q.shape == x.shape and fake.shape == x.shape
    assert torch.isfinite(scale).all() and (scale > 0).all()
    real = dequantize(q, scale, block)
    assert torch.equal(fake.isnan(), x.isnan()) and torch.equal(real.isnan(), x.isnan())
    ok = ~x.isnan()
    assert torch.equal(torch.signbit(fake[ok]), torch.signbit(real[ok]))
    small = ok & (x.abs() < 1e30)  # far from float32's max, the round trip stays finite
    assert torch.isfinite(fake[small]).all() and torch.equal(fake[small], real[small])
