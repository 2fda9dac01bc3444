"""Crash campaign: vend against the simulators under a CPU load, SIGKILL the daemon at random
instants, restart it, and check the journal record by record and against what physically
happened (the simulators' ledgers).

    python -m hil.crash_campaign [--kills 300] [--seed N] [--load N] [--cloud]
                                 [--workdir DIR] [--keep]

The simulators run as processes of the campaign, so they outlive every kill with their ledgers
(coins in and out, bills stacked, products dropped); the daemon opens their ptys as hardware.
While the daemon is up, a customer thread inserts coins and bills, selects, and asks for its
money back; a kill can land anywhere: mid-deposit, mid-escrow, mid-vend, mid-payout.

For its whole duration the campaign runs ``--load`` CPU burners (busy-loop processes; by default
one per core, at least one), because timing faults (a late POLL item in the same reply as another
event) show on a loaded machine; ``--load 0`` runs unloaded. The burners are killed at the end,
also after an error or Ctrl-C, and end by themselves if the campaign dies (they watch their
parent).

At every record, in seq order (``check_records``; the credit and levels are computed with the
journal's own ``counter_deltas``, ``level_deltas``, ``customer_credit`` and
``check_intent_step``):
* seqs are gap-free and every outcome closes an open intent of the right type;
* the customer's credit is never negative;
* a payout (``payout_intent``) for the customer never exceeds the credit not already owed by
  other open payouts, and a cash ``vend_intent`` never exceeds that credit either;
* the ``cash_out`` records of one payout never add up to more than its intent's amount, never
  take more coins of a type than the tube held when the intent was written (its ``tubes``), and
  each ``cash_out``'s ``amount`` is the worth of its ``coins``;
* no tube's coin count, as the records say, goes below zero.
Each failure names the record's seq and the numbers.

At the end, against the simulators' ledgers (``check``):
* no money taken without a record: every coin the changer credited and every bill stacked is a
  ``cash_in`` record, or was found by start-up reconciliation (a ``correction`` of the tube or
  stacker count: the coins fell before the record could be made durable);
* every coin paid out is a ``cash_out`` record or a negative tube ``correction``;
* no double vend: products dropped per slot lie between the sales recorded and the sales plus
  the vends interrupted by a kill (whose product may or may not have fallen), and never exceed
  the vend intents;
* every interrupted vend, payout and escrow was resolved: no open intent is left;
* the credit the daemon shows at the end is not negative.

With ``--cloud`` the machine also has its cloud link (../shared/contracts/cloud-mqtt.md): a
mosquitto broker (tests/mqtt_broker.py) and the stand-in backend (``python -m hil.backend
serve``) run as processes of the campaign and outlive every kill, as the simulators do; the
daemon's ``[cloud]`` has the backend's public command key (orders live 10 s, the shortest the
configuration takes; no ack for 2 s means a resend). Some customers pay by QR: they take their
credit back, ask the control socket for an order (``qr_order``), and the campaign's backend
signs the ``vend`` for it and publishes it, soon (before or after the kill, as it falls),
after the next kill (the daemon is down: the broker keeps it for its session), never (the
order is cancelled or left to expire), again as the same envelope (a redelivery, also across a
kill) or under a new cmd_id; some paid vends find the product hanging on the spiral (nothing
falls: ``vend_failed`` and a ``refund``). One round in ten outlives an order: its vend is sent
after the order expired. Each round may also pause the backend (SIGSTOP: batches and results
wait at the broker, no ack goes out; resumed before or after the kill, so kills land with
records and acks in flight), pause the broker for a moment, send a ``sync`` command or a
``remote`` vend (the static QR). After the last restart every command still waiting is sent,
the campaign waits until every command has a result at the backend and the journal is
acknowledged to its last record, and stops the daemon cleanly. Then (``check_cloud``):
* the journal's ``acked_upto`` is its last seq, and the backend's store holds one journal for
  the machine, the machine's, with every seq from 1 to the last exactly once, in seq order, no
  gap and nothing beyond, each record identical to the journal's (id, boot_id, ts, type, data,
  source): nothing missing or doubled after dedup;
* every command has at least one ``cmd/result`` and all of a cmd_id's results agree;
* every order has at most one ``sale``, or one ``vend_failed`` with its ``refund``, never
  both, and each of its vend intents is closed by one of them;
* a vend answered ok has exactly one ``sale`` naming its cmd_id; ``vend_failed``: its intent,
  ``vend_failed`` and ``refund``; ``interrupted``: its intent (if it got that far) closed as
  above; any refusal (``order_expired``, ``unknown_order``, ``invalid``, ``unavailable``, ...):
  no vend intent names it; no cmd_id is acted on twice; a vend sent after its order expired is
  never sold; a ``remote`` vend sold has its ``order`` record;
* the money: a QR record never moves the customer's cash credit (per record), and the per-slot
  products above count QR sales with the cash ones: a product per sale, never more.
The figures add records synced, duplicates the backend dropped, commands and sends, vend
results, QR orders shown and created, QR sales, failures, refunds, interrupted QR vends, the
disturbances, and the kills that landed with records unacknowledged.

The work directory keeps the journal (``state/``), the daemon's output (``daemon.log``), the
simulators' output (``sims/*.log``), with ``--cloud`` the broker's and the backend's folders
(``cloud/broker``, ``cloud/backend``: its log, its store ``backend.sqlite3``, its key) and the
campaign's timeline (``cloud/timeline.log``: starts, kills with the journal's backlog, every
command sent, disturbances, orders shown, in UTC as the daemon logs), the exported records
(``journal.json``) and the result (``result.json``). Without ``--workdir`` it is a temporary
directory that is deleted after a run that held every invariant (unless ``--keep``) and kept,
with its path printed, after a failure. The exit status is 1 on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from hil.backend.commands import CommandSigner, format_time
from hil.backend.store import BackendStore
from hil.harness import (
    BackendProcess,
    Daemon,
    ExternalSims,
    cloud_config,
    journal_backlog,
    journal_records,
    wait_until,
    write_config,
)
from vmc.journal.records import (
    IntentError,
    Record,
    check_intent_step,
    counter_deltas,
    level_deltas,
    merge_deltas,
)
from vmc.journal.recovery import customer_credit
from vmc.journal.reports import format_money

#: Coin types routed to the tubes in the simulator (0.05 .. 1.00); 2.00 goes to the cashbox,
#: where no counter can reconcile a coin that fell just before a kill, so the campaign's
#: customers do not use it (the gap is documented in docs/journal.md).
TUBE_COINS = (1, 2, 3, 4)
SLOTS = [("A1", 0, 0, 100, 500), ("A2", 0, 1, 120, 500), ("A3", 0, 2, 150, 500)]
#: Slow enough that kills often land mid-vend and mid-payout.
MOTOR_TURN_S = "0.25"
PAYOUT_TIME_S = 0.3
#: A kill lands this long after the machine is back in service (uniformly at random).
KILL_WINDOW_S = (0.05, 2.5)
#: Decimals of the simulated changer's currency, for the messages (amounts are minor units).
DECIMALS = 2
#: Payouts of the customer's credit (an operator's ``manual`` payout is not).
CUSTOMER_PAYOUTS = ("change", "refund", "lever")

#: A CPU burner: a busy loop that ends by itself once its parent (the campaign) is gone.
BURNER = (
    "import os\n"
    "parent = os.getppid()\n"
    "while os.getppid() == parent:\n"
    "    for _ in range(100_000):\n"
    "        pass\n"
)


def default_load() -> int:
    """One burner per core, at least one: on the 2-core CI machine two busy loops compete with
    the daemon, its MDB line process and the simulators for every core."""
    return max(1, os.cpu_count() or 1)


def money(amount: int) -> str:
    return format_money(amount, DECIMALS)


@dataclass
class Outcome:
    kills: int = 0
    actions: int = 0
    failures: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    # --cloud
    qr_orders: int = 0
    qr_refused: Counter[str] = field(default_factory=Counter)
    disturbances: Counter[str] = field(default_factory=Counter)
    kills_with_unacked: int = 0
    max_unacked_at_kill: int = 0


@contextlib.contextmanager
def cpu_load(burners: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Run ``burners`` busy-loop processes for the duration of the block; always kill them."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(burners):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", BURNER],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait()


# --- the cloud side (``--cloud``) --------------------------------------------------------------

MACHINE = "TEST-0001"  # hil.harness.write_config's machine id
CURRENCY = "EUR"  # the configuration's default machine.currency
#: The shortest order lifetime the configuration takes: a vend sent later finds it expired.
ORDER_TTL_S = 10
#: The daemon's ``[cloud]`` beyond the broker and the key: resend soon when no ack comes (the
#: backend is paused at times), reconnect soon after a broker pause.
CLOUD_SETTINGS: dict[str, float | int | str | bool] = {
    "order_ttl_s": ORDER_TTL_S,
    "ack_timeout_s": 2.0,
    "reconnect_max_s": 2.0,
    "keepalive_s": 30,
}
#: One round in ten (the sixth) lasts beyond an order's lifetime: its customer's vend is sent
#: after the order expired.
EXPIRY_ROUND_EVERY = 10
EXPIRY_WINDOW_S = (ORDER_TTL_S + 2.5, ORDER_TTL_S + 4.0)
#: The final phase: every command answered at the backend and every record acked, at most;
#: once the journal is acked, no new result for this long ends the wait.
SETTLE_TIMEOUT_S = 90.0
SETTLE_QUIET_S = 15.0
#: What the customer does with a QR order: the wallet pays and the backend sends ``vend`` soon
#: (before or after a kill, as it falls), after the next kill (the daemon is down: the broker
#: keeps it for the daemon's session), or never (the customer cancels or walks away).
QR_MODES = (("prompt", 0.65), ("after_kill", 0.15), ("unpaid", 0.2))
#: The share of the rounds that begin once the cloud link is up.
LINK_UP_FIRST = 0.7
#: The share of the customers who pay by QR.
QR_SHARE = 0.25
#: The share of paid QR vends whose product hangs on the spiral for two turns (the motor
#: simulator's ``missed_drops``): nothing falls, ``vend_failed`` and a ``refund``.
QR_NO_DROP = 0.12


@dataclass
class Sent:
    """A command the campaign's backend signed; sent once or more (the same envelope)."""

    cmd_id: str
    type: str
    payload: bytes
    how: str
    order_id: str | None = None
    slot: str | None = None
    price: int | None = None
    sends: int = 0
    sent_at: list[str] = field(default_factory=list)  # when each send was published (UTC)


