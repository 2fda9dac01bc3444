"""The MDB line process's own side: what ``python -m drivers.mdb.line_child`` runs.

``drivers.mdb.line_process.LineProcessMaster`` (the daemon's side) starts this module as a
process of its own and talks to it over a socket pair; that module's docstring describes the
frames. This side imports no asyncio and nothing of the daemon's: the line's process holds only
what serving the line needs, for its memory and its start-up time (bench/footprint.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import queue
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from drivers.errors import DriverError, LinkClosed, MdbError
from drivers.mdb.autopoll import ARM_OP, POLLED_OP, AutopollSchedule, Polled
from drivers.mdb.commands import ACK_ONLY, ACK_OR_DATA, ReplyShape
from drivers.mdb.line_spawn import EarlyDevice
from drivers.mdb.link import open_link
from drivers.mdb.master import (
    BUS_RESET_BREAK_S,
    BUS_RESET_QUIET_S,
    DEFAULT_MAX_ATTEMPTS,
    SCHED_NORMAL,
    BusMaster,
    BusStats,
    Reply,
    Timing,
    set_realtime_priority,
)
from drivers.mdb.pcap import PcapWriter

FRAME_HEADER = struct.Struct(">I")
#: Largest frame either side accepts (a request or reply is a few hundred bytes).
MAX_FRAME_BYTES = 64 * 1024
#: ``BusStats`` travels as a tuple of its fields in this order (``BusStats(*stats)`` rebuilds
#: it). Not ``dataclasses.astuple``: it deep-copies every field, which cost more than
#: the rest of a reply frame together (bench/footprint.py).
STATS_FIELDS = tuple(field.name for field in dataclasses.fields(BusStats))


def stats_tuple(stats: BusStats) -> tuple[int, ...]:
    return tuple(getattr(stats, name) for name in STATS_FIELDS)


def encode_frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return FRAME_HEADER.pack(len(body)) + body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    (length,) = FRAME_HEADER.unpack(_recv_exact(sock, FRAME_HEADER.size))
    if length > MAX_FRAME_BYTES:
        raise EOFError
    obj: dict[str, Any] = json.loads(_recv_exact(sock, length))
    return obj


def error_frame(req_id: int, exc: MdbError, stats: BusStats) -> dict[str, Any]:
    return {
        "id": req_id,
        "ok": False,
        "err": type(exc).__name__,
        "msg": str(exc),
        "addr": getattr(exc, "address", 0),
        "att": getattr(exc, "attempts", 0),
        "stats": stats_tuple(stats),
    }


def reply_frame(req_id: int, reply: Reply, stats: BusStats) -> dict[str, Any]:
    return {
        "id": req_id,
        "ok": True,
        "ac": reply.addr_cmd,
        "d": reply.data.hex(),
        "att": reply.attempts,
        "rns": reply.reply_ns,
        "ans": reply.ack_ns,
        "stats": stats_tuple(stats),
    }


def polled_frame(polled: Polled, stats: BusStats) -> dict[str, Any]:
    """An autopoll result for the parent (drivers/mdb/autopoll.py): a reply's or an error's
    fields, without a request id, with the address's last answer."""
    result = polled.result
    if isinstance(result, Reply):
        frame = reply_frame(0, result, stats)
    else:
        frame = error_frame(0, result, stats)
    del frame["id"]
    frame["op"] = POLLED_OP
    frame["ac"] = polled.addr_cmd
    frame["last_answer_ns"] = polled.last_answer_ns
    return frame


def serve(
    sock: socket.socket,
    kind: str,
    port: str,
    timing: Timing,
    pcap: str,
    scheduling: str = SCHED_NORMAL,
    early: tuple[EarlyDevice, ...] = (),
) -> int:
    """The child's body: open the link, start the ``early`` devices up, then answer requests
    until "stop" or EOF."""
    write_lock = threading.Lock()

    def send(obj: dict[str, Any]) -> None:
        with write_lock:
            sock.sendall(encode_frame(obj))

    logging.getLogger().addHandler(_ParentLogHandler(send))

    try:
        link = open_link(kind, port)
    except DriverError as exc:
        send({"op": "fatal", "msg": str(exc)})
        return 2
    engine = BusMaster(link, timing=timing, pcap=PcapWriter(pcap) if pcap else None)
    jobs: queue.PriorityQueue[tuple[int, int, dict[str, Any]]] = queue.PriorityQueue()
    cancelled: set[int] = set()
    order = itertools.count()

    def read_requests() -> None:
        try:
            while True:
                frame = recv_frame(sock)
                if frame.get("op") == "cancel":
                    cancelled.add(int(frame["id"]))
                    continue
                priority = -1 if frame.get("op") == "stop" else int(frame.get("pri", 2))
                jobs.put((priority, next(order), frame))
                if frame.get("op") == "stop":
                    return
        except (EOFError, OSError, ValueError):
            jobs.put((-1, next(order), {"op": "stop"}))

    threading.Thread(target=read_requests, name="mdb-line-requests", daemon=True).start()
    autopolls = AutopollSchedule()
    started = start_early(engine, early, autopolls)
    send({"op": "ready", "sched": scheduling, "early": started})
    try:
        while True:
            # The parent's requests first; an armed POLL only when none waits (lowest priority).
            wait_s = autopolls.wait_s(time.monotonic())
            try:
                if wait_s is None:
                    _priority, _n, frame = jobs.get()
                elif wait_s <= 0:
                    _priority, _n, frame = jobs.get_nowait()
                else:
                    _priority, _n, frame = jobs.get(timeout=wait_s)
            except queue.Empty:
                polled = autopolls.poll_due(engine, time.monotonic())
                if polled is not None:
                    send(polled_frame(polled, engine.stats))
                    if isinstance(polled.result, LinkClosed):
                        return 1
                continue
            op = frame.get("op")
            if op == "stop":
                return 0
            if op == ARM_OP:
                # Never skipped as cancelled: a disarm the parent gave up waiting for must
                # still hand the address's POLLs back to it.
                serve_arm(frame, autopolls, send)
                continue
            req_id = int(frame["id"])
            if req_id in cancelled:
                cancelled.discard(req_id)
                continue
            if op == "ping":
                send({"id": req_id, "ok": True})
                continue
            if op == "break":
                sent = engine.bus_reset_blocking(float(frame["dur"]))
                send({"id": req_id, "ok": True, "sent": sent})
                continue
            try:
                shape = frame.get("ex")
                expect = ReplyShape(*shape) if shape else ACK_OR_DATA
                reply = engine.exchange_blocking(
                    int(frame["ac"]), bytes.fromhex(frame["d"]), int(frame["ma"]), expect
                )
            except MdbError as exc:
                send(error_frame(req_id, exc, engine.stats))
                if isinstance(exc, LinkClosed):
                    return 1
                continue
            send(reply_frame(req_id, reply, engine.stats))
    except OSError:
        return 1
    finally:
        link.close()
        if engine.pcap is not None:
            engine.pcap.close()


