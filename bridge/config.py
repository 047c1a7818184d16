"""`ModelConfig`: the architecture hyper-parameters bridge needs, independent of HF or Megatron spelling."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from bridge.errors import BridgeError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (HF `rope_type: llama3`)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @property
    def megatron_expressible(self) -> bool:
        """Megatron Core fixes everything but the factor (see reference/megatron-format.md)."""
        return (self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings) == (1.0, 4.0, 8192)


@dataclass(frozen=True, kw_only=True)
class LongRope:
    """LongRoPE (Phi-3.5's `longrope`, once `su`): per-frequency divisors, `short_factor` while the longest position
    is within `original_max_position_embeddings` and `long_factor` beyond it, and cos/sin scaled by
    `attention_factor` (transformers' `_compute_longrope_parameters` and `longrope_frequency_update`)."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "short_factor", tuple(float(f) for f in self.short_factor))
        object.__setattr__(self, "long_factor", tuple(float(f) for f in self.long_factor))


@dataclass(frozen=True, kw_only=True)
class YaRN:
    """YaRN RoPE scaling (HF `rope_type: yarn`; transformers' `_compute_yarn_parameters`): the frequencies between
    the two correction dimensions ramp from their original values to `factor` times slower, and cos/sin are scaled
    by the attention factor. `truncate` false (GPT-OSS) keeps the correction range's ends fractional instead of
    rounding them outwards to whole dimensions."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    """cos/sin scale; None: from the factor (and mscale / mscale_all_dim where both are set), as transformers."""
    truncate: bool = True


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Mixture-of-Experts hyper-parameters (Megatron's `--num-experts`, `--moe-*` flags)."""

    num_experts: int
    router_topk: int
    moe_ffn_hidden_size: int
    moe_layers: tuple[int, ...]
    """Global indices of the MoE layers; the others are dense (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers)."""
    shared_expert_ffn_hidden_size: int | None = None
    """Total FFN width of the shared expert(s) (DeepSeek: n_shared_experts x moe_intermediate_size)."""
    shared_expert_gate: bool = False
    """Qwen2-MoE's sigmoid gate `[1, h]` on the shared expert output."""
    score_function: str = "softmax"
    """`softmax` (Mixtral, Qwen) or `sigmoid` (DeepSeek-V3)."""
    pre_softmax: bool = False
    """True: softmax over all experts, then top-k (no renormalisation; Qwen2-MoE's norm_topk_prob=false)."""
    normalize_topk: bool = True
    """Sigmoid routers: divide the top-k scores by their sum (DeepSeek's norm_topk_prob)."""
    expert_bias: bool = False
    """DeepSeek-V3's score-correction bias `[E]` (added for selection only)."""
    topk_scaling_factor: float | None = None
    num_groups: int | None = None
    group_topk: int | None = None
    aux_loss_coeff: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "moe_layers", tuple(int(i) for i in self.moe_layers))
        if not 0 < self.router_topk <= self.num_experts:
            raise BridgeError(f"num_experts_per_tok {self.router_topk} must be in 1..{self.num_experts}")
        if self.score_function not in ("softmax", "sigmoid"):
            raise BridgeError(f"router scoring {self.score_function!r} is not supported; supported: softmax, sigmoid")


@dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3) with YaRN RoPE on the `qk_rope_head_dim` part."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_head_dim: int
    """Per-head non-positional q/k width (HF qk_nope_head_dim)."""
    qk_pos_emb_head_dim: int
    v_head_dim: int
    rope_type: str = "rope"
    """`rope` or `yarn`; YaRN fields below are used only for `yarn`."""
    rotary_scaling_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """How one transformer layer departs from the Llama block. Every field's default is Llama's, so a family that
    does not set it is unchanged; a family's `config_from_hf` builds one per layer (ModelConfig.layers) from its HF
    config, and the model builds each layer from its spec (docs/adding-an-architecture.md)."""

    rope: bool = True
    """False: no positional rotation in this layer's attention (SmolLM3's NoPE layers; Megatron's no_rope_freq)."""
    local_rope: bool = False
    """True: this layer rotates with the local table (ModelConfig.local_rotary_base, unscaled), the others with the
    global one (Gemma 3's sliding layers: base 10k; its full layers: 1M, linearly scaled)."""
    window: int | None = None
    """A sliding window for this layer alone (Gemma's sliding layers); None: the model's `sliding_window`, if any."""
    pre_norms: bool = True
    """False: no norm before attention and MLP (OLMo 2 normalises their outputs instead)."""
    post_norms: bool = False
    """True: a norm on the attention output and on the MLP output, before each residual add (Gemma 2/3, OLMo 2;
    Megatron-Bridge's `linear_proj.post_layernorm` / `linear_fc2.post_layernorm`)."""
    activation: str = "silu"
    """The gated MLP's activation: `silu` (SwiGLU), `gelu_tanh` (Gemma's GeGLU, HF `gelu_pytorch_tanh`) or
    `quick_gelu` (x * sigmoid(1.702 x): GPT-OSS's experts)."""
    glu_clamp: float | None = None
    """The gated MLP's inputs clamped before the activation: the gate to at most this, the linear half to
    [-clamp, clamp] (GPT-OSS's swiglu_limit; Megatron's activation_func_clamp_value)."""
    glu_linear_offset: float = 0.0
    """Added to the linear half before the product: act(gate) * (up + offset) (GPT-OSS: 1; Megatron's
    glu_linear_offset)."""
    attention_softcap: float | None = None
    """Attention scores become tanh(s / cap) * cap before the softmax (Gemma 2's attn_logit_softcapping)."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise BridgeError(f"activation {self.activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        if not (self.pre_norms or self.post_norms):
            raise BridgeError("a layer with neither pre- nor post-norms is not supported")


#: The gated MLP's activations (LayerSpec.activation); bridge.nn.activations holds their functions.
ACTIVATIONS = ("silu", "gelu_tanh", "quick_gelu")
#: How an RMSNorm applies its weight (ModelConfig.norm_style), each as its HF family computes it:
#: `llama` casts the normalised input back to its dtype, then scales; `fp32-scale` scales in fp32, then casts (OLMo 2);
#: `zero-centered` scales by (1 + w) in fp32, then casts (Gemma; Megatron's layernorm_zero_centered_gamma).
NORM_STYLES = ("llama", "fp32-scale", "zero-centered")


LLAMA_LAYER = LayerSpec()


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A dense decoder-only transformer, described once for every format."""

    architecture: str
    """HF architecture class name, e.g. `LlamaForCausalLM`."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (GQA groups); equal to `num_attention_heads` for MHA."""
    kv_channels: int
    """Per-head dimension; may differ from hidden/heads (Qwen3-0.6B: 128 vs 64)."""
    vocab_size: int
    """The HF (unpadded) vocabulary size."""
    max_position_embeddings: int
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    rope_scaling: RopeScaling | None = None
    long_rope: LongRope | None = None
    yarn: YaRN | None = None
    rotary_percent: float = 1.0
    """The fraction of each head's dimensions that RoPE rotates, the first ones (HF partial_rotary_factor)."""
    tie_word_embeddings: bool = False
    add_qkv_bias: bool = False
    add_bias_linear: bool = False
    """Biases on linear_proj, the router and the routed experts' linear_fc1/linear_fc2 (GPT-OSS; Megatron's
    add_bias_linear). Dense MLP layers with biases are not supported."""
    attention_sinks: bool = False
    """A learned logit per head joins every softmax's denominator, with no value (GPT-OSS's `sinks`; Megatron's
    softmax_type learnable, `core_attention.softmax_offset`)."""
    qk_layernorm: bool = False
    sliding_window: int | None = None
    params_dtype: str = "fp32"
    """Source dtype name (`fp32|bf16|fp16`)."""
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None
    layers: tuple[LayerSpec, ...] = ()
    """One LayerSpec per layer, for families whose layers differ from the Llama block; empty: all are LLAMA_LAYER."""
    norm_style: str = "llama"
    """How every RMSNorm of the model applies its weight (NORM_STYLES)."""
    qk_norm_full_width: bool = False
    """q/k norms over the whole q and k projections rather than per head (OLMo 2): weights [heads * d]."""
    local_rotary_base: float | None = None
    """The base of the local RoPE table of the layers whose spec says `local_rope` (Gemma 3's rope_local_base_freq)."""
    rotary_linear_factor: float = 1.0
    """HF `linear` RoPE scaling: positions divided by this factor (Gemma 3's full layers)."""
    softmax_scale: float | None = None
    """The attention scores' scale; None: 1/sqrt(kv_channels) (Gemma: query_pre_attn_scalar ** -0.5)."""
    embedding_multiplier: float | None = None
    """The embedding's output times this, cast to the embedding's dtype first, as HF does (Gemma: sqrt(hidden))."""
    final_logit_softcap: float | None = None
    """Logits become tanh(z / cap) * cap (Gemma 2's final_logit_softcapping)."""
    mtp_layers: int = 0
    """Multi-token prediction layers the checkpoint holds after the decoder (HF num_nextn_predict_layers, Megatron's
    mtp_num_layers). bridge's model does not run them: conversion keeps them, training carries them unchanged."""
    mtp_shared_copies: bool = True
    """Whether the HF checkpoint stores each MTP layer's own `embed_tokens` and `shared_head.head` (copies of the
    model's embedding and head, which Megatron's MTP shares): set from the files on import (bridge.models.mtp.as_stored),
    so that export writes them back only where the source had them."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.layers and len(self.layers) != self.num_layers:
            raise BridgeError(f"{len(self.layers)} layer specs for {self.num_layers} layers; the config is inconsistent")
        if self.norm_style not in NORM_STYLES:
            raise BridgeError(f"norm style {self.norm_style!r} is not one of {', '.join(NORM_STYLES)}")
        if self.local_rotary_base is None and any(spec.local_rope for spec in self.layers):
            raise BridgeError("layer specs ask for the local RoPE table, but local_rotary_base is not set")
        if self.num_attention_heads % self.num_query_groups:
            raise BridgeError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_query_groups}; the config is inconsistent"
            )

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer; 0 for a dense model."""
        return self.moe.num_experts if self.moe else 0

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    def layer(self, index: int) -> LayerSpec:
        """The spec of the layer with this global index."""
        return self.layers[index] if self.layers else LLAMA_LAYER

    def window(self, index: int) -> int | None:
        """The sliding window of the layer with this global index, if it has one."""
        return self.layer(index).window or self.sliding_window

    @property
    def windows(self) -> set[int]:
        """Every window some layer has."""
        return {w for w in map(self.window, range(self.num_layers)) if w is not None}

    @property
    def attention_softcaps(self) -> bool:
        """Whether some layer soft-caps its scores (what context parallelism cannot run)."""
        return any(self.layer(i).attention_softcap for i in range(self.num_layers))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("extra")
        for name in _WRITTEN_WHEN_SET:  # at Llama's defaults: bridge.json as before these fields existed
            if data[name] == _DEFAULTS[name]:
                data.pop(name)
        if "layers" in data:  # each spec with only what departs from Llama's layer
            data["layers"] = [{k: v for k, v in spec.items() if v != _LAYER_DEFAULTS[k]} for spec in data["layers"]]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        if data.get("rope_scaling"):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        if data.get("moe"):
            data["moe"] = MoEConfig(**data["moe"])
        if data.get("mla"):
            data["mla"] = MLAConfig(**data["mla"])
        if data.get("long_rope"):
            data["long_rope"] = LongRope(**data["long_rope"])
        if data.get("yarn"):
            data["yarn"] = YaRN(**data["yarn"])
        data["layers"] = tuple(LayerSpec(**spec) for spec in data.get("layers", ()))
        return cls(**data)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.moe_layers


