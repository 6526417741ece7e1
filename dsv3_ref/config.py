"""Model configuration: one dataclass with the official field names, named presets, HF `config.json` in and out.

Field names follow `ModelArgs` in DeepSeek-V3's official `inference/model.py`; `ModelConfig.from_hf` / `to_hf`
translate to and from the Hugging Face `config.json` names (`hidden_size`, `n_group`, `first_k_dense_replace`, ...).
The crosswalk between the two, and the paper's symbols, is `HF_FIELDS` below and the book's notation page.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

SCORE_FUNCS = ("softmax", "sigmoid")
ATTN_IMPLS = ("naive", "absorb")


def require(cond: bool, msg: str, owner: str) -> None:
    """The one validator of every config dataclass: ValueError(f"{owner}: {msg}") unless cond."""
    if not cond:
        raise ValueError(f"{owner}: {msg}")


def from_fields(cls: type, d: dict[str, Any]) -> Any:
    """cls(**d) for a config dataclass, with a ValueError naming any key that is not one of its fields."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; allowed fields are {sorted(known)}")
    return cls(**d)


@dataclass
class ModelConfig:
    """Hyper-parameters of a DeepSeek-V3 (or V2) model.

    Paper symbols: `dim` = d, `n_heads` = n_h, `qk_nope_head_dim` = d_h, `qk_rope_head_dim` = d_h^R,
    `kv_lora_rank` = d_c, `q_lora_rank` = d_c' (0 = no query compression, as in DeepSeek-V2-Lite),
    `n_routed_experts` = N_r, `n_shared_experts` = N_s, `n_activated_experts` = K_r, `n_mtp_layers` = D.
    """

    vocab_size: int = 259
    dim: int = 64
    inter_dim: int = 128
    moe_inter_dim: int = 32
    n_layers: int = 3
    n_dense_layers: int = 1
    n_heads: int = 4
    # mixture of experts
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_expert_groups: int = 4
    n_limited_groups: int = 2
    score_func: str = "sigmoid"
    route_scale: float = 2.5
    # multi-head latent attention
    q_lora_rank: int = 32
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    # RoPE / YaRN
    max_seq_len: int = 256
    original_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # multi-token prediction: number of sequential MTP modules (the paper's depth D)
    n_mtp_layers: int = 0
    # which attention path the model uses by default ("naive" expands the latent, "absorb" folds W_UK / W_UV)
    attn_impl: str = "naive"
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived quantities
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: d_h + d_h^R (192 at 671B)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def yarn_active(self) -> bool:
        """YaRN is applied exactly when the official code applies it: `max_seq_len > original_seq_len`."""
        return self.max_seq_len > self.original_seq_len

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times mscale^2 = (0.1 * mscale * ln(s) + 1)^2 when YaRN is active.

        0.1352337789 at 671B."""
        scale = self.qk_head_dim**-0.5
        if self.yarn_active and self.rope_factor > 1:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale = scale * m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        """Layers 0..n_dense_layers-1 use a dense SwiGLU MLP; the rest (and every MTP block) use MoE."""
        return layer_id >= self.n_dense_layers

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return from_fields(cls, d)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the field and what is allowed for every impossible combination."""
        need = functools.partial(require, owner="ModelConfig")
        positive = ["vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "n_routed_experts",
                    "n_activated_experts", "n_expert_groups", "n_limited_groups", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len"]
        for name in positive:
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        for name in ["n_dense_layers", "n_shared_experts", "q_lora_rank", "n_mtp_layers"]:
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                 f"{name} must be a non-negative integer, got {value!r}")
        for name in ["rope_theta", "route_scale", "norm_eps", "init_std", "rope_factor"]:
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
                 and math.isfinite(value),
                 f"{name} must be a positive finite number, got {value!r}")
        need(self.rope_factor >= 1, f"rope_factor must be >= 1 (1 = no YaRN stretch), got {self.rope_factor!r}")
        need(isinstance(self.mscale, (int, float)) and self.mscale >= 0, f"mscale must be >= 0, got {self.mscale!r}")
        need(self.beta_fast > self.beta_slow > 0,
             f"beta_fast must be > beta_slow > 0, got beta_fast={self.beta_fast!r}, beta_slow={self.beta_slow!r}")
        need(self.n_dense_layers <= self.n_layers,
             f"n_dense_layers ({self.n_dense_layers}) must be <= n_layers ({self.n_layers})")
        need(self.score_func in SCORE_FUNCS, f"score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        need(self.attn_impl in ATTN_IMPLS, f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        need(self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        need(self.n_routed_experts % self.n_expert_groups == 0,
             f"n_routed_experts ({self.n_routed_experts}) must be divisible by "
             f"n_expert_groups ({self.n_expert_groups})")
        need(self.n_limited_groups <= self.n_expert_groups,
             f"n_limited_groups ({self.n_limited_groups}) must be <= n_expert_groups ({self.n_expert_groups})")
        need(self.n_activated_experts <= self.n_routed_experts,
             f"n_activated_experts ({self.n_activated_experts}) must be <= n_routed_experts ({self.n_routed_experts})")
        per_group = self.n_routed_experts // self.n_expert_groups
        need(self.n_activated_experts <= self.n_limited_groups * per_group,
             f"n_activated_experts ({self.n_activated_experts}) must be <= n_limited_groups * experts per group "
             f"({self.n_limited_groups} * {per_group} = {self.n_limited_groups * per_group})")
        if self.n_expert_groups > 1 and self.score_func == "sigmoid":
            need(per_group >= 2, "with sigmoid scores and n_expert_groups > 1 each group needs at least 2 experts "
                                 f"(the group score is the sum of its top-2), got {per_group} per group")

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset: 'tiny', 'small', '16B', '236B' or '671B' (case-insensitive), with optional overrides."""
        key = {k.lower(): k for k in PRESETS}.get(str(name).lower())
        if key is None:
            raise ValueError(f"unknown preset {name!r}; allowed presets are {list(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face `config.json` (a path to the file, to its folder, or the parsed dict).

        Understands the DeepSeek-V3 and DeepSeek-V2 hub files (`rope_scaling`) and transformers 5's `rope_parameters`.
        """
        hf = dict(path_or_dict) if isinstance(path_or_dict, dict) else _read_hf_json(path_or_dict)
        missing = [k for k in _HF_REQUIRED if k not in hf]
        if missing:
            raise ValueError(f"from_hf: config.json lacks required field(s) {missing}")
        return cls(**_hf_fields(hf), **_hf_rope(hf))

    def to_hf(self) -> dict[str, Any]:
        """The equivalent Hugging Face `config.json` dict (DeepSeek-V3 hub layout; loadable by transformers)."""
        hf: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
        }
        for ours, theirs in HF_FIELDS.items():
            hf[theirs] = getattr(self, ours)
        hf["q_lora_rank"] = self.q_lora_rank or None
        hf["num_key_value_heads"] = self.n_heads
        hf["scoring_func"] = self.score_func
        hf["norm_topk_prob"] = self.score_func == "sigmoid"
        hf["topk_method"] = "noaux_tc" if self.score_func == "sigmoid" else "group_limited_greedy"
        hf["max_position_embeddings"] = self.max_seq_len
        hf["rope_theta"] = self.rope_theta
        if self.yarn_active:
            hf["rope_scaling"] = {
                "type": "yarn", "rope_type": "yarn", "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_seq_len,
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
                "mscale": self.mscale, "mscale_all_dim": self.mscale,
            }
        else:
            hf["rope_scaling"] = None
        hf.update({"hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
                   "rope_interleave": True, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None})
        return hf


