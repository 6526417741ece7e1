"""Data- and expert-parallel training (torchrun, 2 CPU processes, gloo) against one process on the same global batch.

One torchrun launch (tests/support/dp_worker.py) trains the tiny setup DP=2 (twice) and DP=2 + EP=2, and resumes
this process's step-2 checkpoint; this process trains the same setup alone and resumes the 2-process checkpoints.

Tolerances (float32): the losses agree to 2e-5 relative and the weights to 2e-5 absolute after 4 AdamW steps (the
gradients differ only in the order of their float sums: the mean over 2 ranks' halves vs over the whole batch);
the balancing biases, moved by +-gamma from integer loads, agree exactly.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from support.dp_worker import setup

from dsv3_ref.config import ModelConfig
from dsv3_ref.data import CorpusData
from dsv3_ref.io.checkpoint import from_pretrained
from dsv3_ref.train.distributed import check_layout

ROOT = Path(__file__).resolve().parents[1]
RTOL_LOSS, ATOL_WEIGHT = 2e-5, 2e-5
RUNS = ("dp", "ep", "dp_resumed", "ep_resumed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dp")
    data = CorpusData(seed=0)
    ref = setup(data=data)
    ref.fit(stop_at=2, out=out / "ref_2")
    ref.fit(out=out / "ref_4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "support" / "dp_worker.py"), str(out), str(out / "ref_2")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return {"out": out, "data": data, "ref": ref, "ref_biases": ref.hooks[1].biases, "ranks": ranks}


def weights(folder) -> dict[str, torch.Tensor]:
    return from_pretrained(folder).state_dict()


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def assert_history_close(got: list[dict], want: list[dict], where: str) -> None:
    assert len(got) == len(want), where
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys(), where
        for key in w:
            assert math.isclose(g[key], w[key], rel_tol=RTOL_LOSS, abs_tol=1e-7), (where, key, g[key], w[key])


def test_every_rank_sees_the_same_run(runs):
    r0, r1 = runs["ranks"]
    assert r0["world"] == 2
    for name in RUNS:
        assert r0["runs"][name]["history"] == r1["runs"][name]["history"], name
        assert r0["runs"][name]["biases"] == r1["runs"][name]["biases"], name  # identical, never broadcast


@pytest.mark.parametrize("name", ["dp", "ep"])
def test_parallel_training_equals_one_process(runs, name):
    """Loss history (train, val, MTP, balance loss, grad norm, MaxVio), biases and weights of DP=2 and DP=2 + EP=2
    equal one process on the same global batch."""
    run = runs["ranks"][0]["runs"][name]
    assert_history_close(run["history"], runs["ref"].history, name)
    assert run["biases"] == runs["ref_biases"], name
    assert any(b != 0 for layer in run["biases"][-1].values() for b in layer)  # the biases did move
    ref = {k: v.detach() for k, v in runs["ref"].model.state_dict().items()}
    assert max_weight_diff(weights(runs["out"] / f"{name}_4"), ref) <= ATOL_WEIGHT


def test_a_per_rank_bias_update_would_differ(runs):
    """The bias update from one rank's loads (half the global batch) is not the global update, and the two ranks'
    would disagree: the update must see the global batch."""
    global_bias = runs["ranks"][0]["runs"]["dp"]["biases"][0]
    assert global_bias == runs["ref_biases"][0]
    per_rank = [r["runs"]["dp"]["per_rank"] for r in runs["ranks"]]
    assert per_rank[0].keys() == global_bias.keys()
    assert per_rank[0] != per_rank[1]
    assert per_rank[0] != global_bias and per_rank[1] != global_bias


def test_two_process_runs_repeat_exactly(runs):
    r0 = runs["ranks"][0]["runs"]
    assert r0["dp"]["history"][:2] == r0["dp_again"]["history"]
    assert r0["dp"]["biases"][:2] == r0["dp_again"]["biases"]
    assert max_weight_diff(weights(runs["out"] / "dp_2"), weights(runs["out"] / "dp_again_2")) == 0.0


@pytest.mark.parametrize("name", ["dp_resumed", "ep_resumed"])
def test_two_processes_resume_a_one_process_checkpoint(runs, name):
    run = runs["ranks"][0]["runs"][name]
    assert_history_close(run["history"], runs["ref"].history, name)
    assert run["biases"] == runs["ref_biases"][2:]
    ref = {k: v.detach() for k, v in runs["ref"].model.state_dict().items()}
    assert max_weight_diff(weights(runs["out"] / f"{name}_4"), ref) <= ATOL_WEIGHT


@pytest.mark.parametrize("name", ["dp", "ep"])
def test_one_process_resumes_a_two_process_checkpoint(runs, name):
    """The checkpoint of a 2-process run (hub format gathered on rank 0, the experts of both ranks under their
    global names, with their AdamW moments) continues in one process as the one-process run does."""
    folder = runs["out"] / f"{name}_2"
    with safe_open(folder / "train_state.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert {"optimizer.layers.1.ffn.experts.7.w1.weight.exp_avg",
            "optimizer.mtp.0.block.ffn.experts.7.w2.weight.exp_avg_sq"} <= keys
    trainer = setup(data=runs["data"])
    trainer.fit(resume_from=folder)
    assert_history_close(trainer.history, runs["ref"].history, name)
    assert trainer.hooks[1].biases == runs["ref_biases"][2:]
    ref = {k: v.detach() for k, v in runs["ref"].model.state_dict().items()}
    assert max_weight_diff({k: v.detach() for k, v in trainer.model.state_dict().items()}, ref) <= ATOL_WEIGHT


@pytest.mark.parametrize("batch_size, expert_parallel, world, message", [
    (3, False, 2, "batch_size (3, one micro-batch of the global batch) must be divisible by the data-parallel"),
    (6, True, 3, "n_routed_experts (8) must be divisible by the expert-parallel size (3 processes)"),
])
def test_impossible_layouts_are_refused(batch_size, expert_parallel, world, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_layout(ModelConfig(), batch_size, world, expert_parallel)


def test_torchrun_cli_trains_data_and_expert_parallel_and_reports_once(tmp_path):
    """`torchrun --nproc-per-node 2 -m dsv3_ref train ... --expert-parallel`: rank 0 alone prints, and the
    checkpoint is the one-process hub format."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dsv3_ref",
           "train", "--preset", "tiny", "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--eval-every", "0",
           "--eval-batches", "1", "--no-progress", "--expert-parallel", "--bias-gamma", "0.001",
           "--out", str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("step 2: train loss") == 1 and proc.stdout.count("checkpoint: ") == 1, proc.stdout
    model = from_pretrained(tmp_path / "ckpt")
    assert len(model.layers[1].ffn.experts) == 8  # both ranks' experts
    assert model.layers[1].ffn.gate.bias.abs().sum() > 0  # the balancing hook ran


def test_expert_parallel_needs_torchrun(tmp_path, capsys):
    from dsv3_ref.cli import main

    assert main(["train", "--preset", "tiny", "--steps", "1", "--expert-parallel", "--out", str(tmp_path)]) == 2
    assert "--expert-parallel needs a torchrun job of 2 or more processes" in capsys.readouterr().err


def test_expert_aux_loss_refuses_data_parallelism():
    from types import SimpleNamespace

    from dsv3_ref.train import ExpertAuxLoss

    with pytest.raises(ValueError, match="under data parallelism each rank sees only its share"):
        ExpertAuxLoss().on_train_start(SimpleNamespace(parallel=object()))
