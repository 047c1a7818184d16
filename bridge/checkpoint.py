"""The bridge checkpoint folder: Megatron's tree plus `bridge.json` and `hf_meta/` (what export needs)."""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

from bridge.config import ModelConfig
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout

log = logging.getLogger(__name__)

META_FILE = "bridge.json"
HF_META_DIR = "hf_meta"
#: HF files carried into `hf_meta/` and back out on export: config, generation config, tokenizer.
HF_META_PATTERNS: tuple[str, ...] = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "*.tiktoken",
)
TRANSFORMER_IMPLS = ("transformer_engine", "local")


@dataclass(frozen=True, kw_only=True)
class CheckpointMeta:
    """Everything `bridge.json` records; enough to read the Megatron tree back without guessing."""

    config: ModelConfig
    layout: ParallelLayout
    transformer_impl: str = "transformer_engine"
    dtype: str = "fp32"
    format: str = "torch"
    source: dict[str, Any] = field(default_factory=dict)
    bridge_version: str = "0.1.0"

    @property
    def padded_vocab_size(self) -> int:
        return self.layout.padded_vocab_size(self.config.vocab_size)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "architecture": self.config.architecture,
            "layout": self.layout.to_json(),
            "transformer_impl": self.transformer_impl,
            "dtype": self.dtype,
            "original_vocab_size": self.config.vocab_size,
            "padded_vocab_size": self.padded_vocab_size,
            "source": self.source,
            "config": self.config.to_json(),
            "bridge_version": self.bridge_version,
        }

    def save(self, folder: Path) -> None:
        (folder / META_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "CheckpointMeta":
        path = folder / META_FILE
        if not path.is_file():
            raise BridgeError(f"{folder} is not a bridge checkpoint (no {META_FILE}); create one with `bridge import`")
        try:
            data = json.loads(path.read_text())
            return cls(
                config=ModelConfig.from_json(data["config"]),
                layout=ParallelLayout(**data["layout"]),
                transformer_impl=data["transformer_impl"],
                dtype=data["dtype"],
                format=data["format"],
                source=data.get("source", {}),
                bridge_version=data.get("bridge_version", "?"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BridgeError(f"{path} is damaged ({type(exc).__name__}: {exc}); re-create the checkpoint") from exc


def copy_hf_meta(src: Path, dst: Path) -> None:
    """Copy config, generation config and tokenizer files (whatever of them exists) into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for pattern in HF_META_PATTERNS:
        for path in src.glob(pattern):
            if path.is_file():
                shutil.copy2(path, dst / path.name)


def set_config_dtype(config_path: Path, dtype: "torch.dtype") -> None:
    """Record the weights' dtype in an HF config.json (`dtype` in transformers 5, `torch_dtype` before)."""
    config: dict[str, Any] = json.loads(config_path.read_text())
    config["dtype" if "dtype" in config else "torch_dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2) + "\n")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield `<out>.tmp` to write into; on success it replaces `out`, on any failure it is removed.

    An existing non-empty `out` is an error unless `overwrite`; then it is replaced only after the
    new output is complete, so a failed run never loses the old one.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BridgeError(f"{out} exists and is not empty; pass --overwrite to replace it or choose another --out")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        log.info("removing leftover %s from an interrupted run", tmp)
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
