"""bridge: move large language models between Hugging Face and Megatron-style parallel training."""
from bridge.auto import AutoBridge
from bridge.config import ModelConfig
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout

__all__ = ["AutoBridge", "BridgeError", "ModelConfig", "ParallelLayout"]
__version__ = "0.1.0"
