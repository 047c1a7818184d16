"""bridge's parallel trainer: TP/SP/PP(1F1B, interleaved)/DP, ZeRO-1, bf16 with fp32 masters, exact resume."""
from bridge.training.config import TrainConfig
from bridge.training.run import train

__all__ = ["TrainConfig", "train"]
