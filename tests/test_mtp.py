"""Multi-token prediction: the causal chain of the depths, eq. 25 by hand, the lambda schedule, the trainer hook, the
671B shapes, and self-speculative decoding (greedy output identical to plain greedy decoding)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dsv3_ref import ModelConfig, Transformer
from dsv3_ref.data import BOS_ID, CorpusData, encode
from dsv3_ref.inference import speculative as spec
from dsv3_ref.inference.generate import generate
from dsv3_ref.inference.speculative import speculative_generate
from dsv3_ref.nn.attention import causal_mask
from dsv3_ref.nn.model import MTPModule
from dsv3_ref.nn.moe import MoE
from dsv3_ref.objectives.mtp import (
    evaluate_mtp,
    mtp_hidden_states,
    mtp_logits,
    mtp_loss,
    paper_lambda,
)
from dsv3_ref.systems.accounting import mtp_params
from dsv3_ref.train import MTPLoss, TrainConfig, Trainer


def _model(n_mtp_layers=1, seed=0, **overrides) -> Transformer:
    m = Transformer(ModelConfig.from_preset("tiny", n_mtp_layers=n_mtp_layers, **overrides))
    m.reset_parameters(seed)
    return m.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread is faster (and unaffected by other processes on the machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> CorpusData:
    return CorpusData(seed=0, n_bytes=100_000)


@pytest.fixture(scope="module")
def trained(data):
    """The tiny model with one MTP module trained for 60 steps with the paper's lambda schedule: (model, history)."""
    torch.manual_seed(0)
    model = _model(seed=0).train()
    cfg = TrainConfig(steps=60, batch_size=8, seq_len=64, warmup_steps=5, eval_every=60, eval_batches=2,
                      log_every=10)
    trainer = Trainer(model, cfg, data, hooks=[MTPLoss()], progress=False)
    history = trainer.fit()
    return model.eval(), history


# ---------------------------------------------------------------------------------------------- the forward pass
@pytest.mark.parametrize("k", [1, 2])
def test_depth_k_sees_token_i_plus_k_and_never_later(k, random_tokens):
    """Slot i of depth k predicts t_{i+k+1}: it must depend on t_{i+k} and on nothing after it."""
    model = _model(n_mtp_layers=2)
    B, T, i = 2, 12, 4
    tokens = random_tokens(B, T)
    with torch.no_grad():
        base = mtp_logits(model, tokens)[k - 1]  # (B, T - k, V)
        assert base.shape == (B, T - k, model.config.vocab_size)
        later = tokens.clone()
        later[:, i + k + 1:] = (later[:, i + k + 1:] + 1 + random_tokens(B, T - i - k - 1, seed=1) % 200) % 256
        assert (later[:, i + k + 1:] != tokens[:, i + k + 1:]).all()
        after = mtp_logits(model, later)[k - 1]
        assert_close(after[:, : i + 1], base[:, : i + 1], rtol=0, atol=1e-6)  # slots 0..i unchanged
        assert (after[:, i + 1:] - base[:, i + 1:]).abs().amax() > 1e-3  # (the perturbation is real)
        own = tokens.clone()
        own[:, i + k] = (own[:, i + k] + 7) % 256  # t_{i+k}, the token slot i embeds (depth k) or reads via h^{k-1}
        changed = mtp_logits(model, own)[k - 1]
        assert (changed[:, i] - base[:, i]).abs().amax() > 1e-3
        assert_close(changed[:, :i], base[:, :i], rtol=0, atol=1e-6)  # earlier slots never see it


def test_depth_2_reads_depth_1_slot_by_slot(random_tokens):
    """Eq. 21 for k = 2: h'^2_i combines h^1_i (not h^0_i) with Emb(t_{i+2})."""
    model = _model(n_mtp_layers=2)
    tokens = random_tokens(2, 10)
    T = tokens.size(1)
    with torch.no_grad():
        h1, h2 = mtp_hidden_states(model, tokens)
        m2 = model.mtp[1]
        want = m2(h1[:, : T - 2], model.embed(tokens[:, 2:]), model.freqs_cis("cpu")[2:T], causal_mask(T - 2, 0))
    assert h1.shape == (2, T - 1, model.config.dim) and h2.shape == (2, T - 2, model.config.dim)
    assert_close(h2, want, rtol=0, atol=0)  # exact: mtp_hidden_states makes this very call (same inputs, kernels)