class Cloud:
    """A mosquitto broker and the stand-in backend, processes of the campaign that outlive every
    kill, and the backend's operator: it signs commands with the backend's key and publishes
    them on ``vmc/M/cmd`` (QoS 1) after a delay or after the next kill, from a thread of its
    own. The backend stores what the machine syncs and the command results; the campaign reads
    its store at the end."""

    def __init__(self, workdir: Path) -> None:
        # The tests' broker helper (bench/sync.py uses it too): a free port, persistence in
        # its folder.
        from tests.mqtt_broker import Broker

        self.workdir = workdir
        self.broker = Broker(workdir / "broker")
        self.backend = BackendProcess(workdir / "backend", self.broker.port)
        self.client: mqtt.Client | None = None
        self.commands: dict[str, Sent] = {}
        self._infos: list[mqtt.MQTTMessageInfo] = []
        self._lock = threading.Condition()
        self._due: list[tuple[float, int, str]] = []
        self._after_kill: list[str] = []
        self._order = itertools.count()
        self._sending = 0
        self._closed = False
        self.broker_paused = False
        #: What happened when (UTC, as the daemon's log): starts, kills, sends, disturbances,
        #: orders; written to ``timeline.log`` beside the broker's and backend's folders.
        self.timeline: list[str] = []
        self._thread = threading.Thread(target=self._send_loop, name="operator", daemon=True)
        try:
            self.broker.start()
            self.backend.start()
            self.signer = CommandSigner.load_or_create(self.backend.workdir)
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="vmc-crash-operator")
            client.connect("127.0.0.1", self.broker.port, keepalive=30)
            client.loop_start()
            self.client = client
            self._thread.start()
        except BaseException:
            self.close()
            raise

    def note(self, what: str) -> None:
        with self._lock:
            self.timeline.append(f"{format_time(datetime.now(UTC))} {what}")

    def config(self) -> str:
        """The daemon's ``[cloud]`` table."""
        return cloud_config(self.broker.port, self.signer.public_key_b64, CLOUD_SETTINGS)

    def command(self, type: str, fields: dict[str, Any], how: str, **about: Any) -> Sent:
        body = self.signer.body(MACHINE, type, fields)
        payload = json.dumps(self.signer.sign(body)).encode()
        sent = Sent(str(body["cmd_id"]), type, payload, how, **about)
        with self._lock:
            self.commands[sent.cmd_id] = sent
        return sent

    def vend(self, order: dict[str, Any], how: str, origin: str = "machine") -> Sent:
        """A signed ``vend`` for ``order`` (``order_id``, ``slot``, ``price``, ``currency``)."""
        fields = {
            "order_id": order["order_id"],
            "slot": order["slot"],
            "price": order["price"],
            "currency": order["currency"],
            "origin": origin,
        }
        return self.command(
            "vend",
            fields,
            how,
            order_id=order["order_id"],
            slot=order["slot"],
            price=order["price"],
        )

    def send(self, sent: Sent, delay_s: float | None) -> None:
        """Publish ``sent`` in ``delay_s`` seconds, or after the next kill (None). Sent again,
        it is the same envelope: a redelivery."""
        with self._lock:
            if delay_s is None:
                self._after_kill.append(sent.cmd_id)
            else:
                when = time.monotonic() + delay_s
                heapq.heappush(self._due, (when, next(self._order), sent.cmd_id))
            self._lock.notify()

    def killed(self) -> None:
        """The daemon was just killed: send what waited for it."""
        with self._lock:
            for cmd_id in self._after_kill:
                heapq.heappush(self._due, (0.0, next(self._order), cmd_id))
            self._after_kill.clear()
            self._lock.notify()

    def flush(self, timeout_s: float = 30.0) -> None:
        """Send everything still waiting now; return once the broker has every command."""
        with self._lock:
            waiting = [cmd_id for _when, _n, cmd_id in self._due] + self._after_kill
            self._due = [(0.0, next(self._order), cmd_id) for cmd_id in waiting]
            self._after_kill.clear()
            self._lock.notify()

        def delivered() -> bool:
            with self._lock:
                if self._due or self._sending:
                    return False
                return all(info.is_published() for info in self._infos)

        wait_until(delivered, timeout_s, "every command published at the broker")

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed:
                    now = time.monotonic()
                    if self._due and self._due[0][0] <= now:
                        break
                    self._lock.wait(self._due[0][0] - now if self._due else None)
                if self._closed:
                    return
                _when, _n, cmd_id = heapq.heappop(self._due)
                sent = self.commands[cmd_id]
                sent.sends += 1
                sent.sent_at.append(format_time(datetime.now(UTC)))
                self.timeline.append(
                    f"{sent.sent_at[-1]} send {sent.type} {cmd_id} ({sent.how}, send "
                    f"{sent.sends}{', order ' + sent.order_id if sent.order_id else ''})"
                )
                self._sending += 1
            try:
                assert self.client is not None
                info = self.client.publish(f"vmc/{MACHINE}/cmd", sent.payload, qos=1)
            finally:
                with self._lock:
                    self._sending -= 1
            with self._lock:
                self._infos.append(info)

    def pause_broker(self) -> None:
        proc = self.broker.proc
        if proc is not None and proc.poll() is None and not self.broker_paused:
            proc.send_signal(signal.SIGSTOP)
            self.broker_paused = True

    def resume_broker(self) -> None:
        proc = self.broker.proc
        if proc is not None and self.broker_paused:
            proc.send_signal(signal.SIGCONT)
        self.broker_paused = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
            with contextlib.suppress(OSError):
                (self.workdir / "timeline.log").write_text("\n".join(self.timeline) + "\n")
        if self._thread.is_alive():
            self._thread.join(10)
        self.resume_broker()
        if self.client is not None:
            self.client.loop_stop()
            self.client.disconnect()
            self.client = None
        self.backend.stop()
        self.broker.stop()


