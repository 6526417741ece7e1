"""Crash-safe checkpoints (issue 14 §1): a process SIGKILLed after each step of the save sequence
(`dsv3_ref.io.atomic.STEPS`) leaves a checkpoint that the next load or resume finds by itself, with a warning, and
training then ends exactly where the uninterrupted run does. The kill happens in a forked child (the hook
`set_step_hook` SIGKILLs it after the named step), so each case costs a fork, not an interpreter start-up."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from dsv3_ref import ModelConfig, Transformer, from_pretrained, save_pretrained
from dsv3_ref.data import CorpusData
from dsv3_ref.io import atomic
from dsv3_ref.train import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork")
SMALL = dict(steps=4, batch_size=2, seq_len=16, warmup_steps=1, eval_every=0, eval_batches=1, log_every=1)
COMPLETE = atomic.STEPS[atomic.STEPS.index("completed"):]


@pytest.fixture(scope="module")
def data() -> CorpusData:
    return CorpusData(seed=0, n_bytes=20_000)


def _trainer(data, seed=0) -> Trainer:
    model = Transformer(ModelConfig.from_preset("tiny"))
    model.reset_parameters(seed)
    return Trainer(model, TrainConfig(**SMALL), data, progress=False)


def _killed_at(step: str, action) -> None:
    """Run action() in a forked child that SIGKILLs itself right after save step `step`."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            atomic.set_step_hook(lambda s: s == step and os.kill(os.getpid(), signal.SIGKILL))
            action()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"not killed at {step!r}"


def test_the_hook_sees_every_step_of_an_overwriting_save(tmp_path):
    seen = []
    model = Transformer(ModelConfig.from_preset("tiny"))
    save_pretrained(model, tmp_path / "ck")
    atomic.set_step_hook(seen.append)
    try:
        save_pretrained(model, tmp_path / "ck")
    finally:
        atomic.set_step_hook(None)
    assert tuple(seen) == atomic.STEPS


@pytest.mark.parametrize("step", atomic.STEPS)
def test_train_killed_while_saving_resumes_to_the_same_result(data, tmp_path, step):
    straight = _trainer(data)
    straight.fit(stop_at=2, out=tmp_path / "ck")
    straight.fit(stop_at=4)  # the uninterrupted run, in memory; its save at step 4 is killed
    _killed_at(step, lambda: straight.save(tmp_path / "ck"))
    resumed = _trainer(data)
    if step in ("written", "synced", "new_moved_in", "old_removed"):  # nothing to finish, or only leftovers
        resumed.resume(tmp_path / "ck")
    else:
        with pytest.warns(UserWarning, match="a save was interrupted"):
            resumed.resume(tmp_path / "ck")
    assert resumed.step == (4 if step in COMPLETE else 2)  # the newest complete checkpoint
    assert os.listdir(tmp_path) == ["ck"]  # leftovers removed
    resumed.fit(out=tmp_path / "ck")
    assert resumed.step == 4 and resumed.history == straight.history
    for (name, a), b in zip(resumed.model.state_dict().items(), straight.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(resumed.optimizer.state.values(), straight.optimizer.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def _models():
    old, new = Transformer(ModelConfig.from_preset("tiny")), Transformer(ModelConfig.from_preset("tiny", dim=48))
    old.reset_parameters(0)
    new.reset_parameters(1)
    return old, new


def _same(a: Transformer, b: Transformer) -> bool:
    return a.config == b.config and all(torch.equal(x, y) for x, y in
                                        zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("step", atomic.STEPS)
def test_save_pretrained_killed_while_overwriting(tmp_path, step):
    old, new = _models()
    save_pretrained(old, tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("kept")
    _killed_at(step, lambda: save_pretrained(new, tmp_path / "m"))
    loaded = from_pretrained(tmp_path / "m") if step not in ("completed", "old_moved_aside") else None
    if loaded is None:
        with pytest.warns(UserWarning, match="a save was interrupted"):
            loaded = from_pretrained(tmp_path / "m")
    assert _same(loaded, new if step in COMPLETE else old)  # old config with old weights, or new with new
    assert (tmp_path / "m" / "README.md").read_text() == "kept"
    assert os.listdir(tmp_path) == ["m"]


@pytest.mark.parametrize("step", ["written", "synced", "completed", "new_moved_in"])
def test_save_pretrained_killed_while_creating(tmp_path, step):
    _, new = _models()
    _killed_at(step, lambda: save_pretrained(new, tmp_path / "m"))
    if step == "completed":
        with pytest.warns(UserWarning, match="a save was interrupted"):
            assert _same(from_pretrained(tmp_path / "m"), new)
    elif step in COMPLETE:
        assert _same(from_pretrained(tmp_path / "m"), new)
    else:
        with pytest.raises(ValueError, match="no such checkpoint folder"):
            from_pretrained(tmp_path / "m")
    assert os.listdir(tmp_path) == (["m"] if step in COMPLETE else [])


def test_cli_train_killed_with_nothing_at_out(tmp_path):
    """The worst instant, end to end: the old checkpoint moved aside, the new one not yet in place."""
    ck = str(tmp_path / "ck")
    args = ["train", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
            "--eval-batches", "1", "--save-every", "1", "--out", ck, "--no-progress"]
    code = ("import os, signal, sys; from dsv3_ref.io import atomic; from dsv3_ref.cli import main; "
            "atomic.set_step_hook(lambda s: s == 'old_moved_aside' and os.kill(os.getpid(), signal.SIGKILL)); "
            "main(sys.argv[1:])")
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert not os.path.exists(ck)  # the save at step 2 was killed between its two renames
    from dsv3_ref.cli import main

    with pytest.warns(UserWarning, match="a save was interrupted after its new checkpoint was complete"):
        assert main(["train", "--resume", ck, "--out", ck, "--no-progress"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["ck"]
