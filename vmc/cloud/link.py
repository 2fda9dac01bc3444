"""The MQTT connection to the backend: one long-lived client, reconnected forever.

Why aiomqtt (pinned in pyproject.toml, 2.5.1): it is asyncio-native (paho's socket is read and
written from the event loop's own reader/writer callbacks, no network thread of ours), it
tracks each QoS 1 publish by message id until its PUBACK (``await client.publish(...)``
returns then), and it is paho-mqtt 2 underneath, the client the issue names, so MQTT 5,
3.1.1, wills, sessions and TLS are paho's well-trodden code. The one blocking step, paho's
``connect()`` (TCP connect and TLS handshake, up to ``connect_timeout_s`` each), runs on a
thread of its own (:class:`_Client`): the loop never waits on the network.

What the link does (the contract: ../shared/contracts/cloud-mqtt.md; docs/cloud.md):

* client id = machine id; MQTT 5 with a persistent session (clean start off, session expiry
  ``session_expiry_s``), or MQTT 3.1.1 (clean session off) when the broker refuses version 5;
* the will on ``PREFIX/M/status``: ``{"online": false, "boot_id", "ts"}`` retained at QoS 1
  (its ``ts`` is the time of the connection that set it); after each CONNACK
  ``{"online": true, "boot_id", "version", "ts"}`` retained; at a clean stop the link publishes
  ``online: false`` itself before disconnecting (a clean DISCONNECT suppresses the will);
* TLS 1.2 or later with the configured CA, client certificate and key, host name checked;
* reconnects with jittered exponential backoff (tenacity's ``wait_exponential_jitter``) from
  ``RECONNECT_INITIAL_S`` up to ``reconnect_max_s``;
* the state (down / connecting / up, with the reason and since when) for listeners, the
  control interface's STATE ``cloud_link`` and telemetry; in the log the first failure at
  WARNING, repeats at DEBUG, the recovery at INFO;
* per connection: the journal sync (:mod:`vmc.cloud.sync`), telemetry
  (:mod:`vmc.cloud.telemetry`), and signed commands through a :class:`CommandSink`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import math
import socket
import ssl
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol, Self

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tenacity import RetryCallState, Retrying, wait_exponential_jitter

from vmc.config import CloudConfig
from vmc.journal.records import format_ts
from vmc.log import FailureLog

if TYPE_CHECKING:
    from vmc.cloud.sync import JournalSync
    from vmc.cloud.telemetry import Telemetry

log = structlog.get_logger("vmc.cloud")

#: Contract: payloads are UTF-8 JSON objects of at most 64 KiB.
MAX_PAYLOAD_BYTES: Final = 64 * 1024
#: The first reconnect wait; it doubles (plus jitter) up to ``cloud.reconnect_max_s``.
RECONNECT_INITIAL_S: Final = 1.0
#: Up to this much random time is added to each wait, so that a fleet of machines does not
#: reconnect in step after a broker outage.
RECONNECT_JITTER_S: Final = 5.0
#: A connection that lasted this long resets the backoff (a flapping link keeps backing off).
STABLE_SESSION_S: Final = 30.0
#: At a clean stop, how long the ``online: false`` status may wait for its PUBACK, and the
#: DISCONNECT for the broker: the daemon's whole stop budget is 2 s.
STOP_PUBLISH_TIMEOUT_S: Final = 0.4
STOP_DISCONNECT_TIMEOUT_S: Final = 0.3
#: ``publish_json`` waits this long for a QoS 1 PUBACK before it reports failure.
PUBLISH_TIMEOUT_S: Final = 10.0
#: MQTT 5 reason code 0x84 "Unsupported Protocol Version" (paho maps a 3.1.1 broker's
#: CONNACK return code 1 "unacceptable protocol version" to it too).
UNSUPPORTED_PROTOCOL_VERSION: Final = 0x84
CONNACK_REFUSED_PROTOCOL_VERSION: Final = 1
#: paho logs every packet at DEBUG and a reset connection at ERROR; the link logs its own
#: state changes (first failure WARNING, repeats DEBUG), so paho's log is off.
PAHO_LOG_LEVEL: Final = logging.CRITICAL


class LinkState(enum.Enum):
    DOWN = "down"
    CONNECTING = "connecting"
    UP = "up"


@dataclass(frozen=True)
class LinkStatus:
    """The link's state, why (the broker and protocol when up, the failure when down), and
    since when (RFC 3339 UTC)."""

    state: LinkState
    detail: str
    since: str

    def as_dict(self) -> dict[str, str]:
        return {"state": self.state.value, "detail": self.detail, "since": self.since}


LinkListener = Callable[[LinkStatus], None]


class CommandSink(Protocol):
    """Where signed commands go (vmc/cloud/commands.py implements it).

    The link subscribes ``PREFIX/M/cmd`` at QoS 1 and hands every payload over, in arrival
    order, one at a time, on a task of its own that a link loss does not cancel (payloads over
    64 KiB too: the sink refuses them). Whenever the link is up it publishes
    ``unpublished_results()`` on ``PREFIX/M/cmd/result`` at QoS 1, oldest first, and calls
    ``mark_published(cmd_id)`` after each PUBACK; it looks again whenever ``results_changed``
    is set. So a result not yet published when the link or the daemon went down is published
    after it returns (the sink keeps unpublished results durably).
    """

    #: Set whenever a result is queued (the link clears it before it looks).
    results_changed: asyncio.Event

    async def handle(self, payload: bytes) -> None:
        """Verify, act, queue exactly one result."""

    def unpublished_results(self) -> list[dict[str, Any]]:
        """``cmd/result`` payloads not yet PUBACKed, oldest first."""

    async def mark_published(self, cmd_id: str) -> None:
        """The result of ``cmd_id`` was PUBACKed by the broker."""


@dataclass(frozen=True)
class Topics:
    """The contract's topics: ``PREFIX/M/...``."""

    prefix: str
    machine: str

    def topic(self, suffix: str) -> str:
        return f"{self.prefix}/{self.machine}/{suffix}"

    @property
    def status(self) -> str:
        return self.topic("status")

    @property
    def journal(self) -> str:
        return self.topic("journal")

    @property
    def journal_ack(self) -> str:
        return self.topic("journal/ack")

    @property
    def telemetry(self) -> str:
        return self.topic("telemetry")

    @property
    def cmd(self) -> str:
        return self.topic("cmd")

    @property
    def cmd_result(self) -> str:
        return self.topic("cmd/result")


