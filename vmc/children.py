"""Child processes the daemon starts for its embedded simulated set-up.

``config/sim.toml`` runs the machine with no hardware: the MDB simulators (``python -m hil.sim``)
and the VMC96 motor board simulator (``python -m hil.sim.vmc96``) are started as real processes
on ptys, exactly as an independent emulator would be, and stopped with the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog

from vmc.errors import VmcError

log = structlog.get_logger("vmc.children")

#: How long a simulator may take to start and publish its pty path (Python start-up on a slow
#: ARM board is the bulk of it).
CHILD_START_TIMEOUT_S = 20.0
#: How long a child gets to stop after SIGTERM before it is killed.
CHILD_STOP_TIMEOUT_S = 1.0
LINK_FILE_POLL_S = 0.05


class ChildStartError(VmcError):
    """A simulator process did not come up."""


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    port: str
    control: Path | None

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), CHILD_STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()


async def start_child(
    name: str,
    module: str,
    args: list[str],
    link_file: Path,
    control: Path | None,
    *,
    link_flag: str = "--pty-link",
) -> Child:
    """Start ``python -m module args`` and wait until it writes its pty path to ``link_file``."""
    await asyncio.to_thread(_remove, link_file)
    argv = [sys.executable, "-m", module, *args, link_flag, str(link_file)]
    if control is not None:
        argv += ["--control", str(control)]
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CHILD_START_TIMEOUT_S
    while True:
        if process.returncode is not None:
            raise ChildStartError(f"{name} simulator exited with status {process.returncode}")
        port = await asyncio.to_thread(_read_port, link_file)
        if port:
            log.info("simulator started", child=name, port=port, pid=process.pid)
            return Child(name, process, port, control)
        if loop.time() > deadline:
            process.kill()
            await process.wait()
            raise ChildStartError(
                f"{name} simulator did not start within {CHILD_START_TIMEOUT_S} s"
            )
        await asyncio.sleep(LINK_FILE_POLL_S)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _read_port(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""