def start_early(
    engine: BusMaster, devices: tuple[EarlyDevice, ...], autopolls: AutopollSchedule
) -> dict[str, Any]:
    """Start ``devices`` up as far as their JUST RESET while the daemon imports
    (drivers/mdb/line_spawn.py): the bus reset (BREAK, then MDB 4.2's quiet time) where the
    link carries one, each device's RESET, then its POLL armed at its interval. Its first
    answer that is not a bare ACK (JUST RESET) waits for the daemon as an autopoll result.
    Returns what the daemon goes on from: whether the BREAK went out, and the addresses whose
    RESET was ACKed. A device that did not ACK is left to the daemon's own start-up."""
    if not devices:
        return {}
    bus_reset = engine.bus_reset_blocking(BUS_RESET_BREAK_S)
    if bus_reset:
        time.sleep(BUS_RESET_QUIET_S)
    reset: list[int] = []
    for device in devices:
        try:
            engine.exchange_blocking(device.address, b"", DEFAULT_MAX_ATTEMPTS, ACK_ONLY)
        except MdbError:
            continue
        reset.append(device.address)
        autopolls.arm(
            device.address | device.poll_cmd, ACK_OR_DATA, device.every_s, time.monotonic()
        )
    return {"bus_reset": bus_reset, "reset": reset}


def serve_arm(
    frame: dict[str, Any], autopolls: AutopollSchedule, send: Callable[[dict[str, Any]], None]
) -> None:
    """Arm (``every_s`` a number) or disarm (``every_s`` null) one device's POLL. A disarm is
    answered: it runs in the line thread, so no autopoll POLL is in flight once it is, and
    every result before it went to the parent before its answer."""
    addr_cmd = int(frame["ac"])
    every_s = frame.get("every_s")
    if every_s is None:
        autopolls.disarm(addr_cmd)
        send({"id": int(frame["id"]), "ok": True})
        return
    shape = frame.get("ex")
    expect = ReplyShape(*shape) if shape else ACK_OR_DATA
    autopolls.arm(addr_cmd, expect, float(every_s), time.monotonic())


class _ParentLogHandler(logging.Handler):
    """Hands the child's log records to the parent, which logs them as its own."""

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            self._send({"op": "log", "lvl": record.levelno, "name": record.name, "msg": message})
        except Exception:  # the parent is gone: nowhere to log to
            self.handleError(record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drivers.mdb.line_child")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--kind", required=True)
    parser.add_argument("--port", required=True)
    parser.add_argument("--slack-s", type=float, default=Timing().slack_s)
    parser.add_argument("--pcap", default="")
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    parser.add_argument("--realtime-priority", type=int)
    parser.add_argument(
        "--early",
        action="append",
        default=[],
        type=EarlyDevice.from_arg,
        help="ADDRESS:POLL_CMD:EVERY_S of a device to RESET and POLL before the daemon is up",
    )
    args = parser.parse_args(argv)
    # The parent decides when the line stops ("stop", or EOF when it dies). A Ctrl-C in the
    # terminal or systemd's SIGTERM to the whole unit must not cut the line under the parent's
    # orderly shutdown.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)
    # Records go to the parent over the socket (``_ParentLogHandler``, added in ``serve``);
    # nothing is printed here, so the daemon's log stays one format.
    logging.getLogger().setLevel(args.log_level)
    scheduling = SCHED_NORMAL
    if args.realtime_priority:
        scheduling = set_realtime_priority(args.realtime_priority)
    sock = socket.socket(fileno=args.fd)
    timing = Timing(slack_s=args.slack_s)
    return serve(sock, args.kind, args.port, timing, args.pcap, scheduling, tuple(args.early))


if __name__ == "__main__":
    sys.exit(main())