def test_rope_offset_does_not_change_the_scores(random_tokens):
    """Depth k puts slot i at RoPE position i + k; positions 0..T-k-1 give the same logits (relative encoding)."""
    model = _model()
    tokens = random_tokens(2, 16)
    T = tokens.size(1)
    with torch.no_grad():
        h = model.hidden_states(tokens)
        ours = mtp_logits(model, tokens, h)[0]
        shifted = model.head(model.mtp[0](h[:, : T - 1], model.embed(tokens[:, 1:]), model.freqs_cis("cpu")[: T - 1],
                                          causal_mask(T - 1, 0)))
    assert_close(shifted, ours, rtol=1e-5, atol=1e-5)


def test_mtp_loss_equals_hand_computation(random_tokens):
    """Eq. 21-25 written out with the raw parameters for D = 2, including the embedding-first concatenation."""
    model = _model(n_mtp_layers=2)
    window = random_tokens(3, 14, seed=3)
    tokens, targets = window[:, :-1], window[:, 1:]  # (B, T): targets[:, j] = t_{j+1}
    B, T = tokens.shape
    lam = 0.3

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    with torch.no_grad():
        h = model.hidden_states(tokens)  # h^0
        freqs = model.freqs_cis("cpu")
        ces = []
        for k, mod in enumerate(model.mtp, start=1):
            S = T - k
            emb = model.embed.weight[tokens[:, k:]]  # Emb(t_{i+k})
            cat = torch.cat([rms(emb, mod.enorm.weight), rms(h[:, :S], mod.hnorm.weight)], dim=-1)  # (B, S, 2d)
            h = rms(mod.block(cat @ mod.eh_proj.weight.T, freqs[k:T], causal_mask(S, 0)), mod.norm.weight)
            logp = torch.log_softmax(h @ model.head.weight.T, dim=-1)  # (B, S, V)
            ces.append(-logp.gather(-1, targets[:, k:, None]).mean())  # predicts t_{i+k+1}
        want = lam / 2 * (ces[0] + ces[1])
        loss, got_ces, accs = mtp_loss(model, tokens, targets, lam=lam)
    assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert_close(torch.stack(got_ces), torch.stack(ces), rtol=1e-5, atol=1e-6)
    assert all(0 <= float(a) <= 1 for a in accs) and len(accs) == 2


def test_mtp_loss_ignores_pad_targets(random_tokens):
    model = _model()
    window = random_tokens(2, 11, seed=4)
    tokens, targets = window[:, :-1], window[:, 1:].clone()
    targets[:, -3:] = 256  # <pad>
    with torch.no_grad():
        logits = mtp_logits(model, tokens)[0]
        want = F.cross_entropy(logits[:, :-3].flatten(0, 1), targets[:, 1:-3].flatten())
        _, (ce,), _ = mtp_loss(model, tokens, targets)
    assert_close(ce, want, rtol=1e-6, atol=1e-6)


def test_mtp_gradients_reach_the_shared_embedding_head_and_trunk(random_tokens):
    model = _model().train()
    window = random_tokens(2, 9)
    loss, _, _ = mtp_loss(model, window[:, :-1], window[:, 1:])
    loss.backward()
    for name in ("embed.weight", "head.weight", "layers.0.attn.wq_a.weight", "mtp.0.eh_proj.weight",
                 "mtp.0.block.attn.wkv_b.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_bad_input_raises(random_tokens):
    with pytest.raises(ValueError, match="no MTP module"):
        mtp_logits(_model(n_mtp_layers=0), random_tokens(1, 8))
    with pytest.raises(ValueError, match="more than n_mtp_layers=2 positions"):
        mtp_logits(_model(n_mtp_layers=2), random_tokens(1, 2))
    with pytest.raises(ValueError, match="targets must have the shape"):
        mtp_loss(_model(), random_tokens(1, 8), random_tokens(1, 7))


def test_671b_preset_has_one_mtp_module_with_a_7168_x_14336_projection():
    cfg = ModelConfig.from_preset("671B")
    assert cfg.n_mtp_layers == 1
    with torch.device("meta"):
        module = MTPModule(cfg, cfg.n_layers)  # what Transformer(cfg).mtp[0] is (the whole model takes ~20 s)
    assert module.eh_proj.weight.shape == (7168, 14336)  # M_1 in R^{d x 2d}
    assert module.block.layer_id == 61 and isinstance(module.block.ffn, MoE)  # the hub's model.layers.61
    stored = sum(t.numel() for t in [*module.parameters(), *module.buffers()])  # + the gate's bias buffer
    assert stored == mtp_params(cfg) == 11_610_068_224


# ---------------------------------------------------------------------------------------------- training
def test_paper_lambda_schedule():
    assert paper_lambda(0.0) == 0.3 and paper_lambda(0.67) == 0.3  # the first 10T of 14.8T tokens
    assert paper_lambda(10 / 14.8) == 0.1 and paper_lambda(0.68) == 0.1 and paper_lambda(1.0) == 0.1
    with pytest.raises(ValueError, match=r"fraction of training must be in \[0, 1\]"):
        paper_lambda(1.5)
    assert MTPLoss().current_lambda(0.5) == 0.3 and MTPLoss().current_lambda(0.9) == 0.1
    assert MTPLoss(lam=0.2).current_lambda(0.9) == 0.2
    assert MTPLoss(schedule=lambda f: 1 - f).current_lambda(0.25) == 0.75


@pytest.mark.parametrize("kwargs, match", [
    (dict(lam=0.3, schedule=paper_lambda), "not both"),
    (dict(lam=-1.0), "lam must be a number >= 0"),
    (dict(schedule=0.3), "schedule must be a callable"),
])
def test_mtp_loss_hook_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MTPLoss(**kwargs)


def test_mtp_loss_hook_needs_mtp_modules(data):
    trainer = Trainer(_model(n_mtp_layers=0), TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1),
                      data, hooks=[MTPLoss()], progress=False)
    with pytest.raises(ValueError, match="MTPLoss needs a model with MTP modules"):
        trainer.fit()


