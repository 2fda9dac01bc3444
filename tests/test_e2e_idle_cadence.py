"""End to end: while nobody is at the machine its devices' idle POLLs slow to
``mdb.idle_poll_interval_ms``; as soon as a customer is (credit), each device is polled at its
own interval again, and slows once more when the customer has gone (docs/autopoll.md)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hil.harness import Daemon, call, write_config

pytestmark = pytest.mark.slow

OWN_INTERVAL_S = 0.05  # hil.harness.write_config: every device every 50 ms
IDLE_INTERVAL_MS = 400
#: How long the POLLs are counted: 24 at the device's own interval, 3 at the idle one.
WINDOW_S = 1.2
#: After a change, before counting: the POLL armed at the old interval may still go.
SETTLE_S = 0.6
COIN_100 = 4


def coin_polls(daemon: Daemon) -> int:
    status = call(daemon.mdb_control, {"cmd": "status"})
    assert status["ok"], status
    return int(status["result"]["coin"]["counters"]["polls"])


def polls_in_window(daemon: Daemon) -> int:
    time.sleep(SETTLE_S)
    before = coin_polls(daemon)
    time.sleep(WINDOW_S)
    return coin_polls(daemon) - before


def test_idle_polls_slow_down_and_a_customer_brings_them_back(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "vmc.toml",
        state,
        devices=("coin",),
        mdb_extra=f"idle_poll_interval_ms = {IDLE_INTERVAL_MS}",
    )
    at_idle = WINDOW_S / (IDLE_INTERVAL_MS / 1000) + 2
    at_own = WINDOW_S / OWN_INTERVAL_S / 2
    with Daemon(config, state).running() as daemon:
        idle = polls_in_window(daemon)
        assert idle <= at_idle, f"{idle} POLLs in {WINDOW_S} s with nobody at the machine"

        daemon.insert_coins(COIN_100)
        daemon.wait_state(lambda s: s["credit"] == 100, "the coin credited")
        busy = polls_in_window(daemon)
        assert busy >= at_own, f"{busy} POLLs in {WINDOW_S} s with a customer's credit"

        refund = daemon.control({"op": "cancel"})
        assert refund["ok"], refund
        daemon.wait_state(lambda s: s["credit"] == 0, "the credit paid back")
        again = polls_in_window(daemon)
        assert again <= at_idle, f"{again} POLLs in {WINDOW_S} s after the customer left"
