"""`AutoBridge`: the Python entry point. One object per HF model; every CLI command is a call on it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Collection, Iterator, Sequence

import torch

from bridge.config import DTYPES, ModelConfig
from bridge.converters.convert import export_hf, import_hf
from bridge.errors import BridgeError
from bridge.hub import resolve_source
from bridge.layout import ParallelLayout
from bridge.models import load_hf_config

log = logging.getLogger(__name__)


class AutoBridge:
    """An HF model's config and mapping, resolved once; weights are read only when an operation needs them.

    >>> b = AutoBridge.from_hf("meta-llama/Llama-3.2-1B")          # doctest: +SKIP
    >>> b.import_checkpoint("ckpt", layout=ParallelLayout(tp=2))     # doctest: +SKIP
    """

    def __init__(self, folder: Path, config: ModelConfig, source: str, revision: str | None = None) -> None:
        self.folder, self.config, self.source, self.revision = folder, config, source, revision

    @classmethod
    def from_hf(cls, source: str | Path, *, revision: str | None = None, token: str | None = None) -> "AutoBridge":
        """A local HF folder or a Hub id (downloads config, tokenizer and safetensors files)."""
        folder = resolve_source(str(source), revision=revision, token=token)
        return cls(folder, load_hf_config(folder), str(source), revision)

    @property
    def architecture(self) -> str:
        return self.config.architecture

    def __repr__(self) -> str:
        c = self.config
        return (f"AutoBridge({self.source!r}: {c.architecture}, {c.num_layers} layers, hidden {c.hidden_size}, "
                f"{c.num_attention_heads}/{c.num_query_groups} heads, vocab {c.vocab_size})")

    # ---- offline conversion (CLI equivalents) ------------------------------------------------
    def import_checkpoint(self, out: str | Path, layout: ParallelLayout | None = None, **options: Any) -> Path:
        """`bridge import`: write a Megatron checkpoint for `layout` (options: dtype, transformer_impl, overwrite)."""
        return import_hf(self.folder, out, layout, revision=self.revision, **options)

    @staticmethod
    def export_checkpoint(checkpoint: str | Path, out: str | Path, **options: Any) -> Path:
        """`bridge export`: Megatron checkpoint -> HF folder (options: dtype, max_shard_size, overwrite, iteration)."""
        return export_hf(checkpoint, out, **options)

    # ---- live models (inside torch.distributed) ----------------------------------------------
    def build_model(self, layout: ParallelLayout, ps: Any = None, *, load_weights: bool = True,
                    transformer_impl: str = "transformer_engine", sequence_parallel: bool = False,
                    params_dtype: torch.dtype | str = torch.float32, device: str | torch.device | None = None) -> list:
        """This rank's `bridge.nn` model chunks (one per virtual pipeline chunk), HF weights loaded.

        Call on every rank of an initialised `torch.distributed` job; `ps` (a ParallelState) is made from
        the job's world size and rank when not given. World size must be a multiple of tp*pp.
        """
        import torch.distributed as dist

        # imported here: live models need bridge.nn (and torch.compile's machinery); offline conversion never loads it
        from bridge.apps.live import load_hf_weights
        from bridge.nn.gpt import build_model_chunks
        from bridge.parallel.state import ParallelState

        if ps is None:
            if not dist.is_initialized():
                raise BridgeError("build_model needs torch.distributed: call bridge.parallel.state.init_distributed() "
                                  "or run under torchrun")
            ps = ParallelState(layout, dist.get_world_size(), dist.get_rank())
        dtype = DTYPES[params_dtype] if isinstance(params_dtype, str) else params_dtype
        chunks = build_model_chunks(self.config, ps, transformer_impl=transformer_impl,
                                    sequence_parallel=sequence_parallel, params_dtype=dtype, device=device)
        if load_weights:
            load_hf_weights(chunks, self.folder)
        return chunks

    @staticmethod
    def export_hf_weights(chunks: Sequence[Any], *, names: Collection[str] | None = None,
                          dtype: torch.dtype | None = None, to: str = "all") -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (HF name, full tensor) out of a live model; see `bridge.apps.live.export_hf_weights`."""
        from bridge.apps.live import export_hf_weights  # a live model's module: see build_model

        return export_hf_weights(chunks, names=names, dtype=dtype, to=to)

    def save_hf(self, chunks: Sequence[Any], out: str | Path, *, dtype: torch.dtype | None = None,
                max_shard_size: str = "5GB", overwrite: bool = False) -> Path | None:
        """Write a live model as an HF folder (rank 0 writes; every rank must call). Returns the folder on rank 0."""
        from bridge.apps.live import save_hf  # a live model's module: see build_model

        return save_hf(chunks, self.folder, Path(out), dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
