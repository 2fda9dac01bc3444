"""The cloud link's figures (issue 8 point 10), each printed beside its target; exit 1 on a miss.

    python bench/sync.py [--quick] [--max-in-flight N]   # quick: 10,000 records, 5 QR vends

1. Journal drain: records drained through a real mosquitto (plain TCP) and acked by the
   stand-in backend (``python -m hil.backend serve``, a process of its own), against a
   baseline in the same run: paho publishing the same records (the same bytes) one per
   message at QoS 1 with paho's default 20 in flight, until every PUBACK. Targets:
   ≥ 5,000 records/s, ratio ≥ 2, RSS growth ≤ 30 MB, event-loop lag p99 ≤ 5 ms (1 ms sampler;
   the same sampler on the idle loop just before is printed as the floor of this run).
2. The daemon (``python -m vmc run`` on the bench's coin changer and VMC96 simulators) over
   TLS (a throwaway CA, server and client certificate made here with ``cryptography``; the
   broker's TLS listener requires the client certificate) through a counting TCP proxy:
   * a QR vend: the screen's ``qr_order`` through the control socket, then the backend's
     signed ``vend`` published → the RUN frame arrives at the motor board simulator
     (``perf_counter_ns`` on both sides). Target p99 ≤ 50 ms.
   * bytes on the wire at default settings, counted at the proxy (TLS records, MQTT inside;
     TCP/IP headers not counted): the connection set-up, an idle window, one cash sale (two
     coins and a selection, until the journal is acked and telemetry has gone out), and per
     unit a keepalive exchange and a heartbeat telemetry message (measured on a second link
     with short intervals: a keepalive every 2 s and a heartbeat every 1 s, with the daemon's
     own telemetry payload, since the defaults are 240 s and 900 s). An idle machine per 30
     days = keepalives every 240 s + heartbeats every 900 s + one connection (status, will,
     subscriptions, the first telemetry) per day (an assumption, printed). Target ≤ 5 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as paho

from bench._vend_sims import TimedCoinChanger, TimedVmc96Simulator
from bench.vend import EventListener, VendBench, write_bench_config
from hil.backend.commands import CommandSigner
from hil.harness import Daemon, JsonLineClient
from hil.sim.bus import SimBus
from tests.mqtt_broker import Broker
from tests.tcp_proxy import TcpProxy
from tests.tls_broker import TlsBroker, make_certificates
from vmc.cloud.link import CloudLink
from vmc.cloud.sync import JournalSync, encode_record
from vmc.cloud.telemetry import Telemetry
from vmc.config import parse_config
from vmc.journal import Journal

MACHINE = "BENCH-0001"  # bench/vend.py's write_bench_config
UNITS_MACHINE = "BENCH-0002"  # same length: the same topics' bytes
TARGET_RATE = 5_000.0
TARGET_RATIO = 2.0
TARGET_RSS_MB = 30.0
TARGET_LAG_P99_MS = 5.0
TARGET_VEND_P99_MS = 50.0
TARGET_IDLE_MB_30D = 5.0
LAG_TICK_S = 0.001
LAG_FLOOR_S = 0.5  # the sampler on the idle loop before the drain

DAY_S = 86_400
MONTH_S = 30 * DAY_S
KEEPALIVE_S = 240  # the defaults of [cloud] (vmc/config.py), used for the extrapolation
HEARTBEAT_S = 900
CONNECTIONS_PER_30D = 30  # assumption: the link is re-made once a day
UNIT_KEEPALIVE_S = 2  # the second link's intervals (config minimum for keepalive)
UNIT_HEARTBEAT_S = 1.0
#: No byte through the proxy for this long: the exchange is over (telemetry debounce is 2 s).
QUIET_S = 2.5
#: The baseline queues at most this many messages in paho (its in-flight window is 20).
BASELINE_QUEUED = 10_000
T_STEP_S = 30.0  # any one step of the daemon part; a loaded machine gets room


@dataclass
class Plan:
    records: int
    qr_vends: int
    idle_s: float
    unit_window_s: float


QUICK = Plan(records=10_000, qr_vends=5, idle_s=2.0, unit_window_s=4.5)
FULL = Plan(records=100_000, qr_vends=50, idle_s=30.0, unit_window_s=20.5)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: a value that was really measured."""
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * q), len(ordered) - 1)] if ordered else float("nan")


def record_data(i: int) -> dict[str, object]:
    return {"slot": "A1", "old": i % 10, "new": (i + 1) % 10}