def _link_up(state: dict[str, Any]) -> bool:
    return bool((state.get("cloud_link") or {}).get("state") == "up")


def _qr_purchase(
    daemon: Daemon,
    cloud: Cloud,
    rng: random.Random,
    stop: threading.Event,
    out: Outcome,
    late: bool,
) -> None:
    """A customer pays by QR: takes back any credit, asks for an order (retried while the link
    is not up yet or a payout is going on), and the wallet pays (the backend's ``vend``) as the
    mode says; ``late``: only after the order expired. The customer waits for the product."""
    daemon.control({"op": "cancel"})
    slot = rng.choice(SLOTS)[0]
    for _ in range(12):
        if stop.is_set():
            return
        answer = daemon.control({"op": "qr_order", "slot": slot})
        if answer.get("ok"):
            break
        out.qr_refused[str(answer.get("error"))] += 1
        time.sleep(0.2)
    else:
        return
    order: dict[str, Any] = answer["order"]
    out.qr_orders += 1
    cloud.note(f"order {order['order_id']} shown (slot {order['slot']})")
    if late:
        sent = cloud.vend(order, "late")
        cloud.send(sent, ORDER_TTL_S + rng.uniform(0.3, 1.0))
        stop.wait(ORDER_TTL_S + 1.5)
        return
    mode = rng.choices([m for m, _ in QR_MODES], [w for _, w in QR_MODES])[0]
    if mode == "after_kill":
        cloud.send(cloud.vend(order, "after_kill"), None)
        stop.wait(rng.uniform(0.5, 2.0))
    elif mode == "unpaid":
        stop.wait(rng.uniform(0.2, 1.5))
        if rng.random() < 0.5 and not stop.is_set():
            daemon.control({"op": "qr_cancel"})
    else:
        delay = rng.uniform(0.05, 1.2)
        if rng.random() < QR_NO_DROP:  # the product hangs on the spiral: vend_failed + refund
            _slot_id, row, col, *_ = next(s for s in SLOTS if s[0] == order["slot"])
            daemon.motor_sim("fault", row=row, col=col, missed_drops=2)
        sent = cloud.vend(order, "prompt")
        cloud.send(sent, delay)
        roll = rng.random()
        if roll < 0.2:  # the broker or the backend delivers the same envelope again
            cloud.send(sent, delay + rng.uniform(0.0, 2.5))
        elif roll < 0.3:  # ... after the next kill
            cloud.send(sent, None)
        elif roll < 0.4:  # the backend sends the order's vend again under a new cmd_id
            cloud.send(cloud.vend(order, "resend"), delay + rng.uniform(0.1, 2.0))
        stop.wait(delay + rng.uniform(0.5, 1.5))


def _disturbances(cloud: Cloud, rng: random.Random, window_s: float) -> list[tuple[float, str]]:
    """The cloud's part of one round, drawn up front: (seconds after the start, action).
    The backend paused (batches and results wait at the broker, no ack goes out) and resumed,
    maybe only after the kill; the broker paused for a moment (publishes and acks in flight);
    a ``sync`` command; a ``remote`` vend (the static QR)."""
    plan: list[tuple[float, str]] = []
    roll = rng.random()
    if roll < 0.35:
        at = rng.uniform(0.0, window_s * 0.6)
        plan += [(at, "pause_backend"), (at + rng.uniform(0.3, 3.0), "resume_backend")]
    elif roll < 0.5:
        at = rng.uniform(0.0, window_s)
        plan += [(at, "pause_broker"), (at + rng.uniform(0.2, 1.2), "resume_broker")]
    if rng.random() < 0.3:
        plan.append((rng.uniform(0.0, window_s), "sync"))
    if rng.random() < 0.25:
        plan.append((rng.uniform(0.0, window_s), "remote"))
    return sorted(plan)


