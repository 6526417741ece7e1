"""Parameter, KV-cache and FLOP accounting for a `ModelConfig`, in closed form and from the instantiated model.

Conventions (report §4.2; the numbers they give: docs/facts.md, Parameters):

* Every count includes the gate's correction bias (`e_score_correction_bias`, 1 per routed expert, present only
  with sigmoid scoring): the official code stores it as a parameter; we, like transformers, keep it as a buffer.
* **Total** = the main model (embedding, `n_layers` blocks, final norm, head) without the MTP modules: the report's
  671B. Each MTP module is counted *as stored* but without the embedding and head it shares with the main model:
  block + eh_proj + enorm + hnorm + norm (the hub's `shared_head.norm`).
* **Activated** parameters per token = everything a token passes through: all attention and dense layers, and per
  MoE layer the `n_activated_experts` chosen routed experts, the shared experts, the gate (weight and bias) and the
  two block norms; plus the final norm. Three conventions differ only by the embedding and the head:
  `activated_params(cfg, head=False)` (body only), `activated_params(cfg)` (body + head: the convention that gives
  the report's "37B" = 36.6B, V2-Lite's "2.4B" and V2's "21B") and `activated_params(cfg, embedding=True)`.

`param_counts(cfg)` (closed form, no module built) and `meta_param_counts(cfg)` (the `Transformer` built on the meta
device, its named parameters and buffers grouped by name: small models of the same config, extrapolated layer by layer,
or with full=True the whole model) return the same `COMPONENTS` dict; `check_counts(cfg)` asserts that they agree
exactly. `report(cfg)` prints everything; `python -m dsv3_ref info 671B` is its CLI.
"""

from __future__ import annotations

import functools
import gc
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..config import ATTN_IMPLS, PRESETS, ModelConfig
from ..fp8.formats import BLOCK  # the hub's weight_block_size: one fp32 weight_scale_inv per 128 x 128 block

# whole-model components, in the order the report prints them; "mtp" is every MTP module, as stored (see above)
COMPONENTS = ("embed", "attention", "block_norms", "dense_mlp", "routed_experts", "shared_experts", "gate_weight",
              "gate_bias", "final_norm", "head", "mtp")
MAIN_COMPONENTS = COMPONENTS[:-1]

# KV-cache layouts compared by `kv_cache_bytes`
KV_SCHEMES = ("mla", "naive", "mha", "gqa", "mqa")


# ---------------------------------------------------------------------------------------------- closed form
def mla_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of one MLA layer by projection (official names), and their sum under "total".

    With query compression (q_lora_rank = d_c' > 0): wq_a (d_c' x dim), q_norm (d_c'), wq_b (H*(d_h+d_r) x d_c');
    without (V2-Lite): wq (H*(d_h+d_r) x dim). Always: wkv_a ((d_c+d_r) x dim), kv_norm (d_c),
    wkv_b (H*(d_h+d_v) x d_c), wo (dim x H*d_v); with an indexer (V3.2) its total under "indexer". 187,107,328 at
    671B, 201,066,752 at 671B-V3.2.
    """
    H, d = cfg.n_heads, cfg.dim
    q_out = H * cfg.qk_head_dim
    if cfg.q_lora_rank:
        parts = {"wq_a": d * cfg.q_lora_rank, "q_norm": cfg.q_lora_rank, "wq_b": cfg.q_lora_rank * q_out}
    else:
        parts = {"wq": d * q_out}
    parts.update({
        "wkv_a": d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        "kv_norm": cfg.kv_lora_rank,
        "wkv_b": cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
        "wo": H * cfg.v_head_dim * d,
    })
    if cfg.has_indexer:  # V3.2: the lightning indexer lives in the attention layer (`self_attn.indexer` on the hub)
        parts["indexer"] = indexer_params(cfg)["total"]
    parts["total"] = sum(parts.values())
    return parts


def layer_params(cfg: ModelConfig) -> dict[str, int]:
    """Per-layer building blocks (closed form).

    Keys: mla, dense_mlp (3*dim*inter_dim), expert (one routed expert, 3*dim*moe_inter_dim), routed_experts
    (all of one layer), shared_experts (one SwiGLU of width n_shared_experts*moe_inter_dim; 0 without), gate_weight
    (n_routed_experts*dim), gate_bias (n_routed_experts with sigmoid scoring, else 0), block_norms (attn_norm +
    ffn_norm, 2*dim), dense_layer, moe_layer, moe_layer_activated (top-k routed + shared + gate + MLA + norms),
    eh_proj (the MTP projection M, dim x 2*dim), mtp_module (MoE block + eh_proj + enorm + hnorm + norm).
    """
    d = cfg.dim
    p = {
        "mla": mla_params(cfg)["total"],
        "dense_mlp": 3 * d * cfg.inter_dim,
        "expert": 3 * d * cfg.moe_inter_dim,
        "shared_experts": 3 * d * cfg.n_shared_experts * cfg.moe_inter_dim,
        "gate_weight": cfg.n_routed_experts * d,
        "gate_bias": cfg.n_routed_experts if cfg.score_func == "sigmoid" else 0,
        "block_norms": 2 * d,
        "eh_proj": 2 * d * d,
    }
    p["routed_experts"] = cfg.n_routed_experts * p["expert"]
    attn = p["mla"] + p["block_norms"]
    router_and_shared = p["shared_experts"] + p["gate_weight"] + p["gate_bias"]
    p["dense_layer"] = attn + p["dense_mlp"]
    p["moe_layer"] = attn + p["routed_experts"] + router_and_shared
    p["moe_layer_activated"] = attn + cfg.n_activated_experts * p["expert"] + router_and_shared
    mtp_block = p["moe_layer"] if cfg.is_moe_layer(cfg.n_layers) else p["dense_layer"]
    p["mtp_module"] = mtp_block + p["eh_proj"] + 3 * d
    return p


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Whole-model parameters (buffers included) by `COMPONENTS`, in closed form: nothing is instantiated."""
    p = layer_params(cfg)
    L, n_moe, d = cfg.n_layers, cfg.n_moe_layers, cfg.dim
    return {
        "embed": cfg.vocab_size * d,
        "attention": L * p["mla"],
        "block_norms": L * p["block_norms"],
        "dense_mlp": cfg.n_dense_layers * p["dense_mlp"],
        "routed_experts": n_moe * p["routed_experts"],
        "shared_experts": n_moe * p["shared_experts"],
        "gate_weight": n_moe * p["gate_weight"],
        "gate_bias": n_moe * p["gate_bias"],
        "final_norm": d,
        "head": d * cfg.vocab_size,
        "mtp": cfg.n_mtp_layers * p["mtp_module"],
    }


