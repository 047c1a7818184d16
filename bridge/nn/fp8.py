"""FP8 training of the transformer's linear layers through torchao's float8 matmul (`--fp8 tensorwise|rowwise`).

torchao's `convert_to_float8_training` swaps `nn.Linear` modules, but bridge's column/row-parallel linears
are its own modules (Megatron names, TP collectives around the matmul), so instead each converted layer
calls torchao's autograd function `matmul_with_hp_or_float8_args` on its local shard: the input and the
weight are cast to float8 with dynamic scales (per tensor, or per row for `rowwise`) in forward, and the
output gradient likewise in backward. The parameters stay what they were (bf16 weights in the flat
buffer, fp32 masters in the optimizer), so the state dict, the checkpoint and `bridge export` do not change.

Which layers: linear_qkv, linear_proj, linear_fc1 and linear_fc2 of every dense transformer layer whose
local shard has both dimensions divisible by 16 (the FP8 GEMM's alignment). MoE experts stay in bf16. The
output layer (vocab projection) stays in bf16 too, as in Megatron's default, unless `output_proj` asks for it
(Megatron's --fp8-output-proj): it is the largest single GEMM of a step (23% of the matmul FLOPs of an 8-layer
8B-shaped model), and the one that gains most from FP8 where the transformer layers are few. Megatron's
--first-last-layers-bf16 keeps the first and last layers (1 each by default) in bf16: those whose activations
and gradients FP8's per-tensor scales fit worst.

Transformer Engine's `fp8_autocast` only changes TE modules; bridge's runtime does not build TE modules
(TE is not installable on these machines), so the torchao path is the one implemented.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Container, Iterable, Iterator

import torch
from torch import nn

from bridge.errors import BridgeError

log = logging.getLogger(__name__)

FP8_RECIPES = ("tensorwise", "rowwise")
#: Megatron-LM's --fp8-format: the float8 type of the output gradients (forward casts are e4m3 either way).
FP8_FORMATS = {"hybrid": torch.float8_e5m2, "e4m3": torch.float8_e4m3fn}
#: What each torchao recipe runs when no format is named: tensorwise is hybrid, rowwise all e4m3.
DEFAULT_FP8_FORMAT = {"tensorwise": "hybrid", "rowwise": "e4m3"}
FP8_LAYERS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
_ALIGN = 16


def _torchao() -> Any:
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise BridgeError("--fp8 needs torchao (pip install torchao); it provides the float8 training matmuls") from None
    import torchao

    return torchao


def check_fp8_device(device: str) -> None:
    """One-line error unless FP8 GEMMs can run: a CUDA GPU of compute capability 8.9+ (Ada, Hopper) and torchao."""
    if device != "cuda" or not torch.cuda.is_available():
        raise BridgeError("--fp8 trains with FP8 matrix products, which need a CUDA GPU with FP8 tensor cores "
                          "(Hopper H100/H200 or Ada); run on such a GPU or drop --fp8")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise BridgeError(f"--fp8 needs FP8 tensor cores (compute capability 8.9+, e.g. H100); "
                          f"{torch.cuda.get_device_name()} is {major}.{minor}; drop --fp8")
    _torchao()


def check_fp8_recipe(recipe: str, fmt: str | None) -> str:
    """The format (`fmt`, or the recipe's own) after one-line errors for unknown names and for rowwise in hybrid:
    torchao's rowwise recipe is all e4m3, and per-row scaled e5m2 gradients were never run here."""
    if recipe not in FP8_RECIPES:
        raise BridgeError(f"--fp8 {recipe} is not one of {', '.join(FP8_RECIPES)}")
    fmt = fmt or DEFAULT_FP8_FORMAT[recipe]
    if fmt not in FP8_FORMATS:
        raise BridgeError(f"--fp8-format {fmt} is not one of {', '.join(FP8_FORMATS)}")
    if recipe == "rowwise" and fmt != "e4m3":
        raise BridgeError(f"--fp8 rowwise keeps gradients in e4m3 (torchao's recipe); drop --fp8-format {fmt} or use "
                          f"--fp8 tensorwise")
    return fmt


def fp8_config(recipe: str, fmt: str | None = None, *, emulate: bool = False) -> Any:
    """torchao's Float8LinearConfig for a recipe name, its output gradients cast to `fmt`'s float8 type (e4m3 makes
    tensorwise Megatron's `--fp8-format e4m3`); `emulate` runs the casts and GEMMs in high precision (CPU tests)."""
    grad_dtype = FP8_FORMATS[check_fp8_recipe(recipe, fmt)]
    _torchao()
    from torchao.float8.config import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    config = dataclasses.replace(  # both uses of the output gradient (input and weight gradient) take one type
        config, emulate=emulate,
        cast_config_grad_output=dataclasses.replace(config.cast_config_grad_output, target_dtype=grad_dtype),
        cast_config_grad_output_for_grad_weight=dataclasses.replace(config.cast_config_grad_output_for_grad_weight,
                                                                    target_dtype=grad_dtype))
    return config


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, config: Any) -> torch.Tensor:
    """x [..., in] @ weight[out, in]^T in FP8 (torchao's dynamic scaling); output in x's dtype."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
    from torchao.float8.float8_training_tensor import LinearMMConfig

    lead = x.shape[:-1]
    out = matmul_with_hp_or_float8_args.apply(x.reshape(-1, x.shape[-1]), weight.t(), LinearMMConfig(), config)
    return out.reshape(*lead, weight.shape[0])  # [..., out]


def _aligned(weight: torch.Tensor | None) -> bool:
    return weight is not None and weight.shape[0] % _ALIGN == 0 and weight.shape[1] % _ALIGN == 0


def _fp8_layers(chunk: nn.Module, output_proj: bool, bf16_layers: Container[int]) -> Iterator[tuple[str, nn.Module]]:
    """The chunk's linear layers that FP8 takes: the dense transformer linears of each layer not in `bf16_layers`
    (global indices), and the output layer if asked. The output layer's weight may be the tied embedding (one
    stage), which is the matrix its GEMM multiplies."""
    for i, layer in enumerate(chunk.decoder.layers):
        if layer.global_index in bf16_layers:
            continue
        for name, module in layer.named_modules():
            if name.endswith(FP8_LAYERS) and ".experts." not in name and _aligned(getattr(module, "weight", None)):
                yield f"decoder.layers.{i}.{name}", module
    head = getattr(chunk, "output_layer", None)
    if output_proj and head is not None:
        weight = head.weight if head.weight is not None else chunk.shared_embedding_or_output_weight()
        if _aligned(weight):
            yield "output_layer", head


def first_last_layers(num_layers: int, at_start: int, at_end: int) -> frozenset[int]:
    """Megatron-LM's --first-last-layers-bf16: the global indices of the first `at_start` and last `at_end`
    layers, which stay in bf16."""
    return frozenset(range(at_start)) | frozenset(range(num_layers - at_end, num_layers))


def apply_fp8(chunks: Iterable[nn.Module], recipe: str, fmt: str | None = None, *, output_proj: bool = False,
              bf16_layers: Container[int] = (), emulate: bool = False) -> list[str]:
    """Switch the eligible linear layers of `chunks` to FP8 matmuls, except those of the transformer layers in
    `bf16_layers` (global indices); returns their names (chunk-prefixed).

    Only the modules' compute changes (their `fp8` attribute); parameters and state dicts are untouched.
    """
    config = fp8_config(recipe, fmt, emulate=emulate)
    converted: list[str] = []
    for v, chunk in enumerate(chunks):
        for name, module in _fp8_layers(chunk, output_proj, bf16_layers):
            module.fp8 = config
            converted.append(f"{v}.{name}")
    log.info("fp8 (%s, %s gradients): %d linear layers use FP8 matrix products%s", recipe,
             config.cast_config_grad_output.target_dtype, len(converted),
             ", the output layer among them" if any(n.endswith("output_layer") for n in converted) else "")
    return converted
