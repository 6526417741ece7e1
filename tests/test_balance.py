"""Load balancing: gate variants (group- and node-limited), loads and MaxVio, the loss-free bias, balance losses."""

import pytest
import torch
from torch.testing import assert_close

from dsv3_ref import Gate, ModelConfig, Transformer
from dsv3_ref.data import CorpusData
from dsv3_ref.nn.moe import Routing
from dsv3_ref.objectives.balance import (
    PAPER_FREEZE_FRACTION,
    collect_loads,
    expert_aux_loss,
    expert_load,
    freeze_schedule,
    loads_by_label,
    max_vio,
    moe_layers,
    sequence_balance_loss,
    update_bias,
)
from dsv3_ref.train import (
    ExpertAuxLoss,
    LoadMonitor,
    LossFreeBalancing,
    SequenceBalanceLoss,
    TrainConfig,
    Trainer,
    TrainHook,
)


def _gate(seed: int = 0, group_score: str = "official", bias_std: float = 0.0, **overrides) -> tuple[ModelConfig, Gate]:
    cfg = ModelConfig.from_preset("tiny", **overrides)
    torch.manual_seed(seed)
    gate = Gate(cfg, group_score=group_score)
    torch.nn.init.normal_(gate.weight, std=0.3)
    if gate.bias is not None and bias_std:
        gate.bias.normal_(0.0, bias_std)
    return cfg, gate


def _kept_groups(gate: Gate, x: torch.Tensor, top: int) -> torch.Tensor:
    """(N, G) bool: the groups a token may use, by hand: group score = sum of its `top` best (biased) affinities."""
    s = torch.sigmoid(x @ gate.weight.T) if gate.score_func == "sigmoid" else torch.softmax(x @ gate.weight.T, -1)
    if gate.bias is not None:
        s = s + gate.bias
    group_scores = s.view(x.size(0), gate.n_groups, -1).topk(top, dim=-1).values.sum(-1)
    keep = group_scores.topk(gate.topk_groups, dim=-1).indices
    return torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)


