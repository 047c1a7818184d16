"""Conversions that cannot corrupt or lose anything: one writer per output, sources never written over, shapes
and dtypes checked from the headers before writing, a full disk reported in one line."""
from __future__ import annotations

import errno
import itertools
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
from collections import namedtuple
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridge import api
from bridge.cli.main import main
from bridge.converters import engine
from bridge.converters.dcp import DcpWriter
from bridge.converters.hf import StreamingSafetensorsWriter
from bridge.converters.torch_zip import IncrementalTorchWriter
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from tests.model_fixtures import load_pt

DOWN = "model.layers.0.mlp.down_proj.weight"
O_PROJ = "model.layers.1.self_attn.o_proj.weight"


def one_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run the CLI; it must fail with exactly one `bridge <cmd>: error: ...` line on stderr."""
    code = main(list(argv))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bridge ")]  # not transformers' notes
    assert code == 1 and len(err) == 1 and err[0].startswith(f"bridge {argv[0]}: error: "), (code, err)
    return err[0]


def leftovers(folder: Path, name: str = "out") -> list[str]:
    """`name` itself and anything a conversion to it may leave: temporary folders, replaced folders, the lock."""
    return sorted(p.name for p in folder.iterdir() if p.name == name or p.name.startswith(name + "."))


def edited_model(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def ckpt(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TP=2 PP=2 checkpoint of the tiny Llama (tests copy it before changing it)."""
    return api.import_hf(tiny_hf("llama31"), tmp_path_factory.mktemp("ckpt") / "ck", ParallelLayout(tp=2, pp=2))


# 1. one writer per output


def test_second_conversion_to_the_same_out_fails_at_once(tiny_hf, tmp_path: Path, capsys, monkeypatch) -> None:
    """A TP2xPP2 import is paused mid-way; a TP1 import to the same --out must fail, not mix its files in."""
    src, out = tiny_hf("llama31"), tmp_path / "out"
    paused, resume, put = threading.Event(), threading.Event(), engine.MegatronSink.put

    def slow_put(self, conv, tensor) -> None:  # noqa: ANN001
        if tensor.device.type != "meta" and threading.current_thread() is not threading.main_thread():
            paused.set()
            resume.wait(timeout=60)
        put(self, conv, tensor)

    monkeypatch.setattr(engine.MegatronSink, "put", slow_put)
    first = threading.Thread(target=api.import_hf, args=(src, out, ParallelLayout(tp=2, pp=2)))
    first.start()
    try:
        assert paused.wait(timeout=60), "the first conversion never started"
        with pytest.raises(BridgeError, match="another bridge command is writing"):
            api.import_hf(src, out, ParallelLayout(), overwrite=True)
    finally:
        resume.set()
        first.join(timeout=60)
    assert json.loads((out / "bridge.json").read_text())["layout"]["tp"] == 2
    assert sorted(p.name for p in (out / "release").iterdir()) == [f"mp_rank_0{t}_00{p}" for t in (0, 1) for p in (0, 1)]
    assert leftovers(tmp_path) == ["out"]


def test_leftovers_of_a_killed_run_are_removed(tiny_hf, tmp_path: Path) -> None:
    (tmp_path / "out.tmp-4242-0badf00d" / "release").mkdir(parents=True)
    (tmp_path / "out.lock").touch()  # a killed run's lock file: its flock died with it
    assert main(["import", str(tiny_hf("llama31")), "--out", str(tmp_path / "out")]) == 0
    assert leftovers(tmp_path) == ["out"]


# 4. the source is never written over


def test_export_to_the_folder_holding_the_checkpoint_is_refused(ckpt: Path, tmp_path: Path, capsys) -> None:
    """`bridge export /d/ck --out /d --overwrite` used to delete /d/ck and everything else in /d."""
    d = tmp_path / "d"
    shutil.copytree(ckpt, d / "ck")
    (d / "notes.txt").write_text("unrelated")
    err = one_error(capsys, "export", str(d / "ck"), "--out", str(d), "--overwrite")
    assert f"--out {d} holds the source {d / 'ck'}" in err, err
    assert (d / "ck" / "bridge.json").is_file() and (d / "notes.txt").read_text() == "unrelated"
    assert sorted(p.name for p in d.iterdir()) == ["ck", "notes.txt"]