async def fill(journal: Journal, count: int) -> None:
    done = 0
    while done < count:
        n = min(500, count - done)
        await journal.append_many([("inventory_changed", record_data(done + i)) for i in range(n)])
        done += n


# --- 1. the drain ------------------------------------------------------------------------


async def lag_samples(seconds: float, done: asyncio.Event | None = None) -> list[float]:
    """Loop lag of a 1 ms sleep, sampled for ``seconds`` or until ``done`` is set."""
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    end = loop.time() + seconds
    while (done is None or not done.is_set()) and loop.time() < end:
        before = loop.time()
        await asyncio.sleep(LAG_TICK_S)
        lags.append(loop.time() - before - LAG_TICK_S)
    return lags


@dataclass
class DrainResult:
    seconds: float
    rss_growth_mb: float
    lag_p99_ms: float
    lag_floor_p99_ms: float
    records: int
    batches: int


async def drain(state: Path, port: int, cloud: dict[str, object]) -> DrainResult:
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
        journal,
        MACHINE,
        batch_records=config.batch_records,
        max_in_flight=config.max_in_flight,
        ack_timeout_s=config.ack_timeout_s,
    )
    link = CloudLink(config, MACHINE, boot_id=journal.boot_id, sync=sync)
    floor = await lag_samples(LAG_FLOOR_S)
    done = asyncio.Event()
    rss_before = rss_mb()
    total = journal.backlog
    began = time.perf_counter()
    sampler = asyncio.create_task(lag_samples(3600, done))
    task = asyncio.create_task(link.run())
    while journal.acked_upto < journal.last_seq:  # noqa: ASYNC110 - the writer thread sets it
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - began
    done.set()
    rss_growth = rss_mb() - rss_before
    lags = await sampler
    await link.stop()
    await task
    sync.close()
    await journal.close()
    return DrainResult(
        seconds=elapsed,
        rss_growth_mb=rss_growth,
        lag_p99_ms=percentile(lags, 0.99) * 1000,
        lag_floor_p99_ms=percentile(floor, 0.99) * 1000,
        records=total,
        batches=sync.batches_sent,
    )


