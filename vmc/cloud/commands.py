"""Signed cloud commands: verify, act once, answer exactly once (docs/commands.md).

The backend signs each command with its Ed25519 private key; the machine holds only the public
key (``cloud.command_public_key``), so nothing read out of a machine can forge a command. An
envelope ``{"body": "<JSON>", "sig": "<base64 signature of the body's UTF-8 bytes>"}`` goes
through these checks, in this order, so that nothing is read out of a body whose signature has
not verified, and nothing is acted on before every check passed:

1. size (at most 64 KiB), envelope shape → ``invalid``;
2. signature → ``bad_signature``;
3. a body decided before, byte for byte (a redelivery) → its original result again, never acted
   on twice (also once it has expired: the result of a vend that ran across an outage must
   reach the backend);
4. body JSON and field types → ``invalid``; ``machine`` → ``wrong_machine``; ``issued_at`` ≤ now
   + skew and now ≤ ``expires_at`` → ``expired``; ``expires_at`` − ``issued_at`` ≤ 300 s →
   ``invalid``;
5. ``cmd_id`` accepted before, with another body → ``replayed``;
6. known type with valid fields → ``invalid``;
7. act: the planogram (vend-cycle actor), ``sync``, or the QR orders (``vend``,
   ``cancel_order``), whose answer is the result.

Every command gets exactly one ``cmd/result`` ``{"cmd_id", "ok", "error"}`` (``cmd_id`` null
when no id could be read from the body). Results wait, durably, in ``commands.sqlite3`` in the
state directory until the link reports them published (PUBACK); the same file keeps the replay
cache (every verified body and its result, until a day after it expired). A command accepted
is marked there, durably, *before* it is acted on, so a crash can never make it run twice: a
command cut by a crash is answered ``interrupted`` at the next start. Every refusal by these
checks is journaled as a ``security`` record (reason, and the cmd_id when known; never the
payload).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import inspect
import json
import math
import re
import sqlite3
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vmc.config import Config
from vmc.journal import Journal, JournalError, Source, remote_source
from vmc.log import bind_ids, bound_ids
from vmc.planogram import MAX_PRICE, MIN_PRICE, Slot, SlotChange

log = structlog.get_logger("vmc.cloud.commands")

#: Contract: payloads are at most 64 KiB.
MAX_PAYLOAD_BYTES: Final = 64 * 1024
#: Contract: ``expires_at`` − ``issued_at`` ≤ 300 s.
MAX_VALIDITY_S: Final = 300
#: How long a decided command is remembered after it expired. The contract asks until it
#: expires; a day more keeps a replay out when the clock steps back (no RTC, a late NTP) or
#: forward and back again. A machine sees a few hundred commands a day: the file stays small.
RETAIN_AFTER_EXPIRY_S: Final = 86_400
#: Unpublished results kept at most; beyond, the oldest refusals are dropped (a flood of forged
#: commands must not fill the disk). Results of accepted commands are never dropped.
OUTBOX_MAX: Final = 1000
#: The database of the replay cache and the unpublished results, in the state directory.
COMMANDS_FILE: Final = "commands.sqlite3"
#: What a security record's detail may hold (the journal's text limit).
DETAIL_MAX: Final = 200
#: Refusals journaled one by one per window; beyond that they are counted and journaled as one
#: summary record when the window is over (at the next refusal, or when the daemon stops), so
#: junk on the command topic cannot fill the disk with records.
REFUSALS_JOURNALED_PER_WINDOW: Final = 30
REFUSAL_WINDOW_S: Final = 60.0

ED25519_SIGNATURE_BYTES: Final = 64  # RFC 8032 §5.1.6
CMD_ID_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # fits a journal record's source
ORDER_ID_RE: Final = CMD_ID_RE
SLOT_RE: Final = re.compile(r"[A-Za-z0-9]{1,8}")
TIME_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")
BASE_FIELDS: Final = frozenset({"cmd_id", "machine", "issued_at", "expires_at", "type"})

# Result codes (docs/commands.md).
BAD_SIGNATURE: Final = "bad_signature"
EXPIRED: Final = "expired"
REPLAYED: Final = "replayed"
WRONG_MACHINE: Final = "wrong_machine"
INVALID: Final = "invalid"
UNKNOWN_ORDER: Final = "unknown_order"
INTERRUPTED: Final = "interrupted"
UNAVAILABLE: Final = "unavailable"


class QrOrders(Protocol):
    """The QR payment method, as commands reach it (built against this by the QR issue).

    Each returns None when done, or a result error code (``unknown_order``, ``order_expired``,
    ``invalid``, ...). ``vend`` returns once the vend's outcome is journaled."""

    async def vend(
        self, order_id: str, slot: str, price: int, currency: str, origin: str, cmd_id: str
    ) -> str | None: ...

    async def cancel_order(self, order_id: str, cmd_id: str) -> str | None: ...


