"""Megatron-LM's `torch_dist` checkpoint format: global, layout-independent keys in DCP files.

Facts (megatron/core/dist_checkpointing, checked against the own `save` of megatron-core 0.16.1 and 0.19.2):
- The iteration folder (`release/` or `iter_{N:07d}/`) holds DCP files (`__{rank}_{n}.distcp`, `.metadata`),
  the common (non-sharded) state (`args`, `checkpoint_version`, `iteration`, ...) and `metadata.json`.
- Up to Megatron Core 0.18 the common state is `common.pt` and `metadata.json` adds `common_backend: torch`,
  version 1. From 0.19 it is the DCP byte entry `common_state/shard_0_1` holding `torch.save([state])` (the
  ShardedObject `common_state`), `metadata.json` names the sharded backend only, and a `common.pt` present is
  still read first, with a deprecation warning.
- Keys are the TE-spec names without the layer index; homogeneous layers are stacked on a leading
  layer axis: `decoder.layers.self_attention.linear_qkv.weight` `[L, (nq+2ng)d, h]`. The local spec maps
  its norms to the same keys (`sharded_state_dict_keys_map`), so one folder serves both specs.
- fc1 is the global `[gate_full; up_full]`; the embedding and output layer keep the vocab padding.
- Tied embeddings store no `output_layer.weight`.
- `_extra_state` of linear_qkv, linear_proj, linear_fc1 and linear_fc2 are ShardedObjects, one per layer:
  byte blobs `{key}/shard_{layer}_{L}` holding `torch.save([state])`. TEDotProductAttention
  (core_attention) contributes none.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import pickle
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from bridge.checkpoint import CheckpointMeta
from bridge.converters import engine
from bridge.converters.megatron_legacy import (CHECKPOINT_VERSION, SAFE_GLOBALS, TRACKER, LegacyCheckpointReader,
                                               check_iteration, iteration_dir_name, model_keys, read_tracker,
                                               state_dict_position)
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from bridge.mapping import Conversion, megatron_shape
from bridge.sharding import Split, localize, rule_for, split

if TYPE_CHECKING:
    from bridge.converters.dcp import DcpReader
    from bridge.converters.dcp_parts import DcpPart

log = logging.getLogger(__name__)

FORMATS = ("torch", "torch_dist")
CONFIG_FILE = "metadata.json"
COMMON_FILE = "common.pt"
#: metadata.json beside a `common.pt` (what Megatron Core up to 0.18 writes and needs).
BACKEND_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                  "common_backend": "torch", "common_backend_version": 1}
#: metadata.json of Megatron Core 0.19, whose common state lives inside the DCP files.
DCP_COMMON_BACKEND_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
#: Megatron Core 0.19's common state: `ShardedObject("common_state", ..., (1,), (0,)).unique_key`.
COMMON_STATE_KEY = "common_state/shard_0_1"
#: Megatron-Bridge's run configuration, in the iteration folder (megatron/bridge/training/utils/checkpoint_utils.py).
RUN_CONFIG = "run_config.yaml"
#: Modules whose `_extra_state` Megatron Core puts in the sharded state dict (both layer specs).
EXTRA_STATE_MODULES: tuple[str, ...] = ("self_attention.linear_qkv", "self_attention.linear_proj",
                                        "mlp.linear_fc1", "mlp.linear_fc2")
#: Top-level DCP keys of training state that carry no model weights.
NON_MODEL_PREFIXES: tuple[str, ...] = ("optimizer.", "rng_state", "rerun_state_machine")
#: Key prefixes under which a Megatron-LM version may nest the model (tools/checkpoint/dist_checkpoint_io.py).
MODEL_PREFIXES: tuple[str, ...] = ("", "model.", "model.module.", "model.module.module.")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def dcp_key(key: str) -> tuple[str, int | None]:
    """Global Megatron key -> (stacked DCP key, layer index) for layer weights, (key, None) otherwise."""
    match = _LAYER.match(key)
    return (f"decoder.layers.{match.group(2)}", int(match.group(1))) if match else (key, None)


def extra_state_key(module: str, layer: int, num_layers: int) -> str:
    """Megatron's ShardedObject unique key: `{key}/shard_{offset}_{global shape}`."""
    return f"decoder.layers.{module}._extra_state/shard_{layer}_{num_layers}"


def extra_state_blob(transformer_impl: str) -> bytes:
    """What Megatron stores per module: torch.save of the list of ShardedObject payloads on that rank.

    TE modules without FP8 hold an empty uint8 tensor (TE 2.x); the local spec's modules hold None.
    """
    buf = io.BytesIO()
    torch.save([torch.empty(0, dtype=torch.uint8) if transformer_impl == "transformer_engine" else None], buf)
    return buf.getvalue()


