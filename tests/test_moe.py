"""Gate and MoE: bias only selects, group-limited top-k, V2 softmax semantics, dispatch-by-sorting, and the grouped
experts path against the reference loop."""

import pytest
import torch
from torch.testing import assert_close

from dsv3_ref import Gate, ModelConfig, MoE, Transformer
from dsv3_ref.fp8.linear import convert_to_fp8
from dsv3_ref.nn.moe import EXPERT_IMPLS, can_group, run_experts, set_expert_impl

# 16 experts in 4 groups of 4, keep 2 groups, 3 experts per token: top-2-sum, max and full-sum group scores differ
GROUPED = dict(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3)


def _gate(seed: int = 0, **overrides) -> tuple[ModelConfig, Gate]:
    cfg = ModelConfig.from_preset("tiny", **overrides)
    torch.manual_seed(seed)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.3)
    return cfg, gate


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def _gate_for_scores(p: list[float], **overrides) -> tuple[Gate, torch.Tensor]:
    """A gate and one input whose sigmoid (or softmax) affinities are exactly proportional to p."""
    cfg, gate = _gate(**overrides)
    p_t = torch.tensor(p, dtype=torch.float64)
    logits = _logit(p_t) if cfg.score_func == "sigmoid" else torch.log(p_t)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = logits.float()
    x = torch.zeros(1, cfg.dim)
    x[0, 0] = 1.0
    return gate, x


# ---------------------------------------------------------------------------------------------------- gate
def test_bias_selects_but_does_not_weight():
    cfg, gate = _gate(n_expert_groups=1, n_limited_groups=1)  # no groups: isolate the bias
    x = torch.randn(32, cfg.dim)
    plain = gate(x)
    with torch.no_grad():
        gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0]))  # expert 7 always chosen
    biased = gate(x)
    s = torch.sigmoid(x @ gate.weight.T)  # unbiased affinities, by hand
    assert_close(biased.scores, s, rtol=1e-6, atol=1e-7)  # Routing.scores are the unbiased ones
    assert bool((biased.indices == 7).any(dim=-1).all())
    changed = (plain.indices.sort(dim=-1).values != biased.indices.sort(dim=-1).values).any(dim=-1)
    assert changed.sum() > 10  # the bias really changed the chosen set
    chosen = s.gather(1, biased.indices)
    assert_close(biased.weights, chosen / chosen.sum(-1, keepdim=True) * cfg.route_scale, rtol=1e-6, atol=1e-7)
    # not the biased scores
    biased_scores = chosen + gate.bias[biased.indices]
    assert not torch.allclose(biased.weights, biased_scores / biased_scores.sum(-1, keepdim=True) * cfg.route_scale)


def test_sigmoid_weights_sum_to_route_scale():
    cfg, gate = _gate(**GROUPED)
    with torch.no_grad():
        gate.bias.normal_(0, 0.1)
    r = gate(torch.randn(64, cfg.dim))
    assert r.weights.shape == r.indices.shape == (64, 3) and r.scores.shape == (64, 16)
    assert r.indices.dtype == torch.int64
    assert_close(r.weights.sum(-1), torch.full((64,), cfg.route_scale), rtol=1e-6, atol=1e-6)
    assert bool((r.indices.sort(-1).values.diff(dim=-1) > 0).all())  # K distinct experts per token


def test_group_limited_topk_matches_hand_computation():
    cfg, gate = _gate(**GROUPED)
    with torch.no_grad():
        gate.bias.normal_(0, 0.2)
    x = torch.randn(256, cfg.dim)
    r = gate(x)
    # exact comparisons below: x @ W.T is the product the gate computes (F.linear, the same mm kernel on the same
    # operands), so the hand computation sees the gate's bits and every top-k picks the same experts
    biased = (torch.sigmoid(x @ gate.weight.T) + gate.bias).view(256, 4, 4)  # (N, G, E/G)
    group_score = biased.topk(2, dim=-1).values.sum(-1)  # V3: sum of the top-2 biased affinities
    kept = group_score.topk(2, dim=-1).indices  # (N, 2)
    chosen_group = r.indices // 4
    assert bool((chosen_group[:, :, None] == kept[:, None, :]).any(-1).all())  # never outside the kept groups
    masked = torch.full_like(biased, float("-inf"))
    masked.scatter_(1, kept[:, :, None].expand(-1, -1, 4), biased.gather(1, kept[:, :, None].expand(-1, -1, 4)))
    expected = masked.flatten(1).topk(3, dim=-1).indices
    assert torch.equal(r.indices.sort(-1).values, expected.sort(-1).values)
    # and the group limit actually bites: the unrestricted top-3 would differ for some tokens
    free = biased.flatten(1).topk(3, dim=-1).indices
    assert (free.sort(-1).values != expected.sort(-1).values).any(-1).sum() > 10


