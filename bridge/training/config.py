"""`TrainConfig`: every `bridge train` setting in one typed object, validated before any process starts.

Field names are Megatron-LM's flag names with `-` -> `_` where they mean the same thing, so a
recipe written for `bridge train --config recipe.yaml` reads like a Megatron launch script.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.errors import BridgeError

LR_DECAY_STYLES = ("cosine", "linear", "constant")
RECOMPUTE = ("full", "selective", "elementwise")
#: Megatron-Bridge's LoRA target names (bridge.nn.lora.TARGETS), all adapted by default as there.
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(kw_only=True)
class TrainConfig:
    """One training run. Paths are strings so the object pickles into spawned workers unchanged."""

    # model source: a bridge checkpoint (import or training) or an HF config.json for random init
    load: str | None = None
    model_config: str | None = None
    """HF `config.json` (or its folder): train from random initialisation (benchmarks, from-scratch runs)."""
    finetune: bool = False
    """Load only the weights of a training checkpoint: iteration 0, fresh optimizer (Megatron's --finetune)."""
    # data
    data_path: list[str] = field(default_factory=list)
    """Indexed dataset prefixes (`PREFIX.bin/.idx`) or `.jsonl` files with a `text_key` field."""
    mock_data: bool = False
    split: str = "969,30,1"
    text_key: str = "text"
    sft: bool = False
    """Train only on the tokens the SFT loss mask keeps (`bridge data prepare --chat` writes it)."""
    tokenizer: str | None = None
    """Tokenizer for `.jsonl` data; default: the checkpoint's `hf_meta/`."""
    reset_attention_mask: bool = False
    """No attention across EOD: each packed document attends only to itself (bridge.training.packing)."""
    reset_position_ids: bool = False
    """Positions restart after each EOD: RoPE sees each packed document as if alone."""
    eod_mask_loss: bool = False
    """No loss on predictions made at EOD (the next document's first token)."""
    # parallelism
    nproc: int | None = None
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    """Expert parallelism (Megatron's --expert-model-parallel-size): splits each MoE layer's experts over EP ranks
    carved out of DP x CP, so it must divide dp x cp; expert gradients are reduced over the dp*cp/ep replicas."""
    cp: int = 1
    """Context parallelism (Megatron's --context-parallel-size): each sequence is split over CP ranks in 2*cp
    load-balanced chunks; world = tp x cp x pp x dp. Weights are replicated over CP, checkpoints unchanged."""
    cp_comm_type: str = "p2p"
    """How CP ranks exchange K/V (Megatron's --cp-comm-type, same default): p2p, a ring that overlaps the exchange
    with attention (the faster one: docs/performance.md), or all_gather, all K/V up front, which alone applies a
    sliding window (bridge.parallel.state.CP_COMM_TYPES)."""
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    use_precision_aware_optimizer: bool = False
    """Megatron-LM's flag, with its param-remainder storage: under --bf16 the fp32 master weights are kept as 16-bit
    remainders beside the bf16 parameters (their rounded upper halves), bit for bit the same masters in 2 bytes per
    parameter less (bridge.training.optimizer)."""
    ddp_bucket_size: int = 40_000_000
    """Elements per gradient bucket; a full bucket starts its all-reduce while backward goes on."""
    # batch
    micro_batch_size: int = 1
    global_batch_size: int | None = None
    """Samples per optimizer step; default micro-batch-size x DP, no gradient accumulation (Megatron-LM's rule)."""
    seq_length: int = 2048
    # optimisation
    train_iters: int = 100
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    """Megatron-LM's default; a Megatron launch line without --lr-decay-style gets the same schedule here."""
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    bf16: bool = False
    fp8: str | None = None
    """FP8 matrix products in the transformer's linear layers (tensorwise | rowwise, torchao); needs --bf16 and an
    FP8 GPU (H100). Weights, optimizer state and checkpoints stay bf16/fp32 in Megatron layout."""
    fp8_format: str | None = None
    """Megatron-LM's --fp8-format, the float8 type of --fp8's output gradients: hybrid (e5m2) or e4m3. None: the
    recipe's own (tensorwise: hybrid; rowwise: e4m3, its only one)."""
    fp8_output_proj: bool = False
    """Megatron-LM's --fp8-output-proj: the output layer (vocabulary projection) also runs in FP8. Off by default,
    as in Megatron-LM: it is the largest single matmul, and the one whose rounding reaches the loss most directly."""
    first_last_layers_bf16: bool = False
    """Megatron-LM's flag: with --fp8, the first and last transformer layers keep bf16 matmuls (how many: the two
    counts below, Megatron's defaults 1 and 1, which it reads only under this flag)."""
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1
    accumulate_allreduce_grads_in_fp32: bool = False
    """Megatron-LM's flag; under --bf16 fp32 gradients are already the default (as in Megatron-LM), so it only
    documents the choice and contradicts --grad-reduce-in-bf16."""
    grad_reduce_in_bf16: bool = False
    """Under --bf16, accumulate and all-reduce gradients in bf16 (half the buffer, half the DP traffic, coarser sums
    over micro-batches and ranks) instead of Megatron-LM's default fp32."""
    gradient_accumulation_fusion: bool = True
    """Linear layers' weight-gradient GEMMs add into the gradient buffer (Megatron's default; bf16 GEMMs accumulate
    in fp32 into an fp32 buffer), and so does the embedding's backward, row by row. Applies without DP, the linear
    layers' without TP (bridge.nn.layers._LinearIntoMainGrad, _EmbeddingIntoMainGrad)."""
    moe_router_bias_update_rate: float = 1e-3
    """DeepSeek-V3's expert-bias step after every optimizer step (Megatron's default); routers without a bias ignore it."""
    mtp_num_layers: int | None = None
    """Megatron's multi-token prediction training: not available (refused); a checkpoint's MTP layers (GLM-4.5) are
    carried unchanged into the saves."""
    linear_cross_entropy_fusion: bool = True
    """The output layer and the loss in one pass over chunks of tokens, gradients formed in the forward: the
    [tokens, V/tp] logits and their gradient never exist whole (bridge.nn.linear_cross_entropy)."""
    rope_fusion: bool = True
    """Split q/k/v and apply RoPE in one Triton kernel on CUDA (Megatron's default; bridge.nn.rope_qkv)."""
    recompute: str | None = None
    attention_backend: str = "auto"
    """SDPA kernel on CUDA: auto | flash | fused (cuDNN) | unfused (Megatron-LM's --attention-backend names)."""
    compile: bool = False
    """torch.compile each transformer layer (CUDA runs; the first steps pay the compilation)."""
    # parameter-efficient fine-tuning (bridge.nn.lora; docs/lora.md)
    lora_rank: int | None = None
    """LoRA on the --lora-target-modules linears with this rank; the base is frozen (no gradients, no optimizer
    state) and checkpoints hold only the adapter, its optimizer state and the path of the base checkpoint."""
    lora_alpha: float = 32.0
    """The adapter's output is scaled by alpha / rank (Megatron-Bridge's and peft's convention)."""
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    lora_use_dora: bool = False
    """DoRA: a trained per-row magnitude over the direction of W + BA (peft's use_dora)."""
    lora_canonical: bool = False
    """Set by bridge, not a flag: q/k/v and gate/up keep an A each (an adapter imported from peft; bridge.nn.lora)."""
    lora_absent_parts: list[list[Any]] = field(default_factory=list)
    """Set by bridge, not a flag: [target, part] of the HF linears an imported adapter leaves out (bridge.nn.lora)."""
    lora_resume: str | None = None
    """Set by bridge, not a flag: the LoRA run --load named, whose adapter and optimizer resume; `load` is its base."""
    # checkpoints and evaluation
    save: str | None = None
    save_interval: int | None = None
    keep_last_checkpoints: int | None = None
    ckpt_format: str = "torch"
    """Megatron-LM's --ckpt-format: `torch` (legacy per-rank files, bridge's default: what existing runs and scripts
    read) or `torch_dist` (every rank writes its own shard in parallel; resumes on any TP/PP/DP/EP layout)."""
    async_save: bool = False
    """Megatron-LM's --async-save (torch_dist only): write checkpoints in a background thread while training goes
    on; the previous one is completed (tracker updated) at the next save or at the end."""
    exit_interval: int | None = None
    eval_interval: int = 1000
    eval_iters: int = 100
    """Validation batches per evaluation (Megatron-LM's default)."""
    seed: int = 1234
    # logging
    log_interval: int = 1
    tensorboard_dir: str | None = None
    profile: bool = False
    """PyTorch profiler over iterations [profile_step_start, profile_step_end): a Chrome trace and a table of the
    kernels that took the most time, per profiled rank (bridge.training.profiling)."""
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: list[int] = field(default_factory=lambda: [0])
    progress: bool = True
    peak_tflops: float | None = None
    """Peak bf16 TFLOP/s of one device, for MFU; default from the device name (H100/H200: 989)."""
    device: str | None = None
    """cpu or cuda; default cuda when a GPU is visible."""
    load_as_given: str | None = None
    """Set by bridge, not a flag: --load as the user gave it, where `load` is its automatic reshard to this layout."""

    def resolved_device(self) -> str:
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML recipe -> {field: value}; keys may be spelled as flags (`micro-batch-size`) or fields."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise BridgeError(f"recipe {file} does not exist; give a YAML file of flag: value pairs")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BridgeError(f"recipe {file} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise BridgeError(f"recipe {file} must be a mapping of flag: value, got {type(data).__name__}")
    out = {str(k).lstrip("-").replace("-", "_"): v for k, v in data.items()}
    aliases = {"data": "data_path", "tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
               "context_parallel_size": "cp",
               "expert_model_parallel_size": "ep",
               "recompute_granularity": "recompute"}
    out = {aliases.get(k, k): v for k, v in out.items()}
    unknown = sorted(set(out) - TrainConfig.field_names())
    if unknown:
        raise BridgeError(f"recipe {file} has unknown keys {unknown}; use `bridge train --help` flag names")
    if isinstance(out.get("data_path"), str):
        out["data_path"] = out["data_path"].split()
    return out
