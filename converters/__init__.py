"""Checkpoint formats (HF safetensors, Megatron legacy `torch`) and the streaming conversion engine."""
