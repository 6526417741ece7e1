"""Hugging Face / hub-format checkpoints: `config.json` + safetensors with the hub's key names, in and out.

A checkpoint folder holds `config.json` (read by `ModelConfig.from_hf`) and either `model.safetensors` or the
shards listed by `model.safetensors.index.json` (its `weight_map`). The hub names differ from the official code's
module names, which this package uses; the crosswalk is the official `convert.py`'s, inverted:

    embed.weight                          <-> model.embed_tokens.weight
    layers.{i}.<block key>                <-> model.layers.{i}.<BLOCK_KEYS[block key]>
    layers.{i}.ffn.experts.{e}.w1.weight  <-> model.layers.{i}.mlp.experts.{e}.gate_proj.weight   (w2 down, w3 up)
    norm.weight / head.weight             <-> model.norm.weight / lm_head.weight
    mtp.{k}.<MTP_KEYS key>                <-> model.layers.{n_layers + k}.<MTP_KEYS value>
    mtp.{k}.block.<block key>             <-> model.layers.{n_layers + k}.<BLOCK_KEYS[block key]>

The MTP layer on the hub also re-stores the embedding and the output head (`MTP_SHARED`); the model shares the
main ones (report §2.2), so on load those copies are compared with the main tensors (a warning if they differ) and
otherwise ignored, and on save they are written again, as the hub does.

Released weights are FP8 (`float8_e4m3fn`) with one fp32 `<name>_scale_inv` multiplier per 128 x 128 block;
`from_pretrained` dequantizes them (`dsv3_ref.fp8.formats.block_dequant`). transformers' in-memory fused expert layout
(`mlp.experts.gate_up_proj` (E, 2 I, H) = cat(gate, up), `mlp.experts.down_proj` (E, H, I)) is accepted on load;
transformers' own `save_pretrained` converts back to the per-expert keys, which is also what we write.

Only safetensors are read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..fp8.formats import block_dequant
from ..nn.model import Transformer
from .atomic import write_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"

# ------------------------------------------------------------------ key mapping (ours <-> hub)
# top-level tensors
TOP_KEYS: dict[str, str] = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
# SwiGLU projections (dense MLP, shared and routed experts): w2(silu(w1 x) * w3 x)
SWIGLU_KEYS: dict[str, str] = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
# MLA projections and latent norms
ATTN_KEYS: dict[str, str] = {
    "wq": "q_proj",  # q_lora_rank = 0 only
    "wq_a": "q_a_proj",
    "q_norm": "q_a_layernorm",
    "wq_b": "q_b_proj",
    "wkv_a": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm",
    "wkv_b": "kv_b_proj",
    "wo": "o_proj",
}
# inside one block: `layers.{i}.` + key <-> `model.layers.{i}.` + value (routed experts: EXPERT_RE below)
BLOCK_KEYS: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{ours}.weight": f"self_attn.{hub}.weight" for ours, hub in ATTN_KEYS.items()},
    **{f"ffn.{ours}.weight": f"mlp.{hub}.weight" for ours, hub in SWIGLU_KEYS.items()},  # dense layers
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    **{f"ffn.shared_experts.{ours}.weight": f"mlp.shared_experts.{hub}.weight" for ours, hub in SWIGLU_KEYS.items()},
}
EXPERT_RE = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$")
HUB_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|down_proj|up_proj)\.weight$")
# transformers' fused in-memory layout (accepted on load): gate_up_proj (E, 2I, H) = cat(gate, up); down_proj (E, H, I)
HUB_FUSED_RE = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)$")
# the MTP module's own tensors: `mtp.{k}.` + key <-> `model.layers.{n_layers + k}.` + value (its block: BLOCK_KEYS)
MTP_KEYS: dict[str, str] = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "norm.weight": "shared_head.norm.weight",
}
# hub-only copies inside the MTP layer -> the main tensor they duplicate (shared in the model)
MTP_SHARED: dict[str, str] = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}

_HUB_BLOCK = {hub: ours for ours, hub in BLOCK_KEYS.items()}
_HUB_MTP = {hub: ours for ours, hub in MTP_KEYS.items()}
_HUB_TOP = {hub: ours for ours, hub in TOP_KEYS.items()}
_HUB_SWIGLU = {hub: ours for ours, hub in SWIGLU_KEYS.items()}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_MTP_RE = re.compile(r"^mtp\.(\d+)\.(.+)$")
_HUB_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _block_to_hub(rest: str) -> str:
    if rest in BLOCK_KEYS:
        return BLOCK_KEYS[rest]
    m = EXPERT_RE.match(rest)
    if m:
        return f"mlp.experts.{m[1]}.{SWIGLU_KEYS[m[2]]}.weight"
    raise KeyError(rest)


def _block_from_hub(rest: str) -> str | None:
    if rest in _HUB_BLOCK:
        return _HUB_BLOCK[rest]
    m = HUB_EXPERT_RE.match(rest)
    return f"ffn.experts.{m[1]}.{_HUB_SWIGLU[m[2]]}.weight" if m else None


def hub_key(name: str, n_layers: int) -> str:
    """The hub name of our state-dict entry `name`.

    'layers.3.attn.wkv_a.weight' -> 'model.layers.3.self_attn.kv_a_proj_with_mqa.weight';
    'mtp.0.norm.weight' -> f'model.layers.{n_layers}.shared_head.norm.weight'.
    """
    try:
        if name in TOP_KEYS:
            return TOP_KEYS[name]
        if m := _LAYER_RE.match(name):
            return f"model.layers.{m[1]}.{_block_to_hub(m[2])}"
        if m := _MTP_RE.match(name):
            prefix = f"model.layers.{n_layers + int(m[1])}."
            if m[2] in MTP_KEYS:
                return prefix + MTP_KEYS[m[2]]
            if m[2].startswith("block."):
                return prefix + _block_to_hub(m[2][len("block."):])
    except KeyError:
        pass
    raise ValueError(f"hub_key: no hub name for parameter {name!r}")


def our_key(key: str, n_layers: int) -> str | None:
    """Our state-dict name for the hub tensor `key`, or None if it has none (an MTP_SHARED copy, a `_scale_inv`,
    a fused expert tensor, or an unknown key). Layers >= n_layers are MTP modules."""
    if key in _HUB_TOP:
        return _HUB_TOP[key]
    m = _HUB_LAYER_RE.match(key)
    if m is None:
        return None
    layer, rest = int(m[1]), m[2]
    if layer < n_layers:
        ours = _block_from_hub(rest)
        return None if ours is None else f"layers.{layer}.{ours}"
    prefix = f"mtp.{layer - n_layers}."
    if rest in _HUB_MTP:
        return prefix + _HUB_MTP[rest]
    ours = _block_from_hub(rest)
    return None if ours is None else f"{prefix}block.{ours}"


def key_map(model: torch.nn.Module) -> dict[str, str]:
    """{our name: hub name} for every tensor in `model.state_dict()` (a `Transformer`; works on the meta device)."""
    return {name: hub_key(name, model.config.n_layers) for name in model.state_dict()}


def hub_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under hub names, in state-dict order, plus each MTP layer's copies of the embedding and
    output head (`MTP_SHARED`, the same tensor objects: clone before writing). Gate biases are returned in fp32."""
    cfg = model.config
    sd = model.state_dict()
    out = {hub_key(name, cfg.n_layers): t.float() if name.endswith("gate.bias") else t for name, t in sd.items()}
    for k in range(cfg.n_mtp_layers):
        for dup, main in MTP_SHARED.items():
            out[f"model.layers.{cfg.n_layers + k}.{dup}"] = sd[main]
    return out