def _groups_used(indices: torch.Tensor, per_group: int) -> torch.Tensor:
    """(N,) number of distinct groups among each token's chosen experts."""
    g = (indices // per_group).sort(dim=-1).values
    return (g[:, 1:] != g[:, :-1]).sum(-1) + 1


class _Trainer:
    """What the hooks read from a `Trainer`, for driving a hook by hand: model, step (done), tokens_per_step."""

    def __init__(self, model, tokens_per_step: int = 0):
        self.model, self.step, self.tokens_per_step = model, 0, tokens_per_step


def _tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny", **overrides))


# ---------------------------------------------------------------------------------------------------- gate variants
def test_bias_changes_selection_not_weights():
    cfg, gate = _gate(bias_std=0.0)
    x = torch.randn(64, cfg.dim)
    plain = gate(x)
    with torch.no_grad():
        gate.bias.normal_(0.0, 0.2)
    biased = gate(x)
    assert_close(biased.scores, plain.scores)  # the affinities do not see the bias
    changed = (plain.indices.sort(-1).values != biased.indices.sort(-1).values).any(-1)
    assert changed.sum() > 5  # ... but the selection does
    chosen = plain.scores.gather(1, biased.indices)  # weights from the UNBIASED affinities of the chosen experts
    assert_close(biased.weights, chosen / chosen.sum(-1, keepdim=True) * cfg.route_scale)


@pytest.mark.parametrize("group_score", ["official", "node_limited"])
def test_weights_sum_to_route_scale(group_score):
    cfg, gate = _gate(group_score=group_score, bias_std=0.1, n_routed_experts=16, n_expert_groups=4,
                      n_limited_groups=2, n_activated_experts=4)
    w = gate(torch.randn(50, cfg.dim)).weights
    assert_close(w.sum(-1), torch.full((50,), cfg.route_scale))


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_group_limited_never_picks_outside_kept_groups(score_func):
    cfg, gate = _gate(bias_std=0.1, score_func=score_func, n_routed_experts=32, n_expert_groups=8,
                      n_limited_groups=3, n_activated_experts=4)
    x = torch.randn(200, cfg.dim)
    r = gate(x)
    top = 2 if score_func == "sigmoid" else 1  # official: top-2 sum with a bias, the max without
    assert gate.group_topk == top
    kept = _kept_groups(gate, x, top)  # (N, G)
    per_group = cfg.n_routed_experts // cfg.n_expert_groups
    assert bool(kept.gather(1, r.indices // per_group).all())
    # and within the kept groups it is the plain top-k of the biased affinities
    s = r.scores + (gate.bias if gate.bias is not None else 0)
    masked = s.view(200, 8, -1).masked_fill(~kept.unsqueeze(-1), float("-inf")).flatten(1)
    # exact: the gate's own scores and bias, added and ranked as the gate does
    assert torch.equal(r.indices.sort(-1).values, masked.topk(4, -1).indices.sort(-1).values)


def test_node_limited_uses_at_most_m_nodes_scored_by_top_k_over_m():
    # 8 nodes of 4 experts, M = 2 nodes per token, K = 6: a node scores the sum of its top K/M = 3 affinities
    cfg, gate = _gate(group_score="node_limited", bias_std=0.1, n_routed_experts=32, n_expert_groups=8,
                      n_limited_groups=2, n_activated_experts=6)
    assert gate.group_topk == 3
    x = torch.randn(300, cfg.dim)
    r = gate(x)
    assert int(_groups_used(r.indices, 4).max()) <= 2
    kept = _kept_groups(gate, x, 3)
    assert bool(kept.gather(1, r.indices // 4).all())
    official = Gate(cfg)
    official.load_state_dict(gate.state_dict())
    differs = (official(x).indices.sort(-1).values != r.indices.sort(-1).values).any(-1)
    assert differs.any()  # top-3 sum vs the official top-2 sum: a different rule


def test_node_limited_equals_official_for_v3():
    """DeepSeek-V3: K_r / M = 8 / 4 = 2, so node-limited (training) = group-limited top-2 sum (inference)."""
    cfg = ModelConfig.from_preset("671B")
    torch.manual_seed(0)
    official, node = Gate(cfg), Gate(cfg, group_score="node_limited")
    torch.nn.init.normal_(official.weight, std=cfg.init_std)
    official.bias.normal_(0.0, 0.02)
    node.load_state_dict(official.state_dict())
    assert official.group_topk == node.group_topk == 2
    x = torch.randn(64, cfg.dim)
    a, b = official(x), node(x)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)  # exact: one code path (top-2)
    assert int(_groups_used(b.indices, 32).max()) <= 4  # at most M = 4 nodes of 32 experts


def test_group_score_bad_values():
    with pytest.raises(ValueError, match="group_score"):
        Gate(ModelConfig(), group_score="nodes")
    gate = Gate(ModelConfig(n_activated_experts=3))  # K = 3, M = 2: K/M is not an integer
    with pytest.raises(ValueError, match="divisible"):
        gate.group_score = "node_limited"
    assert gate.group_score == "official"


# ---------------------------------------------------------------------------------------------------- loads, MaxVio
def test_expert_load_and_max_vio_on_known_loads():
    indices = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1], [1, 2]])  # loads 4, 3, 2, 1 over 4 experts
    load = expert_load(indices, 4)
    assert load.tolist() == [4, 3, 2, 1]
    assert float(max_vio(load)) == pytest.approx((4 - 2.5) / 2.5)
    assert float(max_vio(torch.tensor([5, 5, 5, 5]))) == 0.0
    layers = torch.tensor([[10, 2, 4, 4], [0, 0, 0, 8]])  # one row per layer
    assert_close(max_vio(layers), torch.tensor([1.0, 3.0]))  # 3 = E/K - 1 for E = 4, K = 1: all on one expert


def test_last_routing_scores_keep_the_graph(random_tokens):
    model = _tiny_model()
    model(random_tokens(2, 8, 0))
    layers = moe_layers(model)
    assert list(layers) == ["layers.1.ffn", "layers.2.ffn"]
    for moe in layers.values():
        assert moe.last_routing.scores.requires_grad and moe.last_routing.scores.grad_fn is not None


def test_collect_loads_sums_over_batches(random_tokens):
    model = _tiny_model()
    batches = [random_tokens(2, 8, s) for s in range(3)]
    loads = collect_loads(model, batches)
    cfg = model.config
    per_batch = [collect_loads(model, [b]) for b in batches]
    for name, load in loads.items():
        assert int(load.sum()) == 3 * 2 * 8 * cfg.n_activated_experts
        assert torch.equal(load, sum(p[name] for p in per_batch))
    assert max_vio(torch.stack(list(loads.values()))).shape == (2,)


def test_loads_by_label_splits_collect_loads(random_tokens):
    model = _tiny_model()
    tokens = [random_tokens(2, 8, s) for s in range(2)]
    labels = [torch.arange(16).view(2, 8) % 3 for _ in tokens]
    by_label = loads_by_label(model, list(zip(tokens, labels, strict=True)), n_labels=3)
    total = collect_loads(model, tokens)
    for name, load in by_label.items():
        assert load.shape == (3, model.config.n_routed_experts)
        assert torch.equal(load.sum(0), total[name])  # the rows split the loads
        # label 0 marks tokens 0, 3, 6, ... of each row: 6 of 16 tokens per batch, K choices each
        assert int(load[0].sum()) == 2 * 6 * model.config.n_activated_experts
    with pytest.raises(ValueError, match="labels must be in"):
        loads_by_label(model, [(tokens[0], labels[0] + 3)], n_labels=3)


# ---------------------------------------------------------------------------------------------------- the bias update
def test_update_bias_sign_rule_lowers_overloaded():
    bias = torch.zeros(4)
    update_bias(bias, torch.tensor([10, 2, 5, 3]), gamma=0.1)  # mean 5
    assert_close(bias, torch.tensor([-0.1, 0.1, 0.0, 0.1]))  # overloaded down, underloaded up, balanced unchanged
    update_bias(bias, torch.tensor([10, 2, 5, 3]), gamma=0.1, rule="proportional")  # += gamma (mean - c) / mean
    assert_close(bias, torch.tensor([-0.2, 0.16, 0.0, 0.14]))
    update_bias(bias, torch.zeros(4, dtype=torch.long), gamma=0.1)  # no tokens: no information
    assert_close(bias, torch.tensor([-0.2, 0.16, 0.0, 0.14]))
    with pytest.raises(ValueError, match="rule"):
        update_bias(bias, torch.ones(4), 0.1, rule="sgn")
    with pytest.raises(ValueError, match="rule"):
        LossFreeBalancing(rule="sgn")


def test_bias_has_no_gradient_and_is_not_in_the_optimizer(random_tokens):
    model = _tiny_model()
    biases = [moe.gate.bias for moe in moe_layers(model).values()]
    params = list(model.parameters())
    assert all(not b.requires_grad for b in biases)
    assert all(b is not p for b in biases for p in params)  # a buffer, not a parameter
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    assert not any(p is b for g in opt.param_groups for p in g["params"] for b in biases)
    with torch.no_grad():
        for b in biases:
            b.normal_(0.0, 0.1)
    before = [b.clone() for b in biases]
    tokens = random_tokens(2, 8, 0)
    hook = SequenceBalanceLoss(alpha=1.0)
    logits = model(tokens)
    loss = logits.logsumexp(-1).mean() + hook.loss_terms(_Trainer(model), tokens, None, None, logits)[
        "seq_balance_loss"]
    loss.backward()
    opt.step()
    assert all(b.grad is None for b in biases)
    for b, b0 in zip(biases, before, strict=True):
        assert torch.equal(b, b0)  # the optimizer step did not move it
    assert all(moe.gate.weight.grad is not None for moe in moe_layers(model).values())


class _BiasWatch(TrainHook):
    """After each step (listed after LossFreeBalancing): that step's bias change and the loads it came from."""

    def __init__(self, balance: LossFreeBalancing):
        self.balance, self.seen = balance, []

    def on_train_start(self, trainer):
        self.prev = {n: m.gate.bias.clone() for n, m in moe_layers(trainer.model).items()}

    def after_step(self, trainer, step):
        for name, moe in moe_layers(trainer.model).items():
            self.seen.append((moe.gate.bias - self.prev[name], self.balance.last_loads[name]))
            self.prev[name] = moe.gate.bias.clone()


def test_one_bias_update_per_optimizer_step_with_gradient_accumulation():
    model = _tiny_model()
    gamma = 0.01
    balance, seq_loss = LossFreeBalancing(gamma=gamma), SequenceBalanceLoss()
    watch = _BiasWatch(balance)
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=16, grad_accum=3, warmup_steps=0, eval_every=0,
                      eval_batches=1, log_every=1)
    trainer = Trainer(model, cfg, CorpusData(seed=0, n_bytes=20_000), hooks=[balance, seq_loss, watch],
                      progress=False)
    biases = [moe.gate.bias for moe in moe_layers(model).values()]
    assert not any(p is b for g in trainer.optimizer.param_groups for p in g["params"] for b in biases)
    history = trainer.fit()
    assert balance.n_updates == 3  # one per optimizer step, not one per micro-batch (that would be 9)
    assert len(watch.seen) == 3 * len(biases)
    for delta, load in watch.seen:
        # the whole batch's loads (3 micro-batches of 2 x 16 tokens), and ONE sign step of gamma from them:
        # overloaded experts down, underloaded up
        assert int(load.sum()) == 3 * 2 * 16 * model.config.n_activated_experts
        assert_close(delta, gamma * torch.sign(load.float().mean() - load), atol=1e-7, rtol=0)
    assert [h["step"] for h in history] == [1, 2, 3]
    for entry in history:
        assert entry["maxvio_batch"] >= 0 and entry["balance_gamma"] == gamma and entry["seq_balance_loss"] > 0


