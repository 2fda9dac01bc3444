"""Footprint of the idle daemon: memory, CPU, and how fast it comes up.

    python bench/footprint.py [--quick] [--dir DIR] [--keep]

The coin changer, bill validator and cashless reader (one ``SimBus`` on a pty) and the VMC96
board run in this process; the daemon runs as a subprocess (``python -m vmc run``) with the
settings of config/sim.toml: coin and reader polled every 100 ms, bills every 150 ms, every
device every 200 ms while nobody is at the machine (``mdb.idle_poll_interval_ms``: the idle
window's cadence), log level info, no cloud link, the line under ``SCHED_FIFO`` 10 where the
machine allows it. The daemon spawns its MDB line process (drivers/mdb/line_process.py); both
are measured, the simulators (this process) are not.

Figures (issue 9 point 5), each beside its target; exit status 1 when one is missed:

1. start → first POLL: ``Popen`` of the daemon → the first POLL command reaches a simulated
   peripheral (stamped in the simulator's serving thread). Target ≤ 0.5 s, judged on the
   median over the starts (nearest rank, so with two starts the slower one).
2. start → accepting money: ``Popen`` → the "vmc running" line in the daemon's log, which it
   writes once its acceptors are enabled on the wire (the control socket's ``state`` is then
   checked to agree). No target; printed beside the first POLL.
3. RSS of the daemon + its line process, summed ``VmRSS`` from /proc/PID/status, read at the end
   of the idle window. ``VmRSS`` counts the pages both processes share (the interpreter, the
   C libraries) twice: an upper bound, and a figure that does not depend on what else runs.
   The proportional share (``Pss`` from /proc/PID/smaps_rollup) splits shared pages among
   every process mapping them, the other Python programs on the machine included; it is
   printed too, not judged. Target ≤ 60 MB (10^6 bytes; MiB printed beside).
4. CPU share of one core over an idle window (60 s; ``--quick`` 8 s), after the start-up has
   settled: ``utime + stime`` of both processes from /proc/PID/stat. Target ≤ 1 %.

Baselines measured in the same run: ``python -c pass`` (wall time of a start to exit, median
of several, and its peak RSS from ``wait4``), and an idle asyncio loop (``asyncio.run`` of a
wait that never ends) measured over the same window as the daemon: its RSS and CPU share.
Each figure is also shown as a ratio to its baseline.

Before the first start, the project's modules are compiled to bytecode (``compileall``, into
their ``__pycache__`` folders, which git ignores), as an installed machine has them: pip
compiles an installed package, and the systemd unit's ``ProtectSystem=strict`` keeps a running
daemon from writing them. Without that (``PYTHONDONTWRITEBYTECODE`` set, or a fresh checkout)
every start compiles ~80 modules from source, ~0.2 s on the development VM.

Exit status 2: the benchmark could not run (the daemon did not come up, ...).
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._main import bench_main
from drivers.mdb.block import CommandReceived
from hil.harness import JsonLineClient
from hil.sim.bill import BillValidatorSim
from hil.sim.bus import SimBus
from hil.sim.cashless import CashlessReaderSim
from hil.sim.coin import CoinChangerSim
from hil.sim.peripheral import SimPeripheral
from hil.sim.vmc96 import Vmc96Simulator

REPO = Path(__file__).resolve().parent.parent
TARGET_RSS_MB = 60.0
TARGET_CPU_PCT = 1.0
TARGET_FIRST_POLL_S = 0.5

#: config/sim.toml's poll intervals: the idle machine as it ships.
POLL_INTERVAL_MS = {"coin": 100, "bill": 150, "cashless": 100}
#: config/sim.toml's (and the default) ``mdb.idle_poll_interval_ms``: with nobody at the
#: machine, every device's idle POLLs go at this interval.
IDLE_POLL_INTERVAL_MS = 200
#: Python start-up plus device start-up on a loaded 2-core machine; a miss means broken.
T_UP_S = 30.0
#: The daemon promises to stop within 2 s (README); this is the give-up limit.
T_STOP_S = 10.0
#: How often the log is looked at for "vmc running": small next to the figure (~1 s).
LOG_STEP_S = 0.002
#: After "vmc running", before the idle window opens: the devices' first status reads, the
#: journal's start-up records and the first telemetry-free idle polls are over by then.
SETTLE_S = 2.0
#: One control call.
T_CALL_S = 10.0
IDLE_LOOP_CODE = "import asyncio\nasyncio.run(asyncio.Event().wait())"
#: What /proc/PID/wchan shows while a process sleeps reading an empty pipe (kernel versions).
PIPE_READ_WAITS = ("anon_pipe_read", "pipe_read")
#: The packages the daemon and its line process import from this repository.
PROJECT_PACKAGES = ("vmc", "drivers")
MB = 1_000_000
MIB = 1024 * 1024


class BenchError(Exception):
    """The benchmark could not carry on."""


@dataclass(frozen=True)
class Plan:
    starts: int  # daemon starts (first POLL, accepting money); the last one idles
    window_s: float  # the idle window (CPU)
    bare_runs: int  # ``python -c pass`` runs


QUICK = Plan(starts=2, window_s=8.0, bare_runs=5)
FULL = Plan(starts=5, window_s=60.0, bare_runs=10)


@dataclass
class Start:
    first_poll_s: float
    accepting_s: float


@dataclass
class Memory:
    rss_kb: int = 0
    pss_kb: int = 0


@dataclass
class Figures:
    starts: list[Start] = field(default_factory=list)
    bare_start_s: list[float] = field(default_factory=list)
    bare_rss_kb: int = 0
    daemon: Memory = field(default_factory=Memory)
    line: Memory = field(default_factory=Memory)
    loop: Memory = field(default_factory=Memory)
    daemon_cpu_s: float = 0.0
    line_cpu_s: float = 0.0
    loop_cpu_s: float = 0.0
    window_s: float = 0.0
    line_scheduling: str = ""


class FirstPoll:
    """Stamps (``perf_counter_ns``) the first POLL any peripheral receives after ``arm``."""

    def __init__(self, peripherals: list[SimPeripheral]) -> None:
        self._lock = threading.Lock()
        self._armed = False
        self.at_ns = 0
        for peripheral in peripherals:
            self._wrap(peripheral)

    def _wrap(self, peripheral: SimPeripheral) -> None:
        answer: Callable[[CommandReceived], bytes | None] = peripheral.answer
        poll_cmd = peripheral.POLL_CMD

        def timed(command: CommandReceived) -> bytes | None:
            if command.addr_cmd & 0x07 == poll_cmd:
                now = time.perf_counter_ns()
                with self._lock:
                    if self._armed and not self.at_ns:
                        self.at_ns = now
            return answer(command)

        # The bus calls ``peripheral.answer``: the instance attribute shadows the method.
        peripheral.answer = timed  # type: ignore[method-assign]

    def arm(self) -> None:
        with self._lock:
            self._armed, self.at_ns = True, 0


def write_config(path: Path, state_dir: Path, mdb_port: str, motor_port: str) -> Path:
    lines = [
        "[machine]",
        'id = "BENCH-FOOTPRINT"',
        f'state_dir = "{state_dir}"',
        "[log]",
        'level = "info"',
        'format = "json"',
        "[mdb]",
        'link = "stream"',
        f'port = "{mdb_port}"',
        # A timeout allowance only: the simulators are Python threads on a busy machine.
        "timing_slack_ms = 20.0",
        "realtime_priority = 10",
        f"idle_poll_interval_ms = {IDLE_POLL_INTERVAL_MS}",
    ]
    for name, interval_ms in POLL_INTERVAL_MS.items():
        lines += [f"[mdb.{name}]", "enabled = true", f"poll_interval_ms = {interval_ms}"]
    lines += ["[motor]", 'driver = "vmc96"', f'port = "{motor_port}"']
    for slot_id, row, col, price in (("A1", 0, 0, 100), ("A2", 0, 1, 120), ("B1", 1, 0, 250)):
        lines += [
            "[[slot]]",
            f'id = "{slot_id}"',
            f"row = {row}",
            f"col = {col}",
            f"price = {price}",
            "stock = 10",
            "capacity = 10",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- /proc --------------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (its threads included), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory(pid: int) -> Memory:
    found = Memory()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            found.rss_kb = int(line.split()[1])
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                found.pss_kb = int(line.split()[1])
    return found


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


# --- baselines ----------------------------------------------------------------------------------


def bare_python(runs: int) -> tuple[list[float], int]:
    """Wall times of ``python -c pass`` from spawn to exit, and the RSS (KiB) of a bare
    interpreter: ``wait4``'s peak RSS would count the fork of this process before the exec, so
    the RSS is read from /proc of one that waits on its stdin instead of exiting."""
    times: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - started)
    bare = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + T_UP_S
        # Up once it reads its stdin: its RSS no longer grows.
        while Path(f"/proc/{bare.pid}/wchan").read_text() not in PIPE_READ_WAITS:
            if time.monotonic() > deadline:
                raise BenchError("a bare python did not start")
            time.sleep(LOG_STEP_S)
        rss_kb = memory(bare.pid).rss_kb
    finally:
        assert bare.stdin is not None
        bare.stdin.close()
        bare.wait()
    return times, rss_kb


# --- the daemon ---------------------------------------------------------------------------------


class DaemonRun:
    """One ``vmc run``: started, watched until it takes money, stopped."""

    def __init__(self, config: Path, log_path: Path, control_socket: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.control_socket = control_socket
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, first_poll: FirstPoll) -> Start:
        with contextlib.suppress(FileNotFoundError):
            self.control_socket.unlink()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        first_poll.arm()
        with open(self.log_path, "ab") as log:
            started_ns = time.perf_counter_ns()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmc", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        running_ns = self._wait_log(log_offset, b'"vmc running"')
        if not first_poll.at_ns:
            raise BenchError("the daemon runs, but no peripheral saw a POLL")
        state = self.call({"op": "state"})["state"]
        if not (state["in_service"] and all(state["accepting"].values())):
            raise BenchError(f'logged "vmc running" but its state disagrees: {state}')
        return Start(
            first_poll_s=(first_poll.at_ns - started_ns) / 1e9,
            accepting_s=(running_ns - started_ns) / 1e9,
        )

    def _wait_log(self, offset: int, needle: bytes) -> int:
        deadline = time.monotonic() + T_UP_S
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            seen = b""
            while True:
                seen += log.read()
                if needle in seen:
                    return time.perf_counter_ns()
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise BenchError(f"the daemon exited with {self.proc.returncode}")
                if time.monotonic() > deadline:
                    raise BenchError(f"no {needle.decode()} in the log within {T_UP_S} s")
                time.sleep(LOG_STEP_S)

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        client = JsonLineClient(self.control_socket, T_CALL_S)
        try:
            return client.call(request)
        finally:
            client.close()

    def line_scheduling(self) -> str:
        """How the line process was scheduled, as the daemon logged it at start."""
        found = ""
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                found = str(json.loads(line).get("scheduling", found))
        return found

    def line_pid(self) -> int:
        assert self.proc is not None
        children = children_of(self.proc.pid)
        if len(children) != 1:
            raise BenchError(f"expected the line process as the daemon's one child: {children}")
        return children[0]

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(T_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None


def idle_window(daemon: DaemonRun, window_s: float, figures: Figures) -> None:
    """CPU over the window and memory at its end: the daemon, its line process and, beside
    them, an idle asyncio loop started just before."""
    assert daemon.proc is not None
    daemon_pid, line_pid = daemon.proc.pid, daemon.line_pid()
    loop = subprocess.Popen([sys.executable, "-c", IDLE_LOOP_CODE])
    try:
        time.sleep(SETTLE_S)  # the loop's own start-up is not idle CPU either
        before = (cpu_seconds(daemon_pid), cpu_seconds(line_pid), cpu_seconds(loop.pid))
        opened = time.monotonic()
        time.sleep(window_s)
        after = (cpu_seconds(daemon_pid), cpu_seconds(line_pid), cpu_seconds(loop.pid))
        figures.window_s = time.monotonic() - opened
        figures.daemon_cpu_s = after[0] - before[0]
        figures.line_cpu_s = after[1] - before[1]
        figures.loop_cpu_s = after[2] - before[2]
        figures.daemon, figures.line, figures.loop = (
            memory(daemon_pid),
            memory(line_pid),
            memory(loop.pid),
        )
    finally:
        loop.terminate()
        loop.wait()


# --- report -------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    """Nearest rank, rounding up: a value really measured (with two, the larger)."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def judged(name: str, value: float, target: float, unit_format: str = "{:.2f}") -> bool:
    ok = value <= target
    shown, limit = unit_format.format(value), unit_format.format(target)
    print(f"  {name:<44} {shown:>8}  <= {limit:<6} {'ok' if ok else 'MISS'}")
    return ok