class SlotChanger(Protocol):
    """The planogram as commands change it: ``VendMachine``."""

    slots: dict[str, Slot]

    async def change_slot(self, change: SlotChange, source: Source) -> dict[str, Any]: ...


Clock = Callable[[], datetime]
SyncHook = Callable[[], Awaitable[None] | None]
#: ``dex``: publish the audit report (vmc/dex/); the result's error code or None.
DexHook = Callable[[Source], Awaitable[str | None]]


def utc_now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------------------------
# The durable part: replay cache and unpublished results


@dataclass(frozen=True)
class Decided:
    """A verified body seen before, and its result (None while it is being acted on)."""

    cmd_id: str | None
    accepted: bool
    result: dict[str, Any] | None


class CommandStore:
    """``commands.sqlite3``: every verified body decided (by its SHA-256) with its result, and
    the results not yet published. ``synchronous=FULL``: a write has reached the disk when the
    call returns. Every call runs on a worker thread, never on the event loop."""

    SCHEMA: Final = (
        "CREATE TABLE IF NOT EXISTS decided ("
        " digest TEXT PRIMARY KEY, cmd_id TEXT, accepted INTEGER NOT NULL, result TEXT,"
        " keep_until REAL NOT NULL)",
        "CREATE INDEX IF NOT EXISTS decided_accepted ON decided(cmd_id) WHERE accepted = 1",
        "CREATE TABLE IF NOT EXISTS outbox ("
        " n INTEGER PRIMARY KEY AUTOINCREMENT, cmd_id TEXT, ok INTEGER NOT NULL,"
        " result TEXT NOT NULL)",
    )

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        for statement in self.SCHEMA:
            self._conn.execute(statement)

    @classmethod
    async def open(cls, path: Path) -> CommandStore:
        return await asyncio.to_thread(cls, path)

    async def close(self) -> None:
        await asyncio.to_thread(self._conn.close)

    async def _run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        def locked() -> Any:
            with self._lock:
                return fn(self._conn)

        return await asyncio.to_thread(locked)

    @staticmethod
    def _write(conn: sqlite3.Connection, fn: Callable[[], Any]) -> Any:
        conn.execute("BEGIN IMMEDIATE")
        try:
            value = fn()
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return value

    async def start(self, now: float) -> list[tuple[int, dict[str, Any]]]:
        """At start: answer commands a crash cut while they were acted on (``interrupted``),
        drop what expired, and return the unpublished results, oldest first."""

        def start(conn: sqlite3.Connection) -> list[tuple[int, dict[str, Any]]]:
            def work() -> None:
                cut = conn.execute(
                    "SELECT digest, cmd_id FROM decided WHERE result IS NULL"
                ).fetchall()
                for digest, cmd_id in cut:
                    result = _result(cmd_id, INTERRUPTED)
                    conn.execute(
                        "UPDATE decided SET result = ? WHERE digest = ?", (_dump(result), digest)
                    )
                    conn.execute(
                        "INSERT INTO outbox (cmd_id, ok, result) VALUES (?, 0, ?)",
                        (cmd_id, _dump(result)),
                    )
                    log.error("command cut by a restart; answered interrupted", cmd_id=cmd_id)
                conn.execute("DELETE FROM decided WHERE keep_until < ?", (now,))

            self._write(conn, work)
            rows = conn.execute("SELECT n, result FROM outbox ORDER BY n").fetchall()
            return [(int(n), json.loads(text)) for n, text in rows]

        result: list[tuple[int, dict[str, Any]]] = await self._run(start)
        return result

    async def lookup(self, digest: str) -> Decided | None:
        def read(conn: sqlite3.Connection) -> Decided | None:
            row = conn.execute(
                "SELECT cmd_id, accepted, result FROM decided WHERE digest = ?", (digest,)
            ).fetchone()
            if row is None:
                return None
            return Decided(row[0], bool(row[1]), None if row[2] is None else json.loads(row[2]))

        found: Decided | None = await self._run(read)
        return found

    async def was_accepted(self, cmd_id: str) -> bool:
        def read(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM decided WHERE cmd_id = ? AND accepted = 1", (cmd_id,)
            ).fetchone()
            return row is not None

        found: bool = await self._run(read)
        return found

    async def begin(self, digest: str, cmd_id: str, keep_until: float) -> None:
        """Durably mark a command accepted, before it is acted on."""

        def write(conn: sqlite3.Connection) -> None:
            self._write(
                conn,
                lambda: conn.execute(
                    "INSERT INTO decided (digest, cmd_id, accepted, result, keep_until) "
                    "VALUES (?, ?, 1, NULL, ?)",
                    (digest, cmd_id, keep_until),
                ),
            )

        await self._run(write)

    async def queue(
        self,
        result: dict[str, Any],
        *,
        digest: str | None = None,
        accepted: bool = False,
        keep_until: float = 0.0,
    ) -> int:
        """Queue ``result`` for publishing, and with ``digest`` remember it as that body's
        result, in one transaction. Returns its outbox number."""
        text = _dump(result)

        def write(conn: sqlite3.Connection) -> int:
            def work() -> int:
                if digest is not None:
                    conn.execute(
                        "INSERT INTO decided (digest, cmd_id, accepted, result, keep_until) "
                        "VALUES (?, ?, ?, ?, ?) ON CONFLICT(digest) DO UPDATE SET "
                        "result = excluded.result",
                        (digest, result["cmd_id"], int(accepted), text, keep_until),
                    )
                cursor = conn.execute(
                    "INSERT INTO outbox (cmd_id, ok, result) VALUES (?, ?, ?)",
                    (result["cmd_id"], int(bool(result["ok"])), text),
                )
                return int(cursor.lastrowid or 0)

            number: int = self._write(conn, work)
            return number

        number: int = await self._run(write)
        return number

    async def requeue(self, result: dict[str, Any]) -> int:
        """Queue a remembered result again (a redelivery after it was published)."""
        return await self.queue(result)

    async def published(self, number: int) -> None:
        def write(conn: sqlite3.Connection) -> None:
            self._write(conn, lambda: conn.execute("DELETE FROM outbox WHERE n = ?", (number,)))

        await self._run(write)

    async def trim(self, keep: int) -> list[int]:
        """Drop the oldest refusals beyond ``keep`` unpublished results; their numbers."""

        def write(conn: sqlite3.Connection) -> list[int]:
            (count,) = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
            if count <= keep:
                return []
            rows = conn.execute(
                "SELECT n FROM outbox WHERE ok = 0 ORDER BY n LIMIT ?", (count - keep,)
            ).fetchall()
            numbers = [int(row[0]) for row in rows]
            self._write(
                conn,
                lambda: conn.executemany("DELETE FROM outbox WHERE n = ?", [(n,) for n in numbers]),
            )
            return numbers

        numbers: list[int] = await self._run(write)
        return numbers