def baseline(port: int, payloads: list[bytes]) -> float:
    """paho, one record per message at QoS 1, until every PUBACK: seconds."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-baseline")
    client.max_inflight_messages_set(20)  # paho's default, said out loud
    client.connect("127.0.0.1", port)
    client.loop_start()
    began = time.perf_counter()
    infos: list[paho.MQTTMessageInfo] = []
    for i, payload in enumerate(payloads):
        if i >= BASELINE_QUEUED:  # message ids wrap at 65,535: keep fewer than that queued
            infos[i - BASELINE_QUEUED].wait_for_publish(60)
        infos.append(client.publish(f"vmc/{MACHINE}/journal", payload, qos=1))
    for info in infos[-BASELINE_QUEUED:]:
        info.wait_for_publish(60)
    elapsed = time.perf_counter() - began
    client.loop_stop()
    client.disconnect()
    return elapsed


def backend_process(url: str, state: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "hil.backend", "serve", "--broker", url, "--state", str(state)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_drain(plan: Plan, work: Path, cloud: dict[str, object]) -> tuple[DrainResult, float]:
    """The drain and its baseline: (drain, baseline records/s)."""
    with Broker(work / "broker") as broker:
        backend = backend_process(broker.url, work / "backend")
        try:
            time.sleep(1.0)  # the backend subscribes
            state = work / "state"

            async def prepare() -> list[bytes]:
                journal = await Journal.open(state)
                await fill(journal, plan.records)
                records = await journal.records(1, limit=plan.records + 10)
                await journal.close()
                return [encode_record(r.to_wire()) for r in records]  # the sync's bytes

            payloads = asyncio.run(prepare())
            result = asyncio.run(drain(state, broker.port, cloud))
        finally:
            backend.terminate()
            backend.wait(10)
        # After the backend: the baseline's messages go to no subscriber, its PUBACKs
        # come from the broker alone.
        base_seconds = baseline(broker.port, payloads)
    return result, len(payloads) / base_seconds


# --- 2. the daemon over TLS ----------------------------------------------------------------


def cloud_lines(port: int, certs: dict[str, Path], public_key: str) -> list[str]:
    return [
        "[cloud]",
        "enabled = true",
        'host = "127.0.0.1"',
        f"port = {port}",
        "tls = true",
        f"ca_file = {json.dumps(str(certs['ca.crt']))}",
        f"cert_file = {json.dumps(str(certs['client.crt']))}",
        f"key_file = {json.dumps(str(certs['client.key']))}",
        f'command_public_key = "{public_key}"',
    ]


class Watcher:
    """The bench's own MQTT client on the plain listener: sends commands, sees results and the
    latest telemetry."""

    def __init__(self, port: int) -> None:
        self.results: dict[str, dict[str, Any]] = {}
        self.telemetry: bytes = b""
        self._lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-watcher")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"vmc/{MACHINE}/cmd/result", qos=1)
        self.client.subscribe(f"vmc/{MACHINE}/telemetry", qos=0)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            if message.topic.endswith("/telemetry"):
                self.telemetry = bytes(message.payload)
            else:
                result = json.loads(message.payload)
                self.results[str(result.get("cmd_id"))] = result

    def result(self, cmd_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self.results.get(cmd_id)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_for(predicate: Any, what: str, timeout_s: float = T_STEP_S, step_s: float = 0.005) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(step_s)


def quiet(proxy: TcpProxy, quiet_s: float = QUIET_S) -> tuple[int, int]:
    """Wait until no byte went through the proxy for ``quiet_s``; the counters then."""
    last = (-1, -1)
    since = time.monotonic()
    deadline = since + T_STEP_S * 2
    while True:
        now = (proxy.bytes_up, proxy.bytes_down)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
        if time.monotonic() > deadline:
            raise RuntimeError("the link never went quiet")
        time.sleep(0.05)


@dataclass
class WireResult:
    vend_ms: list[float] = field(default_factory=list)
    connect: tuple[int, int] = (0, 0)
    idle: tuple[int, int] = (0, 0)
    idle_s: float = 0.0
    sale: tuple[int, int] = (0, 0)
    ping: float = 0.0  # bytes, both ways, per keepalive exchange
    heartbeat: float = 0.0  # bytes, both ways, per heartbeat telemetry
    telemetry_payload: int = 0


def units(tls_port: int, certs: dict[str, Path], payload: bytes, plan: Plan) -> tuple[float, float]:
    """Bytes per keepalive exchange and per heartbeat on a second link through a proxy of its
    own, with the daemon's telemetry payload: (ping, heartbeat)."""
    telemetry_doc = json.loads(payload) if payload else {"online": True}
    base = {"enabled": True, "host": "127.0.0.1", "tls": True}
    files = {
        "ca_file": certs["ca.crt"],
        "cert_file": certs["client.crt"],
        "key_file": certs["client.key"],
    }

    async def measure(
        proxy: TcpProxy, cloud: dict[str, Any], with_telemetry: bool
    ) -> tuple[int, int]:
        config = parse_config(
            {
                "machine": {"id": UNITS_MACHINE, "state_dir": "/nonexistent"},
                "mdb": {"simulate": True},
                "motor": {"simulate": True},
                "cloud": {
                    **base,
                    **{k: str(v) for k, v in files.items()},
                    "port": proxy.port,
                    **cloud,
                },
            },
            Path("/nonexistent"),
        ).cloud
        telemetry = (
            Telemetry(lambda: dict(telemetry_doc), heartbeat_s=UNIT_HEARTBEAT_S)
            if with_telemetry
            else None
        )
        link = CloudLink(config, UNITS_MACHINE, boot_id="0" * 36, telemetry=telemetry)
        pings = [0]
        real = paho.Client._send_pingreq

        def counting(self: paho.Client) -> Any:
            pings[0] += 1
            return real(self)

        paho.Client._send_pingreq = counting  # type: ignore[method-assign]
        task = asyncio.create_task(link.run())
        try:
            while link.state.value != "up":  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            await asyncio.sleep(QUIET_S)  # the first telemetry and the status are out
            up, down, beats, began = proxy.bytes_up, proxy.bytes_down, 0, pings[0]
            if telemetry is not None:
                beats = telemetry.heartbeats
            await asyncio.sleep(plan.unit_window_s)
            total = proxy.bytes_up - up + proxy.bytes_down - down
            count = (telemetry.heartbeats - beats) if telemetry is not None else pings[0] - began
            return total, count
        finally:
            paho.Client._send_pingreq = real  # type: ignore[method-assign]
            await link.stop()
            await task

    with TcpProxy(tls_port) as proxy:
        ping_bytes, ping_count = asyncio.run(
            measure(proxy, {"keepalive_s": UNIT_KEEPALIVE_S}, False)
        )
    with TcpProxy(tls_port) as proxy:
        beat_bytes, beat_count = asyncio.run(measure(proxy, {"keepalive_s": 1200}, True))
    return ping_bytes / max(ping_count, 1), beat_bytes / max(beat_count, 1)


