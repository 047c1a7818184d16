"""The gated MLP's activation, shared by dense MLPs and routed experts: act(gate) * up, with GPT-OSS's clamp and
linear offset where the layer's spec has them (LayerSpec.activation, glu_clamp, glu_linear_offset)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bridge.config import LayerSpec

#: LayerSpec.activation -> the gate's function (HF's `silu` and `gelu_pytorch_tanh`; GPT-OSS's gate * sigmoid(1.702
#: gate), Megatron's quick_gelu).
ACTIVATION_FUNCTIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
                        "quick_gelu": lambda x: x * torch.sigmoid(x * 1.702)}


def gated(gate: torch.Tensor, up: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """act(gate) * up; with a clamp, the gate is first clamped from above and up on both sides, and with an offset
    it is added to up (GptOssExperts._apply_gate's order)."""
    if spec.glu_clamp is not None:
        gate, up = gate.clamp(max=spec.glu_clamp), up.clamp(-spec.glu_clamp, spec.glu_clamp)
    if spec.glu_linear_offset:
        up = up + spec.glu_linear_offset
    return ACTIVATION_FUNCTIONS[spec.activation](gate) * up
