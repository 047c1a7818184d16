"""`bridge demo` runs the whole journey and says it passed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "demo", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for step in range(1, 7):
        assert f"[{step}/6]" in out
    assert "identical logits" in out and "PASS:" in out and out.rstrip().endswith("demo passed")
    assert "HTTP Request" not in proc.stderr
    for noise in ("original_max_position_embeddings", "write_record", "FutureWarning"):
        assert noise not in proc.stderr  # warnings about the demo's own config and bridge's own calls
    assert "passed:" not in proc.stderr and out.count("PASS:") == 1  # each result said once
    assert f"files kept in {tmp_path}" in out and f"bridge push {tmp_path / 'train'} " in out
    assert (tmp_path / "train" / "latest_checkpointed_iteration.txt").read_text() == "30"


def test_demo_push_hint_names_no_folder_that_will_be_deleted(tiny_hf) -> None:
    from bridge.push import demo_push

    folder = tiny_hf("llama32-tied")
    line = demo_push(folder, kept=False)
    assert f"bridge push {folder}" not in line and "bridge demo --keep" in line