#    group A                   group B                   group C                   group D
P = [0.90, 0.12, 0.11, 0.10, 0.80, 0.80, 0.10, 0.10, 0.85, 0.13, 0.09, 0.08, 0.70, 0.69, 0.05, 0.05]
# top-2 sums: A 1.02, B 1.60, C 0.98, D 1.39 -> V3 keeps B, D;   max: A .90, B .80, C .85, D .70 -> V2 keeps A, C


def test_v3_group_score_is_top2_sum_not_max():
    gate, x = _gate_for_scores(P, **GROUPED)
    r = gate(x)
    assert sorted(r.indices[0].tolist()) == [4, 5, 12]  # B's two, then D's best; not expert 0 (the best single)


def test_v2_softmax_group_score_is_max_and_not_renormalised():
    gate, x = _gate_for_scores(P, **GROUPED, score_func="softmax", route_scale=1.5)
    assert gate.bias is None and "bias" not in dict(gate.named_buffers())
    r = gate(x)
    assert sorted(r.indices[0].tolist()) == [0, 8, 9]  # groups A and C only; not B's 0.80s
    s = torch.tensor(P) / sum(P)  # softmax of log p
    assert_close(r.scores[0], s, rtol=1e-5, atol=1e-7)
    assert_close(r.weights[0], s[r.indices[0]] * 1.5, rtol=1e-5, atol=1e-7)  # official: no renormalisation
    assert r.weights.sum() < 1.5 * 0.5


def test_gate_without_groups_is_plain_topk():
    cfg, gate = _gate(n_expert_groups=1, n_limited_groups=1)
    x = torch.randn(40, cfg.dim)
    r = gate(x)
    expected = torch.sigmoid(x @ gate.weight.T).topk(2, dim=-1).indices  # the gate's own product (F.linear = mm)
    assert torch.equal(r.indices.sort(-1).values, expected.sort(-1).values)


def test_bias_is_an_fp32_buffer_without_grad():
    cfg = ModelConfig.from_preset("tiny")
    moe = MoE(cfg)
    assert "gate.bias" in dict(moe.named_buffers())
    assert "gate.bias" not in dict(moe.named_parameters())
    assert all(p is not moe.gate.bias for p in moe.parameters())
    assert moe.gate.bias.dtype == torch.float32 and not moe.gate.bias.requires_grad
    assert "gate.bias" in moe.state_dict()  # saved with the checkpoint (e_score_correction_bias)
    moe.to(torch.bfloat16)  # the model can be cast; the bias stays fp32 (its small updates would round away)
    assert moe.gate.weight.dtype == torch.bfloat16 and moe.gate.bias.dtype == torch.float32
    x = torch.randn(5, 2, cfg.dim, dtype=torch.bfloat16)
    y = moe(x)
    assert y.dtype == torch.bfloat16 and moe.last_routing.weights.dtype == torch.bfloat16
    assert moe.gate.bias.grad is None


# ---------------------------------------------------------------------------------------------------- MoE
def _moe(seed: int = 0, **overrides) -> tuple[ModelConfig, MoE]:
    cfg = ModelConfig.from_preset("tiny", **overrides)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
        moe.gate.bias.normal_(0, 0.05) if moe.gate.bias is not None else None
    return cfg, moe


