"""The MDB line served from its own process.

This module is the daemon's side (``LineProcessMaster``); the child runs
``drivers.mdb.line_child``, which imports no asyncio (the line's process stays small).

A line thread in the daemon's process still needs the interpreter lock to read a reply and
write the ACK, and a C call on the event loop (a big ``json.dumps`` for telemetry, TLS) holds
that lock for milliseconds: the benchmark showed ACKs late by 10 ms that way. Here the line has
a process, and so a lock, of its own: the child runs the same exchange logic
(``BusMaster.exchange_blocking``: retries, RET, ACK at once, reply shapes, pcap) and the
daemon talks to it over a socket pair, from asyncio, without blocking.

When the port goes away (a ser2net bridge restarts, a USB adapter is unplugged, a simulator
stops), the child ends; the parent reports the link down to its listeners, fails requests at
once with ``LinkClosed``, and starts a new child with jittered exponential backoff until the
port opens again (mdb.md: the devices then go through their start-up again by themselves).

Frames on the socket pair: a 4-byte big-endian length, then a JSON object.
Parent → child: ``{"op": "req", "id", "pri", "ac", "d" (hex), "ma", "ex"}`` (``ex``: the reply
shape ``[ack, min, max]``), ``{"op": "cancel", "id"}``, ``{"op": "break", "id", "dur"}``,
``{"op": "ping", "id"}`` (answered ``{"id", "ok": true}`` when its turn comes in the queue,
without bus traffic: the daemon's watchdog, vmc/service.py), ``{"op": "stop"}``, and
``{"op": "autopoll", "ac", "d": "", "ex", "every_s"}``: arm a device's POLL in the line process
at that interval, or with ``"every_s": null`` and an ``id`` disarm it (answered ``{"id", "ok":
true}``); see drivers/mdb/autopoll.py.
Child → parent: ``{"op": "ready", "sched", "early"}`` (``sched``: how the line is scheduled;
``early``: ``{"bus_reset": bool, "reset": [address, ...]}`` when the child was started with
devices to start early, drivers/mdb/line_spawn.py) or ``{"op": "fatal", "msg"}`` once at start;
then per request ``{"id", "ok": true, "ac", "d", "att", "rns", "ans", "stats"}`` or ``{"id",
"ok": false, "err", "msg", "addr", "att", "stats"}``; for a break ``{"id", "ok": true,
"sent"}``; and at any time ``{"op": "log", "lvl", "name", "msg"}``: a log record of the child,
which the parent logs as its own (one log output, in the daemon's format, TRACE lines included);
and ``{"op": "polled", "ac", "ok", ..., "last_answer_ns"}``: an autopoll POLL's data reply or
error, with the fields of a request's answer, unsolicited.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drivers.errors import (
    DriverError,
    LinkClosed,
    LinkConfigError,
    MdbError,
    NakReceived,
    NoResponse,
)
from drivers.mdb.autopoll import ARM_OP, POLLED_OP, Polled
from drivers.mdb.block import address_of, command_block
from drivers.mdb.commands import ACK_OR_DATA, ReplyShape
from drivers.mdb.line_child import FRAME_HEADER, encode_frame
from drivers.mdb.line_spawn import TRACE_LEVEL, LineSettings, take_prespawned
from drivers.mdb.master import (
    BUS_RESET_BREAK_S,
    BUS_RESET_QUIET_S,
    DEFAULT_MAX_ATTEMPTS,
    REQUEST_DEADLINE_S,
    SCHED_NORMAL,
    BusStats,
    MdbBus,
    Priority,
    Reply,
    Timing,
)
from drivers.recurring import FailureLog

log = logging.getLogger("drivers.mdb.line_process")

#: Python start-up plus opening the port, on a slow ARM board.
CHILD_READY_TIMEOUT_S = 20.0
#: How long the child gets to stop after "stop" before it is killed.
CHILD_STOP_TIMEOUT_S = 1.0
#: Reopening a lost port: first wait, doubling up to the cap, each wait jittered down to half
#: (a fleet of machines behind one restarted bridge must not retry in step).
RECONNECT_FIRST_WAIT_S = 0.25
RECONNECT_MAX_WAIT_S = 5.0

#: ``callback(up, detail)``: the link came up (detail: the port) or went down (detail: why).
LinkListener = Callable[[bool, str], None]


def _rebuild_error(frame: dict[str, Any]) -> MdbError:
    kind, msg = frame.get("err"), str(frame.get("msg", ""))
    if kind == "NoResponse":
        return NoResponse(int(frame["addr"]), int(frame["att"]))
    if kind == "NakReceived":
        return NakReceived(int(frame["addr"]), int(frame["att"]))
    if kind == "LinkClosed":
        return LinkClosed(msg)
    return MdbError(f"{kind}: {msg}")


def _reply_of(frame: dict[str, Any]) -> Reply:
    return Reply(
        int(frame["ac"]),
        bytes.fromhex(frame["d"]),
        int(frame["att"]),
        int(frame["rns"]),
        int(frame["ans"]),
    )


def error_as_mdb(error: DriverError) -> MdbError:
    return error if isinstance(error, MdbError) else LinkClosed(str(error))


# --- the parent --------------------------------------------------------------------------------


class _AdoptedProcess:
    """A line process started early (``drivers.mdb.line_spawn``), seen as the asyncio process
    the master otherwise starts: its exit status, waiting for it, killing it."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.poll()

    async def wait(self) -> int:
        # Only at a stop, after "stop" was sent or with a kill to follow: the thread ends.
        return await asyncio.to_thread(self._process.wait)

    def kill(self) -> None:
        self._process.kill()