#: Fields that only some families set, left out of bridge.json at their default (an older bridge reads the file).
_WRITTEN_WHEN_SET = ("layers", "long_rope", "yarn", "rotary_percent", "norm_style", "qk_norm_full_width",
                     "local_rotary_base", "rotary_linear_factor", "softmax_scale", "embedding_multiplier",
                     "final_logit_softcap", "mtp_layers", "mtp_shared_copies", "add_bias_linear", "attention_sinks")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in _WRITTEN_WHEN_SET}
_LAYER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LayerSpec)}


def megatron_args(cfg: ModelConfig, *, padded_vocab_size: int, tp: int, pp: int, vpp: int | None,
                  transformer_impl: str, dtype: str, divisible_by: int, ep: int = 1, etp: int | None = None,
                  moe_grouped_gemm: bool = False) -> argparse.Namespace:
    """The `args` namespace Megatron-LM stores in (and checks against) every checkpoint file."""
    scaling = cfg.rope_scaling
    args = argparse.Namespace(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        max_position_embeddings=cfg.max_position_embeddings,
        seq_length=min(cfg.max_position_embeddings, 4096),
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
        rotary_percent=cfg.rotary_percent,
        use_rope_scaling=scaling is not None,
        rope_scaling_factor=scaling.factor if scaling else 8.0,
        normalization="RMSNorm",
        norm_epsilon=cfg.norm_epsilon,
        swiglu=True,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        padded_vocab_size=padded_vocab_size,
        make_vocab_size_divisible_by=divisible_by,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=1,
        transformer_impl=transformer_impl,
        params_dtype=DTYPES[dtype],
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        ckpt_format="torch",
        tokenizer_type="HuggingFaceTokenizer",
        attention_dropout=0.0,
        hidden_dropout=0.0,
        # Megatron's (left, right) is flash attention's: keys i-left..i, left + 1 of them; transformers keeps W
        window_size=(cfg.sliding_window - 1, 0) if cfg.sliding_window else None,
        iteration=0,
        consumed_train_samples=0,
        consumed_valid_samples=0,
    )
    args.expert_model_parallel_size = ep
    args.expert_tensor_parallel_size = etp or tp
    if cfg.moe:
        vars(args).update(_moe_args(cfg, cfg.moe, moe_grouped_gemm))
    if cfg.mla:
        vars(args).update(_mla_args(cfg.mla))
    specs = [cfg.layer(i) for i in range(cfg.num_layers)]
    args.swiglu = all(spec.activation == "silu" for spec in specs)  # Gemma's GeGLU: Megatron-LM has no flag for it
    vars(args).update(_layer_args(cfg, specs))
    args.layernorm_zero_centered_gamma = cfg.norm_style == "zero-centered"
    if cfg.softmax_scale is not None:
        args.softmax_scale = cfg.softmax_scale
    if cfg.mtp_layers:
        args.mtp_num_layers = cfg.mtp_layers
    if not all(cfg.layer(i).rope for i in range(cfg.num_layers)):
        args.no_rope_freq = [int(not cfg.layer(i).rope) for i in range(cfg.num_layers)]  # 1: this layer skips RoPE
    return args


