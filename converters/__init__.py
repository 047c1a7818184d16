"""Checkpoint formats (HF safetensors, Megatron legacy `torch`, `torch_dist`), the streaming conversion engine,
and the whole-checkpoint conversions built on them (`convert`: import, export, reshard).
"""
