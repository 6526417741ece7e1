"""dsv3_ref: a faithful, readable, tested reference implementation of DeepSeek-V3."""

from .config import PRESETS, ModelConfig
from .io.checkpoint import from_pretrained, save_pretrained
from .nn.attention import MLA, KVCache
from .nn.model import Block, Transformer
from .nn.moe import Gate, MoE, Routing

__all__ = ["PRESETS", "Block", "Gate", "KVCache", "MLA", "ModelConfig", "MoE", "Routing", "Transformer",
           "from_pretrained", "save_pretrained"]
__version__ = "0.1.0"