def test_out_that_is_or_lies_inside_the_source_is_refused(ckpt: Path, tiny_hf, tmp_path: Path, capsys) -> None:
    src = shutil.copytree(tiny_hf("llama31"), tmp_path / "hf")
    err = one_error(capsys, "import", str(src), "--out", str(src), "--overwrite")
    assert f"--out {src} is the source" in err, err
    assert (src / "model.safetensors").is_file() and not (src / "bridge.json").exists()
    err = one_error(capsys, "reshard", str(ckpt), "--out", str(ckpt / "tp1"), "--tp", "1")
    assert f"--out {ckpt / 'tp1'} is inside the source" in err, err
    assert not (ckpt / "tp1").exists() and not leftovers(ckpt, "tp1")


def test_out_dot_is_refused(ckpt: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    here = tmp_path / "here"
    here.mkdir()
    (here / "keep.txt").write_text("mine")
    monkeypatch.chdir(here)
    for flags in ([], ["--overwrite"]):
        assert "is the current folder" in one_error(capsys, "export", str(ckpt), "--out", ".", *flags)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"] and (here / "keep.txt").read_text() == "mine"


# 3. a full disk


def test_too_little_free_space_is_refused_before_writing(ckpt: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 300_000, 300_000))
    err = one_error(capsys, "export", str(ckpt), "--out", str(tmp_path / "out"))
    assert re.search(rf"no space left on /\S* writing {tmp_path / 'out'}; [\d.]+ [kM]B needed, 300.0 kB free", err), err
    assert leftovers(tmp_path) == []


def fill_disk_after(calls: int) -> Callable[..., None]:
    """A writer method that raises ENOSPC from its `calls`-th call on."""
    count = itertools.count(1)

    def write(*args: object) -> None:
        if next(count) >= calls:
            raise OSError(errno.ENOSPC, "No space left on device")

    return write


#: Where each writer is made to hit a full disk: rank files, safetensors shards, and torch_dist's DCP file, whose
#: torch.save into a real full device reports the ENOSPC as its own RuntimeError.
FULL_DISK: dict[str, Callable[[], tuple[type, str, Callable[..., object]]]] = {
    "import": lambda: (IncrementalTorchWriter, "tensor", fill_disk_after(5)),
    "export": lambda: (StreamingSafetensorsWriter, "write", fill_disk_after(5)),
    "import-torch_dist": lambda: (DcpWriter, "_append", lambda self, write: write(open("/dev/full", "wb"))),
}


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.skipif(
    "torch_dist" in case and not Path("/dev/full").exists(), reason="needs /dev/full")) for case in sorted(FULL_DISK)])