class LinkDown(Exception):
    """The connection ended or could not be made; ``str()`` is the reason."""


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON, as every payload on the link."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def utc_now() -> datetime:
    return datetime.now(UTC)


def software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vmc")
    except PackageNotFoundError:
        return "0+unknown"


def tls_context(config: CloudConfig) -> ssl.SSLContext:
    """TLS 1.2 or later, the server checked against ``ca_file`` and its host name, our client
    certificate from ``cert_file`` / ``key_file``. Reads files: call it off the loop."""
    assert config.ca_file is not None and config.cert_file is not None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(config.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(
        str(config.cert_file), str(config.key_file) if config.key_file else None
    )
    return context


class _Client(aiomqtt.Client):
    """aiomqtt's client whose blocking connect step runs on a daemon thread of its own.

    aiomqtt 2.5.1 runs paho's ``connect()`` on the loop's default executor; ``asyncio.run``
    joins that executor at exit, so a connect hanging on a blackholed network would hold up
    the daemon's stop for ``connect_timeout_s``. This is aiomqtt's ``__aenter__`` with that
    one change (the version is pinned for it).
    """

    async def __aenter__(self) -> Self:
        if self._lock.locked():
            raise aiomqtt.MqttReentrantError("the client is reusable, not reentrant")
        await self._lock.acquire()
        try:
            await _in_thread(self._client_connect, self._abandon)
        except (OSError, paho.WebsocketConnectionError) as exc:
            self._lock.release()
            raise aiomqtt.MqttError(str(exc) or type(exc).__name__) from None
        except BaseException:
            self._lock.release()
            raise
        _no_delay(self._client.socket())
        try:
            await self._wait_for(self._connected, timeout=None)
        except aiomqtt.MqttError:
            self._lock.release()
            self._connected = asyncio.Future()
            raise
        if self._disconnected.done():
            self._disconnected = asyncio.Future()
        return self

    def _abandon(self) -> None:
        """A connect that finished after we stopped waiting for it: drop its socket."""
        with contextlib.suppress(Exception):
            self._loop.call_soon_threadsafe(self._client._sock_close)

    def close_now(self) -> None:
        """Close the socket without a DISCONNECT (the broker then sends the will)."""
        with contextlib.suppress(Exception):
            self._client._sock_close()
        if not self._disconnected.done():
            self._disconnected.set_result(None)
        if self._lock.locked():
            self._lock.release()


def _no_delay(sock: object) -> None:
    """Small packets (a command's PUBACK, a cmd/result, telemetry) leave at once. Without
    TCP_NODELAY, Nagle's algorithm holds a packet while the previous one waits for the peer's
    delayed ACK: up to 40 ms on Linux, the whole of the vend-latency budget. paho leaves it
    off; asyncio turns it on for its own TCP transports."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _in_thread(work: Callable[[], None], abandoned: Callable[[], None]) -> None:
    """Run blocking ``work`` on a daemon thread; if we stop waiting first, ``abandoned()`` is
    called once it ends."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    gave_up = threading.Event()

    def settle(exc: BaseException | None) -> None:
        if future.cancelled():
            abandoned()
        elif exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(None)

    def run() -> None:
        error: BaseException | None = None
        try:
            work()
        except BaseException as exc:  # handed to the loop
            error = exc
        if gave_up.is_set():
            abandoned()
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name="vmc-cloud-connect", daemon=True).start()
    try:
        await future
    except asyncio.CancelledError:
        gave_up.set()
        raise