def total_params(cfg: ModelConfig) -> int:
    """Main-model parameters without MTP (671,026,419,200 at 671B: the report's "671B")."""
    counts = param_counts(cfg)
    return sum(counts[k] for k in MAIN_COMPONENTS)


def mtp_params(cfg: ModelConfig) -> int:
    """All MTP modules as stored, without the shared embedding and head (11,610,068,224 at 671B, D = 1)."""
    return param_counts(cfg)["mtp"]


def activated_params(cfg: ModelConfig, head: bool = True, embedding: bool = False) -> int:
    """Parameters one token passes through in the main model (see the module docstring for what counts).

    The default (head, no embedding) is the report's convention: 36,625,618,432 at 671B ("37B"). head=False gives
    the body only (35,698,939,392); embedding=True adds the embedding row's table (37,552,297,472).
    """
    p = layer_params(cfg)
    n = (cfg.n_dense_layers * p["dense_layer"] + cfg.n_moe_layers * p["moe_layer_activated"] + cfg.dim)
    return n + head * cfg.dim * cfg.vocab_size + embedding * cfg.vocab_size * cfg.dim


def mtp_activated_params(cfg: ModelConfig) -> int:
    """Activated parameters per token of all MTP modules, without the shared embedding and head: per module the
    block with its top-k routed + shared experts, eh_proj and three norms (688,100,608 at 671B)."""
    p = layer_params(cfg)
    block = p["moe_layer_activated"] if cfg.is_moe_layer(cfg.n_layers) else p["dense_layer"]
    return cfg.n_mtp_layers * (block + p["eh_proj"] + 3 * cfg.dim)


# ---------------------------------------------------------------------------------------------- from the model
_NAME_RULES = [  # (regex on a parameter/buffer name, component); the first match wins
    (r"embed\.", "embed"),
    (r"head\.", "head"),
    (r"norm\.weight$", "final_norm"),
    (r"mtp\.", "mtp"),
    (r"layers\.\d+\.attn\.", "attention"),
    (r"layers\.\d+\.(attn_norm|ffn_norm)\.", "block_norms"),
    (r"layers\.\d+\.ffn\.experts\.", "routed_experts"),
    (r"layers\.\d+\.ffn\.shared_experts\.", "shared_experts"),
    (r"layers\.\d+\.ffn\.gate\.weight$", "gate_weight"),
    (r"layers\.\d+\.ffn\.gate\.bias$", "gate_bias"),
    (r"layers\.\d+\.ffn\.w[123]\.", "dense_mlp"),
]


def component_of(name: str) -> str:
    """The `COMPONENTS` entry a `Transformer` parameter or buffer name belongs to (ValueError if none)."""
    return _component_of(_NUMBER.sub(".0.", name))  # layer and expert numbers do not matter: classify each form once


_NUMBER = re.compile(r"\.\d+\.")


@functools.cache
def _component_of(name: str) -> str:
    for pattern, component in _NAME_RULES:
        if re.match(pattern, name):
            return component
    raise ValueError(f"component_of: cannot classify parameter/buffer {name!r}")


def count_by_component(model: nn.Module) -> dict[str, int]:
    """numel of a `Transformer`'s named parameters AND buffers (the gate bias is a buffer), grouped by component."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        counts[component_of(name)] += t.numel()
    return counts


@contextmanager
def _shapes_only() -> Iterator[None]:
    """Build modules for their shapes only (on the meta device), fast: `nn.Linear` and `nn.Embedding` skip their
    default initialisation (on the meta device it writes nothing, yet each call runs through Python decompositions:
    60% of building the 671B model's 47K linear layers) and the cyclic garbage collector pauses (it walks the growing
    module tree again and again: 40% of the rest). Not thread-safe: it swaps the two classes' `reset_parameters`."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    collecting = gc.isenabled()
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    gc.disable()
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved
        if collecting:
            gc.enable()


