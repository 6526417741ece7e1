"""Expert parallelism: the all-to-all MoE layer on 2 CPU processes equals the single-process layer; bytes per token."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3_ref import Gate, ModelConfig, MoE
from dsv3_ref.systems.parallel import ExpertParallelMoE, dispatch_bytes_per_token, distinct_destinations

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory) -> list[dict]:
    """Run tests/support/ep_worker.py on 2 ranks (gloo) and return each rank's JSON."""
    out = tmp_path_factory.mktemp("ep")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "support" / "ep_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_expert_parallel_equals_single_process(ep_results):
    for rank, res in enumerate(ep_results):
        assert res["world"] == 2
        assert set(res["cases"]) == {"tiny_official", "node_limited", "softmax", "one_sided"}
        for name, case in res["cases"].items():
            where = f"rank {rank}, case {name}: {case}"
            assert case["same_indices"], where  # the same Gate code, the same choices
            assert case["out_diff"] <= 1e-5, where  # forward, fp32
            assert case["x_grad_diff"] <= 1e-5 and case["gate_grad_diff"] <= 1e-5, where  # backward through both
            assert case["shared_grad_diff"] <= 1e-5, where  # all-to-alls
            assert case["expert_grad_diff"] <= 1e-5 * max(1.0, case["expert_grad_scale"]), where
            # one row per (token, destination rank): what `distinct_destinations` counts
            assert case["sent_rows"] == case["distinct_ranks"], where
            assert case["distinct_ranks"] <= 2 * case["tokens"], where
    one_sided = [res["cases"]["one_sided"] for res in ep_results]
    assert all(c["max_rank_used"] == 0 for c in one_sided)  # rank 1 received nothing, and it still matched
    assert one_sided[1]["expert_grad_scale"] == 0.0


def test_expert_parallel_rejects_uneven_split(ep_results):
    for res in ep_results:
        assert "n_routed_experts (3) must be divisible" in res["odd_split_error"]


def test_needs_a_process_group():
    with pytest.raises(ValueError, match="process group"):
        ExpertParallelMoE.from_moe(MoE(ModelConfig()))


def test_distinct_destinations_by_hand():
    indices = torch.tensor([[0, 1, 2, 3], [0, 4, 8, 12], [5, 6, 13, 15]])  # 16 experts, 4 per destination
    assert distinct_destinations(indices, 4).tolist() == [1, 4, 2]
    assert distinct_destinations(indices, 8).tolist() == [1, 2, 2]
    assert dispatch_bytes_per_token(indices, 4, dim=10, bytes_per_value=2) == pytest.approx(7 / 3 * 10 * 2)


def test_node_limited_routing_bounds_the_nodes_a_token_reaches():
    """DeepSeek-V3's deployment shape: 256 experts, 64-way EP over 8 nodes of 8 GPUs (4 experts per GPU, 32 per
    node = one group). Node-limited routing (M = 4) caps the nodes per token at 4; plain top-8 does not."""
    torch.manual_seed(0)
    limited_cfg = ModelConfig.from_preset("671B")
    free_cfg = limited_cfg.replace(n_expert_groups=1, n_limited_groups=1)
    limited = Gate(limited_cfg, group_score="node_limited")
    torch.nn.init.normal_(limited.weight, std=limited_cfg.init_std)
    free = Gate(free_cfg)
    free.load_state_dict(limited.state_dict())  # the same weights, no group limit
    x = torch.randn(512, limited_cfg.dim)
    lim, fre = limited(x).indices, free(x).indices
    experts_per_gpu, experts_per_node = 4, 32
    assert int(distinct_destinations(lim, experts_per_node).max()) <= 4  # M = 4 nodes
    assert int(distinct_destinations(lim, experts_per_gpu).max()) <= 8  # K = 8 GPUs at most, in any case
    assert int(distinct_destinations(fre, experts_per_node).max()) > 4
    # the inter-node bytes of a dispatch (FP8: 1 byte per value) are bounded by M * dim and fall with the limit
    lim_bytes = dispatch_bytes_per_token(lim, experts_per_node, limited_cfg.dim, bytes_per_value=1)
    free_bytes = dispatch_bytes_per_token(fre, experts_per_node, limited_cfg.dim, bytes_per_value=1)
    assert lim_bytes <= 4 * limited_cfg.dim < free_bytes
