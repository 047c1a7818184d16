"""Megatron-compatible parallel GPT: modules whose state-dict names are Megatron Core's."""
from bridge.nn.gpt import (GPTModel, allreduce_tied_embedding_grads, allreduce_tp_partial_grads, build_model_chunks, load_rank_checkpoint,
                           sync_tied_embeddings)

__all__ = ["GPTModel", "build_model_chunks", "load_rank_checkpoint", "sync_tied_embeddings",
           "allreduce_tied_embedding_grads",
           "allreduce_tp_partial_grads"]