def test_gamma_schedule_freezes_the_bias(random_tokens):
    assert PAPER_FREEZE_FRACTION == pytest.approx(0.5 / 14.8)
    schedule = freeze_schedule(14_800)  # "tokens": the paper's 14.8T scaled down
    assert schedule(0) == schedule(14_300) == 1.0
    assert schedule(14_301) == schedule(14_800) == 0.0
    # a run of 2 steps x 14 tokens whose last half is frozen: exactly one update moves the bias
    model = _tiny_model()
    hook = LossFreeBalancing(gamma=0.01, schedule=freeze_schedule(28, freeze_fraction=0.5))
    trainer = _Trainer(model, tokens_per_step=14)
    moes = list(moe_layers(model).values())
    for step in range(2):
        before = [m.gate.bias.clone() for m in moes]
        model(random_tokens(2, 7, step))
        hook.loss_terms(trainer, random_tokens(2, 7, step), None, None, None)
        trainer.step += 1
        hook.after_step(trainer, trainer.step)
        moved = any(not torch.equal(m.gate.bias, b) for m, b in zip(moes, before, strict=True))
        assert moved == (step == 0)
    assert hook.metrics(trainer)["balance_gamma"] == 0.0


def test_loss_free_balancing_needs_a_bias():
    model = _tiny_model(score_func="softmax")
    with pytest.raises(ValueError, match="bias"):
        LossFreeBalancing().on_train_start(_Trainer(model))