class Session:
    """One connection, from its CONNACK to its loss: what the per-connection tasks publish
    through."""

    def __init__(self, client: aiomqtt.Client, topics: Topics, protocol: str) -> None:
        self.client = client
        self.topics = topics
        self.protocol = protocol

    async def publish(
        self,
        suffix: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool = False,
        ack_wait_s: float = math.inf,
    ) -> None:
        """Publish on ``PREFIX/M/suffix``; at QoS 1 return once the broker's PUBACK came.
        Raises aiomqtt.MqttError when the connection is gone."""
        await self.client.publish(
            self.topics.topic(suffix), payload, qos=qos, retain=retain, timeout=ack_wait_s
        )


def _is_protocol_refusal(exc: aiomqtt.MqttError) -> bool:
    if not isinstance(exc, aiomqtt.MqttCodeError):
        return False
    code = getattr(exc.rc, "value", exc.rc)
    return code in (UNSUPPORTED_PROTOCOL_VERSION, CONNACK_REFUSED_PROTOCOL_VERSION)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class CloudLink:
    """The machine's MQTT link to the backend. ``run()`` is its task; ``stop()`` ends it
    cleanly (``online: false`` published, then DISCONNECT).

    ``sync`` (the journal outbox), ``telemetry`` and ``commands`` are optional parts: each
    runs while the link is up.
    """

    def __init__(
        self,
        config: CloudConfig,
        machine_id: str,
        *,
        boot_id: str,
        version: str | None = None,
        sync: JournalSync | None = None,
        telemetry: Telemetry | None = None,
        commands: CommandSink | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.config = config
        self.machine_id = machine_id
        self.boot_id = boot_id
        self.version = version if version is not None else software_version()
        self.topics = Topics(config.topic_prefix, machine_id)
        self.sync = sync
        self.telemetry = telemetry
        self.commands = commands
        self._clock = clock
        self._status = LinkStatus(LinkState.DOWN, "not started", format_ts(clock()))
        self._listeners: list[LinkListener] = []
        self._session: Session | None = None
        self._stop = asyncio.Event()
        self._stopped = asyncio.Event()
        self._down_log = FailureLog(log)
        self._ever_up = False
        self._force_v311 = False
        self._wait = wait_exponential_jitter(
            initial=RECONNECT_INITIAL_S, max=config.reconnect_max_s, jitter=RECONNECT_JITTER_S
        )
        self._commands_in: asyncio.Queue[_InboundCommand] = asyncio.Queue()
        #: The protocol of the current (or last) connection: "5" or "3.1.1".
        self.protocol = ""
        #: Connections made by this run (tests and the bench read it).
        self.connections = 0

    # --- state -------------------------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        return self._status.state

    @property
    def status(self) -> LinkStatus:
        return self._status

    @property
    def where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def add_listener(self, listener: LinkListener) -> Callable[[], None]:
        """``listener(status)`` on the loop at every change of state. Returns an unsubscribe."""
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def _set_state(self, state: LinkState, detail: str) -> None:
        previous = self._status
        self._status = LinkStatus(state, detail, format_ts(self._clock()))
        if state is LinkState.UP:
            if not self._down_log.recovered("cloud link up again", detail=detail):
                log.info("cloud link up", detail=detail)
            self._ever_up = True
        elif state is LinkState.DOWN:
            if detail == "stopped":
                log.info("cloud link stopped")
            else:
                self._down_log.failed("cloud link down", detail=detail, broker=self.where)
        else:
            log.debug("cloud link connecting", broker=self.where)
        if state is previous.state:
            return
        for listener in list(self._listeners):
            try:
                listener(self._status)
            except Exception:
                log.exception("cloud link listener failed")

    # --- public operations -----------------------------------------------------------------

    async def publish_json(
        self, suffix: str, payload: Mapping[str, Any], qos: int, retain: bool = False
    ) -> bool:
        """Publish a live message on ``PREFIX/M/suffix`` now. False when the link is down or
        the publish failed (at QoS 1: no PUBACK within ``PUBLISH_TIMEOUT_S``): nothing is
        queued; what must not be lost goes through the journal. Raises ValueError for a
        payload over 64 KiB."""
        data = encode_payload(payload)
        if len(data) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"payload of {len(data)} bytes is over {MAX_PAYLOAD_BYTES}")
        session = self._session
        if session is None:
            return False
        try:
            await session.publish(
                suffix, data, qos=qos, retain=retain, ack_wait_s=PUBLISH_TIMEOUT_S
            )
        except aiomqtt.MqttError as exc:
            log.debug("cloud publish failed", topic=suffix, error=str(exc))
            return False
        return True

    def request_sync(self) -> None:
        """The ``sync`` command: publish telemetry now and resend what is unacknowledged."""
        if self.sync is not None:
            self.sync.rewind()
        if self.telemetry is not None:
            self.telemetry.request()

    # --- the task ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, reconnect, until ``stop()``. Never raises but CancelledError: a
        broken link or a bug in a part is a reason to reconnect, not to stop selling."""
        loop = asyncio.get_running_loop()
        worker = (
            asyncio.create_task(self._command_worker(), name="cloud-commands")
            if self.commands is not None
            else None
        )
        attempt = 0
        try:
            while not self._stop.is_set():
                self._set_state(LinkState.CONNECTING, self.where)
                up_at: float | None = None
                try:
                    up_at = await self._connect_and_serve()
                    reason = "disconnected"
                except LinkDown as exc:
                    reason = str(exc)
                except (aiomqtt.MqttError, OSError, ssl.SSLError, TimeoutError) as exc:
                    reason = _describe(exc)
                except Exception as exc:
                    log.exception("cloud link failed")
                    reason = f"internal error: {_describe(exc)}"
                if self._stop.is_set():
                    break
                if isinstance(up_at, float) and loop.time() - up_at >= STABLE_SESSION_S:
                    attempt = 0
                attempt += 1
                delay = self.backoff(attempt)
                self._set_state(LinkState.DOWN, reason)
                log.debug("cloud link reconnect", in_s=round(delay, 2), attempt=attempt)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            if worker is not None:
                await cancel_and_wait([worker])
            self._set_state(LinkState.DOWN, "stopped")
            self._stopped.set()

    def backoff(self, attempt: int) -> float:
        """The wait before reconnect ``attempt`` (1, 2, ...): tenacity's exponential backoff
        with jitter, capped at ``reconnect_max_s``."""
        state = RetryCallState(Retrying(), None, (), {})
        state.attempt_number = attempt
        return float(self._wait(state))

    async def stop(self) -> None:
        """Publish ``online: false`` (bounded), disconnect, end ``run()``. Idempotent."""
        if self._stop.is_set():
            return
        session = self._session
        if session is not None:
            try:
                async with asyncio.timeout(STOP_PUBLISH_TIMEOUT_S):
                    await session.publish("status", self._offline(), qos=1, retain=True)
            except (TimeoutError, aiomqtt.MqttError) as exc:
                log.warning("cloud link: offline status not confirmed", error=_describe(exc))
        self._stop.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), STOP_DISCONNECT_TIMEOUT_S + 0.2)

    # --- one connection ----------------------------------------------------------------------

    def _offline(self) -> bytes:
        return encode_payload(
            {"online": False, "boot_id": self.boot_id, "ts": format_ts(self._clock())}
        )

    def _make_client(
        self, protocol: aiomqtt.ProtocolVersion, context: ssl.SSLContext | None
    ) -> _Client:
        config = self.config
        v5 = protocol is aiomqtt.ProtocolVersion.V5
        properties: Properties | None = None
        kwargs: dict[str, Any] = {}
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = config.session_expiry_s
            kwargs["clean_start"] = False
        else:
            kwargs["clean_session"] = False
        paho_log = logging.getLogger("vmc.cloud.mqtt")
        paho_log.setLevel(PAHO_LOG_LEVEL)
        client = _Client(
            config.host,
            config.port,
            identifier=self.machine_id,
            protocol=protocol,
            will=aiomqtt.Will(self.topics.status, self._offline(), qos=1, retain=True),
            keepalive=config.keepalive_s,
            timeout=config.connect_timeout_s,
            properties=properties,
            tls_context=context,
            username=config.username or None,
            password=config.password or None,
            # Journal batches in flight, telemetry, a command result, the status.
            max_inflight_messages=config.max_in_flight + 8,
            logger=paho_log,
            **kwargs,
        )
        client._client.connect_timeout = config.connect_timeout_s
        # A command is acknowledged to the broker (PUBACK) only once the command processor has
        # made it durable (stored, refused, or recognised as a redelivery): paho's automatic
        # PUBACK on arrival let a kill in between lose a command for good, never carried out,
        # never answered, never sent again (found by the crash campaign with --cloud). A
        # command not acknowledged is sent again by the broker at the next connection.
        client._client.manual_ack_set(True)
        return client

    async def _connect(self) -> tuple[_Client, str]:
        context: ssl.SSLContext | None = None
        if self.config.tls:
            try:
                context = await asyncio.to_thread(tls_context, self.config)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise LinkDown(f"TLS set-up: {_describe(exc)}") from None
        versions = [aiomqtt.ProtocolVersion.V311]
        if not self._force_v311:
            versions.insert(0, aiomqtt.ProtocolVersion.V5)
        for protocol in versions:
            client = self._make_client(protocol, context)
            try:
                async with asyncio.timeout(self.config.connect_timeout_s * 2):
                    await client.__aenter__()
            except aiomqtt.MqttError as exc:
                if protocol is aiomqtt.ProtocolVersion.V5 and _is_protocol_refusal(exc):
                    log.info("broker refused MQTT 5; using MQTT 3.1.1", broker=self.where)
                    self._force_v311 = True
                    continue
                raise
            except TimeoutError:
                raise LinkDown(
                    f"no CONNACK within {self.config.connect_timeout_s * 2:g} s"
                ) from None
            return client, "5" if protocol is aiomqtt.ProtocolVersion.V5 else "3.1.1"
        raise LinkDown("broker refused every protocol version")

    async def _connect_and_serve(self) -> float:
        client, protocol = await self._connect()
        loop = asyncio.get_running_loop()
        self.connections += 1
        self.protocol = protocol
        session = Session(client, self.topics, protocol)
        clean = False
        try:
            timeout = self.config.connect_timeout_s
            if self.commands is not None:
                await client.subscribe(self.topics.cmd, qos=1, timeout=timeout)
            if self.sync is not None:
                await client.subscribe(self.topics.journal_ack, qos=1, timeout=timeout)
            online = {
                "online": True,
                "boot_id": self.boot_id,
                "version": self.version,
                "ts": format_ts(self._clock()),
            }
            await session.publish(
                "status", encode_payload(online), qos=1, retain=True, ack_wait_s=timeout
            )
            self._session = session
            up_at = loop.time()
            self._set_state(LinkState.UP, f"{self.where} MQTT {protocol}")
            parts: list[Coroutine[Any, Any, None]] = [self._read(client)]
            if self.sync is not None:
                parts.append(self.sync.run(session))
            if self.telemetry is not None:
                parts.append(self.telemetry.run(session))
            if self.commands is not None:
                parts.append(self._publish_results(session, self.commands))
            await _until_first_ends(parts, self._stop)
            clean = self._stop.is_set()
            return up_at
        finally:
            self._session = None
            await self._close(client, clean=clean)

    async def _close(self, client: _Client, *, clean: bool) -> None:
        if clean:
            try:
                async with asyncio.timeout(STOP_DISCONNECT_TIMEOUT_S):
                    await client.__aexit__(None, None, None)
                return
            except (TimeoutError, aiomqtt.MqttError, OSError):
                pass
        client.close_now()

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = str(message.topic)
            payload = message.payload
            data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
            if topic == self.topics.cmd and self.commands is not None:
                # Acknowledged by the worker, once the processor has it durably.
                self._commands_in.put_nowait(
                    _InboundCommand(data, client, message.mid, message.qos)
                )
                continue
            if topic == self.topics.journal_ack and self.sync is not None:
                self.sync.ack_received(data)  # the journal commit runs behind
            else:
                log.debug("cloud message on an unexpected topic", topic=topic)
            # A journal ack lost with a kill costs nothing: the machine resends from its first
            # unacknowledged record and the backend acks again.
            _puback(client, message.mid, message.qos)
        raise LinkDown("message stream ended")

    async def _command_worker(self) -> None:
        """Hands commands to the sink one at a time; runs across link losses, so a vend that
        a command started is never cut by the link."""
        assert self.commands is not None
        while True:
            inbound = await self._commands_in.get()
            try:
                await self.commands.handle(inbound.payload)
            except Exception:
                # Acknowledged all the same: a command that breaks the handler would otherwise
                # come back at every connection and break it again.
                log.exception("command handler failed", payload_bytes=len(inbound.payload))
            # On the connection it came on; if that one is gone, the broker sends the command
            # again and the processor answers it as a redelivery (never acted on twice).
            _puback(inbound.client, inbound.mid, inbound.qos)

    async def _publish_results(self, session: Session, sink: CommandSink) -> None:
        while True:
            sink.results_changed.clear()
            for result in sink.unpublished_results():
                await session.publish("cmd/result", encode_payload(result), qos=1)
                await sink.mark_published(str(result["cmd_id"]))
            await sink.results_changed.wait()


@dataclass(frozen=True, slots=True)
class _InboundCommand:
    payload: bytes
    client: aiomqtt.Client
    mid: int
    qos: int


def _puback(client: aiomqtt.Client, mid: int, qos: int) -> None:
    """Acknowledge an inbound message (manual acknowledgement: see ``_make_client``)."""
    with contextlib.suppress(Exception):  # a closed connection: nothing to acknowledge on
        client._client.ack(mid, qos)


async def _until_first_ends(parts: list[Coroutine[Any, Any, None]], stop: asyncio.Event) -> None:
    """Run the parts until one ends (the connection is gone, or a part failed) or ``stop`` is
    set; cancel and await the others; raise the first failure."""
    tasks = [asyncio.create_task(part) for part in parts]
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _pending = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait([*tasks, stopper])
    for task in done:
        if task is not stopper and not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            raise exc


#: A task cancelled but still running is cancelled again this often: on Python 3.11 a
#: cancellation that lands just as an awaited future completes can be lost (asyncio.wait_for).
CANCEL_REPEAT_S: Final = 0.05


async def cancel_and_wait(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again as needed."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=CANCEL_REPEAT_S)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: the caller reads the one it wants