def _layer_args(cfg: ModelConfig, specs: list[LayerSpec]) -> dict[str, Any]:
    """GPT-OSS's features in Megatron-LM's arguments (its GPT-OSS flags: --quick-geglu, --glu-linear-offset,
    --activation-func-clamp-value, --softmax-type learnable, --window-size with --window-attn-skip-freq, YaRN's)."""
    args: dict[str, Any] = {}
    if cfg.attention_sinks:
        args["softmax_type"] = "learnable"
    if all(spec.activation == "quick_gelu" for spec in specs):
        args["quick_geglu"] = True
    clamps, offsets = {spec.glu_clamp for spec in specs}, {spec.glu_linear_offset for spec in specs}
    if len(clamps) == 1 and None not in clamps:
        args["activation_func_clamp_value"] = clamps.pop()
    if len(offsets) == 1 and 0.0 not in offsets:
        args["glu_linear_offset"] = offsets.pop()
    windows = {spec.window for spec in specs} - {None}
    full = [i + 1 for i, spec in enumerate(specs) if spec.window is None]  # Megatron counts layers from 1
    if cfg.sliding_window is None and len(windows) == 1 and full and all(n % full[0] == 0 for n in full) \
            and len(full) == cfg.num_layers // full[0]:  # every k-th layer full, the others windowed
        args.update(window_size=(windows.pop() - 1, 0), window_attn_skip_freq=full[0])
    if cfg.yarn is not None:
        yarn = cfg.yarn
        args.update(position_embedding_type="yarn", yarn_rotary_scaling_factor=yarn.factor,
                    yarn_original_max_position_embeddings=yarn.original_max_position_embeddings,
                    yarn_beta_fast=yarn.beta_fast, yarn_beta_slow=yarn.beta_slow, yarn_mscale=yarn.mscale,
                    yarn_mscale_all_dim=yarn.mscale_all_dim, yarn_correction_range_round_to_int=yarn.truncate)
    return args


