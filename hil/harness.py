"""Run the real daemon as a subprocess against the real simulators: for end-to-end tests, the
crash campaign, benchmarks and field-test scenarios.

Two set-ups:
* embedded: the daemon starts the simulators itself (``simulate = true``), as in
  config/sim.toml;
* external: the test starts ``python -m hil.sim`` and ``python -m hil.sim.vmc96`` itself and
  the daemon opens their ptys as if they were hardware. The simulators then outlive a daemon
  killed with SIGKILL, with their ledgers, which the crash campaign needs.

Output stays in files for a post-mortem: the daemon's stdout and stderr in ``daemon.log`` beside
its state folder (appended to at every start), the external simulators' in ``mdb-sim.log`` and
``motor-sim.log`` in their work folder.

For the cloud link: :func:`cloud_config` writes the daemon's ``[cloud]`` table,
:class:`BackendProcess` runs the stand-in backend (``python -m hil.backend serve``) as a process
of the caller that outlives daemon kills (its store and command key in its own folder, its
output in ``backend.log`` there), and :func:`journal_backlog` reads the journal's id, last seq
and ``acked_upto`` (read-only, safe while the daemon runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hil.sim.control import JsonLineClient
from vmc.journal.files import database_path, open_readonly
from vmc.journal.reports import backlog

#: Python start-up plus device start-up on a loaded 2-core CI machine.
START_TIMEOUT_S = 40.0
CALL_TIMEOUT_S = 30.0

DEFAULT_SLOTS = [
    ("A1", 0, 0, 100, 10),
    ("A2", 0, 1, 120, 10),
    ("A3", 0, 2, 150, 10),
    ("B1", 1, 0, 250, 10),
]


def write_config(
    path: Path,
    state_dir: Path,
    *,
    mdb_port: str | None = None,
    motor_port: str | None = None,
    slots: list[tuple[str, int, int, int, int]] | None = None,
    extra: str = "",
    devices: tuple[str, ...] = ("coin", "bill"),
    mdb_extra: str = "",
) -> Path:
    lines = [
        "[machine]",
        'id = "TEST-0001"',
        f'state_dir = "{state_dir}"',
        "[log]",
        'level = "debug"',
        'format = "json"',
        "[mdb]",
        'link = "stream"',
        "timing_slack_ms = 20.0",
        mdb_extra,
    ]
    lines += ["simulate = true"] if mdb_port is None else [f'port = "{mdb_port}"']
    for name in ("coin", "bill", "cashless"):
        lines += [
            f"[mdb.{name}]",
            f"enabled = {'true' if name in devices else 'false'}",
            "poll_interval_ms = 50",
        ]
    lines += ["[motor]", 'driver = "vmc96"', "turn_timeout_s = 3.0", "drop_timeout_s = 1.0"]
    lines += ["simulate = true"] if motor_port is None else [f'port = "{motor_port}"']
    lines += [extra]
    for slot_id, row, col, price, stock in slots or DEFAULT_SLOTS:
        lines += [
            "[[slot]]",
            f'id = "{slot_id}"',
            f"row = {row}",
            f"col = {col}",
            f"price = {price}",
            f"stock = {stock}",
            f"capacity = {max(20, stock)}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def cloud_config(
    port: int,
    public_key: str,
    settings: Mapping[str, float | int | str | bool] | None = None,
    *,
    host: str = "127.0.0.1",
) -> str:
    """The ``[cloud]`` table for a broker on ``host:port`` and the backend's command key, plus
    any other ``cloud.*`` setting (``{"order_ttl_s": 10, "ack_timeout_s": 2.0}``, ...)."""
    lines = [
        "[cloud]",
        "enabled = true",
        f'host = "{host}"',
        f"port = {port}",
        f'command_public_key = "{public_key}"',
    ]
    for name, value in (settings or {}).items():
        if isinstance(value, bool):
            lines.append(f"{name} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f'{name} = "{value}"')
        else:
            lines.append(f"{name} = {value}")
    return "\n".join(lines)


def call(path: Path, request: dict[str, Any], timeout_s: float = CALL_TIMEOUT_S) -> dict[str, Any]:
    client = JsonLineClient(path, timeout_s)
    try:
        return client.call(request)
    finally:
        client.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if predicate():
                return
        except (OSError, ConnectionError, json.JSONDecodeError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


class ExternalSims:
    """The MDB and motor simulators as processes of the test, outliving daemon restarts."""

    def __init__(
        self,
        workdir: Path,
        devices: str = "coin,bill",
        *,
        slots: list[tuple[str, int, int, int, int]] | None = None,
        motor_args: tuple[str, ...] = (),
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.mdb_link = workdir / "mdb.link"
        self.mdb_control = workdir / "mdb.sock"
        self.motor_link = workdir / "motor.link"
        self.motor_control = workdir / "motor.sock"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Their output stays in the work directory, for a post-mortem.
        self.mdb_log = workdir / "mdb-sim.log"
        self.motor_log = workdir / "motor-sim.log"
        mdb_log = open(self.mdb_log, "ab")  # noqa: SIM115 - handed to the child
        motor_log = open(self.motor_log, "ab")  # noqa: SIM115 - handed to the child
        self.mdb = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hil.sim",
                "--devices",
                devices,
                "--pty-link",
                str(self.mdb_link),
                "--control",
                str(self.mdb_control),
            ],
            env=env,
            stdout=mdb_log,
            stderr=subprocess.STDOUT,
        )
        mdb_log.close()
        stock_args = [
            arg
            for _id, row, col, _price, stock in slots or DEFAULT_SLOTS
            for arg in ("--stock", f"{row},{col},{stock}")
        ]
        self.motor = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hil.sim.vmc96",
                "--link-file",
                str(self.motor_link),
                "--control",
                str(self.motor_control),
                *stock_args,
                *motor_args,
            ],
            env=env,
            stdout=motor_log,
            stderr=subprocess.STDOUT,
        )
        motor_log.close()
        try:
            wait_until(
                lambda: self.mdb_link.exists() and self.motor_link.exists(),
                START_TIMEOUT_S,
                "the simulators' pty paths",
            )
            wait_until(
                lambda: self.mdb_control.exists() and self.motor_control.exists(),
                START_TIMEOUT_S,
                "the simulators' control sockets",
            )
        except BaseException:
            self.stop()
            raise

    @property
    def mdb_port(self) -> str:
        return self.mdb_link.read_text().strip()

    @property
    def motor_port(self) -> str:
        return self.motor_link.read_text().strip()

    def stop(self) -> None:
        for proc in (self.mdb, self.motor):
            if proc.poll() is None:
                proc.terminate()
        for proc in (self.mdb, self.motor):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


#: Daemon log lines a failed wait shows.
LOG_TAIL_LINES = 60


class Selection:
    """A selection in progress (``Daemon.select_until_vending``): its answer once it ends."""

    def __init__(self) -> None:
        self.answers: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []
        self.thread: threading.Thread | None = None

    def answer(self, timeout_s: float = 15.0) -> dict[str, Any]:
        """The selection's one answer (it must have come within ``timeout_s``)."""
        assert self.thread is not None
        self.thread.join(timeout_s)
        assert not self.errors, self.errors
        assert len(self.answers) == 1, self.answers
        return self.answers[0]


