"""dsv3_ref: a faithful, readable, tested reference implementation of DeepSeek-V3."""

from .config import PRESETS, ModelConfig
from .nn.attention import MLA, KVCache
from .nn.model import Block, Transformer
from .nn.moe import Gate, MoE, Routing

__all__ = ["PRESETS", "Block", "Gate", "KVCache", "MLA", "ModelConfig", "MoE", "Routing", "Transformer"]
__version__ = "0.1.0"
