"""The simulated devices' physical state, kept in a file across runs (``--state FILE``).

Real hardware keeps its coins in its tubes and its bills in its stacker when the machine is
switched off or the daemon restarts; a simulator that started full every time would let a
restart hide money that moved. Each device says what is physical (``physical_state``); this
file holds ``{device name: that state}``. It is written whenever the state changes, atomically
(a temporary file, then ``os.replace``), so a reader or a SIGKILL never leaves half a file. It is
not fsynced: the simulated board has no power to lose, only a process to be killed, and the page
cache outlives that.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from hil.sim.peripheral import SimPeripheral

#: Format of the file, so a later change can tell an old file from a new one.
STATE_VERSION = 1


class SimStateFile:
    """Loads and saves the physical state of a set of simulated devices."""

    def __init__(self, path: Path | str, peripherals: list[SimPeripheral]) -> None:
        self.path = Path(path)
        self.peripherals = list(peripherals)
        self.saves = 0
        self._last: dict[str, Any] | None = None
        self._lock = threading.Lock()  # the bus thread and the control threads both save

    def load(self) -> bool:
        """Give each device its saved state; False when there is no file yet. A file that
        cannot be read raises ValueError: starting with made-up contents would hide money."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return False
        try:
            saved = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.path}: not a simulator state file: {exc}") from exc
        if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION:
            raise ValueError(f"{self.path}: not a version {STATE_VERSION} simulator state file")
        devices = saved.get("devices", {})
        if not isinstance(devices, dict):
            raise ValueError(f"{self.path}: devices is not an object")
        for device in self.peripherals:
            state = devices.get(device.NAME)
            if isinstance(state, dict):
                try:
                    device.load_physical_state(state)
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"{self.path}: {device.NAME}: {exc}") from exc
        return True

    def snapshot(self) -> dict[str, Any]:
        return {p.NAME: p.physical_state() for p in self.peripherals}

    def save_if_changed(self) -> bool:
        """Write the file when the devices' physical state differs from the last write."""
        with self._lock:
            current = self.snapshot()
            if current == self._last:
                return False
            self._write(current)
            self._last = current
            self.saves += 1
            return True

    def _write(self, devices: dict[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"version": STATE_VERSION, "devices": devices}, indent=1) + "\n")
        os.replace(tmp, self.path)