def checkpoint_format(root: Path, iteration: int | str | None = None, recorded: str = "torch") -> str:
    """`torch_dist` when the iteration folder has Megatron's `metadata.json`, else legacy `torch`.

    `recorded` is what bridge.json says; a torch_dist folder without metadata.json and without rank
    folders is a save that did not finish (Megatron writes metadata.json last), not a legacy checkpoint.
    """
    check_iteration(root, iteration)
    folder = root / iteration_dir_name(read_tracker(root) if iteration is None else iteration)
    config = folder / CONFIG_FILE
    if not config.is_file():
        if recorded == "torch_dist" and not any(folder.glob("mp_rank_*")):
            raise BridgeError(f"{folder} has no {CONFIG_FILE}; the torch_dist checkpoint is incomplete (interrupted save?)")
        return "torch"
    try:
        backend = json.loads(config.read_text()).get("sharded_backend")
    except (ValueError, AttributeError) as exc:
        raise BridgeError(f"{config} is damaged ({exc}); it should name the sharded backend") from exc
    if backend != "torch_dist":
        raise BridgeError(f"{folder} is a {backend!r} distributed checkpoint; bridge reads torch_dist (and legacy torch)")
    return "torch_dist"


class TorchDistSink:
    """Global Megatron tensors -> stacked DCP chunks (one per layer), then extra state, common state, config."""

    def __init__(self, root: Path, meta: CheckpointMeta, args: argparse.Namespace, iteration: int | str = "release",
                 common_pt: bool = False, run_config: str | None = None, part: int | None = None,
                 data: bool = True) -> None:
        """`run_config`: Megatron-Bridge's `run_config.yaml` text, written into the iteration folder.

        A conversion in several processes gives each its `part`: it writes `__{part}_0.distcp` and `close_part`
        returns its chunk table; the parent's sink (`data=False`: no data file) merges them in `close_parts`.
        """
        self.root, self.meta, self.iteration, self.common_pt, self.run_config = root, meta, iteration, common_pt, run_config
        self.folder = root / iteration_dir_name(iteration)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.args = argparse.Namespace(**{**vars(args), "ckpt_format": "torch_dist"})
        from bridge.converters.dcp import DcpWriter  # torch.distributed.checkpoint loads only for this format
        from bridge.converters.dcp_parts import DcpPartWriter

        if data:
            self.writer = DcpWriter(self.folder) if part is None else DcpPartWriter(self.folder, f"__{part}_0.distcp")

    def put(self, conv: Conversion, tensor: torch.Tensor) -> None:
        if rule_for(conv.megatron) is Split.VOCAB:
            tensor = split(tensor, Split.VOCAB, 1, self.meta.padded_vocab_size)[0]
        key, layer = dcp_key(conv.megatron)
        if layer is None:
            self.writer.add_chunk(key, tensor.shape, (0,) * tensor.dim(), tensor)
        else:  # one chunk [1, ...] of the stacked [L, ...] tensor: never materialised whole
            self.writer.add_chunk(key, (self.meta.config.num_layers, *tensor.shape), (layer,) + (0,) * tensor.dim(),
                                  tensor.unsqueeze(0))

    def close(self) -> None:
        self._add_shared()
        self.writer.close()
        self._finish_folder()

    def close_part(self, shared: bool) -> DcpPart:
        """Finish this process's data file; the one `shared` also holds the extra and common state entries."""
        if shared:
            self._add_shared()
        return self.writer.close()

    def close_parts(self, parts: Sequence[DcpPart], conversions: Sequence[Conversion]) -> None:
        """`.metadata` from every process's chunk table, checked to hold every target of `conversions` and every
        shared entry, each tensor covered exactly once; then the folder's other files, as `close` writes them."""
        from bridge.converters.dcp_parts import write_metadata

        write_metadata(self.folder, list(parts), expected={dcp_key(c.megatron)[0] for c in conversions} | self._shared_keys())
        self._finish_folder()

    def _shared_keys(self) -> set[str]:
        num_layers = self.meta.config.num_layers
        return {extra_state_key(m, layer, num_layers) for layer in range(num_layers) for m in EXTRA_STATE_MODULES} \
            | {COMMON_STATE_KEY}

    def _common(self) -> dict[str, Any]:
        iteration = 0 if self.iteration == "release" else int(self.iteration)
        return {"args": self.args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}

    def _add_shared(self) -> None:
        """Every layer's `_extra_state` entries and the common state, into the data file."""
        num_layers = self.meta.config.num_layers
        blob = extra_state_blob(self.meta.transformer_impl)
        for layer in range(num_layers):
            for module in EXTRA_STATE_MODULES:
                self.writer.add_bytes(extra_state_key(module, layer, num_layers), blob)
        self.writer.add_bytes(COMMON_STATE_KEY, torch_bytes([self._common()]))  # where Megatron Core 0.19 reads it

    def _finish_folder(self) -> None:
        """run_config.yaml, common.pt, metadata.json (last but the tracker: it marks the folder complete)."""
        if self.run_config is not None:
            (self.folder / RUN_CONFIG).write_text(self.run_config)
        if self.common_pt:  # written by Python, so a full disk is an OSError (torch's own file writer aborts)
            (self.folder / COMMON_FILE).write_bytes(torch_bytes(self._common()))
        config = BACKEND_CONFIG if self.common_pt else DCP_COMMON_BACKEND_CONFIG
        (self.folder / CONFIG_FILE).write_text(json.dumps(config))  # last: marks the folder complete
        (self.root / TRACKER).write_text(str(self.iteration))