def meta_param_counts(cfg: ModelConfig, full: bool = False) -> dict[str, int]:
    """`count_by_component` of `Transformer(cfg)` as built on the meta device (shapes only: no memory, no
    initialisation), from small models of the same config (default) or, with full=True, from the whole model.

    Why the small models give the exact counts: the model is its top (embedding, final norm, head, the MTP modules)
    plus `n_dense_layers` dense and `n_moe_layers` MoE blocks, and a block's parameter and buffer shapes depend only
    on `cfg` and on whether it is MoE (`Block(layer_id, cfg)` asks `cfg.is_moe_layer(layer_id)`); the top does not
    depend on the layer counts (each MTP block is an MoE block: `cfg.is_moe_layer(n_layers)` holds whenever
    n_dense_layers <= n_layers). So every component's count is an affine function of the two layer counts,
        count(n_dense, n_moe) = base + n_dense * per_dense + n_moe * per_moe,
    with three integer unknowns per component. Three meta builds with the same config but (n_dense, n_moe) = (1, 1),
    (2, 1), (1, 2) layers determine them: per_dense = count(2, 1) - count(1, 1), per_moe = count(1, 2) - count(1, 1),
    and the real counts follow in integer arithmetic (a kind of layer the config has none of stays at 0 in every
    build: with n_dense_layers = 0 the builds are (0, 1), (0, 2)). The counts are still read off instantiated
    modules, not the closed form, so `check_counts` keeps comparing two independent derivations.

    The premise is checked, not assumed: a fourth build at (3, 3) (or (0, 3), (3, 0)) must match the prediction in
    every component, or RuntimeError. A block whose shapes depended on its layer id, or a top part growing with the
    layer count other than linearly (a table per pair of layers, say), would miss it; what no small build can see is a
    block that differs only beyond the layer ids sampled, which `full=True` (the tests, for every preset) would.
    At 671B: 4 models of at most 6 layers, 0.5 s on 2 cores, instead of 61 layers, 5.5 s with the counting.
    """
    if full:
        return _meta_build_counts(cfg)
    target = (cfg.n_dense_layers, cfg.n_moe_layers)
    kinds = [k for k in range(2) if target[k]]  # 0: dense, 1: MoE; a kind the config has none of stays at 0
    one = tuple(min(n, 1) for n in target)
    base = _layers_counts(cfg, one)
    per_layer = {}  # kind -> counts of one more layer of that kind
    for k in kinds:
        more = _layers_counts(cfg, tuple(n + (i == k) for i, n in enumerate(one)))
        per_layer[k] = {c: more[c] - base[c] for c in COMPONENTS}

    def predict(layers: tuple[int, ...]) -> dict[str, int]:
        return {c: base[c] + sum((layers[k] - one[k]) * per_layer[k][c] for k in kinds) for c in COMPONENTS}

    check = tuple(3 * n for n in one)
    predicted, built = predict(check), _layers_counts(cfg, check)
    bad = [f"{c}: predicted {predicted[c]:,} != built {built[c]:,}" for c in COMPONENTS if predicted[c] != built[c]]
    if bad:
        raise RuntimeError(f"meta_param_counts: the counts are not linear in the layer counts at (n_dense_layers, "
                           f"n_moe_layers) = {check}: " + "; ".join(bad) + "; use meta_param_counts(cfg, full=True)")
    return predict(target)


def _layers_counts(cfg: ModelConfig, layers: tuple[int, int]) -> dict[str, int]:
    """`count_by_component` of the meta-device model of `cfg` with (n_dense_layers, n_moe_layers) = `layers`."""
    n_dense, n_moe = layers
    return _meta_build_counts(cfg.replace(n_layers=n_dense + n_moe, n_dense_layers=n_dense))


def _meta_build_counts(cfg: ModelConfig) -> dict[str, int]:
    """`count_by_component` of the whole `Transformer(cfg)` built on the meta device. Counted and let go while the
    garbage collector still pauses: the first collection after it resumes would otherwise walk the whole model."""
    from ..nn.model import Transformer

    with torch.device("meta"), _shapes_only():
        model = Transformer(cfg)
        counts = count_by_component(model)
        del model  # no reference cycles: freed here, by reference counting
    return counts


def check_counts(cfg: ModelConfig, full: bool = False) -> dict[str, int]:
    """Count the model built on the meta device (`meta_param_counts(cfg, full)`: from small models of the same config
    by default, the whole model with full=True) and check every component against `param_counts`; returns the
    counts.

    Raises RuntimeError listing each component that differs (that would be a bug in this module or the model).
    """
    closed, meta = param_counts(cfg), meta_param_counts(cfg, full=full)
    bad = [f"{k}: closed form {closed[k]:,} != model {meta[k]:,}" for k in COMPONENTS if closed[k] != meta[k]]
    if bad:
        raise RuntimeError("parameter accounting disagrees with the model: " + "; ".join(bad))
    return meta


# ---------------------------------------------------------------------------------------------- KV cache
def kv_cache_elements(cfg: ModelConfig, scheme: str = "mla", n_kv_heads: int | None = None) -> int:
    """Values cached per token per layer.

    mla   : d_c + d_r (the normalised latent and the one shared rotated key; the absorb path's cache): 576 at 671B.
    naive : H*(d_h+d_r) + H*d_v (the official naive path's per-head K and V; our `attn_impl="naive"` cache): 40,960.
    mha   : 2*H*d_h, a standard multi-head attention with K and V of head dim d_h = qk_nope_head_dim: 32,768.
    gqa   : 2*n_kv_heads*d_h (n_kv_heads in [1, H] shared K/V heads); mqa is gqa with one K/V head: 256.
    """
    H, dh = cfg.n_heads, cfg.qk_nope_head_dim
    if scheme == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    if scheme == "naive":
        return H * cfg.qk_head_dim + H * cfg.v_head_dim
    if scheme == "mha":
        return 2 * H * dh
    if scheme == "mqa":
        return 2 * dh
    if scheme == "gqa":
        if not (isinstance(n_kv_heads, int) and 1 <= n_kv_heads <= H):
            raise ValueError(f"kv_cache: scheme 'gqa' needs n_kv_heads in [1, n_heads={H}], got {n_kv_heads!r}")
        return 2 * n_kv_heads * dh
    raise ValueError(f"kv_cache: scheme must be one of {KV_SCHEMES}, got {scheme!r}")


def kv_cache_bytes(cfg: ModelConfig, scheme: str = "mla", dtype_bytes: float = 2, seq_len: int = 1,
                   batch_size: int = 1, n_kv_heads: int | None = None) -> int:
    """Bytes of KV cache for `batch_size` sequences of `seq_len` tokens over the `n_layers` main layers:
    kv_cache_elements * n_layers * dtype_bytes * seq_len * batch_size (2 bytes = bf16).

    At 671B, per token in bf16: MLA 70,272 B; MHA 3,997,696 B (56.9x); naive 4,997,120 B (71.1x).
    """
    if not (isinstance(dtype_bytes, (int, float)) and dtype_bytes > 0):
        raise ValueError(f"kv_cache: dtype_bytes must be a positive number, got {dtype_bytes!r}")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if not (isinstance(value, int) and value >= 0):
            raise ValueError(f"kv_cache: {name} must be a non-negative integer, got {value!r}")
    n = kv_cache_elements(cfg, scheme, n_kv_heads) * cfg.n_layers * seq_len * batch_size * dtype_bytes
    return int(n)