class Daemon:
    """``vmc run`` as a subprocess, with helpers to drive it and its simulators."""

    def __init__(self, config: Path, state_dir: Path, sims: ExternalSims | None = None) -> None:
        self.config = config
        self.state_dir = state_dir
        self.sims = sims
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir.parent / "daemon.log"
        self.starts = 0

    @property
    def control_socket(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def mdb_control(self) -> Path:
        return self.sims.mdb_control if self.sims else self.state_dir / "sim-mdb.sock"

    @property
    def motor_control(self) -> Path:
        return self.sims.motor_control if self.sims else self.state_dir / "sim-motor.sock"

    def start(self, wait_in_service: bool = True) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.control_socket.unlink()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmc", "run", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        self.starts += 1

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise AssertionError(f"vmc exited with {self.proc.returncode}:\n{tail}")
            return bool(self.state()["ok"])

        wait_until(up, START_TIMEOUT_S, "the control socket")
        if wait_in_service:
            self.wait_state(
                lambda s: s["in_service"] and all(s["accepting"].values()),
                "the machine in service with its acceptors enabled",
            )

    def state(self) -> dict[str, Any]:
        return call(self.control_socket, {"op": "state"})

    def wait_state(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        what: str,
        timeout_s: float = START_TIMEOUT_S,
    ) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def check() -> bool:
            seen.update(self.state()["state"])
            return predicate(seen)

        try:
            wait_until(check, timeout_s, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last state: {seen}\n{self.log_tail()}") from None
        return seen

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The daemon's last log lines, for a failure message (a CI run keeps no folder)."""
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            return f"(no daemon log: {exc})"
        return "daemon log, last lines:\n" + "\n".join(tail)

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        return call(self.control_socket, request)

    def select_until_vending(self, slot: str) -> Selection:
        """A customer's selection of ``slot``, sent from a thread of its own (the answer comes
        only when the vend is over); returns once the vend is under way."""
        selection = Selection()

        def select() -> None:
            try:
                selection.answers.append(self.control({"op": "select", "slot": slot}))
            except BaseException as exc:  # the test reads it
                selection.errors.append(exc)

        selection.thread = threading.Thread(target=select, name=f"select-{slot}")
        selection.thread.start()
        self.wait_state(lambda s: s["phase"] == "vending", "the vend under way")
        return selection

    def mdb_sim(self, device: str, cmd: str, **args: Any) -> Any:
        answer = call(self.mdb_control, {"device": device, "cmd": cmd, **args})
        assert answer["ok"], answer
        return answer["result"]

    def mdb_ledger(self) -> dict[str, Any]:
        answer = call(self.mdb_control, {"cmd": "ledger"})
        assert answer["ok"], answer
        result: dict[str, Any] = answer["result"]
        return result

    def motor_sim(self, cmd: str, **args: Any) -> dict[str, Any]:
        answer = call(self.motor_control, {"cmd": cmd, **args})
        assert answer["ok"], answer
        result: dict[str, Any] = answer["result"]
        return result

    def wait_accepting(self, device: str) -> None:
        """Wait until the machine has really enabled ``device`` (customers insert money when
        the screen says so, not while a previous bill is still being decided)."""
        self.wait_state(
            lambda s: s["phase"] == "idle" and s["accepting"].get(device) is True,
            f"{device} accepting",
        )

    def insert_coins(self, *coin_types: int) -> None:
        for coin_type in coin_types:
            self.wait_accepting("coin")
            self.mdb_sim("coin", "insert", coin_type=coin_type)

    def insert_bill(self, bill_type: int) -> None:
        self.wait_accepting("bill")
        self.mdb_sim("bill", "insert", bill_type=bill_type)

    @contextlib.contextmanager
    def running(self) -> Iterator[Daemon]:
        """Started (in service), and stopped with SIGTERM at the end, which must exit 0."""
        self.start()
        try:
            yield self
        finally:
            if self.proc is not None:
                code, _elapsed = self.stop()
                assert code == 0, f"vmc exited with {code} on SIGTERM"

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> tuple[int, float]:
        """Signal the daemon; return (exit status, seconds it took to exit)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout_s)
        elapsed = time.monotonic() - started
        self.proc = None
        return code, elapsed

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log_lines(self) -> Iterator[dict[str, Any]]:
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                yield json.loads(line)


class BackendProcess:
    """The stand-in backend (``python -m hil.backend serve``) as a process of the caller:
    it outlives daemon kills, stores what the machine syncs in ``workdir/backend.sqlite3`` and
    keeps its command key there; its output goes to ``workdir/backend.log``. Started, it has
    subscribed (its persistent session exists at the broker, so nothing the machine publishes
    afterwards is lost while it is paused or restarting)."""

    def __init__(self, workdir: Path, broker_port: int, host: str = "127.0.0.1") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.log_path = workdir / "backend.log"
        self.broker = f"{host}:{broker_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        seen = self.log_path.read_bytes().count(b"subscribed at") if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hil.backend",
                "serve",
                "--broker",
                self.broker,
                "--state",
                str(self.workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        proc = self.proc

        def subscribed() -> bool:
            if proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise AssertionError(f"the backend exited with {proc.returncode}:\n{tail}")
            return self.log_path.read_bytes().count(b"subscribed at") > seen

        try:
            wait_until(subscribed, START_TIMEOUT_S, "the backend's subscriptions")
        except BaseException:
            self.stop()
            raise

    def pause(self) -> None:
        """SIGSTOP: batches and results wait at the broker, no ack is sent."""
        if self.proc is not None and self.proc.poll() is None and not self.paused:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.paused:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.resume()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def journal_backlog(state_dir: Path) -> dict[str, Any]:
    """``{"journal": J, "last_seq", "acked_upto", "unacked"}`` of the journal in
    ``state_dir``, read-only (safe while the daemon runs, and after a kill)."""
    conn = open_readonly(database_path(state_dir))
    try:
        journal_id = str(conn.execute("SELECT journal_id FROM state WHERE id = 1").fetchone()[0])
        found = backlog(conn)
    finally:
        conn.close()
    return {
        "journal": journal_id,
        "last_seq": found.acked_upto + found.count,
        "acked_upto": found.acked_upto,
        "unacked": found.count,
    }


def journal_records(state_dir: Path) -> list[dict[str, Any]]:
    """Every record, read from the journal file the way an auditor would: plain SQLite."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmc",
            "journal",
            "export",
            "--format",
            "json",
            "--state-dir",
            str(state_dir),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    document = json.loads(out.stdout)
    records: list[dict[str, Any]] = document["records"]
    return records
