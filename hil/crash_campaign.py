"""Crash campaign: vend against the simulators under a CPU load, SIGKILL the daemon at random
instants, restart it, and check the journal record by record and against what physically
happened (the simulators' ledgers).

    python -m hil.crash_campaign [--kills 300] [--seed N] [--load N] [--workdir DIR] [--keep]

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

The work directory keeps the journal (``state/``), the daemon's output (``daemon.log``), the
simulators' output (``sims/*.log``), the exported records (``journal.json``) and the result
(``result.json``). Without ``--workdir`` it is a temporary directory that is deleted after a
run that held every invariant (unless ``--keep``) and kept, with its path printed, after a
failure. The exit status is 1 on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from hil.harness import Daemon, ExternalSims, journal_records, write_config
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


def _customer(daemon: Daemon, rng: random.Random, stop: threading.Event, out: Outcome) -> None:
    """One customer after another, until the daemon is killed under them."""
    while not stop.is_set():
        try:
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
) -> Outcome:
    """Run the campaign in ``workdir`` (created; left in place: the caller decides whether to
    delete it) under ``load`` CPU burners (None: :func:`default_load`)."""
    burners = default_load() if load is None else load
    rng = random.Random(seed)
    out = Outcome()
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    daemon: Daemon | None = None
    stop = threading.Event()
    with cpu_load(burners):
        sims = ExternalSims(workdir / "sims", slots=SLOTS, motor_args=("--turn-time", MOTOR_TURN_S))
        try:
            state = workdir / "state"
            config = write_config(
                workdir / "vmc.toml",
                state,
                mdb_port=sims.mdb_port,
                motor_port=sims.motor_port,
                slots=SLOTS,
                extra="[vend]\nmax_credit = 2000\ncredit_timeout_s = 0",
            )
            daemon = Daemon(config, state, sims)
            # First boot: the journal learns the tubes' initial fill (as corrections); stop.
            daemon.start()
            daemon.mdb_sim("coin", "set_payout_time", seconds=PAYOUT_TIME_S)
            daemon.stop()
            for n in range(kills):
                daemon.start(wait_in_service=False)
                with contextlib.suppress(AssertionError):
                    daemon.wait_state(lambda s: s["in_service"], "in service", timeout_s=20)
                stop = threading.Event()
                customer = threading.Thread(
                    target=_customer, args=(daemon, rng, stop, out), daemon=True
                )
                customer.start()
                time.sleep(rng.uniform(*KILL_WINDOW_S))
                daemon.kill()
                out.kills += 1
                stop.set()
                customer.join(30)
                if (n + 1) % 25 == 0:
                    log(f"crash campaign: {n + 1}/{kills} kills, {out.actions} customer actions")
            # The last start: recovery resolves what the last kill interrupted; then the
            # customer takes what credit is left, and the daemon stops cleanly.
            daemon.start(wait_in_service=False)
            daemon.wait_state(
                lambda s: s["phase"] == "idle" and s["devices"].get("coin") == "ready",
                "idle after the last restart",
                timeout_s=30,
            )
            with contextlib.suppress(AssertionError):
                daemon.wait_state(lambda s: s["in_service"], "in service", timeout_s=20)
            daemon.control({"op": "cancel"})
            final_state = daemon.state()["state"]
            code, _elapsed = daemon.stop()
            if code != 0:
                out.failures.append(f"the last daemon run exited {code}")
            check(out, state, sims_ledger(daemon), final_state, workdir)
        finally:
            stop.set()
            if daemon is not None:
                daemon.kill()
            sims.stop()
    out.figures["load"] = f"{burners} CPU burner(s) on {os.cpu_count()} cores"
    out.figures["seed"] = seed
    out.figures["duration_s"] = round(time.monotonic() - started)
    (workdir / "result.json").write_text(
        json.dumps({"failures": out.failures, "figures": out.figures}, indent=1) + "\n"
    )
    return out


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
) -> None:
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
        f"workdir {workdir}",
        flush=True,
    )
    started = time.monotonic()
    out = Outcome()
    try:
        out = run_campaign(
            workdir, args.kills, args.seed, log=lambda m: print(m, flush=True), load=args.load
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
