"""Running a benchmark's ``--quick`` as a subprocess, for the benchmarks' smoke tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_quick(bench: str, timeout_s: float) -> tuple[int, str]:
    """``python bench/<bench>.py --quick``: its exit status and output. The status must be 0
    (every target met) or 1 (a target missed, which the bench prints); anything else fails."""
    proc = subprocess.run(
        [sys.executable, f"bench/{bench}.py", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode in (0, 1), f"status {proc.returncode}\n{out}\n{proc.stderr[-3000:]}"
    return proc.returncode, out
