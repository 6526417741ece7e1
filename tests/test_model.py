"""Transformer: shapes, token checks, init, gradients, MTP module, meta-device 671B, bf16, and the KV cache."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dsv3_ref import ModelConfig, MoE, Transformer
from dsv3_ref.nn.attention import causal_mask
from dsv3_ref.nn.layers import MLP
from dsv3_ref.nn.model import MTPModule

TINY = ModelConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def model() -> Transformer:
    m = Transformer(TINY)
    m.reset_parameters(seed=0)
    return m


def test_structure_uses_official_names(model):
    assert isinstance(model.layers[0].ffn, MLP) and not isinstance(model.layers[0].ffn, MoE)
    assert all(isinstance(model.layers[i].ffn, MoE) for i in range(1, TINY.n_layers))
    names = dict(model.named_parameters())
    for key in ["embed.weight", "norm.weight", "head.weight", "layers.0.attn_norm.weight", "layers.0.ffn_norm.weight",
                "layers.0.attn.wq_a.weight", "layers.0.attn.q_norm.weight", "layers.0.attn.wq_b.weight",
                "layers.0.attn.wkv_a.weight", "layers.0.attn.kv_norm.weight", "layers.0.attn.wkv_b.weight",
                "layers.0.attn.wo.weight", "layers.0.ffn.w1.weight", "layers.0.ffn.w2.weight",
                "layers.0.ffn.w3.weight", "layers.1.ffn.gate.weight", "layers.1.ffn.experts.7.w2.weight",
                "layers.1.ffn.shared_experts.w1.weight"]:
        assert key in names, key
    assert model.head.weight.data_ptr() != model.embed.weight.data_ptr()  # untied


def test_logits_shape(model, random_tokens):
    tokens = random_tokens(2, 9, vocab=TINY.vocab_size)
    logits = model(tokens)
    assert logits.shape == (2, 9, TINY.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    hidden = model.hidden_states(tokens)
    assert hidden.shape == (2, 9, TINY.dim)
    assert_close(model.head(hidden), logits, rtol=0, atol=0)  # exact: forward is head(hidden_states), same kernels
    assert model(tokens.int()).shape == (2, 9, TINY.vocab_size)  # int32 ids work too


@pytest.mark.parametrize("tokens, match", [
    (torch.zeros(2, 3), "dtype"),  # float
    (torch.zeros(2, 3, dtype=torch.bool), "dtype"),
    (torch.zeros(2, 3, dtype=torch.int16), "dtype"),  # nn.Embedding only takes int64 / int32
    (torch.zeros(3, dtype=torch.long), "2-D"),
    (torch.zeros(1, 2, 3, dtype=torch.long), "2-D"),
    ([[1, 2, 3]], "2-D"),  # not a tensor
    (torch.tensor([[1, 259]]), r"\[0, vocab_size=259\), got values in \[1, 259\]"),
    (torch.tensor([[-1, 3]]), r"\[0, vocab_size=259\)"),
    (torch.zeros(1, 257, dtype=torch.long), "max_seq_len=256"),
    (torch.zeros(1, 0, dtype=torch.long), "at least one"),
    (torch.zeros(0, 4, dtype=torch.long), "at least one"),
])
def test_bad_tokens_are_value_errors(model, tokens, match):
    with pytest.raises(ValueError, match=match):
        model(tokens)


def test_start_pos_counts_toward_max_seq_len(model):
    model.check_tokens(torch.zeros(1, 6, dtype=torch.long), start_pos=250)
    with pytest.raises(ValueError, match="257 positions exceeds max_seq_len=256"):
        model.check_tokens(torch.zeros(1, 7, dtype=torch.long), start_pos=250)


def test_unknown_attn_impl_at_call(model, random_tokens):
    with pytest.raises(ValueError, match="attn_impl"):
        model(random_tokens(1, 3, vocab=TINY.vocab_size), attn_impl="flash")


def test_deterministic_init():
    a, b = Transformer(TINY), Transformer(TINY)
    a.reset_parameters(seed=123)
    b.reset_parameters(seed=123)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    b.reset_parameters(seed=124)
    assert not torch.equal(a.embed.weight, b.embed.weight)
    # the init itself: N(0, init_std) matrices, unit norms, zero correction bias
    assert a.norm.weight.eq(1).all() and a.layers[0].attn.kv_norm.weight.eq(1).all()
    assert a.layers[1].ffn.gate.bias.eq(0).all()
    std = torch.cat([p.flatten() for n, p in a.named_parameters() if not n.endswith("norm.weight")]).std()
    assert abs(std.item() - TINY.init_std) < 0.02 * TINY.init_std


def test_gradients_reach_every_parameter(random_tokens):
    m = Transformer(TINY)
    m.reset_parameters(seed=1)
    tokens = random_tokens(4, 48, seed=1, vocab=TINY.vocab_size)
    logits = m(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())  # every position
    loss.backward()
    # with 4 x 47 tokens every routed expert gets some; an expert with no token would rightly have no grad
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    zero = [n for n, p in m.named_parameters() if p.grad.abs().max() == 0]
    assert not zero, zero
    for layer in m.layers[TINY.n_dense_layers:]:
        assert layer.ffn.gate.bias.grad is None and not layer.ffn.gate.bias.requires_grad


def test_mtp_module_forward_and_gradients(random_tokens):
    cfg = TINY.replace(n_mtp_layers=2)
    m = Transformer(cfg)
    m.reset_parameters(seed=2)
    assert len(m.mtp) == 2 and all(isinstance(k, MTPModule) for k in m.mtp)
    assert m.mtp[0].eh_proj.weight.shape == (cfg.dim, 2 * cfg.dim)
    assert isinstance(m.mtp[0].block.ffn, MoE) and m.mtp[1].block.layer_id == cfg.n_layers + 1
    tokens = random_tokens(2, 12, seed=2, vocab=TINY.vocab_size)
    B, T = 2, 11  # slot i combines h_i with Emb(t_{i+1})
    h = m.hidden_states(tokens[:, :T])
    fc = m.freqs_cis(h.device)[1:T + 1]  # slot i sits at the embedded token's position i + 1
    hk = m.mtp[0](h, m.embed(tokens[:, 1:]), fc, causal_mask(T, 0))
    assert hk.shape == (B, T, cfg.dim)
    logits = m.head(hk)
    assert logits.shape == (B, T, cfg.vocab_size)
    logits[:, :-1].logsumexp(-1).mean().backward()
    missing = [n for n, p in m.mtp[0].named_parameters() if p.grad is None]
    assert not missing, missing
    # causal: the MTP slots never see later slots
    h2 = h.detach().clone()
    h2[:, 7] += 1.0
    with torch.no_grad():
        a = m.mtp[0](h.detach(), m.embed(tokens[:, 1:]), fc, causal_mask(T, 0))
        b = m.mtp[0](h2, m.embed(tokens[:, 1:]), fc, causal_mask(T, 0))
    assert_close(b[:, :7], a[:, :7], rtol=0, atol=1e-6)


def _count(module: torch.nn.Module) -> int:
    """Parameters plus the gate correction biases (the official code, and the published counts, count them)."""
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def test_671b_on_meta_device():
    """Full-width 671B on the meta device. Building all 61 layers takes ~10 s (45k Linear modules), so build the 3
    dense layers and one MoE layer and count the other 57 MoE layers as copies (the accounting tests go further)."""
    cfg = ModelConfig.from_preset("671B")
    with torch.device("meta"):
        m = Transformer(cfg.replace(n_layers=4))
    assert all(p.is_meta for p in m.parameters())
    moe_layer = m.layers[3]
    assert isinstance(moe_layer.ffn, MoE) and len(moe_layer.ffn.experts) == 256
    assert moe_layer.ffn.gate.bias.shape == (256,) and moe_layer.ffn.gate.bias.dtype == torch.float32
    assert moe_layer.attn.wq_b.weight.shape == (128 * 192, 1536) and moe_layer.attn.wkv_b.weight.shape == (32768, 512)
    main = _count(m) - _count(m.mtp) + (cfg.n_layers - 4) * _count(moe_layer)
    assert main == 671_026_419_200
    assert _count(m.mtp) == 11_610_068_224  # one MTP module (embedding and head shared with the main model)


def test_bf16_forward(random_tokens):
    m = Transformer(TINY)
    m.reset_parameters(seed=3)
    tokens = random_tokens(2, 10, seed=3, vocab=TINY.vocab_size)
    ref = m(tokens)
    m.to(torch.bfloat16)
    assert m.embed.weight.dtype == torch.bfloat16 and m.layers[1].ffn.gate.bias.dtype == torch.float32
    fc = m.freqs_cis(torch.device("cpu"))
    assert fc.dtype == torch.complex64 and fc.shape == (TINY.max_seq_len, TINY.qk_rope_head_dim // 2)
    logits = m(tokens)
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 10, TINY.vocab_size)
    assert torch.isfinite(logits.float()).all()
    assert_close(logits.float(), ref, rtol=0, atol=0.05 * ref.abs().max().item())
    cache = m.new_cache(2, max_len=10, attn_impl="absorb")
    assert cache.layers[0]["kv"].dtype == torch.bfloat16
    out = torch.cat([m(tokens[:, :6], cache=cache), m(tokens[:, 6:8], cache=cache), m(tokens[:, 8:], cache=cache)], 1)
    assert_close(out.float(), logits.float(), rtol=0, atol=0.05 * ref.abs().max().item())


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_cached_logits_equal_uncached(model, impl, random_tokens):
    tokens = random_tokens(2, 14, seed=4, vocab=TINY.vocab_size)
    full = model(tokens)
    cache = model.new_cache(2, attn_impl=impl)
    pieces, pos = [], 0
    for S in (5, 1, 3, 1, 4):  # prefill, decode, a chunk at start_pos > 0, ...
        pieces.append(model(tokens[:, pos:pos + S], cache=cache))
        pos += S
        assert cache.seq_len == pos
    assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    assert_close(model(tokens, attn_impl="absorb" if impl == "naive" else "naive"), full, rtol=1e-5, atol=1e-5)


def test_causality(model, random_tokens):
    tokens = random_tokens(2, 12, seed=5, vocab=TINY.vocab_size)
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % TINY.vocab_size
    a, b = model(tokens), model(changed)
    assert_close(b[:, :8], a[:, :8], rtol=0, atol=1e-5)
    assert (b[:, 8:] - a[:, 8:]).abs().amax() > 1e-4