# ------------------------------------------------------------------ reading
def _list_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)}: [{shown}{more}]"


class _SafetensorsReader:
    """Hub key -> tensor over one file or an index's shards. Every failure is a ValueError naming the file."""

    def __init__(self, folder: str):
        self.folder = folder
        single, index = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
            files = sorted(set(weight_map.values()))
            absent = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
            if absent:
                raise ValueError(f"{index} lists shard file(s) that do not exist: {absent}")
        elif os.path.isfile(single):
            weight_map, files = None, [WEIGHTS_NAME]
        else:
            raise ValueError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}")
        self._handles: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            handle = self._open(name)
            keys = set(handle.keys())
            wanted = keys if weight_map is None else {k for k, v in weight_map.items() if v == name}
            lost = sorted(wanted - keys)
            if lost:
                raise ValueError(f"{self._path(name)}: the index lists tensor(s) this file lacks, {_list_keys(lost)}")
            for k in sorted(wanted):
                self.shapes[k] = tuple(handle.get_slice(k).get_shape())
                self.file_of[k] = name

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _open(self, name: str):
        if name not in self._handles:
            try:
                self._handles[name] = safe_open(self._path(name), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise ValueError(f"{self._path(name)}: not a valid safetensors file "
                                 f"({type(e).__name__}: {e})") from None
        return self._handles[name]

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def dtype(self, key: str) -> str:
        return self._open(self.file_of[key]).get_slice(key).get_dtype()  # e.g. 'F8_E4M3', 'BF16', 'F32'

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key`, FP8 weights dequantized with their `_scale_inv` (float32 then)."""
        t = self._read(key)
        if t.dtype in FP8_DTYPES:
            t = block_dequant(t, self._read(key + SCALE_SUFFIX))
        return t

    def _read(self, key: str) -> torch.Tensor:
        path = self._path(self.file_of[key])
        try:
            return _fresh_storage(self._open(self.file_of[key]).get_tensor(key))
        except Exception as e:
            raise ValueError(f"{path}: cannot read tensor {key!r} ({type(e).__name__}: {e})") from None


def _fresh_storage(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` in storage of its own, which PyTorch's CPU allocator aligns to 64 bytes.

    safetensors returns views into the file's buffer at whatever offset the header and the preceding tensors leave
    (in a shard, often 24 or 32 bytes off 64-byte alignment). The BLAS library picks another kernel for misaligned
    operands, so a model holding such views computes a forward pass that differs from the saved model's in the last
    bits. With fresh storage a reloaded model reproduces the saved one's outputs bit for bit on the same machine."""
    return t.clone(memory_format=torch.contiguous_format)


def _checkpoint_folder(path: str | os.PathLike) -> str:
    """Validate `path` as a safetensors checkpoint folder; refuse pickle checkpoints."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(PICKLE_SUFFIXES):
            raise ValueError(f"{path}: only safetensors checkpoints are supported (pickle files are never loaded)")
        raise ValueError(f"{path}: expected a checkpoint folder ({CONFIG_NAME} + {WEIGHTS_NAME} or {INDEX_NAME})")
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such checkpoint folder")
    has_weights = os.path.isfile(os.path.join(path, WEIGHTS_NAME)) or os.path.isfile(os.path.join(path, INDEX_NAME))
    if not has_weights:
        pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ValueError(f"{path}: found only {pickles}; only safetensors checkpoints are supported (pickle files "
                             f"are never loaded): convert them to {WEIGHTS_NAME} with a trusted tool first")
        raise ValueError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}")
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise ValueError(f"{path}: no {CONFIG_NAME} (a checkpoint folder holds {CONFIG_NAME} + the safetensors)")
    return path


def _mtp_layers_in(keys: list[str], n_layers: int) -> list[int]:
    """The layer indices >= n_layers (MTP layers, hub convention) that the checkpoint holds."""
    return sorted({int(m[1]) for k in keys if (m := _HUB_LAYER_RE.match(k)) and int(m[1]) >= n_layers})


def _resolve_mtp(cfg: ModelConfig, keys: list[str], load_mtp: bool | None) -> ModelConfig:
    """The config to build: MTP modules iff requested (load_mtp) or, by default, iff config.json declares them and
    the checkpoint stores them. Warns whenever MTP weights or a declared MTP layer are skipped."""
    stored = _mtp_layers_in(keys, cfg.n_layers)
    names = ", ".join(f"model.layers.{i}" for i in stored)
    if load_mtp is True:
        if cfg.n_mtp_layers == 0:
            raise ValueError("load_mtp=True but config.json declares num_nextn_predict_layers=0 (no MTP module)")
        return cfg
    if load_mtp is False:
        if cfg.n_mtp_layers or stored:
            warnings.warn(f"from_pretrained: skipping the MTP layer(s) [{names}] (load_mtp=False); the model is built "
                          "with n_mtp_layers=0", stacklevel=3)
        return cfg.replace(n_mtp_layers=0)
    if load_mtp is not None:
        raise ValueError(f"load_mtp must be None, True or False, got {load_mtp!r}")
    if cfg.n_mtp_layers == 0:
        if stored:
            warnings.warn(f"from_pretrained: config.json declares no MTP module (num_nextn_predict_layers=0), so the "
                          f"checkpoint's MTP layer(s) [{names}] are skipped", stacklevel=3)
        return cfg
    if not stored:
        warnings.warn(f"from_pretrained: config.json declares num_nextn_predict_layers={cfg.n_mtp_layers} but the "
                      f"checkpoint stores no model.layers.{cfg.n_layers}+ tensors; building the model without MTP "
                      "(pass load_mtp=True to require them)", stacklevel=3)
        return cfg.replace(n_mtp_layers=0)
    return cfg


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32, strict: bool = True,
                    load_mtp: bool | None = None) -> Transformer:
    """Build a `Transformer` from a hub-format folder (config.json + safetensors). Returns the model (on CPU).

    dtype: the weights' dtype (float32, bfloat16 or float16); the gate biases stay float32. FP8 weights are
    dequantized with their 128 x 128 block scales first. The model is built on the meta device and the loaded
    tensors are assigned to it, so loading needs about one copy of the weights in memory.
    strict: a missing or unexpected tensor is a ValueError (listing the keys); with strict=False they are
    warned about, unexpected ones ignored and missing ones keep a fresh random initialisation (this costs a
    second, initialised model in memory). A mis-shaped tensor is always an error.
    load_mtp: None = load the MTP module(s) iff config.json declares them (num_nextn_predict_layers > 0) and the
    checkpoint holds them (a warning says when they are skipped); False = skip them (n_mtp_layers becomes 0);
    True = require them. The MTP layer's copies of embed_tokens and shared_head.head are checked against the
    main tensors (a warning if they differ) and not loaded: the model shares the main embedding and head.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be one of torch.float32, torch.bfloat16, torch.float16, got {dtype!r}")
    folder = _checkpoint_folder(path)
    cfg = ModelConfig.from_hf(folder)
    reader = _SafetensorsReader(folder)
    cfg = _resolve_mtp(cfg, list(reader.shapes), load_mtp)
    with torch.device("meta"):
        model = Transformer(cfg)
    plan = _plan(reader, cfg, {name: tuple(t.shape) for name, t in model.state_dict().items()})
    _check_plan(plan, reader, folder, cfg.n_layers, strict)
    model.load_state_dict(_load_state(plan, reader, cfg, dtype), strict=True, assign=True)
    return model


@dataclass
class _LoadPlan:
    """Which hub tensor provides each of our tensors: sources[our name] = (hub key, None or a function picking our
    slice of a fused tensor); and what does not fit (hub keys, or lines naming them, for the error message)."""

    sources: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    bad_shape: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (MTP layer's copy, our main tensor)
    missing: list[str] = field(default_factory=list)  # our names no hub tensor provides


def _plan(reader: _SafetensorsReader, cfg: ModelConfig, expected: dict[str, tuple[int, ...]]) -> _LoadPlan:
    """Match every hub tensor of the checkpoint with our state dict `expected` ({our name: shape})."""
    n, plan = cfg.n_layers, _LoadPlan()
    for key, shape in reader.shapes.items():
        if key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in reader:
            continue  # consumed with its FP8 weight
        m = _HUB_LAYER_RE.match(key)
        layer = int(m[1]) if m else -1
        if layer >= n and not cfg.n_mtp_layers:
            continue  # an MTP layer we do not build (_resolve_mtp warned)
        if n <= layer < n + cfg.n_mtp_layers and m[2] in MTP_SHARED:
            main = MTP_SHARED[m[2]]
            if shape != expected[main]:
                plan.bad_shape.append(f"{key}: checkpoint {shape}, but it duplicates {hub_key(main, n)} "
                                      f"{expected[main]}")
            plan.duplicates.append((key, main))
        elif layer >= 0 and (f := HUB_FUSED_RE.match(m[2])):
            _plan_fused(key, shape, f[1], f"model.layers.{layer}.", n, expected, plan.sources, plan.bad_shape)
        elif (name := our_key(key, n)) is None or name not in expected:
            plan.unexpected.append(key)
        else:
            if shape != expected[name]:
                plan.bad_shape.append(f"{key}: checkpoint {shape}, model expects {expected[name]}")
            plan.sources[name] = (key, None)
    plan.missing = [name for name in expected if name not in plan.sources]
    return plan


def _check_plan(plan: _LoadPlan, reader: _SafetensorsReader, folder: str, n_layers: int, strict: bool) -> None:
    """ValueError listing every problem (mis-shaped tensors, FP8 weights without scales and, if strict, missing or
    unexpected tensors); with strict=False a warning for the missing and unexpected ones."""
    no_scale = sorted({key for key, _ in plan.sources.values()
                       if reader.dtype(key).startswith("F8") and key + SCALE_SUFFIX not in reader})
    missing_hub = [hub_key(k, n_layers) for k in plan.missing]
    problems = []
    if plan.bad_shape:
        problems.append(f"mis-shaped tensor(s) {_list_keys(plan.bad_shape)}")
    if no_scale:
        problems.append(f"FP8 tensor(s) without their '{SCALE_SUFFIX}' companion {_list_keys(no_scale)}")
    if strict and plan.missing:
        problems.append(f"missing tensor(s) (hub names) {_list_keys(missing_hub)}")
    if strict and plan.unexpected:
        problems.append(f"unexpected tensor(s) {_list_keys(plan.unexpected)}")
    if problems:
        raise ValueError(f"from_pretrained({folder!r}): " + "; ".join(problems))
    if plan.missing or plan.unexpected:
        warnings.warn(f"from_pretrained(strict=False): missing {_list_keys(missing_hub)} (kept randomly initialised); "
                      f"unexpected {_list_keys(plan.unexpected)} (ignored)", stacklevel=3)


def _load_state(plan: _LoadPlan, reader: _SafetensorsReader, cfg: ModelConfig, dtype: torch.dtype
                ) -> dict[str, torch.Tensor]:
    """Read, dequantize and cast every planned tensor (gate biases stay fp32); each hub tensor is read once (a fused
    one feeds 2E of ours). Compares the MTP layers' copies with the main tensors; with strict=False fills the missing
    tensors from a freshly initialised model."""

    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32 if name.endswith("gate.bias") else dtype)

    by_key: dict[str, list[tuple[str, Callable | None]]] = {}
    for name, (key, pick) in plan.sources.items():
        by_key.setdefault(key, []).append((name, pick))
    state: dict[str, torch.Tensor] = {}
    for key, targets in by_key.items():
        t = reader.get(key)
        for name, pick in targets:
            state[name] = cast(name, t if pick is None else pick(t).clone())
        del t
    for key, main in plan.duplicates:
        if main in state and not torch.equal(cast(main, reader.get(key)), state[main]):
            warnings.warn(f"from_pretrained: {key} differs from {hub_key(main, cfg.n_layers)}; the MTP module shares "
                          "the main model's tensor (as the report and serving stacks do), so this copy is ignored",
                          stacklevel=3)
    if plan.missing:  # strict=False only
        fresh = Transformer(cfg).state_dict()
        for name in plan.missing:
            state[name] = cast(name, fresh[name])
    return state


def _plan_fused(key: str, shape: tuple[int, ...], kind: str, prefix: str, n_layers: int,
                expected: dict[str, tuple[int, ...]], sources: dict, bad_shape: list[str]) -> None:
    """Per-expert slices of transformers' fused `mlp.experts.gate_up_proj` (E, 2I, H) / `down_proj` (E, H, I)."""
    parts = ["gate_proj", "up_proj"] if kind == "gate_up_proj" else ["down_proj"]
    names = []
    e = 0
    while (name := our_key(f"{prefix}mlp.experts.{e}.{parts[0]}.weight", n_layers)) in expected:
        names.append([our_key(f"{prefix}mlp.experts.{e}.{p}.weight", n_layers) for p in parts])
        e += 1
    if not names:
        bad_shape.append(f"{key}: the model has no routed experts there")
        return
    rows, cols = expected[names[0][0]]
    want = (len(names), len(parts) * rows, cols)
    if shape != want:
        bad_shape.append(f"{key}: checkpoint {shape}, model expects {want}")
        return
    for e, expert in enumerate(names):
        for j, name in enumerate(expert):
            sources[name] = (key, lambda t, e=e, j=j: t[e, j * rows:(j + 1) * rows])


# ------------------------------------------------------------------ writing
def _write_json(path: str, obj: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    write_file(path, write)


def save_pretrained(model: torch.nn.Module, path: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
    """Write `config.json` (`cfg.to_hf()`) and the weights under hub names (`hub_state_dict`) into folder `path`.

    One `model.safetensors`, or, when `max_shard_bytes` is given and the weights do not fit in one file of that
    size, shards `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json` (a tensor larger than
    the limit gets a shard of its own). Routed experts are stored per expert; each MTP module is stored as
    `model.layers.{n_layers + k}` with its copies of `embed_tokens` and `shared_head.head`, as on the hub.
    Every file is written to a temporary name and renamed into place; stale weight files of the other layout
    are removed.
    """
    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int)
                                        or max_shard_bytes <= 0):
        raise ValueError(f"max_shard_bytes must be a positive integer or None, got {max_shard_bytes!r}")
    tensors = hub_state_dict(model)
    meta = [k for k, t in tensors.items() if t.is_meta]
    if meta:
        raise ValueError(f"save_pretrained: tensor(s) on the meta device have no data, {_list_keys(meta)}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    shards = _shard(tensors, max_shard_bytes)
    n_layers = model.config.n_layers

    def write_shard(keys: list[str], file: str) -> None:
        # safetensors refuses tensors sharing storage: the MTP layer's copies of embed/head are cloned
        data = {k: (tensors[k].detach().cpu().clone() if _is_mtp_copy(k, n_layers)
                    else tensors[k].detach().cpu().contiguous()) for k in keys}
        write_file(os.path.join(path, file), lambda tmp: save_file(data, tmp, metadata={"format": "pt"}))

    if len(shards) == 1:
        write_shard(shards[0], WEIGHTS_NAME)
        written = {WEIGHTS_NAME}
    else:
        files = [SHARD_NAME.format(i + 1, len(shards)) for i in range(len(shards))]
        weight_map = {}
        for keys, file in zip(shards, files, strict=True):
            write_shard(keys, file)
            weight_map.update(dict.fromkeys(keys, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(os.path.join(path, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
        written = set(files) | {INDEX_NAME}
    for stale in os.listdir(path):
        if stale not in written and (stale in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_RE.match(stale)):
            os.unlink(os.path.join(path, stale))
    _write_json(os.path.join(path, CONFIG_NAME), model.config.to_hf())


def _shard(tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[list[str]]:
    """The keys of `tensors` in order, cut into shards of at most `max_shard_bytes` (None: one shard); a tensor larger
    than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _is_mtp_copy(key: str, n_layers: int) -> bool:
    m = _HUB_LAYER_RE.match(key)
    return bool(m) and int(m[1]) >= n_layers and m[2] in MTP_SHARED
