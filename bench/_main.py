"""The command line the benchmarks share: ``--quick``, ``--dir DIR``, ``--keep``; the run gets
a fresh work folder, removed afterwards unless ``--keep``."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

Plan = TypeVar("Plan")


def bench_main(
    doc: str | None,
    run: Callable[[Plan, Path], int],
    plans: tuple[Plan, Plan],
    *,
    name: str,
    quick_help: str,
) -> int:
    """Parse the arguments, run ``run(plan, workdir)`` with the quick or the full plan of
    ``plans`` (quick, full), and return its exit status."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--dir", type=Path, default=None, help="where the work folder goes")
    parser.add_argument("--keep", action="store_true", help="keep the folder (log, journal)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix=f"vmc-bench-{name}-", dir=args.dir))
    quick, full = plans
    try:
        return run(quick if args.quick else full, workdir)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
