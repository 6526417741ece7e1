"""Cross-check against transformers' DeepseekV3ForCausalLM through the checkpoint format, both directions.

HF -> ours: a randomly initialised HF model saved with its own `save_pretrained`, loaded by
`dsv3_ref.from_pretrained`. Ours -> HF: ours saved with `dsv3_ref.save_pretrained`, loaded by
`DeepseekV3ForCausalLM.from_pretrained`. Float32, eager attention, prefill of 16 tokens, batch 2; logits agree to
1e-4. The correction biases are positive, so biased scores stay > 0 (where HF's and the official group masking agree
even in older transformers versions, which masked with 0 rather than -inf).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from dsv3_ref import ModelConfig, Transformer, from_pretrained, save_pretrained  # noqa: E402

CONFIGS = {
    # (a) correction biases alone decide between experts (one group), query compression on
    "bias": dict(n_expert_groups=1, n_limited_groups=1),
    # (b) group-limited routing: 4 of 16 experts per group, top-2 of 4 groups, 3 experts per token
    "groups": dict(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3),
    # (c) no query compression (q_proj; HF q_lora_rank = null); (a), (b), (d) use q_lora_rank = 32
    "no_q_lora": dict(q_lora_rank=0),
    # (d) YaRN active: max_seq_len > original_seq_len, factor 8, mscale 0.707 (V2-style, != 1)
    "yarn": dict(max_seq_len=256, original_seq_len=32, rope_factor=8.0, mscale=0.707),
}
STD, NORM_STD, BIAS_MAX = 0.15, 0.2, 0.3


@torch.no_grad()
def _randomize(named_params, named_buffers, seed: int) -> None:
    """Every matrix N(0, STD), every norm weight 1 + N(0, NORM_STD), every correction bias U(0, BIAS_MAX)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in named_params:
        is_norm = name.endswith("norm.weight")
        p.copy_((1.0 if is_norm else 0.0) + (NORM_STD if is_norm else STD) * torch.randn(p.shape, generator=gen))
    for name, b in named_buffers:
        if name.endswith(("e_score_correction_bias", "gate.bias")):
            b.copy_(BIAS_MAX * torch.rand(b.shape, generator=gen))


def _first_moe(model: Transformer):
    return model.layers[model.config.n_dense_layers].ffn


def _check_routing(name: str, model: Transformer, tokens: torch.Tensor) -> None:
    """The configs exercise what they claim: (a) the bias changes the chosen experts, (b) groups restrict them."""
    moe = _first_moe(model)
    with torch.no_grad():
        model(tokens)
    routing, bias = moe.last_routing, moe.gate.bias
    chosen = routing.indices.sort(dim=-1).values
    if name == "bias":
        unbiased = routing.scores.topk(model.config.n_activated_experts, dim=-1).indices.sort(dim=-1).values
        assert (chosen != unbiased).any(dim=-1).sum() > 0, "the correction bias never changed the routing"
    if name == "groups":
        per_group = model.config.n_routed_experts // model.config.n_expert_groups
        groups_used = torch.tensor([len(set((row // per_group).tolist())) for row in chosen])
        assert (groups_used <= model.config.n_limited_groups).all()
        free = (routing.scores + bias).topk(model.config.n_activated_experts, dim=-1).indices.sort(dim=-1).values
        assert (chosen != free).any(dim=-1).sum() > 0, "the group limit never changed the routing"


def _hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_checkpoint_loads_into_ours(name, tmp_path, random_tokens):
    cfg = ModelConfig.from_preset("tiny", **CONFIGS[name])
    hf_model = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg.to_hf(), attn_implementation="eager")).eval()
    _randomize(hf_model.named_parameters(), hf_model.named_buffers(), seed=0)
    hf_model.save_pretrained(tmp_path)

    ours = from_pretrained(tmp_path)
    assert ours.config == cfg  # transformers' config.json (rope_parameters, ...) reads back to the same config
    tokens = random_tokens(2, 16, seed=1, vocab=cfg.vocab_size)
    diff = (_hf_logits(hf_model, tokens) - ours(tokens)).abs().max().item()
    print(f"{name}: HF -> ours max |dlogit| = {diff:.2e}")
    assert diff < 1e-4
    _check_routing(name, ours, tokens)


@pytest.mark.parametrize("name", CONFIGS)
def test_our_checkpoint_loads_into_hf(name, tmp_path, random_tokens):
    cfg = ModelConfig.from_preset("tiny", **CONFIGS[name])
    ours = Transformer(cfg)
    _randomize(ours.named_parameters(), ours.named_buffers(), seed=1)
    save_pretrained(ours, tmp_path)

    hf_model, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                           dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    tokens = random_tokens(2, 16, seed=1, vocab=cfg.vocab_size)
    with torch.no_grad():
        diff = (_hf_logits(hf_model.eval(), tokens) - ours(tokens)).abs().max().item()
    print(f"{name}: ours -> HF max |dlogit| = {diff:.2e}")
    assert diff < 1e-4