def report(figures: Figures) -> int:
    bare_s = median(figures.bare_start_s)
    first_poll = median([s.first_poll_s for s in figures.starts])
    accepting = median([s.accepting_s for s in figures.starts])
    rss_kb = figures.daemon.rss_kb + figures.line.rss_kb
    pss_kb = figures.daemon.pss_kb + figures.line.pss_kb
    cpu_pct = 100 * (figures.daemon_cpu_s + figures.line_cpu_s) / figures.window_s
    loop_pct = 100 * figures.loop_cpu_s / figures.window_s
    print(
        f"footprint benchmark: {len(figures.starts)} starts, idle window {figures.window_s:.1f} s;"
        f" polls coin/bill/cashless every {'/'.join(map(str, POLL_INTERVAL_MS.values()))} ms,"
        f" {IDLE_POLL_INTERVAL_MS} ms while nobody is at the machine;"
        f" line scheduling: {figures.line_scheduling or 'unknown'}"
    )
    print(f"  load average at start {os.getloadavg()[0]:.2f}")
    runs = len(figures.bare_start_s)
    print(f"  baseline python -c pass start        {bare_s:8.3f} s  (median of {runs})")
    print(f"  baseline bare python RSS             {figures.bare_rss_kb * 1024 / MB:8.1f} MB")
    print(f"  baseline idle asyncio loop RSS       {figures.loop.rss_kb * 1024 / MB:8.1f} MB")
    print(f"  baseline idle asyncio loop CPU       {loop_pct:8.3f} %")
    each = ", ".join(f"{s.first_poll_s:.3f}/{s.accepting_s:.3f}" for s in figures.starts)
    print(f"  starts: first POLL / accepting (s)   {each}")
    results = [
        judged("start -> first POLL on the wire (s)", first_poll, TARGET_FIRST_POLL_S, "{:.3f}"),
        judged("RSS daemon + line process (MB)", rss_kb * 1024 / MB, TARGET_RSS_MB, "{:.1f}"),
        judged("CPU daemon + line process (% of a core)", cpu_pct, TARGET_CPU_PCT, "{:.2f}"),
    ]
    print(f"  start -> accepting money (s)           {accepting:8.3f}  (no target)")
    print(f"      first POLL x python -c pass start  {first_poll / bare_s:8.1f}")
    print(f"      accepting x python -c pass start   {accepting / bare_s:8.1f}")
    print(
        f"      RSS daemon / line process (MB)     {figures.daemon.rss_kb * 1024 / MB:8.1f}"
        f" / {figures.line.rss_kb * 1024 / MB:.1f}  ({rss_kb / 1024:.1f} MiB together)"
    )
    loop_kb = figures.loop.rss_kb
    print(
        f"      RSS x idle asyncio loop            {figures.daemon.rss_kb / loop_kb:8.2f}"
        f" / {figures.line.rss_kb / loop_kb:.2f}"
    )
    print(f"      PSS daemon + line process (MB)     {pss_kb * 1024 / MB:8.1f}  (not judged)")
    daemon_pct = 100 * figures.daemon_cpu_s / figures.window_s
    print(
        f"      CPU daemon / line process (%)      {daemon_pct:8.2f}"
        f" / {100 * figures.line_cpu_s / figures.window_s:.2f}"
        f"  (idle loop {loop_pct:.3f} %)"
    )
    return 0 if all(results) else 1


