"""Megatron-LM's legacy `torch` checkpoint format: one `model_optim_rng.pt` per (TP, PP, EP) rank.

Layout (reference/megatron-format.md): `latest_checkpointed_iteration.txt` holds `release` or an
iteration number; files live in `release/` or `iter_{N:07d}/` under `mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/`
(every EP rank's file also holds the dense weights of its TP rank).
Each file is a dict with `args`, `checkpoint_version`, `iteration` and `model` (`model0`, `model1`,
... with virtual pipeline chunks).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from bridge.converters.torch_zip import IncrementalTorchWriter, load_index, read_into, read_tensor

TRACKER = "latest_checkpointed_iteration.txt"
FILE_NAME = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
#: Enum classes Megatron-LM pickles beside the weights: `attention_backend` and `exit_signal` of a Megatron-LM 0.19.2
#: `parse_args()` namespace, the rerun state machine's state in a training checkpoint's common state, and the other
#: enums megatron/core/safe_globals.py allows. bridge reads none of them.
ARG_ENUMS: tuple[str, ...] = ("megatron.core.transformer.enums.AttnBackend", "megatron.core.transformer.enums.CudaGraphScope",
                              "megatron.core.transformer.enums.CudaGraphModule",
                              "megatron.core.transformer.enums.InferenceCudaGraphScope", "megatron.core.enums.ModelType",
                              "megatron.core.rerun_state_machine.RerunDiagnostic",
                              "megatron.core.rerun_state_machine.RerunMode", "megatron.core.rerun_state_machine.RerunState",
                              "signal.Signals")


def enum_value(value: Any) -> Any:
    """What an enum member of Megatron's `args` loads as: its value (its class, Megatron's, is never imported)."""
    return value


#: Non-tensor globals a Megatron checkpoint may pickle; loaded with weights_only=True and this allow-list.
SAFE_GLOBALS: list[Any] = [argparse.Namespace, *((enum_value, name) for name in ARG_ENUMS)]


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def check_iteration(root: Path, iteration: int | str | None) -> None:
    """BridgeError listing the iterations `root` holds when an asked-for `iteration` (None: the tracker's) is not one."""
    if iteration is None or (root / iteration_dir_name(iteration)).is_dir():
        return
    held = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    names = [*(["release"] if (root / "release").is_dir() else []), *map(str, held)]
    holds = f"it holds iteration{'s' if len(names) > 1 else ''} {', '.join(names)}" if names else "it holds none"
    raise BridgeError(f"{root} has no iteration {iteration}; {holds}: pass one of them to --iteration, or leave "
                      "--iteration out for the latest")


def read_tracker(root: Path) -> int | str:
    tracker = root / TRACKER
    if not tracker.is_file():
        raise BridgeError(f"{root} has no {TRACKER}; it is not a Megatron legacy checkpoint folder")
    text = tracker.read_text().strip()
    if text == "release":
        return text
    try:
        return int(text)
    except ValueError:
        raise BridgeError(f"{tracker} holds {text!r}; expected 'release' or an iteration number") from None


def model_keys(layout: ParallelLayout) -> list[str]:
    """`model` without virtual pipeline chunks, else `model0`, `model1`, ..."""
    return [f"model{v}" for v in range(layout.chunks)] if layout.vpp else ["model"]


def state_dict_position(name: str) -> tuple[int, int]:
    """Sort key giving Megatron's module order: embedding, layers by index, final norm, MTP layers by index, output
    layer.

    Python's sort is stable, so names inside one layer keep the order they were written in.
    """
    if name.startswith("embedding."):
        return 0, 0
    if name.startswith("decoder.layers."):
        return 1, int(name.split(".")[2])
    if name.startswith("mtp.layers."):
        return 3, int(name.split(".")[2])
    return (2, 0) if name.startswith("decoder.") else (4, 0)


class LegacyCheckpointWriter:
    """Stream (rank, chunk, local name, tensor) into every rank's file at once; index and tracker last."""

    def __init__(self, root: Path, layout: ParallelLayout, args: Callable[[int, int], argparse.Namespace],
                 iteration: int | str = "release", extra: Callable[[int, int], dict[str, Any]] | None = None) -> None:
        self.root, self.layout, self.iteration = root, layout, iteration
        self._args, self._extra = args, extra
        self._writers: dict[tuple[int, int, int], IncrementalTorchWriter] = {}
        self._models: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
        for tp_rank, pp_rank, ep_rank in layout.files():
            folder = root / iteration_dir_name(iteration) / layout.rank_dir(tp_rank, pp_rank, ep_rank)
            folder.mkdir(parents=True, exist_ok=True)
            self._writers[tp_rank, pp_rank, ep_rank] = IncrementalTorchWriter(folder / FILE_NAME)
            self._models[tp_rank, pp_rank, ep_rank] = [{} for _ in range(layout.chunks)]

    def add(self, tp_rank: int, pp_rank: int, chunk: int, name: str, tensor: torch.Tensor, ep_rank: int = 0) -> None:
        model = self._models[tp_rank, pp_rank, ep_rank][chunk]
        if name in model:
            raise BridgeError(f"internal: {name} written twice to rank tp={tp_rank} pp={pp_rank} ep={ep_rank}")
        model[name] = self._writers[tp_rank, pp_rank, ep_rank].tensor(tensor)

    def close(self) -> None:
        for (tp_rank, pp_rank, ep_rank), writer in self._writers.items():
            state: dict[str, Any] = {
                "args": self._args(tp_rank, pp_rank),
                "checkpoint_version": CHECKPOINT_VERSION,
                "iteration": 0 if self.iteration == "release" else int(self.iteration),
            }
            models = [dict(sorted(m.items(), key=lambda item: state_dict_position(item[0])))
                      for m in self._models[tp_rank, pp_rank, ep_rank]]
            state.update(zip(model_keys(self.layout), models))
            if self._extra:
                state.update(self._extra(tp_rank, pp_rank))
            writer.close(state)
        (self.root / TRACKER).write_text(str(self.iteration))


class LegacyCheckpointReader:
    """Lazy reader: indexes every rank file on `meta`, reads a tensor's bytes only when asked."""

    def __init__(self, root: Path, layout: ParallelLayout, iteration: int | str | None = None) -> None:
        self.root, self.layout = root, layout
        check_iteration(root, iteration)
        self.iteration = read_tracker(root) if iteration is None else iteration
        self._paths: dict[tuple[int, int, int], Path] = {}
        self._models: dict[tuple[int, int, int], list[dict[str, torch.Tensor]]] = {}
        self._states: dict[tuple[int, int, int], dict[str, Any]] = {}
        base = root / iteration_dir_name(self.iteration)
        for tp_rank, pp_rank, ep_rank in layout.files():
            path = base / layout.rank_dir(tp_rank, pp_rank, ep_rank) / FILE_NAME
            if not path.is_file():
                raise BridgeError(f"missing rank file {path.relative_to(root)} for layout {layout.name}; the checkpoint is incomplete")
            state = load_index(path, SAFE_GLOBALS)
            keys = model_keys(layout)
            if not all(k in state for k in keys):
                raise BridgeError(f"{path} has no {' / '.join(keys)} entries; was it written with a different --vpp?")
            self._paths[tp_rank, pp_rank, ep_rank] = path
            self._models[tp_rank, pp_rank, ep_rank] = [state[k] for k in keys]
            self._states[tp_rank, pp_rank, ep_rank] = state
        self._consumed: set[tuple[int, int, int, int, str]] = set()

    def state(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> dict[str, Any]:
        """The file's whole object with tensors on `meta` (for non-model entries: optimizer, rng, ...)."""
        return self._states[tp_rank, pp_rank, ep_rank]

    def meta(self, tp_rank: int, pp_rank: int, chunk: int, name: str, ep_rank: int = 0) -> torch.Tensor:
        try:
            return self._models[tp_rank, pp_rank, ep_rank][chunk][name]
        except KeyError:
            path = self._paths[tp_rank, pp_rank, ep_rank].relative_to(self.root)
            raise BridgeError(f"{name} is missing from {path}") from None

    def get(self, tp_rank: int, pp_rank: int, chunk: int, name: str, ep_rank: int = 0) -> torch.Tensor:
        tensor = read_tensor(self._paths[tp_rank, pp_rank, ep_rank], self.meta(tp_rank, pp_rank, chunk, name, ep_rank))
        self._consumed.add((tp_rank, pp_rank, ep_rank, chunk, name))
        return tensor

    def get_into(self, tp_rank: int, pp_rank: int, chunk: int, name: str, out: torch.Tensor, first: int = 0,
                 ep_rank: int = 0) -> None:
        """Read (part of) a tensor straight into `out`; marks it consumed."""
        read_into(self._paths[tp_rank, pp_rank, ep_rank], self.meta(tp_rank, pp_rank, chunk, name, ep_rank), out, first)
        self._consumed.add((tp_rank, pp_rank, ep_rank, chunk, name))

    def mark_consumed(self, tp_rank: int, pp_rank: int, chunk: int, name: str, ep_rank: int = 0) -> None:
        self.meta(tp_rank, pp_rank, chunk, name, ep_rank)
        self._consumed.add((tp_rank, pp_rank, ep_rank, chunk, name))

    def entries(self) -> Iterator[tuple[int, int, int, int, str]]:
        """Every (tp_rank, pp_rank, ep_rank, chunk, name) in every rank file."""
        for (tp_rank, pp_rank, ep_rank), chunks in self._models.items():
            for chunk, model in enumerate(chunks):
                for name in model:
                    yield tp_rank, pp_rank, ep_rank, chunk, name

    def unconsumed(self) -> list[str]:
        return sorted(f"{self.layout.rank_dir(t, p, e)}[{c}]:{n}" for t, p, e, c, n in self.entries()
                      if (t, p, e, c, n) not in self._consumed)

    def load_rank(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> dict[str, Any]:
        """One rank's file fully loaded (weights_only, mmap): what a training rank needs."""
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(self._paths[tp_rank, pp_rank, ep_rank], map_location="cpu", weights_only=True, mmap=True)
