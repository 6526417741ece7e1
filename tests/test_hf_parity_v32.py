"""Cross-check against transformers' DeepseekV32ForCausalLM (DeepSeek-V3.2-Exp) through the checkpoint format, both
directions, and the traps a re-implementation falls into, each shown to break the parity.

Float32, eager attention, prefill of 16 tokens, batch 2; logits agree to 1e-4. "sparse" keeps 5 of up to 16 tokens
(the selection matters, checked), "yarn" the same with YaRN active, "dense" keeps index_topk = 16 = the sequence
length, where DSA is exactly dense DeepSeek-V3 attention (checked against DeepseekV3ForCausalLM with the same weights).

Where transformers differs from the official code (DeepSeek-V3.2-Exp `inference/model.py`), and why the logits still
agree: its indexer computes ReLU(q . k * d^-0.5) and then the head weights (official: d^-0.5 folded into the
weights; equal because the scale is positive); it skips the Hadamard rotation and the FP8 rounding of q and k (so do
we: exact arithmetic); it masks unselected keys with finfo.min rather than -inf (both give exp = 0); it runs the
indexer under no_grad (inference only: the training objective is ours); and it drops MTP layers on load. One
difference is real and pinned by `test_hf_loses_the_mtp_layer`.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3ForCausalLM, DeepseekV32Config, DeepseekV32ForCausalLM  # noqa: E402

from dsv3_ref import ModelConfig, Transformer, from_pretrained, save_pretrained  # noqa: E402
from dsv3_ref.nn import attention  # noqa: E402
from dsv3_ref.nn import indexer as dsa  # noqa: E402
from dsv3_ref.nn.rope import apply_rotary_emb  # noqa: E402

T = 16
DSA = dict(index_n_heads=8, index_head_dim=16, index_topk=5)
CONFIGS = {
    "sparse": dict(DSA),
    "yarn": dict(DSA, max_seq_len=256, original_seq_len=32, rope_factor=8.0, mscale=0.707),
    "dense": dict(DSA, index_topk=T),
}
STD, NORM_STD, BIAS_MAX = 0.15, 0.2, 0.3


def _tokens(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Matrices N(0, STD), norm weights 1 + N(0, NORM_STD), norm biases N(0, NORM_STD), correction biases
    U(0, BIAS_MAX)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            base = 1.0 if name.endswith("weight") else 0.0
            p.copy_(base + NORM_STD * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(STD * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
        if name.endswith(("e_score_correction_bias", "gate.bias")):
            b.copy_(BIAS_MAX * torch.rand(b.shape, generator=gen))


def _hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _ours_logits(model: Transformer, tokens: torch.Tensor, attn_impl: str | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, attn_impl=attn_impl)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """{name: (hf model, ours loaded from the HF checkpoint)} for every config (HF -> ours)."""
    out = {}
    for name, overrides in CONFIGS.items():
        cfg = ModelConfig.from_preset("tiny", **overrides)
        hf_model = DeepseekV32ForCausalLM(DeepseekV32Config(**cfg.to_hf(), attn_implementation="eager")).eval()
        _randomize(hf_model, seed=0)
        path = tmp_path_factory.mktemp(name)
        hf_model.save_pretrained(path)
        out[name] = (cfg, hf_model, from_pretrained(path).eval())
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_checkpoint_loads_into_ours(name, hf_pair):
    cfg, hf_model, ours = hf_pair[name]
    assert ours.config == cfg
    tokens = _tokens(cfg)
    want = _hf_logits(hf_model, tokens)
    for impl in ("naive", "absorb"):  # DSA in MLA's MHA mode (top-k mask) and MQA mode (gathered latent rows)
        diff = (want - _ours_logits(ours, tokens, impl)).abs().max().item()
        print(f"{name}, {impl}: HF -> ours max |dlogit| = {diff:.2e}")
        assert diff < 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_our_checkpoint_loads_into_hf(name, tmp_path):
    cfg = ModelConfig.from_preset("tiny", **CONFIGS[name])
    ours = Transformer(cfg).eval()
    _randomize(ours, seed=1)
    save_pretrained(ours, tmp_path)
    hf_model, info = DeepseekV32ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                            dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    tokens = _tokens(cfg)
    diff = (_hf_logits(hf_model.eval(), tokens) - _ours_logits(ours, tokens)).abs().max().item()
    print(f"{name}: ours -> HF max |dlogit| = {diff:.2e}")
    assert diff < 1e-4


def test_the_selection_matters_in_the_sparse_configs(hf_pair):
    for name in ("sparse", "yarn"):
        cfg, _, ours = hf_pair[name]
        tokens = _tokens(cfg)
        sparse = _ours_logits(ours, tokens)
        for layer in ours.layers:
            layer.attn.sparse = False
        dense = _ours_logits(ours, tokens)
        for layer in ours.layers:
            layer.attn.sparse = True
        assert (sparse - dense).abs().max() > 1e-2, f"{name}: top-{cfg.index_topk} of {T} changed nothing"


def test_topk_equal_to_the_length_is_dense_v3(hf_pair, tmp_path):
    """index_topk = T: every visible token is kept, so V3.2 is DeepSeek-V3 with an unused indexer. The same weights
    without the indexer, loaded by transformers' DeepseekV3ForCausalLM, give the same logits."""
    cfg, hf_model, ours = hf_pair["dense"]
    v3 = Transformer(cfg.replace(index_n_heads=0, index_head_dim=0, index_topk=0)).eval()
    v3.load_state_dict({k: v for k, v in ours.state_dict().items() if ".indexer." not in k})
    save_pretrained(v3, tmp_path)
    hf_v3 = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    tokens = _tokens(cfg)
    want = _hf_logits(hf_model, tokens)
    assert (_ours_logits(v3, tokens) - want).abs().max() < 1e-4
    assert (_hf_logits(hf_v3, tokens) - want).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------- the traps
