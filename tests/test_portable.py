"""The different-machine pass (`make test-portable`, run by CI after `make test`): its environment is derived from this
machine's own (scripts/perturbed_env.py), and when the pass runs, the perturbation is really in effect."""

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("perturbed_env", ROOT / "scripts" / "perturbed_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("capability", "lower"), [("AVX512", "avx2"), ("AVX2", "default"), ("SVE256", "default"),
                                                   ("DEFAULT", None), ("NO AVX", None)])
def test_one_capability_below_the_machines_own(capability, lower):
    env = _script().perturbed_env(capability, default_threads=8)
    assert env.get("ATEN_CPU_CAPABILITY") == lower
    assert env["MKL_CBWR"] == "COMPATIBLE"


@pytest.mark.parametrize(("default_threads", "threads"), [(1, "2"), (2, "1"), (16, "1")])
def test_another_thread_count(default_threads, threads):
    assert _script().perturbed_env("AVX2", default_threads)["OMP_NUM_THREADS"] == threads


def test_the_capability_asked_for_is_the_one_in_effect():
    """ATen ignores an unknown or unsupported ATEN_CPU_CAPABILITY with a warning: the pass would then test nothing."""
    asked = os.environ.get("ATEN_CPU_CAPABILITY")
    if asked is None:
        pytest.skip("ATEN_CPU_CAPABILITY not set (the normal pass)")
    assert torch.backends.cpu.get_cpu_capability().lower() == asked.lower()


def test_ci_runs_the_portable_pass_after_the_normal_one():
    text = (ROOT / ".ci" / "run").read_text()
    normal = re.search(r"^\s*make\s+test\s*$", text, flags=re.MULTILINE)
    portable = re.search(r"^\s*make\s+test-portable\s*$", text, flags=re.MULTILINE)
    assert normal and portable and normal.start() < portable.start()