def test_disk_full_while_writing_is_one_line(case: str, ckpt: Path, tiny_hf, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(*FULL_DISK[case]())
    command, *fmt = case.split("-")
    src = tiny_hf("llama31") if command == "import" else ckpt
    err = one_error(capsys, command, str(src), "--out", str(tmp_path / "out"), *(["--format", *fmt] if fmt else []))
    assert re.search(rf"no space left on /\S* writing {tmp_path / 'out'}; [\d.]+ [kM]B needed, [\d.]+ [kMGT]?B free", err), err
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_rank_file_writer_survives_a_full_disk() -> None:
    """torch's zip writer used to abort the process (SIGABRT) when a write failed; now the error is an OSError."""
    script = (
        "import errno, gc, torch\n"
        "from pathlib import Path\n"
        "from bridge.converters.torch_zip import IncrementalTorchWriter\n"
        "writer = IncrementalTorchWriter(Path('/dev/full'))\n"
        "try:\n"
        "    writer.tensor(torch.zeros(1 << 20))\n"
        "except OSError as exc:\n"
        "    assert exc.errno == errno.ENOSPC, exc\n"
        "del writer\n"
        "gc.collect()\n"
        "print('survived')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "survived" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


# 2. shapes and dtypes, from the headers, before writing


def test_wrong_shapes_and_dtypes_of_the_source_are_listed(tiny_hf, tmp_path: Path, capsys) -> None:
    def corrupt(t: dict[str, torch.Tensor]) -> None:
        t[DOWN] = t[DOWN].T.contiguous()
        t["model.norm.weight"] = t["model.norm.weight"][:48].clone()
        t[O_PROJ] = t[O_PROJ].to(torch.int32)

    src = edited_model(tiny_hf("llama31"), tmp_path / "m", corrupt)
    err = one_error(capsys, "import", str(src), "--out", str(tmp_path / "out"))
    assert (f"wrong shape (2): {DOWN} [128, 64] (expected [64, 128]), model.norm.weight [48] (expected [64]); "
            f"not float32/bfloat16/float16 (1): {O_PROJ} int32") in err, err
    assert leftovers(tmp_path) == []


def test_rank_file_tensor_of_the_wrong_shape_is_refused_on_export(ckpt: Path, tmp_path: Path, capsys) -> None:
    ck = shutil.copytree(ckpt, tmp_path / "ck")
    path = ck / "release" / "mp_rank_01_001" / "model_optim_rng.pt"
    state = load_pt(path)
    key = "decoder.layers.0.self_attention.linear_proj.weight"
    state["model"][key] = state["model"][key].T.contiguous()
    torch.save(state, path)
    err = one_error(capsys, "export", str(ck), "--out", str(tmp_path / "out"))
    assert f"wrong shape (1): mp_rank_01_001[0]:{key} [32, 64] (expected [64, 32])" in err, err
    assert leftovers(tmp_path) == []


# 5. smaller ones


def test_nan_and_inf_weights_are_reported(tiny_hf, tmp_path: Path, caplog) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[DOWN][3, 5] = float("nan")
        t[O_PROJ][0, 0] = float("inf")

    src = edited_model(tiny_hf("llama31"), tmp_path / "m", poison)
    with caplog.at_level(logging.WARNING):
        assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "NaN" in r.getMessage()]
    assert warnings == [f"2 tensors hold NaN or Inf values (converted as they are): {DOWN}, {O_PROJ}"], warnings


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_finite_check_finds_every_nan_and_inf(dtype: torch.dtype) -> None:
    """One bad value anywhere (first, middle, last; in a vectorised body or the scalar tail) against isfinite."""
    assert engine.all_finite(torch.empty(0, dtype=dtype))
    for n in (1, 7, 33, 100_003):
        x = torch.randn(n).to(dtype)
        assert engine.all_finite(x)
        for pos, bad in itertools.product({0, n // 2, n - 1}, (float("nan"), float("inf"), -float("inf"))):
            y = x.clone()
            y[pos] = bad
            assert not engine.all_finite(y.view(1, n)), (n, pos, bad)


@pytest.mark.parametrize("value", ["0", "-128"])
def test_vocab_multiple_must_be_positive(value: str, tiny_hf, tmp_path: Path, capsys) -> None:
    err = one_error(capsys, "import", str(tiny_hf("llama31")), "--out", str(tmp_path / "out"),
                    f"--make-vocab-size-divisible-by={value}")
    assert f"--make-vocab-size-divisible-by must be >= 1, got {value}" in err, err
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("size", ["1e400GB", "-5GB", "0"])
def test_shard_size_must_be_positive_and_finite(size: str, ckpt: Path, tmp_path: Path, capsys) -> None:
    err = one_error(capsys, "export", str(ckpt), "--out", str(tmp_path / "out"), f"--max-shard-size={size}")
    assert f"size {size!r} must be a positive, finite number of bytes" in err, err
    assert leftovers(tmp_path) == []


def test_a_module_whose_rows_are_split_is_a_mapping_error(tiny_hf, tmp_path: Path) -> None:
    """The TE `_extra_state` of a module is written after its last row; a family whose rows come back to a module
    after another one's would write it twice, so the sink stops at the first row out of place."""
    from bridge.checkpoint import CheckpointMeta
    from bridge.mapping import Conversion

    ckpt = api.import_hf(tiny_hf("llama31"), tmp_path / "ckpt")
    meta = CheckpointMeta.load(ckpt)
    added: list[str] = []
    writer = namedtuple("Writer", "add close")(lambda *a, **kw: added.append(a[3]), lambda: None)
    sink = engine.MegatronSink(tmp_path / "out", meta, lambda tp, pp: None, writer=writer)
    rows = ["decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.self_attention.linear_proj.weight",
            "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"]
    sink.put(Conversion(rows[0], (), None, 0), torch.zeros(4, 4))  # one TP rank: any shape is its one shard
    sink.put(Conversion(rows[1], (), None, 0), torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match="linear_qkv are not consecutive"):
        sink.put(Conversion(rows[2], (), None, 0), torch.zeros(4))
    assert sum(name.endswith("linear_qkv._extra_state") for name in added) == 1
