"""dsv3_ref: a faithful, readable, tested reference implementation of DeepSeek-V3."""

from .attention import MLA, KVCache
from .config import PRESETS, ModelConfig
from .model import Block, Transformer
from .moe import Gate, MoE, Routing

__all__ = ["PRESETS", "Block", "Gate", "KVCache", "MLA", "ModelConfig", "MoE", "Routing", "Transformer"]
__version__ = "0.1.0"