# --- run ----------------------------------------------------------------------------------------


def run(plan: Plan, workdir: Path) -> int:
    state_dir = workdir / "state"
    state_dir.mkdir(parents=True)
    peripherals: list[SimPeripheral] = [CoinChangerSim(), BillValidatorSim(), CashlessReaderSim()]
    first_poll = FirstPoll(peripherals)
    bus = SimBus.on_pty(peripherals)
    motor = Vmc96Simulator()
    figures = Figures()
    daemon: DaemonRun | None = None
    try:
        for package in PROJECT_PACKAGES:
            if not compileall.compile_dir(REPO / package, quiet=1):
                raise BenchError(f"{package}: does not compile")
        bus.start()
        motor.start()
        config = write_config(workdir / "vmc.toml", state_dir, bus.port, motor.port)
        figures.bare_start_s, figures.bare_rss_kb = bare_python(plan.bare_runs)
        daemon = DaemonRun(config, workdir / "daemon.log", state_dir / "control.sock")
        for n in range(plan.starts):
            figures.starts.append(daemon.start(first_poll))
            if n == plan.starts - 1:
                figures.line_scheduling = daemon.line_scheduling()
                idle_window(daemon, plan.window_s, figures)
            code = daemon.stop()
            if code != 0:
                raise BenchError(f"the daemon exited with {code} after SIGTERM")
        return report(figures)
    except (BenchError, OSError) as exc:
        print(f"footprint benchmark could not run: {exc}", file=sys.stderr)
        with contextlib.suppress(OSError):
            tail = (workdir / "daemon.log").read_text(errors="replace").splitlines()[-30:]
            print("\n".join(tail), file=sys.stderr)
        return 2
    finally:
        if daemon is not None:
            daemon.stop()
        motor.stop()
        bus.stop()


def main() -> int:
    return bench_main(
        __doc__,
        run,
        (QUICK, FULL),
        name="footprint",
        quick_help="2 starts, 8 s idle window (< 30 s)",
    )


if __name__ == "__main__":
    sys.exit(main())