class LineProcessMaster(MdbBus):
    """``MdbBus`` whose line is served by a child process (see the module docstring)."""

    def __init__(
        self,
        kind: str,
        port: str,
        *,
        timing: Timing | None = None,
        pcap: Path | str | None = None,
        trace: bool = False,
        realtime_priority: int | None = None,
    ) -> None:
        self.kind = kind
        self.port = port
        self.timing = timing or Timing()
        self.stats = BusStats()
        self._pcap = str(pcap or "")
        self._trace = trace
        self._realtime_priority = realtime_priority
        self._proc: asyncio.subprocess.Process | _AdoptedProcess | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._link_log = FailureLog(log)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._ready: asyncio.Future[None] | None = None
        #: How the child is scheduled, as it reported once started: "normal", "SCHED_FIFO 10",
        #: or "normal (SCHED_FIFO 10 refused: ...)".
        self.scheduling = ""
        self._closed = False
        self._gone: DriverError | None = None  # why the child is gone, while it is
        self._listeners: list[LinkListener] = []
        self.link_up = False
        #: Why the link is down, or the port while it is up.
        self.link_detail = "not opened yet"
        #: Children started after a lost link (0 while the first one serves).
        self.reconnects = 0
        #: Autopoll results per device address, and the addresses armed in the child now.
        self._polled: dict[int, asyncio.Queue[Polled]] = {}
        self._armed: set[int] = set()
        #: Started before this master took the child over: the bus reset, the devices RESET.
        self.early_bus_reset = False
        self._early_reset: set[int] = set()
        #: Frames received from the line process, every child counted (an idle autopolled bus
        #: sends none).
        self.frames_received = 0

    def add_link_listener(self, listener: LinkListener) -> None:
        """``listener(up, detail)`` on every change of the link, on the event loop."""
        self._listeners.append(listener)

    def _set_link(self, up: bool, detail: str) -> None:
        if up == self.link_up and detail == self.link_detail:
            return
        self.link_up, self.link_detail = up, detail
        for listener in list(self._listeners):
            try:
                listener(up, detail)
            except Exception:  # a listener's bug must not stop the line's recovery
                log.exception("mdb link listener failed")

    async def open(self) -> None:
        """Start the child and wait until it has the port open (raises LinkConfigError)."""
        await self._start_child()

    async def _start_child(self) -> None:
        level = TRACE_LEVEL if self._trace else logging.getLogger("drivers.mdb").getEffectiveLevel()
        settings = LineSettings(
            kind=self.kind,
            port=self.port,
            slack_s=self.timing.slack_s,
            log_level=level,
            pcap=self._pcap,
            realtime_priority=self._realtime_priority,
        )
        early = None if self.reconnects else take_prespawned(settings)
        if early is not None:  # started by ``vmc run`` before the daemon's imports
            parent_sock = early.parent_sock
            self._proc = _AdoptedProcess(early.process)
        else:
            parent_sock, child_sock = socket.socketpair()
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *settings.argv(child_sock.fileno()),
                    pass_fds=(child_sock.fileno(),),
                    stdin=asyncio.subprocess.DEVNULL,
                )
            finally:
                child_sock.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=parent_sock)
        self._ready = asyncio.get_running_loop().create_future()
        self._reader_task = asyncio.create_task(self._read_replies(reader), name="mdb-line-rx")
        try:
            async with asyncio.timeout(CHILD_READY_TIMEOUT_S):
                await asyncio.shield(self._ready)
        except BaseException:
            await self._stop_child()
            raise
        self._gone = None
        self._set_link(True, self.port)

    def start(self) -> None:
        """Nothing to do: ``open`` starts the child."""

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        error: DriverError = LinkClosed("the MDB line process ended")
        try:
            while True:
                header = await reader.readexactly(FRAME_HEADER.size)
                (length,) = FRAME_HEADER.unpack(header)
                frame: dict[str, Any] = json.loads(await reader.readexactly(length))
                self.frames_received += 1
                op = frame.get("op")
                if op == "log":
                    logging.getLogger(str(frame.get("name", "drivers.mdb"))).log(
                        int(frame.get("lvl", logging.INFO)), "%s", frame.get("msg", "")
                    )
                    continue
                if op == "ready":
                    self.scheduling = str(frame.get("sched", SCHED_NORMAL))
                    self._note_early_start(frame.get("early") or {})
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_result(None)
                    continue
                if op == "fatal":
                    error = LinkConfigError(str(frame.get("msg")))
                    break
                if op == POLLED_OP:
                    self._on_polled(frame)
                    if frame.get("err") == "LinkClosed":
                        error = LinkClosed(f"the MDB port went away: {frame.get('msg', '')}")
                    continue
                if "stats" in frame:
                    self.stats = BusStats(*frame["stats"])
                if frame.get("err") == "LinkClosed":
                    error = LinkClosed(f"the MDB port went away: {frame.get('msg', '')}")
                future = self._pending.pop(int(frame["id"]), None)
                if future is not None and not future.done():
                    future.set_result(frame)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            self._gone = error
            self._fail_all(error)
            self._on_child_gone(error)

    def _note_early_start(self, started: dict[str, Any]) -> None:
        """What the child did before this master took it over (``line_spawn.EarlyDevice``)."""
        self.early_bus_reset = bool(started.get("bus_reset"))
        self._early_reset = {int(address) for address in started.get("reset", ())}
        self._armed |= self._early_reset  # their POLLs are armed in the child

    @property
    def started_early(self) -> bool:
        """The child reset the bus or a device before this master took it over: the daemon
        must not reset the bus again."""
        return self.early_bus_reset or bool(self._early_reset)

    def take_early_reset(self, address: int) -> bool:
        """Whether the child RESET the device at ``address`` before the daemon was up (its
        POLL is then armed, and its JUST RESET comes as an autopoll result). Once: a later
        start-up of the device sends its own RESET."""
        if address in self._early_reset:
            self._early_reset.discard(address)
            return True
        return False

    def _on_polled(self, frame: dict[str, Any]) -> None:
        self.stats = BusStats(*frame["stats"])
        addr_cmd = int(frame["ac"])
        address = address_of(addr_cmd)
        self._armed.discard(address)  # the child suspended it
        result: Reply | MdbError = _reply_of(frame) if frame.get("ok") else _rebuild_error(frame)
        self._polled_queue(address).put_nowait(
            Polled(addr_cmd, result, int(frame["last_answer_ns"]))
        )

    def _polled_queue(self, address: int) -> asyncio.Queue[Polled]:
        found = self._polled.get(address)
        if found is None:
            found = self._polled[address] = asyncio.Queue()
        return found

    def _on_child_gone(self, error: DriverError) -> None:
        """The child ended while it served: the link is down; reopen it with backoff."""
        if self._closed or self._ready is None or not self._ready.done():
            return  # closing, or the first start failed (``open`` raises that)
        if self._ready.exception() is not None:
            return
        self._link_log.failed("mdb link lost; reopening", port=self.port, error=str(error))
        self._set_link(False, str(error))
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.create_task(self._reconnect(), name="mdb-reconnect")

    async def _reconnect(self) -> None:
        await self._stop_child()
        wait_s = RECONNECT_FIRST_WAIT_S
        while not self._closed:
            await asyncio.sleep(random.uniform(wait_s / 2, wait_s))
            try:
                await self._start_child()
            except (DriverError, OSError) as exc:
                # The loss was said at WARNING; these repeats go at DEBUG.
                self._link_log.failed("mdb link lost; reopening", port=self.port, error=str(exc))
                self._set_link(False, f"reopening {self.port} failed: {exc}")
                wait_s = min(wait_s * 2, RECONNECT_MAX_WAIT_S)
                continue
            self.reconnects += 1
            self._link_log.recovered("mdb link back", port=self.port)
            return

    def _fail_all(self, error: DriverError) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
            # Marked as seen: when a stop cancelled the start that awaited it, nobody else will
            # (asyncio would print "Future exception was never retrieved" at exit).
            self._ready.exception()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        # An armed POLL died with the child: its device hears it as that POLL's error.
        for address in self._armed:
            failed = Polled(address, error_as_mdb(error), 0)
            self._polled_queue(address).put_nowait(failed)
        self._armed.clear()

    async def _call(self, frame: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if self._gone is not None:
            raise LinkClosed(f"the MDB link is down: {self._gone}")
        if self._closed or self._writer is None:
            raise LinkClosed("bus master is not running")
        req_id = next(self._ids)
        frame["id"] = req_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = future
        try:
            self._writer.write(encode_frame(frame))
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(future)
        except BaseException:
            if self._pending.pop(req_id, None) is not None and self._writer is not None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    self._writer.write(encode_frame({"op": "cancel", "id": req_id}))
            raise

    async def request(
        self,
        addr_cmd: int,
        data: bytes = b"",
        *,
        priority: Priority = Priority.COMMAND,
        max_attempts: int | None = None,
        expect: ReplyShape = ACK_OR_DATA,
    ) -> Reply:
        command_block(addr_cmd, data)  # raise BlockTooLong here, in the caller
        attempts = max_attempts if max_attempts is not None else DEFAULT_MAX_ATTEMPTS
        frame = {
            "op": "req",
            "pri": int(priority),
            "ac": addr_cmd,
            "d": data.hex(),
            "ma": attempts,
            "ex": expect.as_tuple(),
        }
        try:
            answer = await self._call(frame, REQUEST_DEADLINE_S)
        except TimeoutError as exc:
            raise NoResponse(address_of(addr_cmd), 0) from exc
        if not answer.get("ok"):
            raise _rebuild_error(answer)
        return _reply_of(answer)

    async def autopoll(
        self, addr_cmd: int, every_s: float | None, expect: ReplyShape = ACK_OR_DATA
    ) -> None:
        """Arm (``every_s``) or disarm (None) the POLL ``addr_cmd`` in the line process
        (drivers/mdb/autopoll.py). Arming returns at once; disarming once the child answered,
        after every earlier result of that address reached ``next_polled``."""
        address = address_of(addr_cmd)
        frame: dict[str, Any] = {
            "op": ARM_OP,
            "pri": int(Priority.RESET),
            "ac": addr_cmd,
            "d": "",
            "ex": expect.as_tuple(),
            "every_s": every_s,
        }
        if every_s is None:
            self._armed.discard(address)
            try:
                await self._call(frame, REQUEST_DEADLINE_S)
            except TimeoutError as exc:
                raise NoResponse(address, 0) from exc
            return
        if self._gone is not None:
            raise LinkClosed(f"the MDB link is down: {self._gone}")
        if self._closed or self._writer is None:
            raise LinkClosed("bus master is not running")
        self._writer.write(encode_frame(frame))
        self._armed.add(address)

    async def next_polled(self, address: int) -> Polled:
        return await self._polled_queue(address).get()

    def take_polled(self, address: int) -> Polled | None:
        queue = self._polled.get(address)
        if queue is None or queue.empty():
            return None
        return queue.get_nowait()

    async def bus_reset(self, duration_s: float = BUS_RESET_BREAK_S) -> bool:
        answer = await self._call({"op": "break", "pri": 0, "dur": duration_s}, 2.0)
        sent = bool(answer.get("sent"))
        if sent:
            await asyncio.sleep(BUS_RESET_QUIET_S)
        return sent

    async def ping(self, timeout_s: float) -> None:
        """A round trip through the line process's request queue, no bus traffic: it comes
        back only while the process runs and its line thread takes requests (raises
        TimeoutError or LinkClosed otherwise)."""
        await self._call({"op": "ping", "pri": int(Priority.RESET)}, timeout_s)

    async def _stop_child(self) -> None:
        """Ask the child to stop, kill it if it does not, and drop the socket to it."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.write(encode_frame({"op": "stop"}))
                await writer.drain()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                async with asyncio.timeout(CHILD_STOP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        task = self._reader_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
        await self._stop_child()
        self._fail_all(LinkClosed("bus master closed"))
        self.link_up = False
        self.link_detail = "closed"