def _dump(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _result(cmd_id: str | None, error: str | None) -> dict[str, Any]:
    return {"cmd_id": cmd_id, "ok": error is None, "error": error}


# --------------------------------------------------------------------------------------------
# Checks


class Refused(Exception):
    """A command refused by a check: the result code, a reason for the journal and log."""

    def __init__(self, code: str, reason: str, cmd_id: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.cmd_id = cmd_id


@dataclass(frozen=True)
class Command:
    """A verified, checked command."""

    cmd_id: str
    type: str
    fields: dict[str, Any]
    expires_at: datetime


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 UTC time as the contract writes them (``2026-11-22T22:40:00.123Z``)."""
    if not isinstance(value, str) or TIME_RE.fullmatch(value) is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _claimed_cmd_id(body: object) -> str | None:
    """The body's cmd_id when it is a plausible id (for results and records only)."""
    if isinstance(body, dict):
        value = body.get("cmd_id")
        if isinstance(value, str) and CMD_ID_RE.fullmatch(value):
            return value
    return None


# Per type: field name → check. A check returns None when the value is valid, else what is wrong.
FieldCheck = Callable[[object], str | None]


def _slot_id(value: object) -> str | None:
    return None if isinstance(value, str) and SLOT_RE.fullmatch(value) else "a slot id"


def _order_id(value: object) -> str | None:
    return None if isinstance(value, str) and ORDER_ID_RE.fullmatch(value) else "an order id"


def _price(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and MIN_PRICE <= value <= MAX_PRICE:
        return None
    return f"an integer price {MIN_PRICE}..{MAX_PRICE}"


def _count(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return None
    return "an integer count >= 0"


def _boolean(value: object) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _currency(value: object) -> str | None:
    return None if isinstance(value, str) and re.fullmatch(r"[A-Z]{3}", value) else "a currency"


def _origin(value: object) -> str | None:
    return None if value in ("machine", "remote") else '"machine" or "remote"'


TYPES: Final[Mapping[str, Mapping[str, FieldCheck]]] = {
    "vend": {
        "order_id": _order_id,
        "slot": _slot_id,
        "price": _price,
        "currency": _currency,
        "origin": _origin,
    },
    "cancel_order": {"order_id": _order_id},
    "set_price": {"slot": _slot_id, "price": _price, "currency": _currency},
    "set_inventory": {"slot": _slot_id, "count": _count},
    "set_slot": {"slot": _slot_id, "enabled": _boolean},
    "sync": {},
    "dex": {},
}


# --------------------------------------------------------------------------------------------
# The processor


class CommandProcessor:
    """Implements ``vmc.cloud.link.CommandSink``. Open with :meth:`open`.

    ``machine`` is the vend cycle (its slots and ``change_slot``); ``qr`` the QR payment method
    (None until it exists: ``vend`` is then refused); ``on_sync`` is called for ``sync`` (the
    link's ``request_sync``; may be set after construction); ``clock`` gives the time (UTC)."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        machine: SlotChanger,
        store: CommandStore,
        *,
        qr: QrOrders | None = None,
        on_sync: SyncHook | None = None,
        on_dex: DexHook | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.config = config
        self.journal = journal
        self.machine = machine
        self.store = store
        self.qr = qr
        self.on_sync = on_sync
        self.on_dex = on_dex
        self.clock = clock
        self.results_changed = asyncio.Event()
        self._outbox: list[tuple[int, dict[str, Any]]] = []
        self._lock = asyncio.Lock()
        self._refusals = _RefusalWindow()
        raw = config.cloud.command_public_key_bytes
        self._key = None if raw is None else Ed25519PublicKey.from_public_bytes(raw)
        if self._key is None:
            log.warning("no cloud.command_public_key: every command is refused")

    @classmethod
    async def open(
        cls,
        config: Config,
        journal: Journal,
        machine: SlotChanger,
        *,
        state_dir: Path | None = None,
        qr: QrOrders | None = None,
        on_sync: SyncHook | None = None,
        on_dex: DexHook | None = None,
        clock: Clock = utc_now,
    ) -> CommandProcessor:
        """Open ``commands.sqlite3`` in ``state_dir`` (default: beside the journal) and take
        up the results a previous run left unpublished."""
        folder = state_dir if state_dir is not None else journal.path.parent
        store = await CommandStore.open(folder / COMMANDS_FILE)
        processor = cls(
            config, journal, machine, store, qr=qr, on_sync=on_sync, on_dex=on_dex, clock=clock
        )
        processor._outbox = await store.start(clock().timestamp())
        if processor._outbox:
            log.info("unpublished command results from before", count=len(processor._outbox))
            processor.results_changed.set()
        return processor

    async def close(self) -> None:
        await self._journal_unrecorded_refusals()
        await self.store.close()

    # --- CommandSink -----------------------------------------------------------------------

    def unpublished_results(self) -> list[dict[str, Any]]:
        return [dict(result) for _n, result in self._outbox]

    async def mark_published(self, cmd_id: str | None) -> None:
        """The oldest unpublished result of ``cmd_id`` was PUBACKed. A result whose cmd_id is
        null is matched by None (or the text "None", as ``str(None)``)."""
        for number, result in self._outbox:
            if result["cmd_id"] == cmd_id or (
                result["cmd_id"] is None and cmd_id in (None, "None")
            ):
                await self.store.published(number)
                with contextlib.suppress(ValueError):
                    self._outbox.remove((number, result))
                return

    async def handle(self, payload: bytes) -> None:
        # The command's cmd_id is bound once known; it ends with the command.
        async with self._lock:
            with bound_ids():
                await self._handle(payload)

    # --- the steps ---------------------------------------------------------------------------

    async def _handle(self, payload: bytes) -> None:
        try:
            body_text, digest = self._verify(payload)
        except Refused as refused:
            await self._refuse(refused)
            return
        decided = await self.store.lookup(digest)
        if decided is not None:
            await self._redelivered(decided)
            return
        now = self.clock()
        body: object = None
        try:
            body = json.loads(body_text)
            command = self._check(body, now)
            if await self.store.was_accepted(command.cmd_id):
                raise Refused(REPLAYED, "cmd_id accepted before, with another body")
            self._check_fields(command)
        except (ValueError, RecursionError):
            not_json = Refused(INVALID, "body is not JSON")
            await self._refuse(not_json, digest=digest, keep_until=_keep_until(now, None))
            return
        except Refused as refused:
            refused.cmd_id = refused.cmd_id or _claimed_cmd_id(body)
            expires = parse_time(body.get("expires_at")) if isinstance(body, dict) else None
            await self._refuse(refused, digest=digest, keep_until=_keep_until(now, expires))
            return
        bind_ids(cmd_id=command.cmd_id)
        keep_until = _keep_until(now, command.expires_at)
        await self.store.begin(digest, command.cmd_id, keep_until)
        try:
            error = await self._act(command)
        except Refused as refused:  # refused by this processor while acting (no QR method)
            refused.cmd_id = command.cmd_id
            await self._journal_refusal(refused)
            error = refused.code
        except (JournalError, OSError) as exc:
            log.error("command could not be carried out", cmd_id=command.cmd_id, error=str(exc))
            error = UNAVAILABLE
        result = _result(command.cmd_id, error)
        await self._queue(result, digest=digest, accepted=True, keep_until=keep_until)
        log.info("command done", cmd_id=command.cmd_id, type=command.type, error=error)

    def _verify(self, payload: bytes) -> tuple[str, str]:
        """Size, envelope, signature: the verified body text and its SHA-256."""
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise Refused(INVALID, f"payload of {len(payload)} bytes, over {MAX_PAYLOAD_BYTES}")
        try:
            envelope = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise Refused(INVALID, "envelope is not UTF-8 JSON") from None
        if (
            not isinstance(envelope, dict)
            or set(envelope) != {"body", "sig"}
            or not isinstance(envelope["body"], str)
            or not isinstance(envelope["sig"], str)
        ):
            raise Refused(INVALID, 'envelope is not {"body": string, "sig": string}')
        body_text: str = envelope["body"]
        claimed = None
        with contextlib.suppress(ValueError, RecursionError):
            claimed = _claimed_cmd_id(json.loads(body_text))
        if self._key is None:
            raise Refused(BAD_SIGNATURE, "no command_public_key configured", claimed)
        try:
            sig = base64.b64decode(envelope["sig"], validate=True)
            body_bytes = body_text.encode("utf-8")
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise Refused(BAD_SIGNATURE, "signature is not base64", claimed) from None
        if len(sig) != ED25519_SIGNATURE_BYTES:
            raise Refused(BAD_SIGNATURE, f"signature of {len(sig)} bytes", claimed)
        try:
            self._key.verify(sig, body_bytes)
        except InvalidSignature:
            raise Refused(BAD_SIGNATURE, "signature does not verify", claimed) from None
        return body_text, hashlib.sha256(body_bytes).hexdigest()

    def _check(self, body: object, now: datetime) -> Command:
        """Field types, machine, times and validity window."""
        if not isinstance(body, dict):
            raise Refused(INVALID, "body is not a JSON object")
        cmd_id = body.get("cmd_id")
        if not isinstance(cmd_id, str) or CMD_ID_RE.fullmatch(cmd_id) is None:
            raise Refused(INVALID, "cmd_id is not 1 to 64 characters [A-Za-z0-9_.:-]")
        machine, kind = body.get("machine"), body.get("type")
        if not isinstance(machine, str) or not isinstance(kind, str):
            raise Refused(INVALID, "machine and type must be strings", cmd_id)
        issued, expires = parse_time(body.get("issued_at")), parse_time(body.get("expires_at"))
        if issued is None or expires is None:
            raise Refused(INVALID, "issued_at and expires_at must be RFC 3339 UTC times", cmd_id)
        if machine != self.config.machine.id:
            raise Refused(WRONG_MACHINE, f"for machine {machine[:64]!r}", cmd_id)
        skew = timedelta(seconds=self.config.cloud.command_skew_s)
        if issued > now + skew:
            raise Refused(EXPIRED, f"issued {_ts(issued)}, in the future (now {_ts(now)})", cmd_id)
        if now > expires:
            raise Refused(EXPIRED, f"expired {_ts(expires)} (now {_ts(now)})", cmd_id)
        if (expires - issued).total_seconds() > MAX_VALIDITY_S:
            raise Refused(INVALID, f"valid for more than {MAX_VALIDITY_S} s", cmd_id)
        fields = {k: v for k, v in body.items() if k not in BASE_FIELDS}
        return Command(cmd_id, kind, fields, expires)

    def _check_fields(self, command: Command) -> None:
        """Known type, every field present and valid, no other field."""
        spec = TYPES.get(command.type)
        if spec is None:
            raise Refused(INVALID, f"unknown type {command.type[:40]!r}", command.cmd_id)
        for name in command.fields:
            if name not in spec:
                raise Refused(INVALID, f"{command.type} has no field {name[:40]!r}")
        for name, check in spec.items():
            if name not in command.fields:
                raise Refused(INVALID, f"{command.type}.{name} missing")
            wrong = check(command.fields[name])
            if wrong is not None:
                raise Refused(INVALID, f"{command.type}.{name}: expected {wrong}")
        fields = command.fields
        currency = self.config.machine.currency
        if "currency" in fields and fields["currency"] != currency:
            raise Refused(INVALID, f"currency {fields['currency']}, the machine's is {currency}")
        if command.type.startswith("set_"):
            slot = self.machine.slots.get(fields["slot"])
            if slot is None:
                raise Refused(INVALID, f"no slot {fields['slot']!r}")
            if command.type == "set_inventory" and fields["count"] > slot.capacity:
                raise Refused(INVALID, f"count {fields['count']} over capacity {slot.capacity}")
        if command.type == "dex" and self.on_dex is None:
            raise Refused(INVALID, "no audit report on this machine")

    async def _act(self, command: Command) -> str | None:
        """Carry out an accepted command; its result's error code or None."""
        fields, source = command.fields, remote_source(command.cmd_id)
        match command.type:
            case "set_price":
                change = SlotChange(fields["slot"], price=fields["price"])
            case "set_inventory":
                change = SlotChange(fields["slot"], stock=fields["count"])
            case "set_slot":
                change = SlotChange(fields["slot"], enabled=fields["enabled"])
            case "sync":
                if self.on_sync is not None:
                    done = self.on_sync()
                    if inspect.isawaitable(done):
                        await done
                return None
            case "dex":
                assert self.on_dex is not None  # _check_fields refused it otherwise
                return await self.on_dex(source)
            case "vend":
                if self.qr is None:
                    if fields["origin"] == "remote":
                        log.warning("vend refused: QR selling is not available on this machine")
                        raise Refused(INVALID, "QR selling is not available")
                    raise Refused(UNKNOWN_ORDER, "no QR orders on this machine")
                return await self.qr.vend(
                    fields["order_id"],
                    fields["slot"],
                    fields["price"],
                    fields["currency"],
                    fields["origin"],
                    command.cmd_id,
                )
            case "cancel_order":
                if self.qr is None:
                    raise Refused(UNKNOWN_ORDER, "no QR orders on this machine")
                return await self.qr.cancel_order(fields["order_id"], command.cmd_id)
            case _:  # _check_fields lets only the types above through
                raise Refused(INVALID, f"unknown type {command.type!r}")
        answer = await self.machine.change_slot(change, source)
        if answer.get("ok"):
            return None
        code = str(answer.get("error"))
        log.warning("planogram change refused", cmd_id=command.cmd_id, error=code)
        # The checks above make the machine's own refusals (unknown slot, a value out of range)
        # unreachable; what is left is a record that could not be written.
        return INVALID if code in (INVALID, "unknown_slot") else UNAVAILABLE

    async def _redelivered(self, decided: Decided) -> None:
        """The same verified body again: its original result, never a second action."""
        if decided.result is None:
            log.info("command delivered again while it is carried out", cmd_id=decided.cmd_id)
            return
        waiting = any(result == decided.result for _n, result in self._outbox)
        log.info("command delivered again; original result", cmd_id=decided.cmd_id)
        if not waiting:
            number = await self.store.requeue(decided.result)
            self._outbox.append((number, decided.result))
            self.results_changed.set()

    async def _refuse(
        self, refused: Refused, *, digest: str | None = None, keep_until: float = 0.0
    ) -> None:
        await self._journal_refusal(refused)
        result = _result(refused.cmd_id, refused.code)
        await self._queue(result, digest=digest, keep_until=keep_until)

    async def _journal_refusal(self, refused: Refused) -> None:
        now = self.clock().timestamp()
        if now - self._refusals.started >= REFUSAL_WINDOW_S or now < self._refusals.started:
            await self._journal_unrecorded_refusals()
            self._refusals = _RefusalWindow(started=now)
        window = self._refusals
        window.count += 1
        if window.count > REFUSALS_JOURNALED_PER_WINDOW:
            window.unrecorded[refused.code] += 1
            if sum(window.unrecorded.values()) == 1:
                log.warning(
                    "commands refused in a flood: counted, journaled as one record",
                    per_window=REFUSALS_JOURNALED_PER_WINDOW,
                    window_s=REFUSAL_WINDOW_S,
                )
            log.debug("command refused", code=refused.code, cmd_id=refused.cmd_id)
            return
        log.warning(
            "command refused", code=refused.code, reason=refused.reason, cmd_id=refused.cmd_id
        )
        data: dict[str, Any] = {
            "what": "command refused",
            "detail": f"{refused.code}: {refused.reason}"[:DETAIL_MAX],
            "code": refused.code,
        }
        if refused.cmd_id is not None:
            data["cmd_id"] = refused.cmd_id
        await self._journal_security(data)

    async def _journal_unrecorded_refusals(self) -> None:
        """The summary of a flood's window: how many refusals of each code were only counted."""
        unrecorded = self._refusals.unrecorded
        if not unrecorded:
            return
        total = sum(unrecorded.values())
        codes = ", ".join(f"{code} {n}" for code, n in sorted(unrecorded.items()))
        self._refusals.unrecorded = Counter()
        await self._journal_security(
            {
                "what": "commands refused",
                "detail": f"{total} more refused within {REFUSAL_WINDOW_S:g} s, "
                f"counted only: {codes}"[:DETAIL_MAX],
            }
        )

    async def _journal_security(self, data: dict[str, Any]) -> None:
        try:
            await self.journal.append("security", data)
        except JournalError as exc:
            log.error("security record not written", error=str(exc))

    async def _queue(
        self,
        result: dict[str, Any],
        *,
        digest: str | None,
        accepted: bool = False,
        keep_until: float = 0.0,
    ) -> None:
        number = await self.store.queue(
            result, digest=digest, accepted=accepted, keep_until=keep_until
        )
        self._outbox.append((number, result))
        if len(self._outbox) > OUTBOX_MAX:
            dropped = set(await self.store.trim(OUTBOX_MAX))
            self._outbox = [(n, r) for n, r in self._outbox if n not in dropped]
            log.warning("command results dropped: too many unpublished", dropped=len(dropped))
        self.results_changed.set()


@dataclass
class _RefusalWindow:
    """Refusals counted since ``started`` (wall seconds), and those not journaled one by one."""

    started: float = -math.inf
    count: int = 0
    unrecorded: Counter[str] = field(default_factory=Counter)


def _keep_until(now: datetime, expires: datetime | None) -> float:
    until = max(now, expires) if expires is not None else now
    return until.timestamp() + RETAIN_AFTER_EXPIRY_S


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
