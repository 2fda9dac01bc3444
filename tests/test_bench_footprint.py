"""Smoke test of the footprint benchmark: ``python bench/footprint.py --quick`` as a subprocess
(the real daemon, its line process, the simulated coin changer, bill validator, reader and motor
board) runs to the end, prints every figure beside its target with a verdict that agrees with
the number, and exits 0 (all met) or 1 (one missed) accordingly.

Which targets it holds the run to: the memory target must be met here. The daemon's and the line
process's RSS hardly depend on how busy the machine is, and a module imported at start-up by
mistake (the cloud link's TLS and MQTT stack, qrcode, asyncio in the line process) shows there.
The timing targets (first POLL, CPU share) are not: on a loaded 2-core CI machine a start-up
takes several times as long and CPU time per exchange grows with cache and scheduler
contention, so a miss of those is accepted; the bench's own exit status reports it."""

from __future__ import annotations

import re

import pytest

from tests.bench_support import run_quick

pytestmark = pytest.mark.slow

#: --quick takes ~20 s on an idle machine; headroom for a loaded 2-core CI machine.
T_BENCH_S = 100.0

NUMBER = r"(\d+(?:\.\d+)?)"
#: Each judged figure: its name, then its value, ``<=`` and the target, then ok or MISS.
TARGETS = {
    "start -> first POLL on the wire (s)": 0.5,
    "RSS daemon + line process (MB)": 60.0,
    "CPU daemon + line process (% of a core)": 1.0,
}
BASELINES = (
    rf"baseline python -c pass start\s+{NUMBER} s",
    rf"baseline bare python RSS\s+{NUMBER} MB",
    rf"baseline idle asyncio loop RSS\s+{NUMBER} MB",
    rf"baseline idle asyncio loop CPU\s+{NUMBER} %",
)


@pytest.mark.timeout(T_BENCH_S + 20)
def test_quick_footprint_bench_prints_its_figures_and_meets_the_memory_target() -> None:
    status, out = run_quick("footprint", T_BENCH_S)

    for pattern in BASELINES:
        found = re.search(pattern, out)
        assert found is not None, f"{pattern!r} not printed\n{out}"
        if "start" in pattern or "RSS" in pattern:
            assert float(found[1]) > 0, found[0]

    verdicts: dict[str, bool] = {}
    for name, target in TARGETS.items():
        line = re.search(
            rf"^\s*{re.escape(name)}\s+{NUMBER}\s+<= {NUMBER}\s+(ok|MISS)\s*$", out, re.MULTILINE
        )
        assert line is not None, f"{name!r} not printed with its target\n{out}"
        value, printed_target, mark = float(line[1]), float(line[2]), line[3]
        assert printed_target == target, name
        assert value > 0, line[0]
        assert mark == ("ok" if value <= target else "MISS"), line[0]
        verdicts[name] = value <= target
    assert status == (0 if all(verdicts.values()) else 1), out
    assert verdicts["RSS daemon + line process (MB)"], out

    starts = re.search(r"starts: first POLL / accepting \(s\)\s+(.*)$", out, re.MULTILINE)
    assert starts is not None, out
    pairs = [pair.split("/") for pair in starts[1].split(", ")]
    assert len(pairs) == 2, starts[0]
    # Money is accepted only after the devices' start-up, which begins with their first POLL.
    assert all(0 < float(poll) < float(accepting) for poll, accepting in pairs), starts[0]
