"""``./scripts/run-sim``, the embedded default, shows the whole mission: the simulated machine
with a local mosquitto and the stand-in backend (auto-confirming QR orders): a QR sale through
the control socket, a remote price change from the backend's command line, the sale synced to
the backend; SIGTERM stops everything it started. ``--cash-only`` runs without a broker."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hil.backend.store import BackendStore
from hil.harness import call, wait_until
from tests.mqtt_broker import mosquitto_binary

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RUN_SIM = ROOT / "scripts" / "run-sim"
START_S = 40.0
WAIT_S = 30.0


def group_members(pgid: int) -> list[str]:
    """The processes left in a process group: ``pid command`` each."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(f"{entry.name} {cmdline.strip()}")
    return found


class RunSim:
    def __init__(self, workdir: Path, *args: str) -> None:
        self.state = workdir / "state"
        self.log_path = workdir / "run-sim.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [str(RUN_SIM), "--state", str(self.state), *args],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: what is left of it is findable
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        return call(self.state / "control.sock", request)

    def state_of(self) -> dict[str, Any]:
        answer = self.control({"op": "state"})
        assert answer["ok"], answer
        state: dict[str, Any] = answer["state"]
        return state

    def wait_state(self, predicate: Any, what: str, timeout_s: float = WAIT_S) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def check() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"run-sim exited with {self.proc.returncode}:\n{self.log()}")
            seen.clear()
            seen.update(self.state_of())
            return bool(predicate(seen))

        try:
            wait_until(check, timeout_s, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last state: {seen}\n{self.log()[-3000:]}") from None
        return seen

    def backend(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """``python -m hil.backend --state STATE/backend ARGV`` as an operator types it."""
        return subprocess.run(
            [sys.executable, "-m", "hil.backend", "--state", str(self.state / "backend"), *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stop(self) -> int:
        """SIGTERM, as systemd or a terminal's kill does; then nothing of it may be left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"run-sim did not stop on SIGTERM:\n{self.log()}") from None
        return code

    def kill(self) -> None:
        """SIGKILL whatever is left of its process group (a failed test)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def run_sim() -> Iterator[list[RunSim]]:
    started: list[RunSim] = []
    yield started
    for sim in started:  # a failed test leaves nothing running either
        if sim.proc.poll() is None or group_members(sim.proc.pid):
            sim.kill()


def venv_installed() -> bool:
    """Whether .venv holds an install for this pyproject.toml (run-sim's or scripts/test's)."""
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    stamps = (ROOT / ".venv" / ".vmc-installed-run", ROOT / ".venv" / ".vmc-installed-test")
    return any(p.exists() and p.read_text().strip() == want for p in stamps)


def slot(state: dict[str, Any], slot_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in state["slots"] if s["slot"] == slot_id)
    return found


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_run_sim_shows_a_qr_sale_a_remote_price_change_and_the_sync(
    tmp_path: Path, run_sim: list[RunSim]
) -> None:
    installed = venv_installed()
    sim = RunSim(tmp_path, "--confirm-delay", "1")
    run_sim.append(sim)
    wait_until(lambda: sim.state_of() is not None, START_S, "the daemon's control socket")
    state = sim.wait_state(
        lambda s: (
            (s.get("cloud_link") or {}).get("state") == "up"
            and (s.get("qr") or {}).get("available") is True
            and s["in_service"]
        ),
        "the cloud link up and QR offered",
        START_S,
    )
    if installed:
        assert "installing" not in sim.log(), "the venv was there: nothing to install"
    stock = slot(state, "A1")["stock"]
    # A QR sale: the screen asks for an order; the backend's "wallet" pays it a second later.
    shown = sim.control({"op": "qr_order", "slot": "A1"})
    assert shown["ok"] is True, shown
    order_id = shown["order"]["order_id"]
    sim.wait_state(
        lambda s: slot(s, "A1")["stock"] == stock - 1 and (s.get("qr") or {}).get("order") is None,
        "the QR order paid and vended",
    )
    # A remote price change from the backend's command line (the broker from its settings).
    changed = sim.backend("set-price", "A1", "130")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout.splitlines()[-1])["result"]["ok"] is True
    assert slot(sim.state_of(), "A1")["price"] == 130

    # The backend stored the sale (journal sync) and shows the order sold.
    def sale_stored() -> bool:
        store = BackendStore(sim.state / "backend")
        try:
            sales = store.records(types=["sale"])
        finally:
            store.close()
        return any(r["data"].get("order_id") == order_id for r in sales)

    wait_until(sale_stored, WAIT_S, "the QR sale at the backend")
    orders = [json.loads(line) for line in sim.backend("orders").stdout.splitlines()]
    assert [(o["order_id"], o["state"]) for o in orders] == [(order_id, "sold")]
    sales = json.loads(sim.backend("sales").stdout)
    assert sales["slots"]["A1"] == {"count": 1, "amount": 100}

    pgid = sim.proc.pid
    assert any("mosquitto" in p for p in group_members(pgid))
    assert any("hil.backend" in p for p in group_members(pgid))
    assert any("hil.sim" in p for p in group_members(pgid))
    sim.stop()
    wait_until(lambda: not group_members(pgid), 10, "nothing left running")


def test_run_sim_cash_only_needs_no_broker(tmp_path: Path, run_sim: list[RunSim]) -> None:
    sim = RunSim(tmp_path, "--cash-only")
    run_sim.append(sim)
    wait_until(lambda: sim.state_of() is not None, START_S, "the daemon's control socket")
    state = sim.wait_state(lambda s: s["in_service"], "in service", START_S)
    assert state.get("cloud_link") is None
    assert not (state.get("qr") or {}).get("available")
    pgid = sim.proc.pid
    assert not any("mosquitto" in p or "hil.backend" in p for p in group_members(pgid))
    assert not (sim.state / "mosquitto").exists()
    sim.stop()
    wait_until(lambda: not group_members(pgid), 10, "nothing left running")
