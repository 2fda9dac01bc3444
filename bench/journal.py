"""Benchmark of the transaction journal against the raw fsync rate of the same disk.

    python bench/journal.py [--quick] [--dir DIR]

Measures, in a temporary folder on one disk (DIR, default the system temp folder):
1. raw: ``write`` 64 B + ``os.fsync`` in a loop: the disk's durable-write rate;
2. sequential durable appends (each awaited before the next): rate and ratio to raw
   (issue 3 target: >= 0.8);
3. burst: 50 concurrent appenders (group commit): rate and ratio to raw (target: > 1);
4. append latency p50/p99 of the sequential appends (informational; 10 ms stated as a guide);
   and, informational, the ceiling of any design that keeps fsync off the event loop: the same
   raw write+fsync done by a worker thread for an awaiting coroutine (two thread wake-ups and
   nothing else), as a ratio to raw;
5. event-loop lag: lateness of a 1 ms ticker while appending 1,000 records/s (target p99 <= 2 ms),
   beside the same ticker's lateness with no appends (what the loop itself gives on this box).
Raw, sequential and burst runs alternate over several rounds and the median ratio is reported,
so drift of a shared machine affects both sides alike. Exit status 1 if any target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmc.journal import Journal, Record

RAW_PAYLOAD = b"x" * 64
BURST_APPENDERS = 50
LAG_RATE_PER_S = 1_000
TICK_S = 0.001

TARGET_SEQ_RATIO = 0.8
TARGET_BURST_RATIO = 1.0
GUIDE_P99_LATENCY_MS = 10.0
TARGET_LAG_P99_MS = 2.0


@dataclass(frozen=True)
class Plan:
    rounds: int
    phase_s: float  # each measurement runs this long (at least MIN_OPS operations)
    lag_s: float


MIN_OPS = 50
QUICK = Plan(rounds=3, phase_s=0.7, lag_s=2.0)
FULL = Plan(rounds=7, phase_s=2.0, lag_s=5.0)


def coin() -> dict[str, object]:
    return {"amount": 100, "device": "coin", "route": "tubes", "coin_type": 3}


def raw_fsync_rate(directory: Path, seconds: float) -> float:
    """Appends of 64 B, each followed by fsync, to one file: durable writes per second."""
    path = directory / "raw.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        n = 0
        start = time.perf_counter()
        while n < MIN_OPS or time.perf_counter() - start < seconds:
            os.write(fd, RAW_PAYLOAD)
            os.fsync(fd)
            n += 1
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()
    return n / elapsed


async def handoff_fsync_rate(directory: Path, seconds: float) -> float:
    """The raw loop's write+fsync, each done by a worker thread while a coroutine awaits it:
    what the hand-off alone costs, the ceiling for the journal's sequential appends."""
    loop = asyncio.get_running_loop()
    jobs: queue.SimpleQueue[asyncio.Future[None] | None] = queue.SimpleQueue()
    path = directory / "handoff.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def worker() -> None:
        while (done := jobs.get()) is not None:
            os.write(fd, RAW_PAYLOAD)
            os.fsync(fd)
            loop.call_soon_threadsafe(done.set_result, None)

    thread = threading.Thread(target=worker, name="bench-handoff")
    thread.start()
    try:
        n = 0
        start = time.perf_counter()
        while n < MIN_OPS or time.perf_counter() - start < seconds:
            done: asyncio.Future[None] = loop.create_future()
            jobs.put(done)
            await done
            n += 1
        elapsed = time.perf_counter() - start
    finally:
        jobs.put(None)
        thread.join()
        os.close(fd)
        path.unlink()
    return n / elapsed


async def sequential(journal: Journal, seconds: float) -> tuple[float, list[float]]:
    """Appends awaited one after the other: rate, and the latency of each."""
    latencies: list[float] = []
    start = time.perf_counter()
    while len(latencies) < MIN_OPS or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        await journal.append("cash_in", coin())
        latencies.append(time.perf_counter() - t0)
    return len(latencies) / (time.perf_counter() - start), latencies


async def burst(journal: Journal, seconds: float) -> float:
    """BURST_APPENDERS tasks appending as fast as they can, each awaiting its own appends."""
    done = 0
    start = time.perf_counter()

    async def appender() -> None:
        nonlocal done
        while done < MIN_OPS * BURST_APPENDERS or time.perf_counter() - start < seconds:
            await journal.append("cash_in", coin())
            done += 1

    await asyncio.gather(*(appender() for _ in range(BURST_APPENDERS)))
    return done / (time.perf_counter() - start)


async def ticker_lateness(seconds: float, load: Load | None) -> list[float]:
    """Lateness of a 1 ms ticker (how long after its due time each tick ran), optionally while
    ``load`` runs beside it."""
    loop = asyncio.get_running_loop()
    lateness: list[float] = []
    end = time.perf_counter() + seconds

    async def tick() -> None:
        while time.perf_counter() < end:
            due = time.perf_counter() + TICK_S
            await asyncio.sleep(TICK_S)
            lateness.append(max(time.perf_counter() - due, 0.0))

    tasks = [loop.create_task(tick())]
    if load is not None:
        tasks.append(loop.create_task(load()))
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return lateness


Load = Callable[[], Coroutine[Any, Any, None]]


