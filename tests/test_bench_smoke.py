"""Every benchmark suite of bench/run.py runs in its --smoke mode (CPU, tiny shapes): the suites' code works."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import pytest

from bench.run import SUITES, main

#: the suites run in this process (one import of torch for all); the script suites are their own programs
IN_PROCESS = [name for name, (module, _) in SUITES.items() if not module.endswith(".py")]


@pytest.fixture(autouse=True)
def _environment() -> Iterator[None]:
    """A one-rank run sets torchrun's variables and the data suite TOKENIZERS_PARALLELISM: put them back."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


@pytest.mark.parametrize("suite", IN_PROCESS)
def test_suite_smoke(suite: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"{suite}.json"
    assert main([suite, "--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["suite"] == suite and result["smoke"] is True
    assert result["rows"] and not any("error" in row for row in result["rows"]), result["rows"]
    assert "rows written to" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("suite", [name for name in SUITES if name not in IN_PROCESS])
def test_script_suite_smoke(suite: str, tmp_path: Path) -> None:
    extra = ["--out", str(tmp_path / ("journey" if suite == "journey" else f"{suite}.json"))]  # not in the clone
    assert main([suite, "--smoke", *extra]) == 0


def test_list_names_every_suite(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(SUITES)