def _loop_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, slot by slot: sum_k w_k expert_{i_k}(x_t) + shared(x_t). (The dispatch tests run in float64
    so that summation order, which differs between the two, is far below the tolerance.)"""
    flat = x.reshape(-1, x.size(-1))
    r = moe.gate(flat)
    out = torch.zeros_like(flat)
    for t in range(flat.size(0)):
        for k in range(r.indices.size(1)):
            out[t] += r.weights[t, k] * moe.experts[int(r.indices[t, k])](flat[t:t + 1])[0]
        out[t] += moe.shared_experts(flat[t:t + 1])[0]
    return out.view_as(x)


@pytest.mark.parametrize("overrides", [{}, GROUPED, dict(score_func="softmax", n_shared_experts=2)])
def test_dispatch_by_sorting_equals_loop(overrides):
    cfg, moe = _moe(**overrides)
    moe.double()
    x = torch.randn(3, 7, cfg.dim, dtype=torch.float64)
    with torch.no_grad():
        y = moe(x)
        assert y.shape == x.shape
        assert_close(y, _loop_reference(moe, x), rtol=1e-6, atol=1e-6)


def test_dispatch_with_idle_experts():
    cfg, moe = _moe(**GROUPED)
    with torch.no_grad():
        moe.gate.bias.zero_()
        moe.gate.bias[[1, 2, 5, 6]] = 10.0  # only experts 1, 2 (group 0) and 5, 6 (group 1) can win
    moe.double()
    x = torch.randn(2, 5, cfg.dim, dtype=torch.float64)
    with torch.no_grad():
        y = moe(x)
        counts = torch.bincount(moe.last_routing.indices.flatten(), minlength=16)
        assert (counts == 0).sum() >= 12 and counts.sum() == 30
        assert_close(y, _loop_reference(moe, x), rtol=1e-6, atol=1e-6)
    single = x[:1, :1]  # one token: K experts busy, the rest idle
    with torch.no_grad():
        assert_close(moe(single), _loop_reference(moe, single), rtol=1e-6, atol=1e-6)


def test_shared_expert_always_added_with_weight_one():
    cfg, moe = _moe()
    with torch.no_grad():
        for e in moe.experts:
            e.w2.weight.zero_()  # routed experts contribute nothing
        x = torch.randn(2, 4, cfg.dim)
        assert_close(moe(x), moe.shared_experts(x), rtol=0, atol=0)  # exact: shared(x) + 0, the same (8, dim) product
    assert moe.shared_experts.w1.weight.shape == (cfg.n_shared_experts * cfg.moe_inter_dim, cfg.dim)
    assert MoE(cfg.replace(n_shared_experts=0)).shared_experts is None


def test_last_routing_recorded():
    cfg, moe = _moe()
    assert moe.last_routing is None
    x = torch.randn(2, 5, cfg.dim)
    moe(x)
    r = moe.last_routing
    assert r.indices.shape == (10, cfg.n_activated_experts) and r.scores.shape == (10, cfg.n_routed_experts)
    expected = moe.gate(x.reshape(-1, cfg.dim))
    assert torch.equal(r.indices, expected.indices)  # exact: the same gate call on the same (10, dim) input
    assert_close(r.weights, expected.weights, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- expert_impl
def _grads(moe: MoE, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """moe(x) and the gradients of <moe(x), grad_out> for x and every parameter (None where none flowed)."""
    moe.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = moe(x)
    y.backward(grad_out)
    return y.detach(), {"x": x.grad, **{name: p.grad for name, p in moe.named_parameters()}}


@pytest.mark.parametrize("overrides", [{}, GROUPED, dict(score_func="softmax", n_shared_experts=2)])
def test_grouped_experts_equal_the_loop(overrides):
    cfg, moe = _moe(**overrides)
    x = torch.randn(4, 9, cfg.dim)
    grad_out = torch.randn(4, 9, cfg.dim)
    assert moe.expert_impl == "grouped" and can_group(moe.experts, x)  # the default, and it runs here
    y, grads = _grads(moe, x, grad_out)
    moe.expert_impl = "loop"
    y_loop, grads_loop = _grads(moe, x, grad_out)
    # The same products per expert in float32: the grouped GEMM calls the same matmul on each expert's rows, but the
    # fused gate/up GEMM is twice as wide and the weight gradients come out of a GEMM in the other orientation, so the
    # BLAS may block the sums differently: agreement to float32 rounding, not bit for bit. Rounding is relative to the
    # size of the summands, not of the result (x's gradient sums several experts' terms and can cancel to near zero),
    # so the absolute tolerance scales with the tensor's largest entry. Measured over 30 seeds x these 3 configs under
    # the default, ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE and one-thread settings: at most 3.0 eps * max|ref|;
    # the bound is 16 eps.
    def close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
        atol = 16 * torch.finfo(torch.float32).eps * expected.abs().max().item()
        assert_close(actual, expected, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")

    close(y, y_loop, "y")
    assert grads.keys() == grads_loop.keys()
    for name, g in grads.items():
        if grads_loop[name] is None:  # an idle expert: no gradient in either (so AdamW leaves it alone in both)
            assert g is None, name
        else:
            close(g, grads_loop[name], name)


def test_grouped_experts_leave_idle_experts_without_gradient():
    cfg, moe = _moe(**GROUPED)
    with torch.no_grad():
        moe.gate.bias.zero_()
        moe.gate.bias[[1, 2, 5, 6]] = 10.0  # only experts 1, 2, 5, 6 can win
    _, grads = _grads(moe, torch.randn(2, 5, cfg.dim), torch.randn(2, 5, cfg.dim))
    used = {1, 2, 5, 6}
    for e in range(cfg.n_routed_experts):
        for w in ("w1", "w2", "w3"):
            assert (grads[f"experts.{e}.{w}.weight"] is not None) == (e in used), (e, w)


@pytest.mark.parametrize("how", ["autocast", "cast"])
def test_grouped_experts_in_bfloat16_equal_the_loop(how):
    cfg, moe = _moe(**GROUPED)
    x = torch.randn(4, 9, cfg.dim)
    if how == "cast":
        moe.to(torch.bfloat16)
        x = x.bfloat16()
    outs = {}
    for impl in EXPERT_IMPLS:
        moe.expert_impl = impl
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
            outs[impl] = moe(x)
    assert outs["grouped"].dtype == outs["loop"].dtype == (torch.float32 if how == "autocast" else torch.bfloat16)
    # both compute the experts' GEMMs in bfloat16 (under autocast as nn.Linear would): equal to bfloat16 rounding
    assert_close(outs["grouped"], outs["loop"], rtol=2e-2, atol=2e-2)


def test_grouped_falls_back_to_the_loop_where_it_cannot_run():
    cfg, moe = _moe()
    x = torch.randn(10, cfg.dim)
    assert can_group(moe.experts, x)
    assert not can_group(moe.experts, x.double())  # grouped GEMMs take float32 / bfloat16 / float16 only
    _, odd = _moe(moe_inter_dim=6)  # rows of 6 floats: not a multiple of 16 bytes
    assert not can_group(odd.experts, x)
    with torch.no_grad():
        y, y_loop = odd(x), run_experts_loop(odd, x)
    assert torch.equal(y, y_loop)  # the fallback is the loop itself
    convert_to_fp8(moe)  # FP8Linear experts run in the loop
    assert not can_group(moe.experts, x)
    with torch.no_grad():
        assert torch.equal(moe(x), run_experts_loop(moe, x))


def run_experts_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """moe(x) with the reference loop, leaving moe.expert_impl as it was."""
    impl = moe.expert_impl
    moe.expert_impl = "loop"
    try:
        return moe(x)
    finally:
        moe.expert_impl = impl


def test_expert_impl_is_checked():
    cfg = ModelConfig.from_preset("tiny")
    with pytest.raises(ValueError, match="expert_impl must be one of"):
        MoE(cfg, expert_impl="fast")
    moe = MoE(cfg, expert_impl="loop")
    with pytest.raises(ValueError, match="expert_impl"):
        moe.expert_impl = "grouped_mm"
    assert moe.expert_impl == "loop"
    with pytest.raises(ValueError, match="expert_impl"):
        run_experts(moe.experts, torch.zeros(1, cfg.dim), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long), "bmm")
    model = Transformer(cfg.replace(n_mtp_layers=1))
    set_expert_impl(model, "loop")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(layers) == cfg.n_moe_layers + 1 and all(m.expert_impl == "loop" for m in layers)  # MTP block too
    with pytest.raises(ValueError, match="expert_impl"):
        set_expert_impl(model, "Loop")