# ---------------------------------------------------------------------------------------------- FLOPs
def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights a token multiplies by in the main model's forward pass: every MLA linear (wq_a, wq_b or wq, wkv_a,
    wkv_b, wo, and the V3.2 indexer's wq_b, wk, weights_proj), dense MLPs, the top-k routed and the shared experts,
    the gate weight, and the head.

    Not counted: the embedding (a lookup), RMSNorm weights (elementwise) and the gate bias (an addition).
    The absorb path multiplies by the same weights: folding W_UK into the query and W_UV into the output costs
    2*H*d_c*(d_h + d_v) per token, exactly the naive path's wkv_b.
    """
    mla = mla_params(cfg)
    p = layer_params(cfg)
    attn = mla["total"] - mla.get("q_norm", 0) - mla["kv_norm"] - indexer_params(cfg)["k_norm"]
    moe = cfg.n_activated_experts * p["expert"] + p["shared_experts"] + p["gate_weight"]
    return cfg.n_layers * attn + cfg.n_dense_layers * p["dense_mlp"] + cfg.n_moe_layers * moe + cfg.dim * cfg.vocab_size


def attention_flops(cfg: ModelConfig, ctx: int, attn_impl: str = "naive") -> int:
    """FLOPs of one query token attending to `ctx` positions in ONE layer (scores and weighted values; a
    multiply-add is 2 FLOPs; softmax and masking are not counted).

    naive : 2*H*(d_h+d_r)*ctx (q.k) + 2*H*d_v*ctx (p.v)                  = 81,920 * ctx at 671B.
    absorb: 2*H*(d_c+d_r)*ctx (q_lat.c_kv + q_pe.k_pe) + 2*H*d_c*ctx (p.c_kv) = 278,528 * ctx at 671B: 3.4x more
            arithmetic, but it reads only d_c + d_r = 576 cached values per position instead of 40,960.
    For a causal sequence of length T, token i attends to i + 1 positions: the mean ctx is (T + 1) / 2.
    """
    if not (isinstance(ctx, int) and ctx >= 0):
        raise ValueError(f"attention_flops: ctx must be a non-negative integer, got {ctx!r}")
    H = cfg.n_heads
    if attn_impl == "naive":
        return 2 * H * (cfg.qk_head_dim + cfg.v_head_dim) * ctx
    if attn_impl == "absorb":
        return 2 * H * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * ctx
    raise ValueError(f"attention_flops: attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")


def forward_flops_per_token(cfg: ModelConfig, ctx: int, attn_impl: str = "naive") -> int:
    """Forward FLOPs of one token attending to `ctx` positions (main model):
    2 * matmul_params_per_token + n_layers * attention_flops(ctx) (V3.2: `dsa_attention_flops`)."""
    return 2 * matmul_params_per_token(cfg) + cfg.n_layers * layer_attention_flops(cfg, ctx, attn_impl)


def mtp_forward_flops_per_token(cfg: ModelConfig, ctx: int, attn_impl: str = "naive") -> int:
    """Forward FLOPs per token of all MTP modules (training only): per module 2 * (eh_proj + the block's activated
    matmul weights + the shared head) + the block's attention over `ctx` positions."""
    p = layer_params(cfg)
    mla = mla_params(cfg)
    attn = mla["total"] - mla.get("q_norm", 0) - mla["kv_norm"] - indexer_params(cfg)["k_norm"]
    if cfg.is_moe_layer(cfg.n_layers):
        ffn = cfg.n_activated_experts * p["expert"] + p["shared_experts"] + p["gate_weight"]
    else:
        ffn = p["dense_mlp"]
    per_module = 2 * (p["eh_proj"] + attn + ffn + cfg.dim * cfg.vocab_size) + layer_attention_flops(cfg, ctx, attn_impl)
    return cfg.n_mtp_layers * per_module


def training_flops_per_token(cfg: ModelConfig, ctx: int, attn_impl: str = "naive", mtp: bool = False) -> int:
    """3 x forward (the backward pass costs twice the forward: gradients for activations and for weights);
    with mtp=True the MTP modules' forward is added before tripling."""
    fwd = forward_flops_per_token(cfg, ctx, attn_impl)
    if mtp:
        fwd += mtp_forward_flops_per_token(cfg, ctx, attn_impl)
    return 3 * fwd