# ours -> HF config.json name (the crosswalk; q_lora_rank 0 <-> null, mscale <-> rope_scaling.mscale_all_dim)
HF_FIELDS: dict[str, str] = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace",
    "n_heads": "num_attention_heads",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group",
    "n_limited_groups": "topk_group",
    "route_scale": "routed_scaling_factor",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "n_mtp_layers": "num_nextn_predict_layers",
    "norm_eps": "rms_norm_eps",
    "init_std": "initializer_range",
}
_HF_REQUIRED = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"]


# ------------------------------------------------------------------ from_hf, step by step
def _read_hf_json(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` at `path` (the file or its folder)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"from_hf: no config.json at {path!r}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _hf_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Our fields from the HF names (`HF_FIELDS`), a null meaning the feature is off, and the scoring function."""
    kw = {ours: hf[theirs] for ours, theirs in HF_FIELDS.items() if hf.get(theirs) is not None}
    if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
        kw["n_mtp_layers"] = hf["num_mtp_layers"]
    for theirs, ours, off in (("q_lora_rank", "q_lora_rank", 0), ("n_group", "n_expert_groups", 1),
                              ("topk_group", "n_limited_groups", 1), ("first_k_dense_replace", "n_dense_layers", 0)):
        if hf.get(theirs) is None:
            kw[ours] = off
    kw["score_func"] = hf.get("scoring_func", "sigmoid" if hf.get("model_type", "deepseek_v3") == "deepseek_v3"
                              else "softmax")
    norm_topk = hf.get("norm_topk_prob")
    if norm_topk is not None and bool(norm_topk) != (kw["score_func"] == "sigmoid"):
        warnings.warn(f"from_hf: norm_topk_prob={norm_topk} with scoring_func={kw['score_func']!r}: "
                      "dsv3_ref follows the official code (renormalise sigmoid weights, never softmax weights)",
                      stacklevel=3)
    return kw


def _hf_rope(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta, max_seq_len and the YaRN fields from `rope_scaling` (hub) or `rope_parameters` (transformers 5)."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kw: dict[str, Any] = {"max_seq_len": int(hf["max_position_embeddings"])}
    theta = hf.get("rope_theta", rope.get("rope_theta"))
    if theta is not None:
        kw["rope_theta"] = float(theta)
    rope_type = rope.get("type", rope.get("rope_type", "default"))
    if rope_type in ("default", None):
        kw["original_seq_len"] = kw["max_seq_len"]
        return kw
    if rope_type != "yarn":
        raise ValueError(f"from_hf: rope type {rope_type!r} is not supported; allowed: 'yarn' or 'default'")
    kw["rope_factor"] = float(rope["factor"])
    kw["original_seq_len"] = int(rope.get("original_max_position_embeddings", 4096))
    kw["beta_fast"] = rope.get("beta_fast", 32)
    kw["beta_slow"] = rope.get("beta_slow", 1)
    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
    # HF scales cos/sin by get_mscale(s, mscale) / get_mscale(s, mscale_all_dim) when both are non-zero, else
    # by 0.1 ln s + 1; the official code has no such factor, so only equal non-zero values are expressible
    if not (mscale and mscale_all and math.isclose(float(mscale), float(mscale_all))):
        raise ValueError(f"from_hf: rope_scaling.mscale ({mscale}) and mscale_all_dim ({mscale_all}) must be "
                         "equal and non-zero: the official code has one mscale (HF's mscale_all_dim)")
    kw["mscale"] = float(mscale_all)
    if kw["max_seq_len"] <= kw["original_seq_len"]:
        warnings.warn("from_hf: YaRN is configured but max_position_embeddings <= original_max_position_"
                      "embeddings, so (as in the official code) it is inactive", stacklevel=3)
    return kw


_V2 = dict(vocab_size=102400, score_func="softmax", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
           qk_rope_head_dim=64, v_head_dim=128, max_seq_len=163840, original_seq_len=4096, rope_factor=40.0,
           beta_fast=32, beta_slow=1, mscale=0.707, n_mtp_layers=0)

PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: ~0.2M parameters, every mechanism live (groups, shared expert, query compression, bias)
    "tiny": dict(),
    # notebooks: trains visibly in about a minute on 2 CPU cores
    "small": dict(dim=128, inter_dim=384, moe_inter_dim=64, n_layers=4, n_dense_layers=1, n_heads=4,
                  n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4,
                  n_limited_groups=2, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                  v_head_dim=32, max_seq_len=512, original_seq_len=512),
    # DeepSeek-V2-Lite (inference/configs/config_16B.json): softmax router, no query compression, mscale 0.707
    "16B": {**_V2, **dict(dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27, n_dense_layers=1, n_heads=16,
                          n_routed_experts=64, n_shared_experts=2, n_activated_experts=6, n_expert_groups=1,
                          n_limited_groups=1, route_scale=1.0, q_lora_rank=0)},
    # DeepSeek-V2 (inference/configs/config_236B.json)
    "236B": {**_V2, **dict(dim=5120, inter_dim=12288, moe_inter_dim=1536, n_layers=60, n_dense_layers=1,
                           n_heads=128, n_routed_experts=160, n_shared_experts=2, n_activated_experts=6,
                           n_expert_groups=8, n_limited_groups=3, route_scale=16.0)},
    # DeepSeek-V3 (inference/configs/config_671B.json + the hub's rope_scaling): 128K context, YaRN s=40 over 4096
    "671B": dict(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61, n_dense_layers=3,
                 n_heads=128, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
                 n_limited_groups=4, score_func="sigmoid", route_scale=2.5, q_lora_rank=1536, kv_lora_rank=512,
                 qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_seq_len=131072,
                 original_seq_len=4096, rope_theta=10000.0, rope_factor=40.0, beta_fast=32, beta_slow=1, mscale=1.0,
                 n_mtp_layers=1, init_std=0.006),
}
PRESETS["tiny"] = dataclasses.asdict(ModelConfig())
