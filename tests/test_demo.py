"""The README's set-up lines and `bridge demo`, as a new user runs them: a clone, a fresh venv, the demo."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The README's install lines a CPU machine runs (its CUDA torch, [data] and [te] lines download or need a GPU).
CPU_LINES = ("CPU-only machine", "from a clone", "to run the tests")
#: What the README promises for the demo's time on 2 idle cores ("about a minute"), with room for a busy machine.
DEMO_SECONDS = 120


def _readme_install_lines() -> list[str]:
    block = re.search(r"## Install\n+```\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no Install code block"
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()
             if any(tag in line for tag in CPU_LINES)]
    assert len(lines) == len(CPU_LINES) and all(line.startswith("pip install") for line in lines), lines
    return lines


@pytest.fixture(scope="module")
def readme_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(clone, venv): the repository's files as a clone of this working tree holds them, and a fresh venv where the README's CPU install lines ran in the clone.
    The venv also sees this test environment's packages (a .pth file), so torch and the rest are found installed
    and nothing large is downloaded; bridge itself is installed from the clone, as the README says."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    root = tmp_path_factory.mktemp("readme")
    clone, venv = root / "clone", root / "venv"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):  # what a clone of this working tree holds (uncommitted edits included)
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "zz_test_environment.pth").write_text(f"import site; site.addsitedir({site.getsitepackages()[0]!r})\n")
    for line in _readme_install_lines():
        args = shlex.split(line)
        proc = subprocess.run([str(venv / "bin" / "pip"), *args[1:], "-q"], cwd=clone, capture_output=True, text=True)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"
    return clone, venv


def test_readme_install_then_demo(readme_venv: tuple[Path, Path], tmp_path: Path) -> None:
    clone, venv = readme_venv
    bridge = str(venv / "bin" / "bridge")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import bridge; print(bridge.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert where.startswith(str(clone)), where  # the clone's code, not this environment's
    version = subprocess.run([bridge, "--version"], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert re.match(r"bridge \d+\.\d+\.\d+ \(torch ", version), version

    env = {**os.environ, "PYTHONWARNINGS": "default"}  # every warning, once per place, DeprecationWarning too
    proc = subprocess.run([bridge, "demo", "--workdir", str(tmp_path / "demo")], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out, err = proc.stdout, proc.stderr
    for step in range(1, 7):
        assert f"[{step}/6]" in out
    assert "identical logits" in out and "PASS:" in out and out.rstrip().endswith("demo passed")
    own = [line for line in err.splitlines() if re.search(r"Warning: ", line) and str(clone) in line]
    assert not own, own  # no Python warning raised in bridge's own modules
    for noise in ("original_max_position_embeddings", "write_record", "HTTP Request", "tensor/s"):
        assert noise not in err  # the demo config's own warnings, request logs, progress bars in a log
    assert "passed:" not in err and out.count("PASS:") == 1  # each result said once
    kept = tmp_path / "demo"
    assert f"files kept in {kept}" in out and f"bridge push {kept / 'train'} " in out
    printed = [Path(p) for p in re.findall(r"(/\S+)", out) if p.startswith(str(kept))]
    assert printed and all(p.exists() for p in printed), [p for p in printed if not p.exists()]
    assert (kept / "train" / "latest_checkpointed_iteration.txt").read_text() == "30"
    seconds = int(re.search(r"(\d+) s in all", out).group(1))
    assert seconds <= DEMO_SECONDS, f"the demo took {seconds} s; the README says about a minute"


def test_demo_push_hint_names_no_folder_that_will_be_deleted(tiny_hf) -> None:
    from bridge.apps.push import demo_push

    folder = tiny_hf("llama32-tied")
    line = demo_push(folder, kept=False)
    assert f"bridge push {folder}" not in line and "bridge demo --keep" in line