# ---------------------------------------------------------------------------------------------- FP8 storage
def fp8_linear_shapes(cfg: ModelConfig, moe: bool) -> list[tuple[int, int]]:
    """(out, in) of every linear of one block that the report computes in FP8 and the hub stores as E4M3 with a
    weight_scale_inv (`dsv3_ref.fp8.linear.convert_to_fp8` swaps the same ones): the MLA projections, then the dense
    MLP's w1, w2, w3, or (moe=True) every routed expert's and the shared experts' w1, w2, w3. With an indexer (V3.2)
    also its wq_b and wk, which the official code stores in FP8 (weights_proj in BF16); `convert_to_fp8` keeps the
    indexer in high precision (the report does not describe the indexer's training precision)."""
    H, d = cfg.n_heads, cfg.dim
    q_out = H * cfg.qk_head_dim
    attn = [(cfg.q_lora_rank, d), (q_out, cfg.q_lora_rank)] if cfg.q_lora_rank else [(q_out, d)]
    attn += [(cfg.kv_lora_rank + cfg.qk_rope_head_dim, d), (H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
             cfg.kv_lora_rank), (d, H * cfg.v_head_dim)]
    if cfg.has_indexer:  # V3.2: the indexer's wq_b and wk (weights_proj stays BF16)
        attn += [(cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank), (cfg.index_head_dim, d)]

    def swiglu(width: int) -> list[tuple[int, int]]:
        return [(width, d), (d, width), (width, d)]

    if not moe:
        return attn + swiglu(cfg.inter_dim)
    shared = swiglu(cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else []
    return attn + cfg.n_routed_experts * swiglu(cfg.moe_inter_dim) + shared


def checkpoint_bytes(cfg: ModelConfig, fp8: bool = True, mtp: bool = True) -> dict[str, int]:
    """Bytes of the weights stored the hub's way, by storage dtype, and their "total".

    fp8=True (the released checkpoints; docs/facts.md, Parameters, the hub checkpoint rows): "e4m3" the FP8 linears
    (`fp8_linear_shapes`, 1 byte), "scale_inv" their fp32 weight_scale_inv (4 bytes per 128 x 128 block, ragged
    edges included), "bf16" everything else (embedding, head, norms, gate weights, MTP eh_proj), "fp32" the gate
    biases. fp8=False: the same tensors
    with the FP8 linears in BF16 and no scales (what the official `fp8_cast_bf16.py` writes). mtp=True includes the
    MTP modules as the hub stores them, with their copies of the embedding and the head. At 671B with fp8 and mtp:
    688,574,839,360 bytes, the hub's total.
    """
    blocks = [cfg.is_moe_layer(i) for i in range(cfg.n_layers + (cfg.n_mtp_layers if mtp else 0))]
    shapes = [shape for moe in blocks for shape in fp8_linear_shapes(cfg, moe)]
    n_fp8 = sum(o * i for o, i in shapes)
    n_scales = sum(-(-o // BLOCK) * -(-i // BLOCK) for o, i in shapes)
    n_bias = sum(blocks) * layer_params(cfg)["gate_bias"]
    n_all = total_params(cfg) + (mtp_params(cfg) + cfg.n_mtp_layers * 2 * cfg.vocab_size * cfg.dim if mtp else 0)
    n_bf16 = n_all - n_fp8 - n_bias
    out = {"e4m3": n_fp8, "bf16": 2 * n_bf16, "fp32": 4 * n_bias, "scale_inv": 4 * n_scales} if fp8 else \
        {"e4m3": 0, "bf16": 2 * (n_bf16 + n_fp8), "fp32": 4 * n_bias, "scale_inv": 0}
    out["total"] = sum(out.values())
    return out


def fp8_linear_inputs(cfg: ModelConfig) -> dict[str, int]:
    """Values per token that the FP8 linears' inputs leave cached for the backward pass (Wgrad needs them; the
    report caches them in FP8), per layer type: "attention" (the block input x, shared by wq_a and wkv_a, or wq
    and wkv_a; wq_b's, wkv_b's and wo's inputs), "dense_mlp" (x for w1 and w3, and w2's input), "moe" (the same for
    each of the top-k routed experts and the shared experts) and "total" over the n_layers main layers.
    Other cached tensors (norm inputs, attention scores, the gate's) are not counted."""
    attn = cfg.dim + cfg.q_lora_rank + cfg.kv_lora_rank + cfg.n_heads * cfg.v_head_dim
    dense = cfg.dim + cfg.inter_dim
    moe = cfg.n_activated_experts * (cfg.dim + cfg.moe_inter_dim)
    if cfg.n_shared_experts:
        moe += cfg.dim + cfg.n_shared_experts * cfg.moe_inter_dim
    total = cfg.n_layers * attn + cfg.n_dense_layers * dense + cfg.n_moe_layers * moe
    return {"attention": attn, "dense_mlp": dense, "moe": moe, "total": total}


# ---------------------------------------------------------------------------------------------- DSA (V3.2-Exp)
CACHE_FORMATS = ("bf16", "fp8")
PHASES = ("prefill", "decode")


def indexer_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of one layer's lightning indexer (official names) and their "total"; all 0 without an indexer.

    wq_b (H^I*d^I x d_c'), wk (d^I x dim), k_norm (a LayerNorm: weight and bias, 2*d^I), weights_proj (H^I x dim).
    13,959,424 per layer at 671B-V3.2 (7.5% of its MLA layer)."""
    if not cfg.has_indexer:
        return dict.fromkeys(("wq_b", "wk", "k_norm", "weights_proj", "total"), 0)
    H, d_i = cfg.index_n_heads, cfg.index_head_dim
    parts = {"wq_b": cfg.q_lora_rank * H * d_i, "wk": cfg.dim * d_i, "k_norm": 2 * d_i, "weights_proj": cfg.dim * H}
    parts["total"] = sum(parts.values())
    return parts


def _check_format(fmt: str) -> None:
    if fmt not in CACHE_FORMATS:
        raise ValueError(f"cache format must be one of {CACHE_FORMATS}, got {fmt!r}")


def latent_cache_bytes(cfg: ModelConfig, fmt: str = "bf16") -> int:
    """Bytes of MLA's latent cache [c^KV; k^R] per token per layer.

    bf16: 2*(d_c + d_r) = 1,152 at 671B. fp8: the serving layout of DeepSeek's FlashMLA ("FP8 with scale"): d_c E4M3
    values, one fp32 scale per 128 of them (1 x 128 tiles), the d_r RoPE values kept in bf16: 512 + 16 + 128 = 656."""
    _check_format(fmt)
    if fmt == "bf16":
        return 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return cfg.kv_lora_rank + 4 * -(-cfg.kv_lora_rank // BLOCK) + 2 * cfg.qk_rope_head_dim


def index_key_bytes(cfg: ModelConfig, fmt: str = "bf16") -> int:
    """Bytes of the indexer's key cache per token per layer (0 without an indexer): bf16 2*d^I = 256 at 671B-V3.2;
    fp8 the official `k_cache` (d^I E4M3) + `k_scale_cache` (one fp32 per 128) = 132."""
    _check_format(fmt)
    if not cfg.has_indexer:
        return 0
    return 2 * cfg.index_head_dim if fmt == "bf16" else cfg.index_head_dim + 4 * -(-cfg.index_head_dim // BLOCK)


def cache_bytes_per_token(cfg: ModelConfig, fmt: str = "bf16") -> int:
    """The absorb path's whole cache per token over the n_layers main layers: latent + indexer key.
    671B: 70,272 (bf16), 40,016 (fp8); 671B-V3.2: 85,888 (bf16), 48,068 (fp8)."""
    return cfg.n_layers * (latent_cache_bytes(cfg, fmt) + index_key_bytes(cfg, fmt))


def indexer_flops(cfg: ModelConfig, ctx: int) -> int:
    """FLOPs of one query token's index scores over `ctx` positions in ONE layer: 2*H^I*d^I*ctx (q . k per head) +
    2*H^I*ctx (weighting and summing the heads); ReLU and the top-k are not counted. 16,512 * ctx at 671B-V3.2."""
    if not cfg.has_indexer:
        raise ValueError("indexer_flops: the config has no indexer (index_n_heads = 0)")
    return 2 * cfg.index_n_heads * (cfg.index_head_dim + 1) * ctx


def layer_attention_flops(cfg: ModelConfig, ctx: int, attn_impl: str = "naive") -> int:
    """One query token attending in ONE layer: `attention_flops(ctx)` for dense MLA; with an indexer (V3.2)
    `indexer_flops(ctx)` + `attention_flops(min(ctx, index_topk))`: the core attention sees only the selection."""
    if not cfg.has_indexer:
        return attention_flops(cfg, ctx, attn_impl)
    return indexer_flops(cfg, ctx) + attention_flops(cfg, min(ctx, cfg.index_topk), attn_impl)


def attention_cost(cfg: ModelConfig, ctx: int, phase: str = "decode", fmt: str = "bf16") -> dict[str, int]:
    """The attention cost of one token at position `ctx` (it sees ctx positions) in ONE layer, as served.

    "flops": the context-dependent arithmetic (scores and weighted values; `layer_attention_flops`) plus, with an
        indexer, its projections (2 * (wq_b + wk + weights_proj) per token), which V3 does not pay. Dense V3 runs
        prefill in MLA's MHA mode ("naive") and decoding in its MQA mode ("absorb", report Appendix A); V3.2 runs DSA
        in the MQA mode for both (report §1).
    "bytes": the cache the token's attention reads: ctx latent rows for V3; ctx indexer keys + min(ctx, index_topk)
        latent rows for V3.2 (`fmt` "bf16" or "fp8", see `latent_cache_bytes`). Decoding is bound by these bytes;
        a prefill kernel shares each row it loads between many queries, so prefill is bound by the FLOPs.
    """
    if phase not in PHASES:
        raise ValueError(f"attention_cost: phase must be one of {PHASES}, got {phase!r}")
    if not (isinstance(ctx, int) and ctx >= 1):
        raise ValueError(f"attention_cost: ctx must be a positive integer, got {ctx!r}")
    latent = latent_cache_bytes(cfg, fmt)
    if not cfg.has_indexer:
        return {"flops": attention_flops(cfg, ctx, "naive" if phase == "prefill" else "absorb"), "bytes": ctx * latent}
    p = indexer_params(cfg)
    kept = min(ctx, cfg.index_topk)
    return {"flops": layer_attention_flops(cfg, ctx, "absorb") + 2 * (p["total"] - p["k_norm"]),
            "bytes": ctx * index_key_bytes(cfg, fmt) + kept * latent}


def dense_config(cfg: ModelConfig) -> ModelConfig:
    """The same model without an indexer: DeepSeek-V3's dense MLA (V3.2-Exp minus DSA)."""
    return cfg.replace(index_n_heads=0, index_head_dim=0, index_topk=0)


def dsa_crossover(cfg: ModelConfig, phase: str = "decode", metric: str = "flops", fmt: str = "bf16") -> int:
    """The first context length from which V3.2's attention (`cfg`, with an indexer) costs less than dense V3's
    (`dense_config(cfg)`) for `metric` "flops" or "bytes" (`attention_cost`). At 671B-V3.2, bf16: prefill FLOPs
    9,148 (hence the report's masked MHA mode for short prefills, §3), decode FLOPs 2,284, decode bytes 2,634."""
    if not cfg.has_indexer:
        raise ValueError("dsa_crossover: the config has no indexer (index_n_heads = 0)")
    if metric not in ("flops", "bytes"):
        raise ValueError(f"dsa_crossover: metric must be 'flops' or 'bytes', got {metric!r}")
    dense = dense_config(cfg)

    def cheaper(ctx: int) -> bool:
        return attention_cost(cfg, ctx, phase, fmt)[metric] < attention_cost(dense, ctx, phase, fmt)[metric]

    lo, hi = 1, 1
    while not cheaper(hi):  # past index_topk the sparse cost grows more slowly, so this ends
        lo, hi = hi, 2 * hi
    while lo < hi:  # first ctx in (lo, hi] that is cheaper
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if not cheaper(mid) else (lo, mid)
    return hi


def dsa_report(cfg: ModelConfig, contexts: tuple[int, ...] = (4096, 32768, 131072)) -> str:
    """V3 (dense MLA) vs V3.2 (indexer + top-k) attention per token, all n_layers layers, at `contexts`: FLOPs
    (prefill, decode), decode bytes (bf16 and FP8 caches), and the crossover context lengths."""
    dense = dense_config(cfg)
    L = cfg.n_layers
    lines = [f"DSA (index_n_heads {cfg.index_n_heads}, index_head_dim {cfg.index_head_dim}, index_topk "
             f"{cfg.index_topk:,}) vs dense MLA, attention of one token at context ctx, {L} layers",
             f"  {'':<30}" + "".join(f"{f'ctx {c:,}':>26}" for c in contexts)]

    def row(label: str, phase: str, metric: str, fmt: str = "bf16") -> None:
        cells = []
        for c in contexts:
            v3, v32 = attention_cost(dense, c, phase, fmt)[metric] * L, attention_cost(cfg, c, phase, fmt)[metric] * L
            cells.append(f"{v3 / 1e9:>8.2f} / {v32 / 1e9:>6.2f} ({v3 / v32:4.1f}x)")
        lines.append(f"  {label:<30}" + "".join(f"{cell:>26}" for cell in cells))

    lines.append("  (V3 / V3.2, in GFLOP or GB, and V3's multiple of V3.2)")
    row("prefill GFLOP", "prefill", "flops")
    row("decode GFLOP", "decode", "flops")
    row("decode cache read GB, bf16", "decode", "bytes")
    row("decode cache read GB, fp8", "decode", "bytes", "fp8")
    lines.append(f"  V3.2 is cheaper from ctx = prefill FLOPs {dsa_crossover(cfg, 'prefill'):,}, decode FLOPs "
                 f"{dsa_crossover(cfg, 'decode'):,}, decode bytes {dsa_crossover(cfg, 'decode', 'bytes'):,} (bf16)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- report and CLI
_LABELS = {
    "embed": "embedding", "attention": "attention (MLA)", "block_norms": "block norms (attn_norm + ffn_norm)",
    "dense_mlp": "dense MLPs", "routed_experts": "routed experts", "shared_experts": "shared experts",
    "gate_weight": "gate weights", "gate_bias": "gate biases (buffers)", "final_norm": "final norm",
    "head": "output head",
}


class _Table:
    """The lines of `report`: section headers and right-aligned rows (thousands separators)."""

    WIDTH = 58

    def __init__(self) -> None:
        self.lines: list[str] = []

    def row(self, label: str, value: int | str, extra: str = "") -> None:
        v = f"{value:,}" if isinstance(value, int) else value
        self.lines.append(f"  {label:<{self.WIDTH}}{v:>18}{extra}")

    def header(self, label: str, column: str, extra: str = "") -> None:
        self.lines.extend(["", f"{label:<{self.WIDTH + 2}}{column:>18}{extra}"])


def report(cfg: ModelConfig, name: str | None = None, ctx: int | None = None, meta_counts: dict | None = None) -> str:
    """The accounting of `cfg` as a printable table (thousands separators).

    ctx: context length for the FLOP lines (default: original_seq_len, the pre-training context: 4,096 at 671B).
    meta_counts: `check_counts(cfg)`'s result, to state that the instantiated model agrees.
    """
    t = _Table()
    title = f"dsv3_ref accounting: {name or 'config'}"
    yarn = (f" (1/sqrt({cfg.qk_head_dim}) x YaRN mscale^2, s = {cfg.rope_factor:g})" if cfg.yarn_active
            and cfg.rope_factor > 1 else f" (1/sqrt({cfg.qk_head_dim}))")
    t.lines += [title, "=" * len(title),
                f"dim {cfg.dim}, {cfg.n_layers} layers ({cfg.n_dense_layers} dense + {cfg.n_moe_layers} MoE), "
                f"{cfg.n_heads} heads, vocab {cfg.vocab_size:,}, {cfg.n_routed_experts} routed + "
                f"{cfg.n_shared_experts} shared experts (top-{cfg.n_activated_experts}, {cfg.score_func}), "
                f"{cfg.n_mtp_layers} MTP module(s)",
                f"softmax_scale = {cfg.softmax_scale:.10f}" + yarn]
    _report_parameters(t, cfg, meta_counts is not None)
    _report_kv_cache(t, cfg)
    _report_flops(t, cfg, cfg.original_seq_len if ctx is None else ctx)
    if cfg.has_indexer:
        t.lines += ["", dsa_report(cfg)]
    return "\n".join(t.lines)


def _report_parameters(t: _Table, cfg: ModelConfig, meta_checked: bool) -> None:
    p, total, counts = layer_params(cfg), total_params(cfg), param_counts(cfg)
    t.header("Per layer", "parameters")
    t.row("MLA", p["mla"])
    for k, v in mla_params(cfg).items():
        if k != "total":
            t.row(f"  {k}", v)
    t.row(f"dense MLP (SwiGLU, inter_dim {cfg.inter_dim})", p["dense_mlp"])
    t.row(f"one expert (moe_inter_dim {cfg.moe_inter_dim})", p["expert"])
    t.row(f"routed experts ({cfg.n_routed_experts})", p["routed_experts"])
    t.row(f"shared experts ({cfg.n_shared_experts})", p["shared_experts"])
    t.row("gate weight + bias", f"{p['gate_weight']:,} + {p['gate_bias']:,}")
    t.row("block norms", p["block_norms"])
    t.row("dense layer", p["dense_layer"])
    t.row("MoE layer", p["moe_layer"])
    t.row("MoE layer, activated per token", p["moe_layer_activated"])

    t.header("Model", "parameters", "     share")
    for k in MAIN_COMPONENTS:
        t.row(_LABELS[k], counts[k], f"  {100 * counts[k] / total:7.2f}%")
    t.row("TOTAL (main model, without MTP)", total)
    t.row(f"MTP ({cfg.n_mtp_layers} module(s), without the shared embedding and head)", counts["mtp"])
    t.row("main + MTP", total + counts["mtp"])
    if meta_checked:
        t.lines.append("  meta-device model: every component agrees exactly with the closed form")

    t.header("Activated per token", "parameters")
    t.row("body (no embedding, no head)", activated_params(cfg, head=False))
    t.row("body + head (the report's convention: '37B' at 671B)", activated_params(cfg))
    t.row("body + head + embedding", activated_params(cfg, embedding=True))
    t.row("MTP modules (without the shared embedding and head)", mtp_activated_params(cfg))


def _report_kv_cache(t: _Table, cfg: ModelConfig) -> None:
    mla_bytes = kv_cache_bytes(cfg, "mla")
    t.header(f"KV cache, bf16, {cfg.n_layers} layers", "bytes/token", "    vs MLA")
    for scheme, label in (("mla", f"MLA latent (d_c {cfg.kv_lora_rank} + d_r {cfg.qk_rope_head_dim})"),
                          ("mha", f"MHA ({cfg.n_heads} heads x d_h {cfg.qk_nope_head_dim}, K + V)"),
                          ("naive", f"naive MLA cache (K {cfg.n_heads} x {cfg.qk_head_dim} + V "
                                    f"{cfg.n_heads} x {cfg.v_head_dim})"),
                          ("mqa", "MQA (one K/V head)")):
        b = kv_cache_bytes(cfg, scheme)
        t.row(label, b, f"  {b / mla_bytes:7.1f}x")
    groups = kv_cache_elements(cfg, "mla") / kv_cache_elements(cfg, "mqa")
    t.lines.append(f"  (MLA caches as much as GQA with {groups:.2f} K/V heads)")
    fp8_latent = cfg.n_layers * latent_cache_bytes(cfg, "fp8")
    t.row("MLA latent, FP8 serving layout (E4M3 + scales, bf16 RoPE)", fp8_latent, f"  {fp8_latent / mla_bytes:7.1f}x")
    if cfg.has_indexer:
        for fmt in CACHE_FORMATS:
            t.row(f"+ indexer keys (d^I {cfg.index_head_dim}), {fmt}", cfg.n_layers * index_key_bytes(cfg, fmt))
    for scheme in ("mla", "mha"):
        t.row(f"{scheme.upper()}, one sequence of max_seq_len {cfg.max_seq_len:,}",
              kv_cache_bytes(cfg, scheme, seq_len=cfg.max_seq_len))


def _report_flops(t: _Table, cfg: ModelConfig, ctx: int) -> None:
    t.header(f"FLOPs per token (attending to {ctx:,} positions)", "FLOPs")
    t.row("matmul weights per token (no embedding, norms, gate bias)", matmul_params_per_token(cfg))
    t.row("forward, naive attention", forward_flops_per_token(cfg, ctx, "naive"))
    t.row("forward, absorbed attention", forward_flops_per_token(cfg, ctx, "absorb"))
    t.row("training (3 x forward, naive)", training_flops_per_token(cfg, ctx))
    t.row("training incl. MTP", training_flops_per_token(cfg, ctx, mtp=True))


def resolve_config(spec: str) -> tuple[ModelConfig, str]:
    """A preset name (case-insensitive) or a path to a Hugging Face config.json (or its folder) -> (cfg, label)."""
    if str(spec).lower() in {k.lower() for k in PRESETS}:
        cfg = ModelConfig.from_preset(spec)
        return cfg, next(k for k in PRESETS if k.lower() == str(spec).lower()) + " preset"
    if os.path.exists(spec):
        return ModelConfig.from_hf(spec), os.path.basename(os.path.abspath(spec))
    raise ValueError(f"unknown model {spec!r}: give a preset name (one of {list(PRESETS)}) or a path to a Hugging "
                     "Face config.json or its folder")


# ---------------------------------------------------------------------------------------------- training memory
TRAIN_BYTES_PER_PARAM = 16  # fp32 weight + fp32 gradient + AdamW's two fp32 moments (train.trainer)


def training_state_bytes(cfg: ModelConfig, ep_size: int = 1, mtp: bool = True) -> dict[str, int]:
    """Bytes of training state one rank holds with `dsv3_ref.train` (data parallel with DDP, optionally expert
    parallel over ep_size ranks): TRAIN_BYTES_PER_PARAM per parameter (fp32 weights, gradients, AdamW moments; the
    gates' fp32 bias buffers 4 bytes), the routed experts split over the ep_size ranks, everything else replicated.
    Keys: replicated, routed_experts (this rank's share), total. Activations are not included: they grow with the
    micro-batch (batch_size x seq_len) and are the part to tune on a given device."""
    if not (isinstance(ep_size, int) and ep_size >= 1 and cfg.n_routed_experts % ep_size == 0):
        raise ValueError(f"ep_size must be a positive divisor of n_routed_experts ({cfg.n_routed_experts}), "
                         f"got {ep_size!r}")
    counts, p = param_counts(cfg), layer_params(cfg)
    n_mtp = cfg.n_mtp_layers if mtp else 0
    moe_blocks = cfg.n_moe_layers + (n_mtp if cfg.is_moe_layer(cfg.n_layers) else 0)
    routed = moe_blocks * p["routed_experts"]
    biases = moe_blocks * p["gate_bias"]
    everything = sum(counts[k] for k in MAIN_COMPONENTS) + n_mtp * p["mtp_module"]
    replicated = (everything - routed - biases) * TRAIN_BYTES_PER_PARAM + biases * 4
    mine = routed // ep_size * TRAIN_BYTES_PER_PARAM
    return {"replicated": replicated, "routed_experts": mine, "total": replicated + mine}


def training_memory_table(presets: dict[str, ModelConfig], ep_sizes: tuple[int, ...] = (1, 8, 64)) -> str:
    """Markdown table: per preset, the GiB of training state per rank (`training_state_bytes`) without expert
    parallelism and with each ep_size that divides its experts ("-" where it does not)."""
    head = "| preset | parameters | " + " | ".join(f"EP = {e}" for e in ep_sizes) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(ep_sizes)]
    for name, cfg in presets.items():
        cells = [_gib_or_mib(training_state_bytes(cfg, e)["total"]) if cfg.n_routed_experts % e == 0 else "-"
                 for e in ep_sizes]
        lines.append(f"| {name} | {total_params(cfg) + mtp_params(cfg):,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gib_or_mib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"
