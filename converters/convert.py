"""Whole-checkpoint conversions: HF -> Megatron (`import_hf`), Megatron -> HF (`export_hf`), Megatron -> Megatron
in another layout, spec, dtype or format (`reshard`), and reading one (`open_checkpoint`, `inspect_checkpoint`).

They join the model families' mappings (bridge.models) to the formats and the streaming engine of this package;
`bridge train` reshards a --load in another layout through here, and bridge.api re-exports them for users.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from bridge.checkpoint import (HF_META_DIR, META_FILE, TRANSFORMER_IMPLS, CheckpointMeta, atomic_output_dir, copy_hf_meta,
                               hf_meta_bytes, set_config_dtype)
from bridge.config import DTYPE_NAMES, DTYPES, ModelConfig, megatron_args
from bridge.converters import engine
from bridge.converters.foreign import meta_from_megatron
from bridge.converters.hf import PlannedTensor, SafetensorsReader, StreamingSafetensorsWriter, parse_size, shard_files, write_index
from bridge.converters.megatron_legacy import LegacyCheckpointReader, LegacyCheckpointWriter, iteration_dir_name
from bridge.converters.megatron_stack import complete_args, run_config_yaml
from bridge.converters.torch_dist import FORMATS, TorchDistReader, TorchDistSink, TorchDistSource, checkpoint_format
from bridge.converters.workers import balanced_groups, check_workers, run_in_processes
from bridge.errors import BridgeError
from bridge.hub import resolve_source
from bridge.layout import ParallelLayout
from bridge.models import conversions, family, load_hf_config, mtp

log = logging.getLogger(__name__)


def _check_spec(cfg: ModelConfig, impl: str, layout: ParallelLayout, format: str) -> None:
    """Model/spec/format combinations bridge cannot write faithfully: refuse them with the reason."""
    if cfg.mla and impl == "local":
        raise BridgeError("MLA models need --transformer-impl transformer_engine: Megatron's local spec splits the "
                          "MLA down-projections over TP, which bridge does not write")
    if layout.moe_grouped_gemm and impl == "local":
        raise BridgeError("--moe-grouped-gemm needs --transformer-impl transformer_engine (TEGroupedMLP's weight{j} names); "
                          "the local spec's legacy GroupedMLP stores weight1/weight2, which bridge does not write")
    if format == "torch_dist" and (cfg.moe or cfg.mla):
        raise BridgeError("--format torch_dist does not support MoE/MLA models yet; use --format torch")


def _dtype_name(dtype: str, default: str) -> str:
    if dtype == "auto":
        return default
    if dtype not in DTYPES:
        raise BridgeError(f"--dtype {dtype} is not one of auto, {', '.join(DTYPES)}")
    return dtype


def _warn_inexpressible(cfg: ModelConfig) -> None:
    """What Megatron-LM's args cannot say about this model: the checkpoint is exact, Megatron-LM would compute
    another function (bridge's own model and `bridge verify` stay exact)."""
    if cfg.rope_scaling and not cfg.rope_scaling.megatron_expressible:
        log.warning("rope scaling %s cannot be expressed in Megatron-LM's args (it fixes low=1, high=4, "
                    "original_max_position_embeddings=8192); bridge's own model stays exact, Megatron-LM would not be",
                    cfg.rope_scaling)
    moe = cfg.moe
    if moe and (moe.num_groups or 1) > 1 and moe.group_topk and moe.router_topk != 2 * moe.group_topk:
        log.warning("group-limited routing with top-%d experts from %d of %d groups: transformers scores a group by "
                    "its top 2 experts, Megatron-LM by its top %d (top-k / group top-k), so Megatron-LM would route "
                    "differently; bridge's own model stays exact", moe.router_topk, moe.group_topk, moe.num_groups,
                    max(1, moe.router_topk // moe.group_topk))


def default_out(source: str, layout: ParallelLayout) -> Path:
    name = Path(source.rstrip("/")).name
    return Path.cwd() / f"{name}-tp{layout.tp}-pp{layout.pp}"


def import_hf(source: str | Path, out: str | Path | None = None, layout: ParallelLayout | None = None, *,
              dtype: str = "auto", transformer_impl: str = "transformer_engine", revision: str | None = None,
              token: str | None = None, overwrite: bool = False, format: str = "torch", out_iteration: int | None = None,
              common_pt: bool = False, workers: int = 1) -> Path:
    """HF model (folder or Hub id) -> Megatron checkpoint (`torch` sharded for `layout`, or `torch_dist`).

    `workers` > 1 (torch_dist only) converts in that many processes, each writing its own DCP data file.

    `out_iteration` names the folder `iter_{N:07d}/` instead of `release/` (Megatron-Bridge looks for `iter_*`);
    torch_dist's common state goes inside the DCP files, as Megatron Core 0.19 writes it; `common_pt=True` also
    writes `common.pt`, which Megatron Core up to 0.18 needs (0.19 then warns that reading it is deprecated)."""
    layout = layout or ParallelLayout()
    _check_format(format)
    _check_workers(workers, format)
    _check_impl(transformer_impl)
    folder = resolve_source(str(source), revision=revision, token=token)
    cfg = mtp.as_stored(load_hf_config(folder), SafetensorsReader(folder).names())
    layout.validate(cfg)
    _check_spec(cfg, transformer_impl, layout, format)
    _warn_inexpressible(cfg)
    dtype_name = _dtype_name(dtype, cfg.params_dtype)
    meta = CheckpointMeta(config=cfg, layout=layout, transformer_impl=transformer_impl, dtype=dtype_name, format=format,
                          source={"id": str(source), "revision": revision, "path": str(folder)})
    out_path = Path(out) if out else default_out(str(source), layout)
    convs = conversions(cfg)
    opener = _OpenHF(folder, cfg, None if dtype == "auto" else DTYPES[dtype_name], tuple(family(cfg.architecture).hf_skip(cfg)))
    hf_source = opener()
    needed = engine.megatron_bytes(hf_source, meta) + hf_meta_bytes(folder)
    with atomic_output_dir(out_path, overwrite, sources=(folder,), needed=needed) as tmp:
        if workers > 1:
            _torch_dist_in_processes(hf_source, opener, tmp, meta, out_iteration, common_pt, workers)
        else:
            engine.run(hf_source, _megatron_sink(tmp, meta, out_iteration, common_pt), len(convs), "import")
        copy_hf_meta(folder, tmp / HF_META_DIR)
        meta.save(tmp)
    log.info("wrote %s (%s, %s, %s)", out_path, format, layout.name, dtype_name)
    return out_path


@dataclass(frozen=True)
class _OpenHF:
    """Opens an import's source: in the parent, and again in each process of an import over several (a source holds
    open files and callables, so each process opens its own). The config travels parsed: reading config.json
    again would load transformers' config classes in every process (0.6 s of CPU each)."""

    folder: Path
    cfg: ModelConfig
    dtype: torch.dtype | None
    skip_prefixes: tuple[str, ...]

    def __call__(self) -> engine.HFSource:
        return engine.HFSource(SafetensorsReader(self.folder), self.cfg, conversions(self.cfg), self.dtype, self.skip_prefixes)


@dataclass(frozen=True)
class _OpenCheckpoint:
    """Opens a Megatron checkpoint's source (cast to `dtype` where given), in the parent and in each process."""

    path: Path
    iteration: int | None
    hf_config: str | None
    dtype: torch.dtype | None = None

    def __call__(self) -> _Cast:
        return _Cast(open_checkpoint(self.path, self.iteration, self.hf_config).source(), self.dtype)


def _check_workers(workers: int, format: str) -> None:
    check_workers(workers)
    if workers > 1 and format != "torch_dist":
        raise BridgeError(f"--workers {workers} writes --format torch_dist (one DCP data file per process); "
                          "the torch format's rank files are written by one process, use --workers 1")


def _torch_dist_in_processes(source: Any, opener: Callable[[], Any], tmp: Path, meta: CheckpointMeta,
                             out_iteration: int | None, common_pt: bool, workers: int) -> None:
    """A torch_dist output written by `workers` processes, each its share of the conversions (a module's rows kept
    together, shares of about equal bytes) into `__{w}_0.distcp`; then `.metadata` from their chunk tables, checked
    to hold every target once, and the folder's other files, as one process writes them."""
    convs = source.conversions
    sizes = [tensor.nbytes for _, tensor in source.tensors(meta=True)]
    shares = balanced_groups(sizes, [{c.megatron.rsplit(".", 1)[0]} for c in convs], workers)
    calls = [(opener, tmp, meta, out_iteration, common_pt, part, share) for part, share in enumerate(shares)]
    results = run_in_processes(_torch_dist_share, calls)
    source.finish_shares([report for _, report in results])
    sink = TorchDistSink(tmp, meta, _stored_args(meta, out_iteration), _out_iteration(out_iteration), common_pt,
                         run_config_yaml(meta, _stored_args(meta, out_iteration)), data=False)
    sink.close_parts([part for part, _ in results], convs)


def _torch_dist_share(opener: Callable[[], Any], tmp: Path, meta: CheckpointMeta, out_iteration: int | None,
                      common_pt: bool, part: int, share: range) -> tuple[Any, list[str]]:
    """One process's share of a torch_dist output: its DCP data file's chunk table and its report for the checks.
    Part 0 also holds the entries every output has once (extra state, common state)."""
    source = opener()
    sink = TorchDistSink(tmp, meta, _stored_args(meta, out_iteration), _out_iteration(out_iteration), common_pt, part=part)
    for conv, tensor in source.tensors(only=source.conversions[share.start:share.stop]):
        sink.put(conv, tensor)
        del tensor
    return sink.close_part(shared=part == 0), source.share_report()


def _check_impl(impl: str) -> None:
    if impl not in TRANSFORMER_IMPLS:
        raise BridgeError(f"--transformer-impl {impl} is not one of {', '.join(TRANSFORMER_IMPLS)}")


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise BridgeError(f"--format {format} is not one of {', '.join(FORMATS)} (Megatron-LM's --ckpt-format)")


def _out_iteration(iteration: int | None) -> int | str:
    """`release` unless an iteration number is asked for (which must be one Megatron can name)."""
    if iteration is None:
        return "release"
    if iteration < 0:
        raise BridgeError(f"--out-iteration {iteration} must be 0 or more (Megatron-LM loads 1 or more)")
    return iteration


def checkpoint_args(meta: CheckpointMeta) -> argparse.Namespace:
    """Megatron-LM's `args` for the model, layout and dtype `meta` describes (a fresh namespace per call: the
    writers may set per-rank fields on it)."""
    cfg, layout = meta.config, meta.layout
    return megatron_args(cfg, padded_vocab_size=meta.padded_vocab_size, tp=layout.tp, pp=layout.pp, vpp=layout.vpp,
                         transformer_impl=meta.transformer_impl, dtype=meta.dtype,
                         divisible_by=layout.make_vocab_size_divisible_by, ep=layout.ep, etp=layout.etp,
                         moe_grouped_gemm=layout.moe_grouped_gemm)


def _megatron_sink(tmp: Path, meta: CheckpointMeta, out_iteration: int | None = None, common_pt: bool = False) -> engine.Sink:
    """The sink for `meta.format`, with the `args` Megatron-LM stores (and checks) in the checkpoint."""
    layout = meta.layout
    iteration = _out_iteration(out_iteration)
    stored = lambda tp_rank=0, pp_rank=0: _stored_args(meta, out_iteration)  # noqa: E731
    if meta.format == "torch_dist":
        return TorchDistSink(tmp, meta, stored(), iteration, common_pt, run_config_yaml(meta, stored()))
    return engine.MegatronSink(tmp, meta, stored, writer=LegacyCheckpointWriter(tmp, layout, stored, iteration))


def _stored_args(meta: CheckpointMeta, out_iteration: int | None) -> argparse.Namespace:
    """The `args` Megatron-LM stores (and checks) in the checkpoint: a fresh namespace per call."""
    iteration = _out_iteration(out_iteration)
    return complete_args(checkpoint_args(meta), 0 if iteration == "release" else int(iteration))


@dataclass(frozen=True)
class OpenCheckpoint:
    """A checkpoint opened for reading: metadata, lazy reader (either format), the mapping, and where
    its HF config and tokenizer files are (`hf_meta/`, or the --hf-config folder)."""

    path: Path
    meta: CheckpointMeta
    reader: LegacyCheckpointReader | TorchDistReader
    hf_meta: Path

    def source(self) -> engine.MegatronSource | TorchDistSource:
        if isinstance(self.reader, TorchDistReader):
            return TorchDistSource(self.reader, self.meta, conversions(self.meta.config))
        return engine.MegatronSource(self.reader, self.meta, conversions(self.meta.config))


def checkpoint_meta(path: str | Path, iteration: int | None = None, hf_config: str | None = None) -> tuple[CheckpointMeta, Path]:
    """The CheckpointMeta of a bridge checkpoint, or of a Megatron-LM / Megatron-Bridge one (no bridge.json) read
    together with its HF model's config, and the folder of its HF config and tokenizer files."""
    root = Path(path)
    if not root.is_dir():
        raise BridgeError(f"no checkpoint folder {root}")
    if (root / META_FILE).is_file():
        meta, hf_meta = CheckpointMeta.load(root), root / HF_META_DIR
    elif hf_config:
        hf_meta = resolve_source(hf_config)
        meta = meta_from_megatron(root, load_hf_config(hf_meta), iteration)
    else:
        raise BridgeError(f"{root} is not a bridge checkpoint (no {META_FILE}); for a Megatron-LM or Megatron-Bridge "
                          "checkpoint pass --hf-config with the HF model it started from")
    fmt = checkpoint_format(root, iteration, meta.format)  # from the folder: Megatron-LM may have re-saved it
    return replace(meta, format=fmt), hf_meta


def open_checkpoint(path: str | Path, iteration: int | None = None, hf_config: str | None = None) -> OpenCheckpoint:
    """Open a bridge checkpoint, or a Megatron-LM / Megatron-Bridge one (no bridge.json) with its HF model's config."""
    root = Path(path)
    meta, hf_meta = checkpoint_meta(root, iteration, hf_config)
    fmt = meta.format
    if fmt == "torch_dist":
        return OpenCheckpoint(root, meta, TorchDistReader(root, meta, conversions(meta.config), iteration), hf_meta)
    return OpenCheckpoint(root, meta, LegacyCheckpointReader(root, meta.layout, iteration), hf_meta)


def _write_hf_config(hf_meta: Path, out: Path, dtype_name: str) -> None:
    """Source config (dtype updated) plus generation config and tokenizer files."""
    copy_hf_meta(hf_meta, out)
    set_config_dtype(out / "config.json", DTYPES[dtype_name])


def export_hf(checkpoint: str | Path, out: str | Path, *, dtype: str = "auto", max_shard_size: str = "5GB",
              overwrite: bool = False, iteration: int | None = None, hf_config: str | None = None,
              adjust: Callable[[engine.Source], engine.Source] | None = None, workers: int = 1) -> Path:
    """Megatron checkpoint -> HF folder (safetensors shards + index, config, tokenizer). Returns `out`.

    `adjust` wraps the checkpoint's tensor source (a LoRA adapter merged into its base: bridge.apps.adapter).
    `workers` > 1 converts in that many processes, each writing its own shard files: the same tensors, byte for
    byte, with shard boundaries of their own (each process's tensors split by `max_shard_size`)."""
    check_workers(workers)
    if workers > 1 and adjust is not None:
        raise BridgeError(f"--workers {workers} exports a plain checkpoint; a LoRA run's merged export runs in one process")
    ckpt = open_checkpoint(checkpoint, iteration, hf_config)
    dtype_name = _dtype_name(dtype, ckpt.meta.dtype)
    cap = parse_size(max_shard_size)
    source = ckpt.source() if adjust is None else adjust(ckpt.source())
    out_path = Path(out)
    cast = None if dtype == "auto" else DTYPES[dtype_name]
    needed = engine.hf_bytes(source, ckpt.meta.config, cast) + hf_meta_bytes(ckpt.hf_meta)
    with atomic_output_dir(out_path, overwrite, sources=(ckpt.path, ckpt.hf_meta), needed=needed) as tmp:
        if workers > 1:
            _export_in_processes(source, _OpenCheckpoint(ckpt.path, iteration, hf_config), tmp, cast, cap, workers)
        else:
            sink = engine.HFSink(tmp, ckpt.meta.config, source, cast, cap)
            engine.run(source, sink, len(source.conversions), "export")
        _write_hf_config(ckpt.hf_meta, tmp, dtype_name)
    log.info("wrote %s", out_path)
    return out_path


def _export_in_processes(source: Any, opener: _OpenCheckpoint, tmp: Path, cast: torch.dtype | None, cap: int,
                         workers: int) -> None:
    """An export by `workers` processes: shares of about equal bytes (the rows that write one HF tensor together),
    each split into its own shard files, numbered across all; the parent checks that every tensor of the checkpoint
    was read by some process and writes the index."""
    cfg = source.meta.config
    plan = {p.name: p for p in engine.hf_plan(source, cfg, cast)}
    convs = source.conversions
    sizes = [tensor.nbytes for _, tensor in source.tensors(meta=True)]
    shares = balanced_groups(sizes, [set(c.hf) for c in convs], workers)
    groups = [StreamingSafetensorsWriter.split([plan[n] for n in dict.fromkeys(n for c in convs[s.start:s.stop] for n in c.hf)], cap)
              for s in shares]
    names = iter(shard_files(groups).items())
    files = [dict(next(names) for _ in group) for group in groups]
    calls = [(opener, tmp, cfg, cast, share, own) for share, own in zip(shares, files)]
    source.finish_shares(run_in_processes(_export_share, calls))
    if sum(map(len, files)) > 1:
        where = {p.name: name for own in files for name, shard in own.items() for p in shard}
        write_index(tmp, where, sum(p.nbytes for p in plan.values()))


def _export_share(opener: _OpenCheckpoint, tmp: Path, cfg: ModelConfig, cast: torch.dtype | None, share: range,
                  files: dict[str, list[PlannedTensor]]) -> list[str]:
    """One process's share of an export: its shard files; returns its report for the whole-model check."""
    source = opener()
    writer = StreamingSafetensorsWriter(tmp, [p for shard in files.values() for p in shard], 0, files=files)
    sink = engine.HFSink(tmp, cfg, source, cast, 0, writer=writer)
    for conv, tensor in source.tensors(only=source.conversions[share.start:share.stop]):
        sink.put(conv, tensor)
        del tensor
    sink.close()
    return source.share_report()


def reshard(checkpoint: str | Path, out: str | Path, layout: ParallelLayout, *, transformer_impl: str | None = None,
            dtype: str = "auto", overwrite: bool = False, iteration: int | None = None, format: str | None = None,
            hf_config: str | None = None, out_iteration: int | None = None, common_pt: bool = False,
            workers: int = 1) -> Path:
    """Megatron checkpoint -> the same model in another layout, spec, dtype or format (torch <-> torch_dist);
    `out_iteration`, `common_pt` and `workers` as for `import_hf`."""
    ckpt = open_checkpoint(checkpoint, iteration, hf_config)
    cfg = ckpt.meta.config
    layout.validate(cfg)
    impl = transformer_impl or ckpt.meta.transformer_impl
    _check_impl(impl)
    dtype_name = _dtype_name(dtype, ckpt.meta.dtype)
    format = format or ckpt.meta.format
    _check_spec(cfg, impl, layout, format)
    _check_format(format)
    _check_workers(workers, format)
    meta = CheckpointMeta(config=cfg, layout=layout, transformer_impl=impl, dtype=dtype_name, format=format,
                          source={**ckpt.meta.source, "resharded_from": str(ckpt.path)})
    opener = _OpenCheckpoint(ckpt.path, iteration, hf_config, None if dtype == "auto" else DTYPES[dtype_name])
    source = _Cast(ckpt.source(), opener.dtype)
    needed = engine.megatron_bytes(source, meta) + hf_meta_bytes(ckpt.hf_meta)
    with atomic_output_dir(Path(out), overwrite, sources=(ckpt.path, ckpt.hf_meta), needed=needed) as tmp:
        if workers > 1:
            _torch_dist_in_processes(source, opener, tmp, meta, out_iteration, common_pt, workers)
        else:
            engine.run(source, _megatron_sink(tmp, meta, out_iteration, common_pt), len(source.conversions), "reshard")
        copy_hf_meta(ckpt.hf_meta, tmp / HF_META_DIR)
        meta.save(tmp)
    return Path(out)


class _Cast:
    """A source wrapper that casts every tensor (reshard with --dtype)."""

    def __init__(self, source: Any, dtype: torch.dtype | None) -> None:
        self.source, self.dtype = source, dtype
        self.meta, self.conversions = source.meta, source.conversions

    def tensors(self, meta: bool = False, only: Any = None):  # noqa: ANN201
        for conv, tensor in self.source.tensors(meta, only=only):
            yield conv, tensor if self.dtype is None else tensor.to(self.dtype)

    def finish(self) -> None:
        self.source.finish()

    def share_report(self) -> list[str]:
        return self.source.share_report()

    def finish_shares(self, reports: Any) -> None:
        self.source.finish_shares(reports)


def inspect_checkpoint(checkpoint: str | Path, iteration: int | None = None, hf_config: str | None = None) -> dict[str, Any]:
    """A summary of a checkpoint: architecture, layout, parameter count, dtypes, files and sizes."""
    ckpt = open_checkpoint(checkpoint, iteration, hf_config)
    params = 0
    dtypes: set[str] = set()
    for conv, tensor in ckpt.source().tensors(meta=True):
        params += tensor.numel()
        dtypes.add(DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)))
    folder = ckpt.path / iteration_dir_name(ckpt.reader.iteration)  # a training save holds several iterations
    files = sorted(p for pattern in ("*.pt", "*.distcp", ".metadata") for p in folder.rglob(pattern))
    return {
        "path": str(ckpt.path),
        "architecture": ckpt.meta.config.architecture,
        "layout": ckpt.meta.layout.to_json(),
        "transformer_impl": ckpt.meta.transformer_impl,
        "format": ckpt.meta.format,
        "iteration": ckpt.reader.iteration,
        "parameters": params,
        "dtypes": sorted(dtypes),
        "vocab": {"original": ckpt.meta.config.vocab_size, "padded": ckpt.meta.padded_vocab_size},
        "config": ckpt.meta.config.to_json(),
        "files": [{"path": str(p.relative_to(ckpt.path)), "bytes": p.stat().st_size} for p in files],
    }