def _interleaved_rope(self, x, freqs_cis):
    pe, nope = x.split([self.rope_head_dim, self.head_dim - self.rope_head_dim], dim=-1)
    return torch.cat([apply_rotary_emb(pe, freqs_cis), nope], dim=-1)  # the main MLA's layout


def _rope_part_last(self, x, freqs_cis):
    nope, pe = x.split([self.head_dim - self.rope_head_dim, self.rope_head_dim], dim=-1)
    return torch.cat([nope, apply_rotary_emb(pe, freqs_cis, interleaved=False)], dim=-1)  # MLA's order


def _softmax_scores(q, k, weights):
    logits = torch.einsum("bshd,btd->bsht", q.float(), k.float()).softmax(dim=-1)  # softmax instead of ReLU
    return torch.einsum("bsht,bsh->bst", logits, weights.float())


def _selection_without_causal_mask(indices, T, mask=None):
    return torch.full((*indices.shape[:2], T), float("-inf")).scatter_(-1, indices, 0.0)  # mask never re-added


TRAPS = {
    "interleaved RoPE in the indexer": (dsa.Indexer, "_rotate", _interleaved_rope),
    "rotary part last in the indexer head": (dsa.Indexer, "_rotate", _rope_part_last),
    "softmax instead of ReLU": (dsa, "index_scores", _softmax_scores),
    "causal mask lost after the selection": (attention, "sparse_mask", _selection_without_causal_mask),
}


@pytest.mark.parametrize("trap", TRAPS)
def test_each_trap_breaks_the_parity(trap, hf_pair, monkeypatch):
    cfg, hf_model, ours = hf_pair["sparse"]
    tokens = _tokens(cfg)
    want = _hf_logits(hf_model, tokens)
    assert (_ours_logits(ours, tokens) - want).abs().max() < 1e-4
    owner, attr, bad = TRAPS[trap]
    monkeypatch.setattr(owner, attr, bad)
    diff = (_ours_logits(ours, tokens) - want).abs().max().item()
    print(f"{trap}: max |dlogit| = {diff:.2e}")
    assert diff > 1e-2


def test_hf_loses_the_mtp_layer(tmp_path):
    """transformers' V3.2 has no MTP module: an MTP layer in the checkpoint is ignored on load (ours keeps it)."""
    cfg = ModelConfig.from_preset("tiny", **DSA, n_mtp_layers=1)
    ours = Transformer(cfg).eval()
    _randomize(ours, seed=2)
    save_pretrained(ours, tmp_path)
    hf_model, info = DeepseekV32ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                            dtype=torch.float32, output_loading_info=True)
    assert not hasattr(hf_model.model, "mtp") and len(hf_model.model.layers) == cfg.n_layers
    assert from_pretrained(tmp_path).config.n_mtp_layers == 1
    tokens = _tokens(cfg)
    assert (_hf_logits(hf_model.eval(), tokens) - _ours_logits(ours, tokens)).abs().max() < 1e-4