def _disturb(cloud: Cloud, rng: random.Random, plan: list[tuple[float, str]], out: Outcome) -> None:
    """Carry ``plan`` out (in a thread; it outlives the kill until its last resume)."""
    started = time.monotonic()
    try:
        for at, action in plan:
            time.sleep(max(0.0, started + at - time.monotonic()))
            if action == "pause_backend":
                cloud.backend.pause()
            elif action == "resume_backend":
                cloud.backend.resume()
            elif action == "pause_broker":
                cloud.pause_broker()
            elif action == "resume_broker":
                cloud.resume_broker()
            elif action == "sync":
                cloud.send(cloud.command("sync", {}, "sync"), 0.0)
            elif action == "remote":
                slot_id, _row, _col, price, _stock = rng.choice(SLOTS)
                order = {
                    "order_id": uuid.uuid4().hex,
                    "slot": slot_id,
                    "price": price,
                    "currency": CURRENCY,
                }
                cloud.send(cloud.vend(order, "remote", origin="remote"), 0.0)
            out.disturbances[action] += 1
            cloud.note(action)
    finally:
        cloud.backend.resume()
        cloud.resume_broker()


def _customer(
    daemon: Daemon,
    rng: random.Random,
    stop: threading.Event,
    out: Outcome,
    cloud: Cloud | None = None,
    late_qr: bool = False,
) -> None:
    """One customer after another, until the daemon is killed under them. With ``cloud``, some
    pay by QR (the first one after its order expired when ``late_qr``)."""
    if cloud is not None and late_qr:
        with contextlib.suppress(OSError, ConnectionError, AssertionError, ValueError):
            _qr_purchase(daemon, cloud, rng, stop, out, late=True)
    while not stop.is_set():
        try:
            if cloud is not None and rng.random() < QR_SHARE:
                _qr_purchase(daemon, cloud, rng, stop, out, late=False)
                out.actions += 1
                continue
            roll = rng.random()
            if roll < 0.45:
                daemon.mdb_sim("coin", "insert", coin_type=rng.choice(TUBE_COINS))
            elif roll < 0.55:
                daemon.mdb_sim("bill", "insert", bill_type=0)
            elif roll < 0.85:
                daemon.control({"op": "select", "slot": rng.choice(SLOTS)[0]})
            else:
                daemon.control({"op": "cancel"})
            out.actions += 1
            time.sleep(rng.uniform(0.02, 0.25))
        except (OSError, ConnectionError, AssertionError, ValueError):
            time.sleep(0.05)  # the daemon is gone (killed) or refused: the kill loop restarts it


def run_campaign(
    workdir: Path,
    kills: int,
    seed: int,
    log: Callable[[str], object] = print,
    load: int | None = None,
    cloud: bool = False,
) -> Outcome:
    """Run the campaign in ``workdir`` (created; left in place: the caller decides whether to
    delete it) under ``load`` CPU burners (None: :func:`default_load`); with ``cloud``, with a
    broker, the stand-in backend and QR purchases (module docstring)."""
    burners = default_load() if load is None else load
    rng = random.Random(seed)
    out = Outcome()
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    daemon: Daemon | None = None
    link: Cloud | None = None
    stop = threading.Event()
    with cpu_load(burners):
        sims = ExternalSims(workdir / "sims", slots=SLOTS, motor_args=("--turn-time", MOTOR_TURN_S))
        try:
            state = workdir / "state"
            extra = "[vend]\nmax_credit = 2000\ncredit_timeout_s = 0"
            if cloud:
                link = Cloud(workdir / "cloud")
                extra += "\n" + link.config()
            config = write_config(
                workdir / "vmc.toml",
                state,
                mdb_port=sims.mdb_port,
                motor_port=sims.motor_port,
                slots=SLOTS,
                extra=extra,
            )
            daemon = Daemon(config, state, sims)
            # First boot: the journal learns the tubes' initial fill (as corrections); stop.
            daemon.start()
            daemon.mdb_sim("coin", "set_payout_time", seconds=PAYOUT_TIME_S)
            daemon.stop()
            for n in range(kills):
                if link is not None:
                    link.note(f"round {n + 1}: daemon start")
                daemon.start(wait_in_service=False)
                with contextlib.suppress(AssertionError):
                    daemon.wait_state(lambda s: s["in_service"], "in service", timeout_s=20)
                if link is not None:
                    # Most rounds begin once the link is up (QR is offered then; the resend
                    # of what the last kill left unacknowledged has begun); the others at
                    # once, so that kills also land while the link connects.
                    if rng.random() < LINK_UP_FIRST:
                        with contextlib.suppress(AssertionError):
                            daemon.wait_state(_link_up, "the cloud link up", timeout_s=15)
                    link.note(f"round {n + 1}: in service")
                late = link is not None and n % EXPIRY_ROUND_EVERY == EXPIRY_ROUND_EVERY // 2
                window = rng.uniform(*(EXPIRY_WINDOW_S if late else KILL_WINDOW_S))
                disturber: threading.Thread | None = None
                if link is not None:
                    plan = _disturbances(link, rng, window)
                    disturber = threading.Thread(
                        target=_disturb, args=(link, rng, plan, out), daemon=True
                    )
                    disturber.start()
                stop = threading.Event()
                customer = threading.Thread(
                    target=_customer, args=(daemon, rng, stop, out, link, late), daemon=True
                )
                customer.start()
                time.sleep(window)
                daemon.kill()
                out.kills += 1
                if link is not None:
                    link.killed()
                    at_kill = journal_backlog(state)
                    link.note(f"round {n + 1}: killed; journal {at_kill}")
                    if at_kill["unacked"]:
                        out.kills_with_unacked += 1
                        out.max_unacked_at_kill = max(out.max_unacked_at_kill, at_kill["unacked"])
                stop.set()
                customer.join(30)
                if disturber is not None:
                    disturber.join(30)
                if (n + 1) % 25 == 0:
                    log(f"crash campaign: {n + 1}/{kills} kills, {out.actions} customer actions")
            # The last start: recovery resolves what the last kill interrupted; then the
            # customer takes what credit is left, and the daemon stops cleanly.
            if link is not None:
                link.note("the last start")
            daemon.start(wait_in_service=False)
            daemon.wait_state(
                lambda s: s["phase"] == "idle" and s["devices"].get("coin") == "ready",
                "idle after the last restart",
                timeout_s=30,
            )
            with contextlib.suppress(AssertionError):
                daemon.wait_state(lambda s: s["in_service"], "in service", timeout_s=20)
            daemon.control({"op": "cancel"})
            if link is not None:
                # Every command still waiting is sent; every command answered and every record
                # acknowledged before the clean stop.
                link.flush()
                _settle(link, state, out)
            final_state = daemon.state()["state"]
            code, _elapsed = daemon.stop()
            if code != 0:
                out.failures.append(f"the last daemon run exited {code}")
            records = check(out, state, sims_ledger(daemon), final_state, workdir)
            if link is not None:
                facts = cloud_facts(link, state)
                failures, figures = check_cloud(records, facts)
                out.failures.extend(failures)
                out.figures.update(figures)
                out.figures["qr_orders_shown"] = out.qr_orders
                out.figures["qr_order_refusals"] = dict(out.qr_refused)
                out.figures["disturbances"] = dict(out.disturbances)
                out.figures["kills_with_unacked"] = out.kills_with_unacked
                out.figures["max_unacked_at_kill"] = out.max_unacked_at_kill
        finally:
            stop.set()
            if daemon is not None:
                daemon.kill()
            if link is not None:
                link.close()
            sims.stop()
    out.figures["load"] = f"{burners} CPU burner(s) on {os.cpu_count()} cores"
    out.figures["seed"] = seed
    out.figures["duration_s"] = round(time.monotonic() - started)
    (workdir / "result.json").write_text(
        json.dumps({"failures": out.failures, "figures": out.figures}, indent=1) + "\n"
    )
    return out


