"""A real mosquitto broker for the cloud-link tests: on 127.0.0.1, a free port per run,
anonymous, persistence in the test's folder (so a restart keeps sessions and retained
messages, as a production broker does). ``scripts/test`` installs mosquitto on a fresh machine.
"""

from __future__ import annotations

import contextlib
import getpass
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto")
#: mosquitto starts in milliseconds; a loaded 2-core CI machine gets a generous bound.
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if Path(p).exists()), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


class Broker:
    """``start()``, ``stop()`` (SIGTERM: mosquitto saves its persistence file), ``kill()``,
    ``restart()`` on the same port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (scripts/test installs it)")
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "mosquitto.log"
        self.config_path = workdir / "mosquitto.conf"
        self.config_path.write_text(
            "\n".join(
                [
                    # Send small packets at once, as production brokers do (EMQX and HiveMQ
                    # default to it); mosquitto's default leaves Nagle's algorithm on.
                    "set_tcp_nodelay true",
                    f"listener {self.port} 127.0.0.1",
                    # Run as whoever runs the tests: started as root, mosquitto would switch to
                    # the user "mosquitto" and could not write its persistence file here.
                    f"user {getpass.getuser()}",
                    "allow_anonymous true",
                    "persistence true",
                    f"persistence_location {workdir}/",
                    f"log_dest file {self.log_path}",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    # Offline persistent sessions keep what was sent to them (the backend's
                    # batches while it restarts).
                    "max_queued_messages 100000",
                    "",
                ]
            )
        )

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not accepts(self.port):
            if self.proc.poll() is not None:
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {log[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not accept on port {self.port}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