def test_loss_free_updates_reduce_max_vio_on_the_tiny_model(random_tokens):
    """Fixed random inputs, the weights frozen, only the bias moving: MaxVio_batch falls (measured: 0.46 -> ~0.05)."""
    model = _tiny_model()
    tokens = random_tokens(8, 32, 1)
    trainer = _Trainer(model)
    hook = LossFreeBalancing(gamma=1e-3)
    hook.on_train_start(trainer)
    vio = []
    with torch.no_grad():
        for step in range(1, 31):
            model(tokens)
            hook.loss_terms(trainer, tokens, None, None, None)
            hook.after_step(trainer, step)
            vio.append(hook.metrics(trainer)["maxvio_batch"])
    assert vio[0] > 0.3
    assert max(vio[-5:]) < 0.5 * vio[0]


def test_load_monitor_reports_max_vio_and_skips_stale_routings(random_tokens):
    model = _tiny_model()
    trainer, hook = _Trainer(model), LoadMonitor()
    tokens = random_tokens(2, 8, 0)
    model(tokens)
    hook.loss_terms(trainer, tokens, None, None, None)
    hook.loss_terms(trainer, tokens, None, None, None)  # no new forward: the routing is not counted twice
    hook.after_step(trainer, 0)
    expected = collect_loads(model, [tokens])
    for name, load in hook.last_loads.items():
        assert torch.equal(load, expected[name])
    assert hook.metrics(trainer)["maxvio_batch"] == pytest.approx(
        float(max_vio(torch.stack(list(expected.values()))).mean()))