def _backend_store(link: Cloud) -> BackendStore:
    return BackendStore(link.backend.workdir)


def _settle(link: Cloud, state: Path, out: Outcome) -> None:
    """Wait until every command has a result at the backend and the journal is acked to its
    last record: at most ``SETTLE_TIMEOUT_S``, and no longer than ``SETTLE_QUIET_S`` once the
    journal is acked and no new result came (a lost command never gets one). What is missing
    then is named by the checks; a journal not acked is named here."""
    store = _backend_store(link)
    try:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        seen, changed = -1, time.monotonic()
        while True:
            results = store.messages(MACHINE, "cmd/result")
            answered = {str(m["payload"].get("cmd_id")) for m in results}
            backlog = journal_backlog(state)
            if len(results) != seen:
                seen, changed = len(results), time.monotonic()
            acked = backlog["unacked"] == 0
            if acked and set(link.commands) <= answered:
                return
            now = time.monotonic()
            if now > deadline or (acked and now - changed > SETTLE_QUIET_S):
                if not acked:
                    out.failures.append(
                        f"before the last stop: the journal not acked in {SETTLE_TIMEOUT_S:g} s "
                        f"({backlog})"
                    )
                return
            time.sleep(0.2)
    finally:
        store.close()


@dataclass
class CloudFacts:
    """What the cloud check reads: the journal's sync state after the last clean stop, and the
    backend's store."""

    journal: str
    last_seq: int
    acked_upto: int
    stored: list[dict[str, Any]]  # the backend's records of the machine, every journal
    journals: list[dict[str, Any]]  # the backend's journals of the machine
    results: list[dict[str, Any]]  # cmd/result payloads, in arrival order
    commands: list[Sent]


def cloud_facts(link: Cloud, state: Path) -> CloudFacts:
    backlog = journal_backlog(state)
    store = _backend_store(link)
    try:
        # The ack of the last batch may still be on its way back to the (stopped) machine;
        # the store has it once the backend stored it.
        with contextlib.suppress(AssertionError):
            wait_until(
                lambda: store.acked_upto(MACHINE, backlog["journal"]) >= backlog["last_seq"],
                10.0,
                "the backend's store",
            )
        return CloudFacts(
            journal=backlog["journal"],
            last_seq=backlog["last_seq"],
            acked_upto=backlog["acked_upto"],
            stored=store.records(MACHINE),
            journals=store.journals(MACHINE),
            results=[m["payload"] for m in store.messages(MACHINE, "cmd/result")],
            commands=list(link.commands.values()),
        )
    finally:
        store.close()


def _seqs(seqs: list[int], at_most: int = 12) -> str:
    """``[3, 4, 5, 9]`` → ``"3-5, 9"`` (the first ``at_most`` runs)."""
    runs: list[str] = []
    for _key, group in itertools.groupby(enumerate(sorted(seqs)), lambda p: p[1] - p[0]):
        items = [seq for _i, seq in group]
        runs.append(str(items[0]) if len(items) == 1 else f"{items[0]}-{items[-1]}")
    more = f", ... ({len(runs) - at_most} more runs)" if len(runs) > at_most else ""
    return ", ".join(runs[:at_most]) + more


#: The fields of a record the backend must hold exactly as the journal does.
SYNCED_FIELDS = ("id", "boot_id", "ts", "type", "data", "source")


