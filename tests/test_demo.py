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
    assert (tmp_path / "train" / "latest_checkpointed_iteration.txt").read_text() == "30"