def torch_bytes(obj: Any) -> bytes:
    """`torch.save(obj)` as bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def read_common_state(folder: Path, dcp: DcpReader) -> dict[str, Any]:
    """The common state of a torch_dist iteration folder: Megatron Core 0.19's DCP entry, else `common.pt`, else {}.

    Loaded with weights_only=True, allowing `argparse.Namespace` and Megatron's enums (as their values,
    megatron_legacy.ARG_ENUMS); anything else is refused in one line.
    """
    if dcp.has_bytes(COMMON_STATE_KEY):
        where, data = f"{folder}/{COMMON_STATE_KEY}", dcp.read_bytes(COMMON_STATE_KEY)
    elif (folder / COMMON_FILE).is_file():
        where, data = str(folder / COMMON_FILE), (folder / COMMON_FILE).read_bytes()
    else:
        return {}
    state = _load_common(where, data)
    state = state[0] if isinstance(state, list) and len(state) == 1 else state  # the ShardedObject's payload list
    if not isinstance(state, dict):
        raise BridgeError(f"{where} holds a {type(state).__name__}, not Megatron's common state dict")
    return state


def _load_common(where: str, data: bytes) -> Any:
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            cause = next((line for line in lines if "Unsupported global" in line), lines[0])  # weights_only's reason
            cause = cause.split(". Please use")[0]  # not torch's advice to allow-list it
            raise BridgeError(f"cannot read Megatron's common state {where}: {cause} (bridge unpickles only "
                              "argparse.Namespace and the enums of Megatron-LM's args)") from None


class TorchDistReader:
    """Lazy reader of a torch_dist iteration folder in terms of bridge's global Megatron keys.

    `conversions` is the model's mapping (bridge.models.conversions of its config): `load_rank` splits its tensors
    for a rank by it. The caller passes it, so that the formats know nothing of the model families.
    """

    def __init__(self, root: Path, meta: CheckpointMeta, conversions: Sequence[Conversion],
                 iteration: int | str | None = None) -> None:
        self.root, self.ckpt_meta, self.conversions = root, meta, conversions
        self.iteration = read_tracker(root) if iteration is None else iteration
        self.folder = root / iteration_dir_name(self.iteration)
        if not (self.folder / CONFIG_FILE).is_file():
            raise BridgeError(f"{self.folder} has no {CONFIG_FILE}; the torch_dist checkpoint is incomplete (interrupted save?)")
        from bridge.converters.dcp import DcpReader  # torch.distributed.checkpoint loads only for this format

        self.dcp = DcpReader(self.folder)
        keys = self.dcp.tensor_keys()
        self.prefix = next((p for p in MODEL_PREFIXES if f"{p}embedding.word_embeddings.weight" in keys), "")
        self._consumed: set[tuple[str, int | None]] = set()

    def model_keys(self) -> list[str]:
        """DCP tensor keys of model weights (prefix stripped); optimizer / rng state left out."""
        bare = [k[len(self.prefix):] for k in self.dcp.tensor_keys() if k.startswith(self.prefix)]
        return [k for k in bare if not k.startswith(NON_MODEL_PREFIXES)]

    def common_state(self) -> dict[str, Any]:
        return read_common_state(self.folder, self.dcp)

    def args(self) -> argparse.Namespace | None:
        args = self.common_state().get("args")
        return args if isinstance(args, argparse.Namespace) else None

    def _locate(self, key: str) -> tuple[str, int | None]:
        """Stacked key and layer, or a per-layer key (non-homogeneous models store `decoder.layers.{g}.`)."""
        stacked, layer = dcp_key(key)
        keys = self.dcp.metadata.state_dict_metadata
        return (key, None) if layer is not None and self.prefix + key in keys else (stacked, layer)

    def meta(self, key: str) -> torch.Tensor:
        """Shape and dtype of one global tensor (one layer of a stacked one), on `meta`."""
        stacked, layer = self._locate(key)
        entry = self.dcp.tensor_meta(self.prefix + stacked)
        shape = tuple(entry.size)[1:] if layer is not None else tuple(entry.size)
        return torch.empty(shape, dtype=entry.properties.dtype, device="meta")

    def get(self, key: str, rows: int | None = None) -> torch.Tensor:
        """One global tensor (one layer slice of a stacked one), optionally only its first `rows` rows."""
        stacked, layer = self._locate(key)
        entry = self.dcp.tensor_meta(self.prefix + stacked)
        size = list(entry.size)
        if layer is not None:
            if layer >= size[0]:
                raise BridgeError(f"{self.folder}: {stacked} stacks {size[0]} layers, layer {layer} was asked for")
            offsets, sizes = [layer] + [0] * (len(size) - 1), [1] + size[1:]
        else:
            offsets, sizes = [0] * len(size), size
        row_dim = 1 if layer is not None else 0
        if rows is not None:
            sizes[row_dim] = rows
        tensor = self.dcp.read(self.prefix + stacked, offsets, sizes)
        self._consumed.add((stacked, layer))
        return tensor[0] if layer is not None else tensor

    def unconsumed(self) -> list[str]:
        left = []
        for key in self.model_keys():
            layers = range(self.dcp.tensor_meta(self.prefix + key).size[0]) if key.startswith("decoder.layers.") \
                and not key.split(".")[2].isdigit() else [None]
            left += [f"{key}[{layer}]" if layer is not None else key for layer in layers if (key, layer) not in self._consumed]
        return sorted(left)

    def load_rank(self, tp_rank: int, pp_rank: int, layout: ParallelLayout | None = None,
                  ep_rank: int = 0) -> dict[str, Any]:
        """One rank's state as a legacy rank file holds it (`args`, `model`/`model{v}`), for any `layout`.

        torch_dist is layout-independent, so a training or verify rank of any TP/PP/EP reads its shard here:
        each global tensor of its stage (and EP rank) is read (one at a time) and split with the usual rules.
        """
        # any padding: the source trims the rows to the vocabulary, the rank's split pads them as `layout` does
        meta = replace(self.ckpt_meta, layout=layout or self.ckpt_meta.layout, padded_vocab=None)
        source = TorchDistSource(self, meta, self.conversions)
        collector = _RankCollector(meta.layout, tp_rank, pp_rank, ep_rank)
        sink = engine.MegatronSink(self.root, meta, lambda t, p: argparse.Namespace(), writer=collector)
        last, tied_copy = meta.layout.pp - 1, meta.config.tie_word_embeddings and meta.layout.pp > 1
        wanted = [c for c in source.conversions
                  if _on_rank(localize(c.megatron, meta.layout, meta.config.num_layers, meta.transformer_impl,
                                       meta.config.num_experts), pp_rank, ep_rank)
                  or (tied_copy and pp_rank == last and c.megatron == "embedding.word_embeddings.weight")]
        for conv, tensor in source.tensors(only=wanted):
            sink.put(conv, tensor)
        sink.close()
        state: dict[str, Any] = {"args": self.args(), "checkpoint_version": CHECKPOINT_VERSION,
                                 "iteration": 0 if self.iteration == "release" else int(self.iteration)}
        state.update(zip(model_keys(meta.layout), collector.models()))
        return state


def _on_rank(local: Any, pp_rank: int, ep_rank: int) -> bool:
    """A localized key belongs to this stage and, for experts, to this EP rank."""
    return local.pp_rank == pp_rank and local.ep_rank in (None, ep_rank)


class _RankCollector:
    """Stands in for LegacyCheckpointWriter: keeps one rank's (chunk, local name, shard) in memory."""

    def __init__(self, layout: ParallelLayout, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> None:
        self.tp_rank, self.pp_rank, self.ep_rank = tp_rank, pp_rank, ep_rank
        self._models: list[dict[str, torch.Tensor]] = [{} for _ in range(layout.chunks)]

    def add(self, tp_rank: int, pp_rank: int, chunk: int, name: str, tensor: torch.Tensor, ep_rank: int = 0) -> None:
        """Keep this rank's tensors (the files of other TP, PP and EP ranks are dropped)."""
        if (tp_rank, pp_rank, ep_rank) == (self.tp_rank, self.pp_rank, self.ep_rank):
            self._models[chunk][name] = tensor.clone() if tensor.storage_offset() or not tensor.is_contiguous() else tensor

    def close(self) -> None:
        pass

    def models(self) -> list[dict[str, torch.Tensor]]:
        return [dict(sorted(m.items(), key=lambda item: state_dict_position(item[0]))) for m in self._models]


class TorchDistSource:
    """torch_dist DCP -> global Megatron tensors, one layer slice at a time; all-in/all-out accounting."""

    def __init__(self, reader: TorchDistReader, meta: CheckpointMeta, conversions: Sequence[Conversion]) -> None:
        self.reader, self.meta, self.conversions = reader, meta, conversions
        self._check_accounting()
        self._check_shapes()

    def _check_shapes(self) -> None:
        """Every global tensor (one layer of a stacked one) against the shape bridge.json's model gives it, and a
        float dtype, from the metadata alone."""
        found = ((conv.megatron, got, self._expected(conv.megatron, got), engine.FLOAT_DTYPES)
                 for conv in self.conversions for got in [self.reader.meta(conv.megatron)])
        engine.check_stored(f"{self.reader.folder} does not hold the model its bridge.json describes", found,
                            "was it changed after it was written? re-create it")

    def _expected(self, key: str, got: torch.Tensor) -> tuple[int, ...]:
        """The global shape; vocabulary rows may be padded for whichever TP saved the checkpoint."""
        want = megatron_shape(key, self.meta.config)
        if rule_for(key) is Split.VOCAB and got.dim() == len(want):
            return (max(want[0], got.shape[0]), *want[1:])
        return want

    def _check_accounting(self) -> None:
        expected = {self.reader._locate(c.megatron)[0] for c in self.conversions}
        present = set(self.reader.model_keys())
        missing, unexpected = expected - present, present - expected
        if missing or unexpected:
            parts = [f"missing {len(missing)}: {engine._listing(missing)}" if missing else "",
                     f"unexpected {len(unexpected)}: {engine._listing(unexpected)}" if unexpected else ""]
            raise BridgeError(f"{self.reader.folder} does not hold what bridge.json describes: " + "; ".join(p for p in parts if p))
        for key in expected:
            size = self.reader.dcp.tensor_meta(self.reader.prefix + key).size
            if key.startswith("decoder.layers.") and not key.split(".")[2].isdigit() and size[0] != self.meta.config.num_layers:
                raise BridgeError(f"{self.reader.folder}: {key} stacks {size[0]} layers, the config has {self.meta.config.num_layers}")

    def tensors(self, meta: bool = False, only: Sequence[Conversion] | None = None) -> Iterator[tuple[Conversion, torch.Tensor]]:
        vocab = self.meta.config.vocab_size
        for conv in self.conversions if only is None else only:
            is_vocab = rule_for(conv.megatron) is Split.VOCAB
            if meta:
                tensor = self.reader.meta(conv.megatron)
                yield conv, tensor[:vocab] if is_vocab else tensor
                continue
            if is_vocab and self.reader.meta(conv.megatron).shape[0] < vocab:
                raise BridgeError(f"{conv.megatron} has {self.reader.meta(conv.megatron).shape[0]} rows, fewer than the vocabulary ({vocab})")
            yield conv, self.reader.get(conv.megatron, rows=vocab if is_vocab else None)

    def finish(self) -> None:
        engine.check_leftover([self.leftover()])

    def leftover(self) -> list[str]:
        """What was not read (a conversion over several processes: left over when every process left it)."""
        return self.reader.unconsumed()

    def share_report(self) -> list[str]:
        return self.leftover()

    def finish_shares(self, reports: Sequence[list[str]]) -> None:
        engine.check_leftover(reports)


def open_rank_reader(root: Path, meta: CheckpointMeta, conversions: Sequence[Conversion],
                     iteration: int | str | None = None) -> Any:
    """The reader whose `load_rank(tp_rank, pp_rank)` serves `bridge verify` / training, for either format
    (`conversions`: the model's mapping, which a torch_dist reader splits by)."""
    if checkpoint_format(root, iteration) == "torch_dist":
        return TorchDistReader(root, meta, conversions, iteration)
    return LegacyCheckpointReader(root, meta.layout, iteration)