def check_cloud(
    records: list[dict[str, Any]], facts: CloudFacts
) -> tuple[list[str], dict[str, Any]]:
    """The cloud invariants (module docstring): the backend's records against the journal's,
    every command's results, and every QR order's and vend command's outcome in the journal.
    Returns (failures, figures)."""
    failures: list[str] = []
    fail = failures.append
    journal, last = facts.journal, facts.last_seq

    # (a) The backend holds the journal, once, in order, unchanged; the journal knows it.
    if facts.acked_upto != last:
        fail(
            f"journal {journal}: acked_upto {facts.acked_upto} after the last clean stop, last "
            f"seq {last}: seqs {_seqs(list(range(facts.acked_upto + 1, last + 1)))} unacknowledged"
        )
    held = [j["journal"] for j in facts.journals]
    if held != [journal]:
        fail(f"the backend holds journals {held} of {MACHINE}; the machine's journal is {journal}")
    mine = [r for r in facts.stored if r["journal"] == journal]
    seqs = [int(r["seq"]) for r in mine]
    doubled = sorted(seq for seq, n in Counter(seqs).items() if n > 1)
    missing = sorted(set(range(1, last + 1)) - set(seqs))
    extra = sorted(set(seqs) - set(range(1, last + 1)))
    if doubled:
        fail(f"the backend holds seqs {_seqs(doubled)} of journal {journal} more than once")
    if missing:
        fail(f"the backend lacks seqs {_seqs(missing)} of journal {journal} (last seq {last})")
    if extra:
        fail(f"the backend holds seqs {_seqs(extra)} the journal does not have (last {last})")
    if seqs != sorted(seqs):
        fail(f"the backend's records of journal {journal} are not in seq order")
    by_seq = {int(r["seq"]): r for r in records}
    differ: list[str] = []
    for stored in mine:
        original = by_seq.get(int(stored["seq"]))
        if original is None:
            continue
        fields = [k for k in SYNCED_FIELDS if stored.get(k) != original.get(k)]
        if fields:
            differ.append(f"seq {stored['seq']} {original['type']}: {', '.join(fields)}")
    if differ:
        fail(f"{len(differ)} records differ at the backend: " + "; ".join(differ[:10]))
    stats = next((j for j in facts.journals if j["journal"] == journal), {})

    # (c) Every command answered, its results all the same.
    results: dict[str, list[tuple[Any, Any]]] = {}
    for result in facts.results:
        results.setdefault(str(result.get("cmd_id")), []).append(
            (result.get("ok"), result.get("error"))
        )
    sent = {c.cmd_id: c for c in facts.commands}
    strangers = sorted(set(results) - set(sent))
    if strangers:
        fail(f"results for commands never sent: {strangers[:10]}")
    first: dict[str, str | None] = {}  # cmd_id → its result's error (None: ok)
    for command in facts.commands:
        got = results.get(command.cmd_id, [])
        what = (
            f"cmd {command.cmd_id} ({command.type} {command.how}"
            + (f", order {command.order_id}" if command.order_id else "")
            + f", sent {command.sends}x)"
        )
        if not got:
            fail(f"{what}: no cmd/result (sent at {', '.join(command.sent_at) or 'never'})")
            continue
        if len(set(got)) > 1:
            fail(f"{what}: results disagree: {got}")
        ok, error = got[0]
        first[command.cmd_id] = None if ok is True else str(error)

    # (b) Every order: one sale, or one vend_failed with its refund, at most; each vend intent
    # closed by one of them. Every vend command: what its result says is in the journal.
    by_order: dict[str, dict[str, list[int]]] = {}
    intents_by_cmd: dict[str, list[int]] = {}
    sales_by_cmd: dict[str, list[int]] = {}
    created_by_cmd: dict[str, list[int]] = {}
    for r in records:
        kind, data, seq = r["type"], r["data"], int(r["seq"])
        order_id = data.get("order_id")
        if kind in ("vend_intent", "sale", "vend_failed", "refund", "order") and order_id:
            key = f"order {data.get('state')}" if kind == "order" else kind
            by_order.setdefault(str(order_id), {}).setdefault(key, []).append(seq)
        cmd_id = (r.get("source") or {}).get("cmd_id")
        if cmd_id is None:
            continue
        if kind == "vend_intent":
            intents_by_cmd.setdefault(str(cmd_id), []).append(seq)
        elif kind == "sale":
            sales_by_cmd.setdefault(str(cmd_id), []).append(seq)
        elif kind == "order" and data.get("state") == "created":
            created_by_cmd.setdefault(str(cmd_id), []).append(seq)
    for order_id, kinds in sorted(by_order.items()):
        sales, failed = kinds.get("sale", []), kinds.get("vend_failed", [])
        refunds, intents = kinds.get("refund", []), kinds.get("vend_intent", [])
        where = f"order {order_id}"
        if len(sales) > 1:
            fail(f"{where}: {len(sales)} sales (seqs {_seqs(sales)})")
        if sales and (failed or refunds):
            fail(f"{where}: sold (seq {sales[0]}) and failed/refunded (seqs {failed + refunds})")
        if len(failed) > 1 or len(refunds) != len(failed):
            fail(f"{where}: vend_failed seqs {failed}, refund seqs {refunds}")
        if len(intents) != len(sales) + len(failed):
            fail(
                f"{where}: vend intents (seqs {intents}) for {len(sales)} sale(s) and "
                f"{len(failed)} failure(s)"
            )
    codes: Counter[str] = Counter()
    interrupted_before_intent = 0
    for command in facts.commands:
        if command.type != "vend" or command.cmd_id not in first:
            continue
        code = first[command.cmd_id]
        codes[code or "ok"] += 1
        where = f"cmd {command.cmd_id} (vend {command.how}, order {command.order_id})"
        intents = intents_by_cmd.get(command.cmd_id, [])
        kinds = by_order.get(command.order_id or "", {})
        if len(intents) > 1:
            fail(f"{where}: acted on {len(intents)} times (vend intents {intents})")
        if code is None:
            sales = sales_by_cmd.get(command.cmd_id, [])
            if len(sales) != 1:
                fail(f"{where}: result ok, {len(sales)} sale(s) name it ({sales})")
        elif code == "vend_failed":
            if not (intents and kinds.get("vend_failed") and kinds.get("refund")):
                fail(f"{where}: result vend_failed, journal: intents {intents}, {kinds}")
        elif code == "interrupted":
            interrupted_before_intent += not intents
        elif intents:
            fail(f"{where}: refused ({code}) yet vend intent seq {intents} names it")
        if command.how == "late" and code is None:
            fail(f"{where}: sold although sent after the order expired")
        if command.how == "remote" and code is None and not created_by_cmd.get(command.cmd_id):
            fail(f"{where}: a remote vend sold without its order record")

    qr_sales = [r for r in records if r["type"] == "sale" and r["data"].get("method") == "qr"]
    qr_failed = [
        r for r in records if r["type"] == "vend_failed" and r["data"].get("method") == "qr"
    ]
    figures: dict[str, Any] = {
        "records_synced": len(mine),
        "duplicates_dropped_by_backend": stats.get("duplicates"),
        "acked_upto": facts.acked_upto,
        "commands": Counter(c.type for c in facts.commands),
        "command_sends": sum(c.sends for c in facts.commands),
        "redeliveries": sum(max(0, c.sends - 1) for c in facts.commands),
        "vends_by_how": Counter(c.how for c in facts.commands if c.type == "vend"),
        "vend_results": dict(codes),
        "vends_interrupted_before_intent": interrupted_before_intent,
        "qr_orders_created": dict(
            Counter(
                str(r["data"].get("origin"))
                for r in records
                if r["type"] == "order" and r["data"].get("state") == "created"
            )
        ),
        "qr_sales": len(qr_sales),
        "qr_vend_failed": len(qr_failed),
        "qr_vends_interrupted": sum(r["data"].get("reason") == "interrupted" for r in qr_failed),
        "qr_refunds": sum(1 for r in records if r["type"] == "refund"),
    }
    figures["commands"] = dict(figures["commands"])
    figures["vends_by_how"] = dict(figures["vends_by_how"])
    return failures, figures


def sims_ledger(daemon: Daemon) -> dict[str, Any]:
    ledger = daemon.mdb_ledger()
    ledger["motor"] = daemon.motor_sim("ledger")
    return ledger


@dataclass
class _Payout:
    seq: int
    amount: int
    reason: str
    tubes: dict[str, int] | None
    paid: int = 0
    coins: dict[str, int] = field(default_factory=dict)
    open: bool = True
    recovered: bool = False


