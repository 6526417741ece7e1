"""dsv3_ref: a faithful, readable, tested reference implementation of DeepSeek-V3."""

import importlib
from typing import TYPE_CHECKING, Any

from .config import PRESETS, ModelConfig

if TYPE_CHECKING:  # what the names below are, for readers and type checkers; at run time: `__getattr__`
    from .io.checkpoint import from_pretrained, save_pretrained
    from .nn.attention import MLA, KVCache
    from .nn.model import Block, Transformer
    from .nn.moe import Gate, MoE, Routing

# module -> the names it gives the package, imported on first use (PEP 562): `import dsv3_ref` (as every
# `python -m dsv3_ref ...` does) loads only the config, so `info` imports neither the checkpoint code nor safetensors
_LAZY = {"io.checkpoint": ("from_pretrained", "save_pretrained"), "nn.attention": ("MLA", "KVCache"),
         "nn.model": ("Block", "Transformer"), "nn.moe": ("Gate", "MoE", "Routing")}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["PRESETS", "Block", "Gate", "KVCache", "MLA", "ModelConfig", "MoE", "Routing", "Transformer",
           "from_pretrained", "save_pretrained"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`dsv3_ref.Transformer`, `from dsv3_ref import from_pretrained`, ...: import the defining module on first use."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})