def paced_appends(journal: Journal, seconds: float, rate: int) -> Load:
    """Append ``rate`` records per second for ``seconds``: 5 appends every 5 ms, not awaited
    one by one (several producers, as the machine has)."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        step = 0.005
        per_step = max(int(rate * step), 1)
        pending: set[asyncio.Task[Record]] = set()
        start = loop.time()
        n = 0
        while loop.time() - start < seconds:
            for _ in range(per_step):
                task = loop.create_task(journal.append("cash_in", coin()))
                pending.add(task)
                task.add_done_callback(pending.discard)
            n += 1
            await asyncio.sleep(max(start + n * step - loop.time(), 0))
        if pending:
            await asyncio.gather(*pending)

    return run


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * q), len(ordered) - 1)]


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


async def main_async(plan: Plan, directory: Path) -> int:
    journal = await Journal.open(directory / "state", min_free_bytes=0)
    try:
        seq_ratios, burst_ratios, raws, seq_rates, burst_rates = [], [], [], [], []
        handoff_ratios: list[float] = []
        latencies: list[float] = []
        for _ in range(plan.rounds):
            raw_before = raw_fsync_rate(directory, plan.phase_s)
            handoff_rate = await handoff_fsync_rate(directory, plan.phase_s)
            seq_rate, lat = await sequential(journal, plan.phase_s)
            burst_rate = await burst(journal, plan.phase_s)
            raw_after = raw_fsync_rate(directory, plan.phase_s)
            raw = (raw_before + raw_after) / 2
            raws.append(raw)
            seq_rates.append(seq_rate)
            burst_rates.append(burst_rate)
            seq_ratios.append(seq_rate / raw)
            handoff_ratios.append(handoff_rate / raw)
            burst_ratios.append(burst_rate / raw)
            latencies.extend(lat)
        commits_before, seq_before = journal.commit_count, journal.last_seq
        idle = await ticker_lateness(plan.lag_s, None)
        loaded = await ticker_lateness(
            plan.lag_s, paced_appends(journal, plan.lag_s, LAG_RATE_PER_S)
        )
        lag_records = journal.last_seq - seq_before
        lag_commits = journal.commit_count - commits_before
        mismatches = await journal.verify_counters()
    finally:
        await journal.close()

    seq_ratio = statistics.median(seq_ratios)
    burst_ratio = statistics.median(burst_ratios)
    p50 = percentile(latencies, 0.50) * 1e3
    p99 = percentile(latencies, 0.99) * 1e3
    lag_p99 = percentile(loaded, 0.99) * 1e3
    idle_p99 = percentile(idle, 0.99) * 1e3
    overhead_us = statistics.median(
        (1 / seq - 1 / raw) * 1e6 for seq, raw in zip(seq_rates, raws, strict=True)
    )
    print(f"journal benchmark in {directory} ({plan.rounds} rounds, medians)")
    print(
        f"  raw 64 B write+fsync        {statistics.median(raws):10.0f} /s"
        f"   (1 fsync = {1e6 / statistics.median(raws):.0f} us)"
    )
    print(
        f"  sequential appends          {statistics.median(seq_rates):10.0f} /s   ratio "
        f"{seq_ratio:5.2f} (target >= {TARGET_SEQ_RATIO})  "
        f"{verdict(seq_ratio >= TARGET_SEQ_RATIO)}"
    )
    print(f"    per-round ratios          {' '.join(f'{r:.2f}' for r in seq_ratios)}")
    print(f"    fixed cost per append     {overhead_us:10.0f} us beyond one raw fsync (median)")
    handoff_ratio = statistics.median(handoff_ratios)
    print(
        f"    ceiling off the loop      ratio {handoff_ratio:5.2f}: raw write+fsync in a worker "
        "thread, awaited (informational)"
    )
    print(
        f"  burst, {BURST_APPENDERS} appenders         {statistics.median(burst_rates):10.0f} /s"
        f"   ratio {burst_ratio:5.2f} (target > {TARGET_BURST_RATIO})  "
        f"{verdict(burst_ratio > TARGET_BURST_RATIO)}"
    )
    print(f"    per-round ratios          {' '.join(f'{r:.2f}' for r in burst_ratios)}")
    print(
        f"  append latency p50 / p99    {p50:6.2f} / {p99:6.2f} ms"
        f"   (guide p99 <= {GUIDE_P99_LATENCY_MS:.0f} ms, informational)"
    )
    print(
        f"  loop lag p99, {LAG_RATE_PER_S} rec/s       {lag_p99:6.2f} ms"
        f"   (target <= {TARGET_LAG_P99_MS} ms)  {verdict(lag_p99 <= TARGET_LAG_P99_MS)}"
    )
    print(
        f"    same ticker, no appends   {idle_p99:6.2f} ms p99; loaded max "
        f"{max(loaded) * 1e3:.2f} ms; {lag_records} records in {lag_commits} commits"
    )
    print(f"  counters verified           {mismatches or 'ok'}")
    missed = (
        seq_ratio < TARGET_SEQ_RATIO
        or burst_ratio <= TARGET_BURST_RATIO
        or lag_p99 > TARGET_LAG_P99_MS
        or bool(mismatches)
    )
    return 1 if missed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run (< 30 s)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (a temp folder)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    directory = Path(tempfile.mkdtemp(prefix="vmc-bench-journal-", dir=args.dir))
    try:
        return asyncio.run(main_async(plan, directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
