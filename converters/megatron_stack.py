"""What the rest of today's Megatron stack reads from a bridge folder besides the weights.

- Megatron-LM's `load_args_from_checkpoint` (megatron/training/checkpointing.py) copies model fields from the stored
  `args`, and Megatron-Bridge's `_transformer_config_from_args` (megatron/bridge/training/mlm_compat/arguments.py)
  reads further fields without a default (`args.multi_latent_attention`, `args.no_persist_layer_norm`, ...): a
  namespace lacking one stops it with AttributeError. `complete_args` adds every such field with the value
  Megatron-LM's argument parser gives it when the flag is absent (megatron/training/arguments.py, Megatron Core
  0.19.2), never overriding what bridge.config.megatron_args set for the model.
- Megatron-Bridge keeps the model configuration of a run in `run_config.yaml` inside the iteration folder
  (`save_checkpoint` in megatron/bridge/training/checkpointing.py, 0.6.2) and builds the model from its `model:`
  section; without it, it needs a model type its `export_ckpt` does not pass. `run_config` writes that section in
  the schema of `ConfigContainer.to_yaml` (megatron/training/config/container.py): a `_target_` per dataclass,
  torch dtypes and functions as `{_target_, _call_: false}`.
"""
from __future__ import annotations

import argparse
from typing import Any

import yaml

from bridge.checkpoint import CheckpointMeta

#: Megatron-LM's argument defaults for the fields its loader and Megatron-Bridge's args reader use (flag absent).
ARG_DEFAULTS: dict[str, Any] = {
    "multi_latent_attention": False, "heterogeneous_layers_config_path": None, "no_persist_layer_norm": False,
    "overlap_p2p_comm": False, "num_experts": None, "rotary_interleaved": False, "decoder_first_pipeline_num_layers": None,
    "decoder_last_pipeline_num_layers": None, "fp8_param_gather": False, "bias_swiglu_fusion": True,
    "bias_gelu_fusion": True, "squared_relu": False, "init_method_xavier_uniform": False, "config_logger_dir": "",
    "cp_comm_type": ["p2p"], "is_hybrid_model": False, "apply_layernorm_1p": False, "add_position_embedding": False,
    "use_rotary_position_embeddings": False, "apply_query_key_layer_scaling": False, "spec": None, "mtp_num_layers": None,
    "num_layers_per_virtual_pipeline_stage": None, "context_parallel_size": 1, "sequence_parallel": False,
    "layernorm_epsilon": None, "tokenizer_model": None,
}
_GPT_PROVIDER = "megatron.bridge.models.gpt_provider.GPTModelProvider"
#: LayerSpec.activation -> the function Megatron-Bridge's providers name for it (Gemma's: Megatron Core's fast_gelu,
#: the tanh GELU).
_ACTIVATIONS = {"silu": "torch.nn.functional.silu", "gelu_tanh": "megatron.core.activations.fast_gelu",
                "quick_gelu": "megatron.core.fusions.fused_bias_geglu.quick_gelu"}
_DTYPES = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}


def complete_args(args: argparse.Namespace, iteration: int) -> argparse.Namespace:
    """`args` with every field Megatron-LM's and Megatron-Bridge's readers use, and the iteration it is saved at."""
    defaults = {**ARG_DEFAULTS, "layernorm_epsilon": getattr(args, "norm_epsilon", None),
                "use_rotary_position_embeddings": getattr(args, "position_embedding_type", None) == "rope"}
    return argparse.Namespace(**{**defaults, **vars(args), "iteration": iteration})


def _function(target: str) -> dict[str, Any]:
    """A function or dtype value as ConfigContainer.to_yaml writes it (instantiated by reference, not called)."""
    return {"_target_": target, "_call_": False}


def run_config_yaml(meta: CheckpointMeta, args: argparse.Namespace) -> str:
    """`run_config.yaml`'s text, as ConfigContainer.to_yaml dumps it (yaml.safe_dump, block style)."""
    return yaml.safe_dump(run_config(meta, args), default_flow_style=False)


def run_config(meta: CheckpointMeta, args: argparse.Namespace) -> dict[str, Any]:
    """Megatron-Bridge's run configuration for a dense bridge checkpoint: the `model:` section of a GPTModelProvider
    with the vocabulary as stored (`should_pad_vocab` false: the rows are already padded), and the checkpoint format."""
    cfg = meta.config
    model = {
        "_target_": _GPT_PROVIDER,
        "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads, "num_query_groups": cfg.num_query_groups,
        "kv_channels": cfg.kv_channels, "seq_length": args.seq_length,
        "tensor_model_parallel_size": meta.layout.tp, "pipeline_model_parallel_size": meta.layout.pp,
        "virtual_pipeline_model_parallel_size": meta.layout.vpp, "context_parallel_size": 1,
        "vocab_size": meta.padded_vocab_size, "should_pad_vocab": False,
        "make_vocab_size_divisible_by": meta.layout.make_vocab_size_divisible_by,
        "share_embeddings_and_output_weights": cfg.tie_word_embeddings,
        "normalization": "RMSNorm", "layernorm_epsilon": cfg.norm_epsilon, "gated_linear_unit": True,
        "activation_func": _function(_ACTIVATIONS[cfg.layer(0).activation]), "add_bias_linear": False,
        "layernorm_zero_centered_gamma": cfg.norm_style == "zero-centered",
        "add_qkv_bias": cfg.add_qkv_bias, "qk_layernorm": cfg.qk_layernorm, "position_embedding_type": "rope",
        "rotary_base": int(cfg.rotary_base), "rotary_percent": cfg.rotary_percent, "rope_scaling": cfg.rope_scaling is not None,
        "rope_scaling_factor": cfg.rope_scaling.factor if cfg.rope_scaling else 1.0,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "transformer_impl": meta.transformer_impl,
        "params_dtype": _function(_DTYPES[meta.dtype]), "bf16": meta.dtype == "bf16", "fp16": meta.dtype == "fp16",
        "transformer_layer_spec": _function("megatron.bridge.models.gpt_provider.default_layer_spec"),
    }
    if cfg.softmax_scale is not None:  # Gemma's query_pre_attn_scalar ** -0.5
        model["softmax_scale"] = cfg.softmax_scale
    if getattr(args, "no_rope_freq", None):  # NoPE layers (SmolLM3): the per-layer pattern, as in the args
        model["no_rope_freq"] = list(args.no_rope_freq)
    checkpoint = {"_target_": "megatron.bridge.training.config.CheckpointConfig", "ckpt_format": meta.format,
                  "save": None, "load": None}  # the folder may be moved: no path recorded
    return {"_target_": "megatron.bridge.training.config.ConfigContainer", "model": model, "checkpoint": checkpoint}
