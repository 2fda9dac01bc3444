"""Logging for the daemon: structlog in ``vmc``, stdlib ``logging`` in ``drivers``, one output.

Both kinds of record end in the same handler on the root logger and are rendered the same way:
one JSON object per line (``ts`` RFC 3339 UTC with milliseconds, ``level``, ``logger``,
``event``, then the event's own fields), or a readable console line on a terminal. Under
systemd (stdout connected to journald) each JSON line starts with its syslog level, ``<4>`` for
a warning, so that ``journalctl -p`` filters by it (sd-daemon(3)). docs/logging.md has the
fields, the levels and how to read the log.

The ids of a flow (``session_id``, ``order_id``, ``vend_id``, ``cmd_id``) are structlog context
variables: bound once where the flow runs (:func:`bound_ids`), they are on every line logged in
it, and gone after it.

A TRACE level (5, below DEBUG) carries raw bus bytes. structlog's bound logger has no
``trace`` method and its level table stops at DEBUG, so ``vmc`` code uses :func:`trace` or
``logger.trace(...)`` on a logger from :func:`get_logger`; ``drivers`` code uses
``logging.getLogger(__name__).log(TRACE, ...)`` (``drivers`` must not import this module, so
it defines the number 5 itself).

Rendering happens in the calling thread (so the timestamp and the fields are those of the
moment of the call); writing to stdout happens in a listener thread, so a slow consumer of
stdout (journald under load, a paused terminal) never blocks the event loop.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import logging.handlers
import os
import queue
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from drivers.recurring import FailureLog
from vmc.config import LOG_LEVEL_NUMBERS

__all__ = [
    "FLOW_IDS",
    "FORMATS",
    "LEVELS",
    "TRACE",
    "FailureLog",
    "VmcLogger",
    "bind_ids",
    "bound_ids",
    "configure_logging",
    "current_ids",
    "get_logger",
    "resolve_format",
    "shutdown_logging",
    "trace",
]

TRACE = LOG_LEVEL_NUMBERS["trace"]
LEVELS: Mapping[str, int] = LOG_LEVEL_NUMBERS
#: auto: ``journal`` when stdout is connected to journald, ``console`` on a terminal, ``json``
#: otherwise. ``journal`` is ``json`` with a syslog level prefix on each line.
FORMATS = ("auto", "json", "journal", "console")
#: The ids a flow binds for its lines (:func:`bound_ids`).
FLOW_IDS = ("session_id", "order_id", "vend_id", "cmd_id")

# Level numbers of every method name a processor can see, TRACE included.
_METHOD_LEVELS: Mapping[str, int] = {
    **LEVELS,
    "warn": logging.WARNING,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}
_FIRST_KEYS = ("ts", "level", "logger", "event")
# The name each level number is shown with.
_LEVEL_NAMES: Mapping[int, str] = {
    **{number: name for name, number in LEVELS.items()},
    logging.CRITICAL: "critical",
}

# The syslog priority journald reads from a "<N>" at the start of a line (sd-daemon(3):
# SD_DEBUG 7, SD_INFO 6, SD_WARNING 4, SD_ERR 3, SD_CRIT 2). TRACE is below debug: 7 too.
_SYSLOG_PRIORITY: Mapping[str, int] = {
    "trace": 7,
    "debug": 7,
    "info": 6,
    "warning": 4,
    "error": 3,
    "critical": 2,
}

logging.addLevelName(TRACE, "TRACE")


class VmcLogger(structlog.stdlib.BoundLogger):
    """A structlog stdlib bound logger that also knows the TRACE level."""

    def trace(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at TRACE (5): raw bytes and per-exchange detail."""
        if args:
            kw["positional_args"] = args
        try:
            pargs, pkw = self._process_event("trace", event, kw)
        except structlog.DropEvent:
            return None
        # logging.Logger has no trace(); log() with the number reaches the same handlers.
        return self._logger.log(TRACE, *pargs, **pkw)

    def log(self, level: int, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at a numeric level; TRACE is accepted too."""
        if level == TRACE:
            return self.trace(event, *args, **kw)
        return super().log(level, event, *args, **kw)


def get_logger(name: str) -> VmcLogger:
    """A logger named ``name`` (use the module's ``__name__``)."""
    return cast(VmcLogger, structlog.get_logger(name))


def trace(logger: VmcLogger | logging.Logger, event: str, **fields: Any) -> None:
    """Log ``event`` at TRACE on a structlog or a stdlib logger."""
    if isinstance(logger, logging.Logger):
        if logger.isEnabledFor(TRACE):
            logger.log(TRACE, event, extra=fields)
        return
    logger.trace(event, **fields)


# --------------------------------------------------------------------------------------------
# Flow ids
# --------------------------------------------------------------------------------------------


def current_ids() -> dict[str, Any]:
    """The flow ids bound here now (to hand a flow on to another task or the actor)."""
    bound = structlog.contextvars.get_contextvars()
    return {key: bound[key] for key in FLOW_IDS if key in bound}


def bind_ids(**ids: str | None) -> None:
    """Bind flow ids from here on in this context (None ones are left out). Inside a
    :func:`bound_ids` block they end with it."""
    structlog.contextvars.bind_contextvars(**_given(ids))


@contextlib.contextmanager
def bound_ids(**ids: str | None) -> Iterator[None]:
    """Bind flow ids (None ones are left out) for the block. At its end every flow id is as it
    was before, also one bound inside the block with :func:`bind_ids`: an actor task that runs
    one flow after another never carries a finished flow's ids into the next."""
    before = current_ids()
    structlog.contextvars.bind_contextvars(**_given(ids))
    try:
        yield
    finally:
        structlog.contextvars.unbind_contextvars(*FLOW_IDS)
        structlog.contextvars.bind_contextvars(**before)


def _given(ids: Mapping[str, str | None]) -> dict[str, str]:
    unknown = set(ids) - set(FLOW_IDS)
    if unknown:
        raise ValueError(f"not a flow id: {', '.join(sorted(unknown))}")
    return {key: value for key, value in ids.items() if value is not None}


# --------------------------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------------------------


def _drop_below_level(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    # structlog's filter_by_level looks levels up in a table without TRACE; this one has it.
    stdlib_logger = cast(logging.Logger, logger)
    level = _METHOD_LEVELS.get(method_name, logging.INFO)
    if stdlib_logger.disabled or level < stdlib_logger.getEffectiveLevel():
        raise structlog.DropEvent
    return event_dict


def _rfc3339_ms(seconds: float) -> str:
    stamp = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _add_timestamp(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")
    created = record.created if isinstance(record, logging.LogRecord) else time.time()
    event_dict["ts"] = _rfc3339_ms(created)
    return event_dict


def _add_level(_logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord) and not event_dict.get("_from_structlog"):
        # A stdlib record (drivers, and the MDB line process's records, which its parent logs
        # again with their numeric level): named by number, so level 5 is "trace" whoever
        # registered which level names.
        event_dict["level"] = _LEVEL_NAMES.get(record.levelno) or record.levelname.lower()
    else:
        event_dict["level"] = {"warn": "warning", "exception": "error"}.get(
            method_name, method_name
        )
    return event_dict


def _order_keys(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    ordered: dict[str, Any] = {key: event_dict[key] for key in _FIRST_KEYS if key in event_dict}
    ordered.update((key, value) for key, value in event_dict.items() if key not in ordered)
    return ordered


def _json_default(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex(" ")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return repr(value)


_SHARED: list[Processor] = [
    structlog.stdlib.add_logger_name,
    _add_level,
    _add_timestamp,
]

_STRUCTLOG_CHAIN: list[Processor] = [
    _drop_below_level,
    structlog.contextvars.merge_contextvars,
    *_SHARED,
    structlog.stdlib.PositionalArgumentsFormatter(),
    structlog.processors.StackInfoRenderer(),
    structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
]

_FOREIGN_CHAIN: list[Processor] = [
    *_SHARED,
    structlog.stdlib.ExtraAdder(),
]


class _JournalRenderer:
    """JSON with the syslog priority in front: ``<4>{"ts": ..., "level": "warning", ...}``."""

    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer(default=_json_default)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        priority = _SYSLOG_PRIORITY.get(str(event_dict.get("level")), 6)
        line = self._json(logger, method_name, event_dict)
        # JSONRenderer gives str unless told to serialise to bytes (it is not here).
        text = line.decode() if isinstance(line, bytes) else line
        return f"<{priority}>{text}"


def _formatter(fmt: str, colors: bool) -> structlog.stdlib.ProcessorFormatter:
    renderer: list[Processor]
    if fmt in ("json", "journal"):
        # json.dumps escapes newlines in values (a traceback too): one record, one line.
        renderer = [
            structlog.processors.format_exc_info,
            _order_keys,
            _JournalRenderer()
            if fmt == "journal"
            else structlog.processors.JSONRenderer(default=_json_default),
        ]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=colors, timestamp_key="ts")]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_FOREIGN_CHAIN,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------


class _RenderingQueueHandler(logging.handlers.QueueHandler):
    """Renders the record in the caller's thread and queues the finished line."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        prepared: logging.LogRecord = super().prepare(record)
        # The rendered line already holds any stack; do not let the writer add it again.
        prepared.stack_info = None
        return prepared


class _State:
    listener: logging.handlers.QueueListener | None = None
    handler: logging.Handler | None = None
    atexit_registered = False


def shutdown_logging() -> None:
    """Write out every queued line and stop the writer thread (also runs at exit)."""
    listener, _State.listener = _State.listener, None
    handler, _State.handler = _State.handler, None
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()
    if listener is not None:
        listener.stop()
        for target in listener.handlers:
            target.flush()


def configure_logging(level: str, fmt: str, *, stream: IO[str] | None = None) -> None:
    """Send every log record (structlog and stdlib) to ``stream`` (default stdout).

    ``level`` is one of ``trace``, ``debug``, ``info``, ``warning``, ``error``; ``fmt`` is one
    of :data:`FORMATS` (``auto``: see :func:`resolve_format`). Calling it again replaces the
    previous set-up.
    """
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    out = stream if stream is not None else sys.stdout
    is_tty = _isatty(out)
    resolved = resolve_format(fmt, out)

    shutdown_logging()
    structlog.configure(
        processors=_STRUCTLOG_CHAIN,
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=VmcLogger,
        # Not cached: a module-level logger used before configure_logging must not keep the
        # defaults it saw then.
        cache_logger_on_first_use=False,
    )

    writer = logging.StreamHandler(out)
    writer.setFormatter(logging.Formatter("%(message)s"))
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = _RenderingQueueHandler(lines)
    handler.setFormatter(_formatter(resolved, colors=is_tty))
    listener = logging.handlers.QueueListener(lines, writer, respect_handler_level=False)

    root = logging.getLogger()
    for old in list(root.handlers):
        # Ours replaces whatever basicConfig or a library installed, so nothing prints twice.
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    logging.captureWarnings(True)

    _State.listener = listener
    _State.handler = handler
    listener.start()
    if not _State.atexit_registered:
        atexit.register(shutdown_logging)
        _State.atexit_registered = True


def resolve_format(fmt: str, stream: IO[str]) -> str:
    """The format ``fmt`` means for output to ``stream``: an explicit one is itself; ``auto`` is
    ``journal`` when ``stream`` is connected to journald, ``console`` on a terminal, ``json``
    otherwise."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt != "auto":
        return fmt
    if _connected_to_journald(stream):
        return "journal"
    return "console" if _isatty(stream) else "json"


def _connected_to_journald(stream: IO[str]) -> bool:
    # systemd.exec(5): for a service whose stdout or stderr goes to the journal, systemd sets
    # JOURNAL_STREAM to "DEVICE:INODE" (decimal) of that stream; a process checks that its own
    # stdout is still that stream (not redirected by a wrapper) by comparing with fstat.
    device, sep, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        status = os.fstat(stream.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def _isatty(stream: IO[str]) -> bool:
    isatty: Callable[[], bool] | None = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False
