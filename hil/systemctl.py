"""A stand-in for ``systemctl``, for one Type=notify unit installed under a folder: it does what
systemd does for ``start``/``restart`` of vmc.service (run the unit's ExecStart with a
NOTIFY_SOCKET, wait for READY=1 within TimeoutStartSec, kill it otherwise), and ``stop``,
``is-active``, ``enable``, ``disable``, ``daemon-reload``. It lets tests run scripts/install,
scripts/update (with its rollback) and scripts/uninstall without systemd
(``VMC_SYSTEMCTL="python -m hil.systemctl --root DIR"``).

Paths in ExecStart are taken under the root (``/opt/vmc/...`` is ``DIR/opt/vmc/...``). The
daemon runs in a session of its own and outlives this command, as under systemd; its output
goes to ``DIR/var/log/vmc.log``; what the stand-in knows is in ``DIR/run/systemctl-standin``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from hil.notify_socket import NotifySocket

#: systemd's DefaultTimeoutStartSec, when the unit sets none.
DEFAULT_START_TIMEOUT_S = 90.0
#: systemd's DefaultTimeoutStopSec, when the unit sets none.
DEFAULT_STOP_TIMEOUT_S = 90.0
#: How often ``stop`` looks whether the process is gone.
STOP_POLL_S = 0.05
#: systemctl's exit status for "not active" (is-active) and for a failed job.
EXIT_INACTIVE = 3
EXIT_FAILED = 1


class Unit:
    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name.removesuffix(".service")
        self.file = root / "etc" / "systemd" / "system" / f"{self.name}.service"
        self.run_dir = root / "run" / "systemctl-standin"
        self.pid_file = self.run_dir / f"{self.name}.pid"
        self.state_file = self.run_dir / f"{self.name}.state"
        self.enabled_file = self.run_dir / f"{self.name}.enabled"
        self.log_file = root / "var" / "log" / f"{self.name}.log"

    def directive(self, key: str) -> str | None:
        value = None
        for line in self.file.read_text().splitlines():
            name, sep, rest = line.partition("=")
            if sep and name.strip() == key:
                value = rest.strip()
        return value

    def seconds(self, key: str, default: float) -> float:
        value = self.directive(key)
        return float(value.removesuffix("s")) if value else default

    def command(self) -> list[str]:
        exec_start = self.directive("ExecStart")
        if not exec_start:
            raise SystemExit(f"{self.file}: no ExecStart")
        return [
            str(self.root / arg.lstrip("/")) if arg.startswith("/") else arg
            for arg in shlex.split(exec_start)
        ]

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def set_state(self, state: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(state)

    def state(self) -> str:
        try:
            state = self.state_file.read_text()
        except FileNotFoundError:
            return "inactive"
        if state == "active" and self.pid() is None:
            return "failed"
        return state


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop(unit: Unit) -> int:
    pid = unit.pid()
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + unit.seconds("TimeoutStopSec", DEFAULT_STOP_TIMEOUT_S)
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(STOP_POLL_S)
        if _alive(pid):  # KillMode=mixed: SIGKILL to what is left
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    unit.pid_file.unlink(missing_ok=True)
    unit.set_state("inactive")
    return 0


def start(unit: Unit) -> int:
    if unit.pid() is not None:
        return 0
    unit.log_file.parent.mkdir(parents=True, exist_ok=True)
    unit.run_dir.mkdir(parents=True, exist_ok=True)
    notify = NotifySocket()
    try:
        env = {**os.environ, "NOTIFY_SOCKET": notify.address}
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        with unit.log_file.open("ab") as log:
            proc = subprocess.Popen(
                unit.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        unit.pid_file.write_text(str(proc.pid))
        unit.set_state("activating")
        timeout_s = unit.seconds("TimeoutStartSec", DEFAULT_START_TIMEOUT_S)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(n.fields.get("READY") == "1" for n in notify.drain(0.1)):
                unit.set_state("active")
                return 0
            if proc.poll() is not None:
                print(f"{unit.name}.service: exited with {proc.returncode} before READY=1")
                unit.set_state("failed")
                return EXIT_FAILED
        print(f"{unit.name}.service: no READY=1 within {timeout_s:g} s; killed")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        unit.set_state("failed")
        return EXIT_FAILED
    finally:
        notify.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil.systemctl")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("verb")
    parser.add_argument("units", nargs="*")
    # systemctl's options may stand after the verb too (is-active --quiet vmc.service).
    args, extra = parser.parse_known_args(argv)
    quiet = args.quiet or "--quiet" in extra or "-q" in extra
    units = [Unit(args.root, name) for name in args.units]
    if args.verb == "daemon-reload":
        return 0
    status = 0
    for unit in units:
        if args.verb == "enable":
            unit.run_dir.mkdir(parents=True, exist_ok=True)
            unit.enabled_file.touch()
        elif args.verb == "disable":
            unit.enabled_file.unlink(missing_ok=True)
        elif args.verb == "start":
            status = max(status, start(unit))
        elif args.verb == "restart":
            stop(unit)
            status = max(status, start(unit))
        elif args.verb == "stop":
            status = max(status, stop(unit))
        elif args.verb == "is-active":
            state = unit.state()
            if not quiet:
                print(state)
            status = max(status, 0 if state == "active" else EXIT_INACTIVE)
        else:
            print(f"hil.systemctl: {args.verb} is not stood in for", file=sys.stderr)
            return EXIT_FAILED
    return status


if __name__ == "__main__":
    sys.exit(main())
