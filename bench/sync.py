"""Journal sync throughput: records drained through a real mosquitto and acked by the stand-in
backend (a process of its own), against a baseline in the same run (paho publishing the same
records one per message at QoS 1, waiting for every PUBACK).

    python bench/sync.py [--quick]      # quick: 10,000 records instead of 100,000

Targets (issue 8 point 10): ≥ 5,000 records/s, ratio to the baseline ≥ 2, RSS growth during
the drain ≤ 30 MB, event-loop lag p99 during the drain ≤ 5 ms. Prints each figure beside its
target and exits 1 on a miss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as paho

from tests.mqtt_broker import Broker
from vmc.cloud.link import CloudLink
from vmc.cloud.sync import JournalSync
from vmc.config import parse_config
from vmc.journal import Journal

MACHINE = "BENCH-0001"
TARGET_RATE = 5_000.0
TARGET_RATIO = 2.0
TARGET_RSS_MB = 30.0
TARGET_LAG_P99_MS = 5.0
LAG_TICK_S = 0.001


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def record_data(i: int) -> dict[str, object]:
    return {"slot": "A1", "old": i % 10, "new": (i + 1) % 10}


async def fill(journal: Journal, count: int) -> None:
    done = 0
    while done < count:
        n = min(500, count - done)
        await journal.append_many([("inventory_changed", record_data(done + i)) for i in range(n)])
        done += n


async def drain(
    state: Path, port: int, cloud: dict[str, object]
) -> tuple[float, float, float, int]:
    """(seconds, RSS growth MB, loop lag p99 ms, records) for the drain."""
    journal = await Journal.open(state)
    config = parse_config(
        {
            "machine": {"id": MACHINE, "state_dir": str(state)},
            "mdb": {"simulate": True},
            "motor": {"simulate": True},
            "cloud": {"enabled": True, "port": port, **cloud},
        },
        state,
    ).cloud
    sync = JournalSync(
        journal, MACHINE, max_in_flight=config.max_in_flight, ack_timeout_s=config.ack_timeout_s
    )
    link = CloudLink(config, MACHINE, boot_id=journal.boot_id, sync=sync)
    lags: list[float] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def sample() -> None:
        while not done.is_set():
            before = loop.time()
            await asyncio.sleep(LAG_TICK_S)
            lags.append(loop.time() - before - LAG_TICK_S)

    rss_before = rss_mb()
    total = journal.backlog
    began = time.perf_counter()
    sampler = asyncio.create_task(sample())
    task = asyncio.create_task(link.run())
    while journal.acked_upto < journal.last_seq:  # noqa: ASYNC110 - the writer thread sets it
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - began
    done.set()
    rss_growth = rss_mb() - rss_before
    await sampler
    await link.stop()
    await task
    sync.close()
    await journal.close()
    lags.sort()
    p99 = lags[int(len(lags) * 0.99)] * 1000 if lags else 0.0
    return elapsed, rss_growth, p99, total


def baseline(port: int, payloads: list[bytes]) -> float:
    """paho, one record per message at QoS 1, until every PUBACK: seconds."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-baseline")
    client.max_inflight_messages_set(20)  # paho's default
    client.connect("127.0.0.1", port)
    client.loop_start()
    began = time.perf_counter()
    infos = [client.publish(f"vmc/{MACHINE}/baseline", p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(60)
    elapsed = time.perf_counter() - began
    client.loop_stop()
    client.disconnect()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10,000 records")
    parser.add_argument("--max-in-flight", type=int, help="cloud.max_in_flight (default: its)")
    args = parser.parse_args()
    cloud: dict[str, object] = {}
    if args.max_in_flight:
        cloud["max_in_flight"] = args.max_in_flight
    count = 10_000 if args.quick else 100_000
    work = Path(tempfile.mkdtemp(prefix="vmc-bench-sync-"))
    with Broker(work / "broker") as broker:
        backend = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hil.backend",
                "serve",
                "--broker",
                broker.url,
                "--state",
                str(work / "backend"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)  # the backend subscribes
            state = work / "state"

            async def prepare() -> list[bytes]:
                journal = await Journal.open(state)
                await fill(journal, count)
                records = await journal.records(1, limit=count + 10)
                await journal.close()
                return [json.dumps(r.to_wire()).encode() for r in records]

            payloads = asyncio.run(prepare())
            seconds, rss_growth, lag_p99, total = asyncio.run(drain(state, broker.port, cloud))
            base_seconds = baseline(broker.port, payloads)
        finally:
            backend.terminate()
            backend.wait(10)
    rate = total / seconds
    base_rate = len(payloads) / base_seconds
    ratio = rate / base_rate
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [
        ("records drained and acked", f"{total}", "", True),
        ("records/s", f"{rate:,.0f}", f">= {TARGET_RATE:,.0f}", rate >= TARGET_RATE),
        ("baseline records/s (paho, 1 per msg, QoS 1)", f"{base_rate:,.0f}", "", True),
        ("ratio to baseline", f"{ratio:.2f}", f">= {TARGET_RATIO}", ratio >= TARGET_RATIO),
        (
            "RSS growth during drain (MB)",
            f"{rss_growth:.1f}",
            f"<= {TARGET_RSS_MB}",
            rss_growth <= TARGET_RSS_MB,
        ),
        (
            "event-loop lag p99 during drain (ms)",
            f"{lag_p99:.2f}",
            f"<= {TARGET_LAG_P99_MS}",
            lag_p99 <= TARGET_LAG_P99_MS,
        ),
        ("peak RSS of the process (MB, for information)", f"{peak:.0f}", "", True),
    ]
    for name, value, target, ok in rows:
        mark = "" if not target else ("ok" if ok else "MISS")
        print(f"{name:48} {value:>12}  {target:>10}  {mark}")
    return 0 if all(ok for *_rest, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