def run_daemon(plan: Plan, work: Path) -> WireResult:
    """QR vends and bytes on the wire, the daemon over TLS through a counting proxy."""
    out = WireResult()
    certs = make_certificates(work / "tls", client_cn=MACHINE)
    signer = CommandSigner.generate()
    broker = TlsBroker(work / "tls-broker", certs)
    coin = TimedCoinChanger()
    bus = SimBus.on_pty([coin])
    motor = TimedVmc96Simulator(stock={(0, 0): 1000})
    backend = backend_process(f"127.0.0.1:{broker.port}", work / "tls-backend")
    proxy = TcpProxy(broker.tls_port).start()
    daemon: Daemon | None = None
    watcher: Watcher | None = None
    control: JsonLineClient | None = None
    events: EventListener | None = None
    try:
        bus.start()
        motor.start()
        state = work / "daemon-state"
        config = write_bench_config(work / "vmc.toml", state, bus.port, motor.port)
        with config.open("a") as f:
            f.write("\n".join(cloud_lines(proxy.port, certs, signer.public_key_b64)) + "\n")
        watcher = Watcher(broker.port)
        daemon = Daemon(config, state)
        daemon.start()
        daemon.wait_state(
            lambda st: (st.get("cloud_link") or {}).get("state") == "up", "cloud link up", T_STEP_S
        )
        out.connect = quiet(proxy)
        # The per-unit links run beside the rest, through proxies of their own.
        measured: list[tuple[float, float]] = []
        payload = watcher.telemetry
        side = threading.Thread(
            target=lambda: measured.append(units(broker.tls_port, certs, payload, plan)),
            name="bench-units",
            daemon=True,
        )
        side.start()

        began = time.monotonic()
        time.sleep(plan.idle_s)
        out.idle = (proxy.bytes_up - out.connect[0], proxy.bytes_down - out.connect[1])
        out.idle_s = time.monotonic() - began

        control = JsonLineClient(daemon.control_socket, T_STEP_S)
        events = EventListener(daemon.control_socket)
        before = (proxy.bytes_up, proxy.bytes_down)
        VendBench(coin, motor, control, events, -1).cycle(record=False)  # one cash sale
        after = quiet(proxy)
        out.sale = (after[0] - before[0], after[1] - before[1])
        out.telemetry_payload = len(watcher.telemetry)

        for _ in range(plan.qr_vends):
            daemon.wait_state(
                lambda st: st.get("phase") == "idle" and (st.get("qr") or {}).get("available"),
                "the machine idle with QR offered",
                T_STEP_S,
            )
            # A customer comes after the last product has fallen past the drop sensor; a vend
            # straight after it would wait for the beam to clear (vmc96 T_BEAM_SETTLE_S).
            wait_for(lambda: not motor.beam_blocked(), "the drop sensor clear")
            shown = control.call({"op": "qr_order", "slot": "A1"})
            if not shown.get("ok"):
                raise RuntimeError(f"qr_order refused: {shown}")
            order = shown["order"]
            fields = {k: order[k] for k in ("order_id", "slot", "price", "currency")}
            body = signer.body(MACHINE, "vend", {**fields, "origin": "machine"})
            payload = json.dumps(signer.sign(body)).encode()
            motor.take_runs()
            sent = time.perf_counter_ns()
            watcher.client.publish(f"vmc/{MACHINE}/cmd", payload, qos=1)
            runs: list[Any] = []
            wait_for(lambda r=runs: bool(r.extend(motor.take_runs()) or r), "the QR vend's RUN")
            out.vend_ms.append((runs[0].at_ns - sent) / 1e6)
            wait_for(lambda b=body: watcher.result(b["cmd_id"]) is not None, "the vend's result")
            result = watcher.result(body["cmd_id"])
            if not (result or {}).get("ok"):
                raise RuntimeError(f"QR vend refused: {result}")

        side.join(T_STEP_S * 2)
        if not measured:
            raise RuntimeError("the keepalive and heartbeat measurement did not finish")
        out.ping, out.heartbeat = measured[0]
        return out
    finally:
        if events is not None:
            events.close()
        if control is not None:
            control.close()
        if daemon is not None:
            with contextlib.suppress(Exception):
                daemon.stop()
            daemon.kill()
        if watcher is not None:
            watcher.close()
        proxy.close()
        backend.terminate()
        backend.wait(10)
        motor.stop()
        bus.stop()
        broker.close()