@dataclass
class RecordWalk:
    """What :func:`check_records` found besides the failures."""

    failures: list[str] = field(default_factory=list)
    open_intents: dict[str, str] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    levels: dict[str, int] = field(default_factory=dict)
    payouts: int = 0
    payouts_settled: int = 0  # closed: by their final cash_out or by start-up recovery
    payouts_recovered: int = 0  # resolved by start-up recovery (which may have paid a part)

    @property
    def credit(self) -> int:
        return customer_credit(self.counters)


def _record(wire: dict[str, Any]) -> Record:
    return Record(
        seq=int(wire["seq"]),
        id=str(wire["id"]),
        boot_id=str(wire["boot_id"]),
        ts=str(wire["ts"]),
        mono_ns=0,  # not exported; not needed here
        type=str(wire["type"]),
        data=dict(wire["data"]),
        source=dict(wire["source"]),
    )


def check_records(records: list[dict[str, Any]]) -> RecordWalk:
    """Walk the journal's (wire) records in seq order and check every record (module
    docstring); the credit and levels are the journal's own rules applied record by record."""
    walk = RecordWalk()
    fail = walk.failures.append
    payouts: dict[str, _Payout] = {}
    coin_values: dict[str, int] = {}  # coin type → value, learnt from the records
    previous_seq: int | None = None
    for record in sorted((_record(r) for r in records), key=lambda r: r.seq):
        seq, kind, data = record.seq, record.type, record.data
        where = f"seq {seq} {kind}"
        if previous_seq is not None and seq != previous_seq + 1:
            fail(f"{where}: seq gap after {previous_seq}")
        previous_seq = seq
        credit_before = walk.credit
        owed_before = sum(
            p.amount - p.paid for p in payouts.values() if p.open and p.reason in CUSTOMER_PAYOUTS
        )
        try:
            check_intent_step(kind, data, walk.open_intents)
        except IntentError as exc:
            fail(f"{where}: {exc}")
        merge_deltas(walk.counters, counter_deltas(record))
        merge_deltas(walk.levels, level_deltas(record))
        intent_id = record.intent_id

        # Coin values, as the records state them (before any coin is paid out: the first
        # boot's corrections of the tubes' fill, then every coin taken in).
        if kind == "cash_in" and data["device"] == "coin":
            coin_values.setdefault(str(data["coin_type"]), data["amount"])
        elif (
            kind == "correction"
            and data["field"].startswith("tubes.")
            and data["amount"] is not None
            and data["found"] != data["expected"]
        ):
            coin_type = data["field"].split(".")[1]
            coin_values.setdefault(coin_type, data["amount"] // (data["found"] - data["expected"]))

        if kind == "payout_intent":
            payouts[data["intent_id"]] = _Payout(
                seq, data["amount"], data["reason"], data.get("tubes")
            )
            if data["reason"] in CUSTOMER_PAYOUTS and data["amount"] > credit_before - owed_before:
                fail(
                    f"{where} {data['intent_id']}: {data['reason']} of {money(data['amount'])} "
                    f"with a credit of {money(credit_before)} of which {money(owed_before)} "
                    "is already owed by open payouts"
                )
        elif kind == "vend_intent" and data["method"] == "cash":
            if data["price"] > credit_before - owed_before:
                fail(
                    f"{where} {data['intent_id']}: slot {data['slot']} at "
                    f"{money(data['price'])} with a credit of {money(credit_before)} of which "
                    f"{money(owed_before)} is owed by open payouts"
                )
        elif kind == "cash_out":
            worth = sum(n * coin_values.get(t, 0) for t, n in data["coins"].items())
            unknown = sorted(t for t in data["coins"] if t not in coin_values)
            if not unknown and worth != data["amount"]:
                fail(
                    f"{where}: amount {money(data['amount'])} but its coins {data['coins']} "
                    f"are worth {money(worth)}"
                )
            payout = payouts.get(intent_id or "")
            if intent_id is not None and payout is not None:
                payout.paid += data["amount"]
                for t, n in data["coins"].items():
                    payout.coins[t] = payout.coins.get(t, 0) + n
                if payout.paid > payout.amount:
                    fail(
                        f"{where}: {money(data['amount'])} ({data['coins']}) brings payout "
                        f"{intent_id} to {money(payout.paid)}, above its intent's "
                        f"{money(payout.amount)} ({payout.reason}, seq {payout.seq})"
                    )
                for t, n in payout.coins.items():
                    if payout.tubes is not None and n > payout.tubes.get(t, 0):
                        fail(
                            f"{where}: payout {intent_id} has paid {n} coins of type {t}, "
                            f"its tube held {payout.tubes.get(t, 0)} at its intent "
                            f"(seq {payout.seq})"
                        )
                if data.get("final"):
                    payout.open = False
        elif kind == "recovery" and intent_id is not None and intent_id in payouts:
            payouts[intent_id].open = False
            payouts[intent_id].recovered = True

        credit = walk.credit
        if data.get("method") not in (None, "cash") and credit != credit_before:
            fail(
                f"{where}: a {data['method']} record moved the customer's cash credit from "
                f"{money(credit_before)} to {money(credit)}"
            )
        if credit < 0 and (credit_before >= 0 or credit < credit_before):
            fail(
                f"{where}: customer credit {money(credit)} (was {money(credit_before)}; "
                f"{_money_fields(data)})"
            )
        for name, delta in level_deltas(record).items():
            if name.startswith("tubes.") and delta < 0 and walk.levels.get(name, 0) < 0:
                fail(f"{where}: {name} at {walk.levels[name]} by the records ({delta})")
    walk.payouts = len(payouts)
    walk.payouts_settled = sum(not p.open for p in payouts.values())
    walk.payouts_recovered = sum(p.recovered for p in payouts.values())
    return walk


def _money_fields(data: dict[str, Any]) -> str:
    shown = {
        key: money(value) if key in ("amount", "price", "paid", "change") else value
        for key, value in data.items()
        if key in ("amount", "price", "paid", "change", "reason", "intent_id", "coins", "final")
    }
    return ", ".join(f"{key} {value}" for key, value in shown.items())


def check(
    out: Outcome,
    state: Path,
    ledger: dict[str, Any],
    final: dict[str, Any],
    workdir: Path | None = None,
) -> list[dict[str, Any]]:
    """The end totals against the simulators' ledgers (module docstring); returns the
    journal's records."""
    records = journal_records(state)
    if workdir is not None:
        (workdir / "journal.json").write_text(json.dumps(records, indent=0) + "\n")
    walk = check_records(records)
    out.failures.extend(walk.failures)
    boots = 0
    cash_in = cash_out = surplus = shortfall = 0
    sales: dict[str, int] = {}
    intents: dict[str, int] = {}
    interrupted: dict[str, int] = {}
    recoveries: dict[str, int] = {}
    for r in records:
        kind, data = r["type"], r["data"]
        if kind == "boot":
            boots += 1
        elif kind == "cash_in":
            cash_in += data["amount"]
        elif kind == "cash_out" and data["reason"] in CUSTOMER_PAYOUTS:
            cash_out += data["amount"]
        elif kind == "correction" and boots > 1 and data["amount"] is not None:
            surplus += max(0, data["amount"])
            shortfall += max(0, -data["amount"])
        elif kind == "sale":
            sales[data["slot"]] = sales.get(data["slot"], 0) + 1
        elif kind == "vend_intent":
            intents[data["slot"]] = intents.get(data["slot"], 0) + 1
        elif kind == "recovery":
            recoveries[data["resolution"]] = recoveries.get(data["resolution"], 0) + 1
        elif kind == "vend_failed" and data["reason"] == "interrupted":
            interrupted[data["slot"]] = interrupted.get(data["slot"], 0) + 1

    coin, bill, motor = ledger["coin"], ledger["bill"], ledger["motor"]
    money_in = int(coin["value_in"]) + int(bill["value_stacked"])
    money_out = int(coin["value_out"])
    dropped = {slot_id: 0 for slot_id, *_ in SLOTS}
    by_position = {(row, col): slot_id for slot_id, row, col, *_ in SLOTS}
    for row, col, n in motor["dropped"]:
        dropped[by_position[(row, col)]] += n
    out.figures = {
        "kills": out.kills,
        "customer_actions": out.actions,
        "records": len(records),
        "money_in": money(money_in),
        "journal_cash_in": money(cash_in),
        "reconciled_surplus": money(surplus),
        "money_out": money(money_out),
        "journal_cash_out": money(cash_out),
        "reconciled_shortfall": money(shortfall),
        "sales": sum(sales.values()),
        "interrupted_vends": sum(interrupted.values()),
        "dropped": sum(dropped.values()),
        "payouts": walk.payouts,
        "payouts_settled": walk.payouts_settled,
        "payouts_recovered": walk.payouts_recovered,
        "journal_credit": money(walk.credit),
        "final_credit": money(final["credit"]),
        "recoveries": recoveries,
    }
    fail = out.failures.append
    if money_in != cash_in + surplus:
        fail(
            f"money in {money(money_in)} by the simulators != journal cash_in {money(cash_in)} "
            f"+ reconciled {money(surplus)}"
        )
    if money_out != cash_out + shortfall:
        fail(
            f"money out {money(money_out)} by the simulators != journal cash_out "
            f"{money(cash_out)} + reconciled {money(shortfall)}"
        )
    for slot_id, *_ in SLOTS:
        s, d, i = sales.get(slot_id, 0), dropped[slot_id], interrupted.get(slot_id, 0)
        if not s <= d <= s + i:
            fail(f"slot {slot_id}: {d} dropped, {s} sold, {i} interrupted")
        if d > intents.get(slot_id, 0):
            fail(f"slot {slot_id}: {d} dropped for {intents.get(slot_id, 0)} vend intents")
    if walk.open_intents:
        left = ", ".join(f"{k} {i}" for i, k in sorted(walk.open_intents.items()))
        fail(f"{len(walk.open_intents)} intents left open: {left}")
    if final["credit"] < 0:
        fail(f"negative credit {money(final['credit'])} at the end")
    return records


def _copy_ignoring_special(directory: str, names: list[str]) -> list[str]:
    """shutil.copytree ``ignore``: sockets, fifos and devices cannot be copied."""
    skipped = []
    for name in names:
        with contextlib.suppress(OSError):
            mode = os.lstat(os.path.join(directory, name)).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                skipped.append(name)
    return skipped


def keep_workdir(workdir: Path, name: str, root: Path | None = None) -> Path:
    """Copy a failed run's work directory (journal, logs, results) where it stays:
    ``root`` (default: $VMC_CRASH_KEEP_DIR, else the temp folder) / ``name``-<time>."""
    if root is None:
        root = Path(os.environ.get("VMC_CRASH_KEEP_DIR") or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        dest = root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.{n}"
        n += 1
    shutil.copytree(workdir, dest, symlinks=True, ignore=_copy_ignoring_special)
    return dest


def _terminate(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwind: burners, daemon and simulators are stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hil.crash_campaign",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kills", type=int, default=300, help="SIGKILLs (default 300)")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="default: the time")
    parser.add_argument(
        "--load",
        type=int,
        default=default_load(),
        help=f"CPU burner processes for the run (default {default_load()}: one per core; "
        "0: unloaded)",
    )
    parser.add_argument(
        "--cloud",
        action="store_true",
        help="with a mosquitto broker, the stand-in backend and QR purchases; kills also land "
        "during sync (the cloud invariants of this docstring)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="work here and keep it (default: a temporary directory)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory after a passing run"
    )
    args = parser.parse_args(argv)
    if args.load < 0 or args.kills < 0:
        parser.error("--kills and --load must be >= 0")
    signal.signal(signal.SIGTERM, _terminate)
    workdir: Path = args.workdir or Path(tempfile.mkdtemp(prefix="vmc-crash-"))
    print(
        f"crash campaign: {args.kills} kills, seed {args.seed}, load {args.load}, "
        f"{'cloud, ' if args.cloud else ''}workdir {workdir}",
        flush=True,
    )
    started = time.monotonic()
    out = Outcome()
    try:
        out = run_campaign(
            workdir,
            args.kills,
            args.seed,
            log=lambda m: print(m, flush=True),
            load=args.load,
            cloud=args.cloud,
        )
    except KeyboardInterrupt:
        out.failures.append("interrupted (Ctrl-C or SIGTERM)")
    except Exception:  # reported, and the work directory kept
        out.failures.append(f"the campaign stopped on an error:\n{traceback.format_exc()}")
    out.figures.setdefault("seed", args.seed)
    out.figures.setdefault("load", f"{args.load} CPU burner(s) on {os.cpu_count()} cores")
    out.figures.setdefault("duration_s", round(time.monotonic() - started))
    for name, value in out.figures.items():
        print(f"  {name:22} {value}")
    for failure in out.failures:
        print(f"FAIL: {failure}")
    if out.failures or args.workdir or args.keep:
        print(f"workdir kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print("crash campaign:", "FAILED" if out.failures else "all invariants hold")
    return 1 if out.failures else 0


if __name__ == "__main__":
    sys.exit(main())