def _moe_args(cfg: ModelConfig, moe: MoEConfig, grouped_gemm: bool) -> dict[str, Any]:
    """Megatron-LM's `--num-experts`/`--moe-*` arguments (names as in megatron/training/arguments.py)."""
    return dict(
        num_experts=moe.num_experts,
        moe_router_topk=moe.router_topk,
        moe_ffn_hidden_size=moe.moe_ffn_hidden_size,
        moe_layer_freq=[int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)],
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=moe.shared_expert_gate,
        moe_router_score_function=moe.score_function,
        moe_router_pre_softmax=moe.pre_softmax,
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_topk_scaling_factor=moe.topk_scaling_factor,
        moe_router_num_groups=moe.num_groups,
        moe_router_group_topk=moe.group_topk,
        moe_router_load_balancing_type="seq_aux_loss" if moe.expert_bias else "aux_loss",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_grouped_gemm=grouped_gemm,
        moe_token_dispatcher_type="alltoall",
    )


def _mla_args(mla: MLAConfig) -> dict[str, Any]:
    return dict(
        multi_latent_attention=True,
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_head_dim=mla.qk_head_dim,
        qk_pos_emb_head_dim=mla.qk_pos_emb_head_dim,
        v_head_dim=mla.v_head_dim,
        qk_layernorm=True,
        rope_type=mla.rope_type,
        rotary_scaling_factor=mla.rotary_scaling_factor,
        original_max_position_embeddings=mla.original_max_position_embeddings,
        beta_fast=mla.beta_fast,
        beta_slow=mla.beta_slow,
        mscale=mla.mscale,
        mscale_all_dim=mla.mscale_all_dim,
    )