def test_training_with_mtp_loss_through_the_trainer(trained):
    _, history = trained
    first, last = history[0], history[-1]
    for key in ("mtp", "mtp_lambda", "mtp_ce_1", "mtp_acc_1", "train_loss", "val_loss"):
        assert key in last, key
    assert first["mtp_ce_1"] < math.log(259) + 0.2  # starts near uniform
    assert last["mtp_ce_1"] < first["mtp_ce_1"] - 1.0  # the MTP loss falls
    assert last["mtp"] < first["mtp"]
    assert last["mtp_acc_1"] > first["mtp_acc_1"]
    # the paper's schedule, by fraction of steps: 0.3, then 0.1 from 67.6% of training on
    assert first["mtp_lambda"] == pytest.approx(0.3) and last["mtp_lambda"] == pytest.approx(0.1)
    assert first["mtp"] == pytest.approx(0.3 * first["mtp_ce_1"], rel=1e-6)  # (lambda / D) * CE with D = 1


def test_mtp_loss_term_is_lambda_over_depth_times_the_ce_sum(data):
    model = _model(n_mtp_layers=2).train()
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, log_every=1, eval_every=0, eval_batches=1)
    history = Trainer(model, cfg, data, hooks=[MTPLoss(lam=0.5)], progress=False).fit()
    for h in history:
        assert h["mtp_lambda"] == pytest.approx(0.5)
        assert h["mtp"] == pytest.approx(0.5 / 2 * (h["mtp_ce_1"] + h["mtp_ce_2"]), rel=1e-6)


def test_evaluate_mtp(trained, data):
    model, _ = trained
    batches = data.val_batches(2, 4, 32)
    stats = evaluate_mtp(model, batches)
    assert set(stats) == {"main_ce", "main_acc", "mtp_ce_1", "mtp_acc_1", "mtp_agree_1"}
    with torch.no_grad():
        b = batches[0]
        logits = mtp_logits(model, b.inputs)[0]
        acc0 = (logits.argmax(-1) == b.targets[:, 1:]).float().mean()
        agree0 = (logits.argmax(-1) == model(b.inputs)[:, 1:].argmax(-1)).float().mean()
    assert 0 < stats["mtp_acc_1"] < 1 and stats["mtp_ce_1"] > stats["main_ce"]  # the token after next is harder
    assert abs(acc0 - stats["mtp_acc_1"]) < 0.2 and abs(agree0 - stats["mtp_agree_1"]) < 0.2
    one = evaluate_mtp(model, batches[:1])
    assert one["mtp_acc_1"] == pytest.approx(float(acc0)) and one["mtp_agree_1"] == pytest.approx(float(agree0))
    assert model.training is False


