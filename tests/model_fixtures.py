"""Fixtures for tiny HF models made from the real configs in tests/configs, cached per session."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from bridge.layout import ParallelLayout
from bridge.tiny import save_tiny_model, tiny_config

#: Real `config.json` files of public models, one folder each (`<org>--<name>`); provenance in its README.md.
CONFIGS = Path(__file__).resolve().parent / "configs"

#: The dense architectures bridge converts, one representative real config each.
DENSE_MODELS: dict[str, str] = {
    "llama32-tied": "meta-llama--Llama-3.2-1B",       # tied embeddings, llama3 rope scaling, head_dim 64
    "llama31": "meta-llama--Llama-3.1-8B",            # untied, llama3 rope scaling
    "llama2": "meta-llama--Llama-2-7b-hf",            # MHA, fp16 source
    "mistral": "mistralai--Mistral-7B-v0.3",
    "qwen2": "Qwen--Qwen2.5-7B",                      # qkv bias
    "qwen3": "Qwen--Qwen3-8B",                        # q/k norm
    "qwen3-tied": "Qwen--Qwen3-0.6B",                 # tied, head_dim > hidden/heads
    "smollm3": "HuggingFaceTB--SmolLM3-3B",           # NoPE every 4th layer, tied
    "phi3": "microsoft--Phi-3-mini-4k-instruct",      # fused qkv_proj and gate_up_proj (+ LongRoPE, partial rotary)
    "phi4": "microsoft--phi-4",                       # Phi-3's names with GQA
    "gemma2": "google--gemma-2-2b",                   # (1+w) pre+post norms, GeGLU, softcaps, alternate windows, tied
    "gemma3": "google--gemma-3-1b-it",                # Gemma 2's block with q/k norms, local and global RoPE
    "olmo2": "allenai--OLMo-2-7B-Olmo2Config-defaults",  # post-norms only, q/k norms over the whole projection
}


#: The MoE architectures bridge converts.
MOE_MODELS: dict[str, str] = {
    "mixtral": "mistralai--Mixtral-8x7B-v0.1",
    "qwen3-moe": "Qwen--Qwen3-30B-A3B",
    "qwen2-moe": "Qwen--Qwen1.5-MoE-A2.7B",           # qkv bias, gated shared expert
    "deepseek-v3": "deepseek-ai--DeepSeek-V3",        # MLA, sigmoid router + bias, groups, shared expert, dense first layer
    # Glm4MoeConfig's defaults (GLM-4.5-Air's shape; no copy of the released config.json was found): qkv bias, partial
    # rotary, DeepSeek-V3's router and shared expert, a dense first layer, and an MTP layer kept through conversion
    "glm4.5-air": "zai-org--GLM-4.5-Air-Glm4MoeConfig-defaults",
    "gpt-oss": "openai--gpt-oss-20b",                 # sinks, alternate windows, YaRN, biases, clamped SwiGLU, stacked experts
}

#: The dense models of the logit-parity tests (model and verify), under their test ids -> DENSE_MODELS keys.
PARITY_MODELS: dict[str, str] = {
    "llama-tied": "llama32-tied",     # tied embeddings, llama3 RoPE scaling
    "llama-untied": "llama31",        # untied, llama3 RoPE scaling
    "mistral": "mistral",
    "qwen2": "qwen2",                 # qkv bias
    "qwen3": "qwen3-tied",            # qk-norm, head_dim != hidden/heads, tied
    "smollm3": "smollm3",             # NoPE layers
    "phi3": "phi3",                   # fused HF qkv/gate_up, LongRoPE, partial rotary, sliding window
    "gemma2": "gemma2",               # softcaps, (1+w) post-norms, GeGLU, embedding scale, alternate windows
    "gemma3": "gemma3",               # q/k norms, local/global RoPE (linear scaling), 3:1 windows
    "olmo2": "olmo2",                 # post-norms only, full-width q/k norms (summed over TP)
}
#: The layouts those tests shard them into.
PARITY_LAYOUTS = [ParallelLayout(), ParallelLayout(tp=2), ParallelLayout(pp=2), ParallelLayout(tp=2, pp=2),
                  ParallelLayout(pp=2, vpp=2)]

_TINY_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}

#: Per-model overrides on top of bridge.tiny's scaled-down shapes.
MODEL_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama2": {"num_key_value_heads": 8},  # keep Llama 2's MHA
    "smollm3": {"no_rope_layers": [1, 1, 1, 0], "layer_types": ["full_attention"] * 4},  # the real pattern, 4 layers
    # Phi-3-mini's shape (MHA) with Phi-3.5's LongRoPE and Phi-4-mini's partial rotary: half of each 16-wide head
    # rotates; the verify prompts (24 to 93 tokens) fall on both sides of the 64 original positions and the window
    "phi3": {"num_attention_heads": 4, "num_key_value_heads": 4, "original_max_position_embeddings": 64,
             "sliding_window": 32, "partial_rotary_factor": 0.5,
             "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6],
                              "long_factor": [1.2, 2.0, 3.5, 5.0]}},
    # query_pre_attn_scalar = head_dim, as in the real configs (256); windows of 16 tokens, which the verify prompts
    # (24 to 93 tokens) outgrow; softcaps scaled down to bite on random weights (at 50 and 30 a tiny model's scores
    # and logits are as good as uncapped, and a checkpoint read without them would pass)
    "gemma2": {"query_pre_attn_scalar": 16, "sliding_window": 16, "attn_logit_softcapping": 0.1,
               "final_logit_softcapping": 2.0},
    # Gemma 3-1B's 5:1 pattern cut to 4 layers (the full one last), and the linear RoPE scaling of its larger sizes
    "gemma3": {"query_pre_attn_scalar": 16, "sliding_window": 16,
               "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
               "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32},
    "qwen3-moe": {**_TINY_MOE, "decoder_sparse_step": 2},              # dense and MoE layers alternate
    "qwen2-moe": {**_TINY_MOE, "shared_expert_intermediate_size": 48, "mlp_only_layers": [2]},
    "deepseek-v3": {
        "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
        "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "num_key_value_heads": 8,
        "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
        "quantization_config": None, "num_nextn_predict_layers": 0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    },
    # On top of the defaults: qkv bias as both released GLM-4.5 configs have it (the defaults leave it off), head_dim
    # 16 != hidden/heads as the released 128 (partial rotary 0.5: 8 of its 16 dims rotate), GLM-4.5's routed scale
    # 2.5, top-2 of 8 experts in 2 groups of 4, one kept (group-limited, and Megatron's group score agrees), and an
    # end-of-document token for the trainer (the defaults have none)
    "glm4.5-air": {"head_dim": 16, "attention_bias": True, "n_routed_experts": 8, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 32, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
                   "eos_token_id": 2},
    # the real pattern (sliding first) on 4 layers with 16-token windows, which the verify prompts (24 to 93 tokens)
    # outgrow; YaRN as released (truncate false) but over 64 original positions; the SwiGLU clamp scaled down to bite
    # on random weights (at 7 nothing of a tiny model reaches it: a quarter of its gate/up values pass 0.2); no MXFP4
    "gpt-oss": {
        "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32, "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"] * 2, "swiglu_limit": 0.2, "quantization_config": None,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False},
    },
}


def add_glm_checkpoint_tensors(folder: Path, config: Any) -> None:
    """What a GLM-4.5 checkpoint holds beyond what save_pretrained writes of transformers' model: a score-correction
    bias that is not zero (transformers initialises it to zero, and a conversion that dropped it would pass), and the
    `num_nextn_predict_layers` MTP layers transformers does not build (`model.layers.{L+i}.*`: a decoder MoE layer,
    enorm, hnorm, eh_proj, shared_head.norm, and embed_tokens and shared_head.head as copies of the model's)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(1)

    def randn(like: torch.Tensor, std: float, mean: float = 0.0) -> torch.Tensor:
        return (mean + std * torch.randn(like.shape, generator=generator)).to(like.dtype)

    for name, tensor in list(tensors.items()):
        if name.endswith("e_score_correction_bias"):  # std 0.05 against sigmoid scores of 0.5 +- 0.04: routing moves
            tensors[name] = randn(tensor, 0.05)
    last, h = f"model.layers.{config.num_hidden_layers - 1}.", config.hidden_size
    dtype = tensors["model.norm.weight"].dtype
    for i in range(config.num_nextn_predict_layers):
        mtp = f"model.layers.{config.num_hidden_layers + i}."
        for name, tensor in list(tensors.items()):
            if name.startswith(last):
                norm = "norm" in name
                tensors[mtp + name[len(last):]] = randn(tensor, 0.1 if norm or "bias" in name else 0.02, 1.0 if norm else 0.0)
        one = torch.ones(h, dtype=dtype)
        tensors.update({mtp + "enorm.weight": randn(one, 0.1, 1.0), mtp + "hnorm.weight": randn(one, 0.1, 1.0),
                        mtp + "shared_head.norm.weight": randn(one, 0.1, 1.0),
                        mtp + "eh_proj.weight": randn(torch.empty(h, 2 * h, dtype=dtype), 0.02),
                        mtp + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
                        mtp + "shared_head.head.weight": tensors["lm_head.weight"].clone()})
    save_file(tensors, path, metadata={"format": "pt"})


#: Per-model steps after save_pretrained: tensors a released checkpoint holds that transformers' model does not.
AFTER_SAVE: dict[str, Callable[[Path, Any], None]] = {"glm4.5-air": add_glm_checkpoint_tensors}


def write_random_corpus(prefix: Path, *, seed: int, documents: int, max_length: int = 80) -> Path:
    """An indexed dataset of `documents` random documents of 5..max_length-1 tokens (ids 3..299, clear of the tiny
    models' special tokens): the training tests' corpus."""
    from bridge.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for n in rng.integers(5, max_length, documents):
            w.add_document(rng.integers(3, 300, int(n)))
    return prefix


def rank_model(ckpt: str | Path, world: int, **kwargs: Any) -> tuple[Any, list[Any]]:
    """Inside a launched rank of `world`: its ParallelState and its model chunks, built for the checkpoint's layout
    (`kwargs` go to build_model_chunks) and loaded from its own rank file."""
    import torch.distributed as dist

    from bridge.checkpoint import CheckpointMeta
    from bridge.converters.megatron_legacy import LegacyCheckpointReader
    from bridge.nn import build_model_chunks, load_rank_checkpoint
    from bridge.parallel.state import ParallelState

    meta = CheckpointMeta.load(Path(ckpt))
    ps = ParallelState(meta.layout, world, dist.get_rank())
    chunks = build_model_chunks(meta.config, ps, transformer_impl=meta.transformer_impl, **kwargs)
    load_rank_checkpoint(chunks, LegacyCheckpointReader(Path(ckpt), meta.layout).load_rank(ps.tp_rank, ps.pp_rank))
    return ps, chunks


def load_pt(path: Path) -> dict[str, Any]:
    """A Megatron `.pt` file as the tests read it: weights_only, with the argparse `args` allowed."""
    from bridge.converters.megatron_legacy import SAFE_GLOBALS

    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, weights_only=True)


def real_config(name: str) -> Path:
    return CONFIGS / {**DENSE_MODELS, **MOE_MODELS}.get(name, name) / "config.json"


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_hf("qwen3", dtype=torch.bfloat16, num_hidden_layers=8)` -> folder of a saved tiny model."""
    cache: dict[tuple[Any, ...], Path] = {}

    def make(name: str, dtype: torch.dtype = torch.float32, **overrides: Any) -> Path:
        key = (name, dtype, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"hf-{name}")
            config = tiny_config(real_config(name), **{**MODEL_OVERRIDES.get(name, {}), **overrides})
            cache[key] = save_tiny_model(config, out, dtype=dtype)
            AFTER_SAVE.get(name, lambda folder, config: None)(cache[key], config)
        return cache[key]

    return make
