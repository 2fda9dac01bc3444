"""Smoke test of the cloud benchmark: ``python bench/sync.py --quick`` as a subprocess (a real
mosquitto with a TLS listener, the stand-in backend, the daemon on the bench's simulators) runs
to the end and prints every figure beside its target with a verdict that agrees with the
numbers. Whether the targets are met depends on the machine, so exit status 0 (all met) and 1
(one missed) are both accepted; a crash or a hang is not."""

from __future__ import annotations

import re

import pytest

from tests.bench_support import run_quick
from tests.mqtt_broker import mosquitto_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed"),
]

#: --quick takes ~30 s; headroom for a loaded 2-core CI machine.
T_BENCH_S = 150.0

NUMBER = r"([\d,]+(?:\.\d+)?)"
#: Each judged figure: its name, its value, ``<=`` or ``>=`` and the target, then ok or MISS.
TARGETS = {
    "records/s": (">=", 5000.0),
    "ratio to baseline": (">=", 2.0),
    "RSS growth during drain (MB)": ("<=", 30.0),
    "event-loop lag p99 during drain (ms)": ("<=", 5.0),
    "signed vend published -> RUN on the wire p99": ("<=", 50.0),
    "idle machine per 30 days (MB)": ("<=", 5.0),
}


def number(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.mark.timeout(T_BENCH_S + 30)
def test_quick_sync_bench_prints_every_figure_beside_its_target() -> None:
    status, out = run_quick("sync", T_BENCH_S)
    verdicts = []
    for name, (op, target) in TARGETS.items():
        line = re.search(
            rf"^.*{re.escape(name)}.*?\s{NUMBER}\s+{re.escape(op)} {NUMBER}\s+(ok|MISS)\s*$",
            out,
            re.MULTILINE,
        )
        assert line is not None, f"{name!r} not printed with its target\n{out}"
        value, printed_target, mark = number(line[1]), number(line[2]), line[3]
        assert printed_target == target, name
        met = value >= target if op == ">=" else value <= target
        assert mark == ("ok" if met else "MISS"), line[0]
        verdicts.append(met)
    assert status == (0 if all(verdicts) else 1), out

    assert re.search(r"baseline records/s .*\s[\d,]+\s*$", out, re.MULTILINE), out
    assert re.search(r"floor: the same sampler.*\s\d+\.\d+\s*$", out, re.MULTILINE), out
    for part in ("connection set-up", "one keepalive exchange", "one heartbeat", "one cash sale"):
        assert part in out, part
    shares = re.findall(r"^\s+(keepalive|heartbeat|status|idle window).*MB\s+([\d.]+) %", out, re.M)
    assert {s[0] for s in shares} == {"keepalive", "heartbeat", "status", "idle window"}, out
    assert abs(sum(float(s[1]) for s in shares) - 100.0) < 0.5, shares