# ---------------------------------------------------------------------------------------------- speculative decoding
def _check_counts(ids, stats):
    assert stats.new_tokens == len(ids)
    assert stats.main_forwards == 1 + stats.drafted  # the prefill, then one verification per draft
    assert 0 <= stats.accepted <= stats.drafted
    # each verification emits 1 token, or 2 when the draft is accepted (1 if the stop falls between them)
    assert stats.drafted + stats.accepted <= stats.new_tokens <= 1 + stats.drafted + stats.accepted
    assert stats.forwards_per_token == pytest.approx(stats.main_forwards / stats.new_tokens)


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_speculative_equals_greedy_on_a_random_model(attn_impl, random_tokens):
    model = _model(seed=1)
    for seed in range(4):
        prompt = [BOS_ID] + random_tokens(1, 3 + 2 * seed, seed=seed)[0].tolist()
        want = generate(model, [prompt], 40, eos_id=None, attn_impl=attn_impl)[0]
        ids, stats = speculative_generate(model, prompt, 40, eos_id=None, attn_impl=attn_impl)
        assert ids == want
        _check_counts(ids, stats)


def test_speculative_with_two_mtp_modules_drafts_with_the_first(random_tokens):
    model = _model(n_mtp_layers=2, seed=2)
    prompt = [BOS_ID] + random_tokens(1, 6, seed=5)[0].tolist()
    ids, stats = speculative_generate(model, prompt, 24, eos_id=None)
    assert ids == generate(model, [prompt], 24, eos_id=None)[0]
    _check_counts(ids, stats)


@pytest.mark.parametrize("prompt", ["def add(a, b):\n", "The cat", "12 + 39 = "])
def test_speculative_equals_greedy_on_a_trained_model(trained, prompt):
    model, _ = trained
    ids0 = encode(prompt, bos=True)
    want = generate(model, [ids0], 48)[0]
    ids, stats = speculative_generate(model, ids0, 48)
    assert ids == want
    _check_counts(ids, stats)
    assert stats.accepted > 0 and stats.forwards_per_token < 1


def test_drafts_are_the_mtp_predictions_of_the_full_sequence(trained, monkeypatch):
    """The MTP module's own KV cache stays consistent with the accepted tokens: every draft equals the depth-1
    prediction recomputed over the whole final sequence at that slot."""
    model, _ = trained
    drafts = []
    extend = spec._Drafter.extend

    def recording(self, h, next_tokens):
        d = extend(self, h, next_tokens)
        drafts.append((self.cache.seq_len - 1, d))  # the last slot written drafts the token two after it
        return d

    monkeypatch.setattr(spec._Drafter, "extend", recording)
    prompt = encode("x = 3\ny = ", bos=True)
    ids, stats = speculative_generate(model, prompt, 30, eos_id=None)
    seq = torch.tensor([prompt + ids])
    with torch.no_grad():
        full = mtp_logits(model, seq)[0][0].argmax(-1)  # (T - 1,): slot j predicts t_{j+2}
    assert len(drafts) == stats.mtp_forwards
    for slot, d in drafts:
        assert d == int(full[slot]), slot
    # accepted drafts are those equal to the token that followed
    accepted = sum(int(full[slot]) == seq[0, slot + 2] for slot, _ in drafts if slot + 2 < seq.size(1))
    assert accepted >= stats.accepted


def test_speculative_stops_like_generate(trained):
    model, _ = trained
    prompt = encode("def f(x):\n", bos=True)
    free = generate(model, [prompt], 30, eos_id=None)[0]
    for eos in (free[0], free[1], free[5], free[-1]):  # stop on the prefill token, a draft, a bonus token, ...
        want = generate(model, [prompt], 30, eos_id=eos)[0]
        ids, stats = speculative_generate(model, prompt, 30, eos_id=eos)
        assert ids == want and ids[-1] == eos
        _check_counts(ids, stats)
    for n in (1, 2, 3):
        ids, stats = speculative_generate(model, prompt, n, eos_id=None)
        assert ids == free[:n]
        _check_counts(ids, stats)


def test_speculative_uses_the_last_position(random_tokens):
    model = _model(max_seq_len=24, original_seq_len=24)
    prompt = [BOS_ID] + random_tokens(1, 9)[0].tolist()  # 10 + 14 = max_seq_len
    ids, _ = speculative_generate(model, prompt, 14, eos_id=None)
    assert ids == generate(model, [prompt], 14, eos_id=None)[0]


def test_speculative_bad_input():
    with pytest.raises(ValueError, match="needs a model with an MTP module"):
        speculative_generate(_model(n_mtp_layers=0), [BOS_ID, 1], 4)
    model = _model()
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        speculative_generate(model, [BOS_ID, 1], 0)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        speculative_generate(model, [BOS_ID, 1], model.config.max_seq_len)
    with pytest.raises(ValueError, match="token ids must be integers"):
        speculative_generate(model, [BOS_ID, 999], 4)