def row(name: str, value: str, target: str = "", ok: bool | None = None) -> bool:
    mark = "" if ok is None else ("ok" if ok else "MISS")
    print(f"{name:56} {value:>14}  {target:>12}  {mark}")
    return ok is not False


def report(plan: Plan, drain_result: DrainResult, base_rate: float, wire: WireResult) -> int:
    d = drain_result
    rate = d.records / d.seconds
    ratio = rate / base_rate
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at the end: {load} (2 cores: figures are noisy; see bench/README.md)")
    ok = [
        row("1. records drained and acked (batches)", f"{d.records} ({d.batches})"),
        row("records/s", f"{rate:,.0f}", f">= {TARGET_RATE:,.0f}", rate >= TARGET_RATE),
        row("baseline records/s (paho, 1 per msg, QoS 1, 20 in flight)", f"{base_rate:,.0f}"),
        row("ratio to baseline", f"{ratio:.2f}", f">= {TARGET_RATIO}", ratio >= TARGET_RATIO),
        row(
            "RSS growth during drain (MB)",
            f"{d.rss_growth_mb:.1f}",
            f"<= {TARGET_RSS_MB}",
            d.rss_growth_mb <= TARGET_RSS_MB,
        ),
        row(
            "event-loop lag p99 during drain (ms)",
            f"{d.lag_p99_ms:.2f}",
            f"<= {TARGET_LAG_P99_MS}",
            d.lag_p99_ms <= TARGET_LAG_P99_MS,
        ),
        row("  floor: the same sampler, loop idle, just before (ms)", f"{d.lag_floor_p99_ms:.2f}"),
        row("peak RSS of the process (MB)", f"{peak:.0f}"),
    ]
    v = wire.vend_ms
    p99 = percentile(v, 0.99)
    ok.append(
        row(
            f"2. signed vend published -> RUN on the wire p99 (ms, n={len(v)})",
            f"{p99:.1f}",
            f"<= {TARGET_VEND_P99_MS:.0f}",
            p99 <= TARGET_VEND_P99_MS,
        )
    )
    row("   p50 / max (ms)", f"{percentile(v, 0.5):.1f} / {max(v):.1f}")
    connect = sum(wire.connect)
    idle_window = sum(wire.idle)
    parts = {
        f"keepalive every {KEEPALIVE_S} s": wire.ping * MONTH_S / KEEPALIVE_S,
        f"heartbeat telemetry every {HEARTBEAT_S} s": wire.heartbeat * MONTH_S / HEARTBEAT_S,
        f"status: {CONNECTIONS_PER_30D} connections (assumed)": connect * CONNECTIONS_PER_30D,
        "idle window, extrapolated": idle_window * MONTH_S / max(wire.idle_s, 1e-9),
    }
    month = sum(parts.values())
    print("3. bytes on the wire over TLS (mosquitto, client certificate), at the proxy:")
    row("   connection set-up up / down (bytes)", f"{wire.connect[0]} / {wire.connect[1]}")
    row(f"   idle window of {wire.idle_s:.0f} s (bytes)", f"{idle_window}")
    row("   one keepalive exchange (bytes, both ways)", f"{wire.ping:.0f}")
    row(
        f"   one heartbeat (bytes; payload {wire.telemetry_payload} B)",
        f"{wire.heartbeat:.0f}",
    )
    row("   one cash sale up / down (bytes)", f"{wire.sale[0]} / {wire.sale[1]}")
    ok.append(
        row(
            "   idle machine per 30 days (MB)",
            f"{month / 1e6:.2f}",
            f"<= {TARGET_IDLE_MB_30D}",
            month / 1e6 <= TARGET_IDLE_MB_30D,
        )
    )
    for name, value in parts.items():
        share = 100 * value / month if month else 0.0
        row(f"     {name}", f"{value / 1e6:.3f} MB {share:4.1f} %")
    return 0 if all(ok) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 records, 5 QR vends")
    parser.add_argument("--max-in-flight", type=int, help="cloud.max_in_flight (default: its)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    cloud: dict[str, object] = {}
    if args.max_in_flight:
        cloud["max_in_flight"] = args.max_in_flight
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmc-bench-sync-") as tmp:
        work = Path(tmp)
        drain_result, base_rate = run_drain(plan, work, cloud)
        wire = run_daemon(plan, work)
    status = report(plan, drain_result, base_rate, wire)
    print(f"wall time {time.monotonic() - began:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
