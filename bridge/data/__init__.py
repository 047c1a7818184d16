"""Training data: Megatron indexed datasets (`.bin`/`.idx`) from jsonl/parquet, and their readers.

The tokenizing entry point is `bridge.data.prepare.prepare` (not re-exported here, so that the name
`bridge.data.prepare` keeps meaning the module).
"""
from bridge.data.indexed import (
    IndexedDataset,
    IndexedDatasetWriter,
    SFTDataset,
    has_loss_mask,
    loss_mask_prefix,
    token_dtype,
)
from bridge.data.prepare import PrepareConfig, PrepareResult
from bridge.data.tokenizer import load_tokenizer

__all__ = [
    "IndexedDataset",
    "IndexedDatasetWriter",
    "SFTDataset",
    "PrepareConfig",
    "PrepareResult",
    "has_loss_mask",
    "load_tokenizer",
    "loss_mask_prefix",
    "token_dtype",
]