# ---------------------------------------------------------------------------------------------------- balance losses
def test_sequence_balance_loss_by_hand():
    # 2 sequences of T = 2 tokens, E = 4 experts, K = 2
    scores = torch.tensor([[0.9, 0.5, 0.3, 0.3], [0.8, 0.6, 0.2, 0.4],
                           [0.1, 0.2, 0.7, 0.9], [0.5, 0.5, 0.5, 0.5]])
    indices = torch.tensor([[0, 1], [0, 1], [3, 2], [2, 3]])
    routing = Routing(weights=torch.ones(4, 2), indices=indices, scores=scores)
    E, K, T, alpha = 4, 2, 2, 0.1
    per_seq = []
    for b in range(2):
        rows = range(b * T, (b + 1) * T)
        f = [E / (K * T) * sum(int(i in indices[t].tolist()) for t in rows) for i in range(E)]
        p = [sum(float(scores[t, i] / scores[t].sum()) for t in rows) / T for i in range(E)]
        per_seq.append(alpha * sum(fi * pi for fi, pi in zip(f, p, strict=True)))
    assert float(sequence_balance_loss(routing, 2, alpha)) == pytest.approx(sum(per_seq) / 2, rel=1e-6)
    # the batch-level loss: all four tokens as one sequence
    f = [E / (K * 4) * int((indices == i).sum()) for i in range(E)]
    p = [float((scores[:, i] / scores.sum(-1)).mean()) for i in range(E)]
    batch_level = alpha * sum(fi * pi for fi, pi in zip(f, p, strict=True))
    assert float(expert_aux_loss(routing, alpha)) == pytest.approx(batch_level, rel=1e-6)
    # perfectly balanced and uniform: f_i = 1, sum_i P_i = 1, so L = alpha
    uniform = Routing(torch.ones(4, 2), torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), torch.full((4, 4), 0.5))
    assert float(sequence_balance_loss(uniform, 2, alpha)) == pytest.approx(alpha)
    with pytest.raises(ValueError, match="batch_size"):
        sequence_balance_loss(routing, 3)


def test_balance_losses_are_differentiable_wrt_the_gate():
    cfg, gate = _gate(bias_std=0.1)
    x = torch.randn(4 * 6, cfg.dim)
    for loss in (sequence_balance_loss(gate(x), 4), expert_aux_loss(gate(x))):
        gate.weight.grad = None
        loss.backward()
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
        assert gate.bias.grad is None


@pytest.mark.parametrize("hook_cls, key", [(SequenceBalanceLoss, "seq_balance_loss"), (ExpertAuxLoss, "aux_loss")])
def test_loss_hooks_sum_the_layers(hook_cls, key, random_tokens):
    model = _tiny_model()
    tokens = random_tokens(3, 8, 0)
    model(tokens)
    hook = hook_cls(alpha=0.5)
    terms = hook.loss_terms(_Trainer(model), tokens, None, None, None)
    fn = sequence_balance_loss if key == "seq_balance_loss" else (lambda r, b, a: expert_aux_loss(r, a))
    expected = sum(fn(m.last_routing, 3, 0.5) for m in moe_layers(model).values())
    assert_close(terms[key], expected)
    assert terms[key].requires_grad
    assert hook.loss_terms(_Trainer(model), tokens, None, None, None) == {}  # nothing new since: no term
