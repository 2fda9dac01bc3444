"""The cloud link against a real mosquitto broker on loopback, in-process, with a TCP proxy
in between where the test cuts, delays or refuses (tests/tcp_proxy.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog.testing

from tests.mqtt_broker import Broker, mosquitto_binary
from tests.tcp_proxy import TcpProxy
from tests.tls_broker import TlsBroker, make_certificates
from vmc.cloud.link import CloudLink, LinkState, LinkStatus, tls_context
from vmc.config import CloudConfig, parse_config

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")

MACHINE = "TEST-0001"
WAIT_S = 20.0


#: A connect done on the loop would stall it for the whole connect timeout (1 s in these tests);
#: scheduling noise on a loaded 2-core CI machine stays far below half of it.
STALL_BOUND_S = 0.5


def cloud_config(port: int, **overrides: Any) -> CloudConfig:
    data = {
        "machine": {"id": MACHINE, "state_dir": "/tmp/unused"},
        "mdb": {"simulate": True},
        "motor": {"simulate": True},
        "cloud": {
            "enabled": True,
            "host": "127.0.0.1",
            "port": port,
            "keepalive_s": 2,
            "connect_timeout_s": 2.0,
            "reconnect_max_s": 0.2,
            **overrides,
        },
    }
    return parse_config(data, Path("/tmp")).cloud


class Observer:
    """A plain MQTT client of the test: what the backend would see."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[tuple[str, Any, bool]] = []
        self.arrived = asyncio.Event()

    async def run(self, topics: list[str], ready: asyncio.Event) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="observer") as client:
            for topic in topics:
                await client.subscribe(topic, qos=1)
            ready.set()
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes)
                self.messages.append((str(message.topic), json.loads(payload), message.retain))
                self.arrived.set()

    def on(self, suffix: str) -> list[Any]:
        return [p for t, p, _r in self.messages if t == f"vmc/{MACHINE}/{suffix}"]

    async def wait_for(self, what: str, predicate: Any) -> None:
        deadline = time.monotonic() + WAIT_S
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; saw {self.messages}")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), 0.2)


@pytest.fixture
async def observer(broker: Broker) -> AsyncIterator[Observer]:
    seen = Observer(broker.port)
    ready = asyncio.Event()
    task = asyncio.create_task(seen.run([f"vmc/{MACHINE}/#"], ready))
    await asyncio.wait_for(ready.wait(), WAIT_S)
    yield seen
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def wait_state(link: CloudLink, state: LinkState, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while link.state is not state:
        if time.monotonic() > deadline:
            raise AssertionError(f"link {link.status} did not reach {state}")
        await asyncio.sleep(0.02)


async def test_up_status_retained_clean_stop_publishes_offline(
    broker: Broker, observer: Observer
) -> None:
    link = CloudLink(cloud_config(broker.port), MACHINE, boot_id="boot-1", version="9.9")
    changes: list[LinkStatus] = []
    link.add_listener(changes.append)
    task = asyncio.create_task(link.run())
    await wait_state(link, LinkState.UP)
    assert link.protocol == "5"
    await observer.wait_for("online", lambda: observer.on("status"))
    online = observer.on("status")[0]
    assert online["online"] is True
    assert online["boot_id"] == "boot-1" and online["version"] == "9.9"
    assert online["ts"].endswith("Z") and len(online["ts"]) == 24
    assert await link.publish_json("orders", {"order_id": "o1"}, qos=1) is True
    await link.stop()
    await asyncio.wait_for(task, 2)
    await observer.wait_for("offline", lambda: len(observer.on("status")) >= 2)
    offline = observer.on("status")[-1]
    assert offline["online"] is False and offline["boot_id"] == "boot-1"
    assert [c.state for c in changes] == [
        LinkState.CONNECTING,
        LinkState.UP,
        LinkState.DOWN,
    ]
    assert changes[-1].detail == "stopped"
    assert await link.publish_json("orders", {"order_id": "o2"}, qos=1) is False

    # retained: a newcomer sees the last status at once
    late = Observer(broker.port)
    ready = asyncio.Event()
    reader = asyncio.create_task(late.run([f"vmc/{MACHINE}/status"], ready))
    await late.wait_for("retained status", lambda: late.messages)
    reader.cancel()
    assert late.messages[0][2] is True and late.messages[0][1]["online"] is False


async def test_will_on_a_cut_link_then_reconnects_with_logs(
    broker: Broker, proxy: TcpProxy, observer: Observer
) -> None:
    with structlog.testing.capture_logs() as logs:
        await _cut_and_reconnect(proxy, observer)
    text = [(e["log_level"], e["event"]) for e in logs if e["event"].startswith("cloud link")]
    warnings = [m for lvl, m in text if lvl == "warning"]
    assert warnings == ["cloud link down"], text
    assert any(lvl == "debug" and m == "cloud link down" for lvl, m in text), text
    assert any(lvl == "info" and "up again" in m for lvl, m in text), text


async def _cut_and_reconnect(proxy: TcpProxy, observer: Observer) -> None:
    link = CloudLink(cloud_config(proxy.port), MACHINE, boot_id="boot-2")
    task = asyncio.create_task(link.run())
    await wait_state(link, LinkState.UP)
    proxy.set(refuse_connections=True)
    proxy.reset()  # RST: no DISCONNECT, so the broker sends the will
    await observer.wait_for(
        "the will", lambda: any(s["online"] is False for s in observer.on("status"))
    )
    will = next(s for s in observer.on("status") if s["online"] is False)
    assert will["boot_id"] == "boot-2" and "version" not in will
    await wait_state(link, LinkState.DOWN)
    await asyncio.sleep(1.0)  # a few failed reconnects
    proxy.set()
    await wait_state(link, LinkState.UP)
    assert link.connections == 2
    await link.stop()
    await asyncio.wait_for(task, 2)


async def test_mqtt5_refused_falls_back_to_311(broker: Broker, proxy: TcpProxy) -> None:
    proxy.set(refuse_v5=True)
    link = CloudLink(cloud_config(proxy.port), MACHINE, boot_id="b")
    task = asyncio.create_task(link.run())
    await wait_state(link, LinkState.UP)
    assert link.protocol == "3.1.1"
    await link.stop()
    await asyncio.wait_for(task, 2)


async def test_blackholed_connect_never_stalls_the_loop(broker: Broker, proxy: TcpProxy) -> None:
    """The broker's address answers nothing: the connect (TCP, CONNACK) times out on its thread
    and the loop keeps its timing; the stop does not wait for the connect."""
    proxy.set(blackhole=True)
    link = CloudLink(cloud_config(proxy.port, connect_timeout_s=1.0), MACHINE, boot_id="b")
    task = asyncio.create_task(link.run())
    loop = asyncio.get_running_loop()
    worst = 0.0
    started = loop.time()
    saw_down = False
    while loop.time() - started < 3.0:
        before = loop.time()
        await asyncio.sleep(0.005)
        worst = max(worst, loop.time() - before - 0.005)
        saw_down = saw_down or link.state is LinkState.DOWN
    assert saw_down, link.status
    assert "CONNACK" in link.status.detail or link.state is not LinkState.UP
    assert worst < STALL_BOUND_S, f"event loop stalled {worst * 1000:.1f} ms"
    began = time.monotonic()
    await link.stop()
    await asyncio.wait_for(task, 2)
    assert time.monotonic() - began < 1.0


async def test_unroutable_address_never_stalls_the_loop() -> None:
    """TCP connect to an address that drops SYNs (or is unreachable): same."""
    config = replace(cloud_config(1883, connect_timeout_s=1.0), host="10.255.255.1")
    link = CloudLink(config, MACHINE, boot_id="b")
    task = asyncio.create_task(link.run())
    loop = asyncio.get_running_loop()
    worst = 0.0
    started = loop.time()
    while loop.time() - started < 2.5:
        before = loop.time()
        await asyncio.sleep(0.005)
        worst = max(worst, loop.time() - before - 0.005)
    assert link.state is not LinkState.UP
    assert worst < STALL_BOUND_S, f"event loop stalled {worst * 1000:.1f} ms"
    began = time.monotonic()
    await link.stop()
    await asyncio.wait_for(task, 2)
    assert time.monotonic() - began < 1.0


class FakeSink:
    """A CommandSink: answers every command with ok, remembers what was published."""

    def __init__(self) -> None:
        self.results_changed = asyncio.Event()
        self.handled: list[bytes] = []
        self.pending: list[dict[str, Any]] = []
        self.published: list[str] = []

    async def handle(self, payload: bytes) -> None:
        self.handled.append(payload)
        body = json.loads(payload) if len(payload) < 65536 else {"cmd_id": "big"}
        self.pending.append({"cmd_id": body["cmd_id"], "ok": True, "error": None})
        self.results_changed.set()

    def unpublished_results(self) -> list[dict[str, Any]]:
        return list(self.pending)

    async def mark_published(self, cmd_id: str) -> None:
        self.published.append(cmd_id)
        self.pending = [r for r in self.pending if r["cmd_id"] != cmd_id]


async def test_commands_reach_the_sink_and_results_survive_an_outage(
    broker: Broker, proxy: TcpProxy, observer: Observer
) -> None:
    sink = FakeSink()
    sink.pending.append({"cmd_id": "from-before", "ok": True, "error": None})
    link = CloudLink(cloud_config(proxy.port), MACHINE, boot_id="b", commands=sink)
    task = asyncio.create_task(link.run())
    await wait_state(link, LinkState.UP)
    await observer.wait_for("old result", lambda: observer.on("cmd/result"))
    assert observer.on("cmd/result")[0]["cmd_id"] == "from-before"
    assert sink.published == ["from-before"]

    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="backend") as backend:
        await backend.publish(f"vmc/{MACHINE}/cmd", b'{"cmd_id": "c1"}', qos=1)
        await observer.wait_for("c1 result", lambda: len(observer.on("cmd/result")) >= 2)
        assert observer.on("cmd/result")[1]["cmd_id"] == "c1"
        # A result queued while the link is down is published once it is back.
        proxy.set(refuse_connections=True)
        proxy.reset()
        await wait_state(link, LinkState.DOWN)
        sink.pending.append({"cmd_id": "during-outage", "ok": False, "error": "expired"})
        sink.results_changed.set()
        # A command sent during the outage waits in the persistent session.
        await backend.publish(f"vmc/{MACHINE}/cmd", b'{"cmd_id": "c2"}', qos=1)
        big = json.dumps({"cmd_id": "x", "pad": "y" * 70_000}).encode()
        await backend.publish(f"vmc/{MACHINE}/cmd", big, qos=1)
        await asyncio.sleep(0.3)
        proxy.set()
        await observer.wait_for(
            "all results",
            lambda: len({r["cmd_id"] for r in observer.on("cmd/result")}) >= 5,
        )
    # At least once: a result whose PUBACK the cut swallowed is published again (the backend
    # keys results by cmd_id); the order of first appearance is the order of the results.
    ids = list(dict.fromkeys(r["cmd_id"] for r in observer.on("cmd/result")))
    assert ids[:3] == ["from-before", "c1", "during-outage"]
    assert sorted(ids[3:]) == ["big", "c2"]
    assert any(len(p) > 65536 for p in sink.handled)  # handed over; the sink refuses it
    # Marked published once its PUBACK is back, which can follow the observer's copy.
    await observer.wait_for("every result marked published", lambda: sink.pending == [])
    await link.stop()
    await asyncio.wait_for(task, 2)


class StalledSink(FakeSink):
    """A sink that never finishes its first command (the daemon dies while handling it)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()

    async def handle(self, payload: bytes) -> None:
        self.handled.append(payload)
        self.started.set()
        await asyncio.Event().wait()


async def test_a_command_not_yet_made_durable_is_delivered_again_after_a_restart(
    broker: Broker, proxy: TcpProxy, observer: Observer
) -> None:
    """Found by the crash campaign: the client acknowledged a command (PUBACK) on arrival, and a
    kill before the processor stored it lost it for good. Now the PUBACK waits for the sink."""
    stalled = StalledSink()
    first = CloudLink(cloud_config(proxy.port), MACHINE, boot_id="b1", commands=stalled)
    task = asyncio.create_task(first.run())
    await wait_state(first, LinkState.UP)
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="backend") as backend:
        await backend.publish(f"vmc/{MACHINE}/cmd", b'{"cmd_id": "c1"}', qos=1)
    await asyncio.wait_for(stalled.started.wait(), 10)
    # The handler is busy for a while (a vend takes seconds): long enough for any PUBACK the
    # client would send on arrival to reach the broker.
    await asyncio.sleep(0.5)
    # The daemon is killed: the connection drops with no DISCONNECT, the command unanswered.
    proxy.reset()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(task, 5)
    sink = FakeSink()
    second = CloudLink(cloud_config(proxy.port), MACHINE, boot_id="b2", commands=sink)
    task = asyncio.create_task(second.run())
    await wait_state(second, LinkState.UP)
    await observer.wait_for("c1 answered after the restart", lambda: observer.on("cmd/result"))
    assert [json.loads(p)["cmd_id"] for p in sink.handled] == ["c1"]
    await second.stop()
    await asyncio.wait_for(task, 2)


def test_tls_context_is_tls12_with_hostname_check(tmp_path: Path) -> None:
    """The context the link connects with: TLS ≥ 1.2, CA-verified, host name checked, our
    client certificate loaded (a self-signed one made here)."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, MACHINE)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    config = cloud_config(
        8883, tls=True, ca_file="ca.pem", cert_file="cert.pem", key_file="key.pem"
    )
    config = replace(
        config,
        ca_file=tmp_path / "ca.pem",
        cert_file=tmp_path / "cert.pem",
        key_file=tmp_path / "key.pem",
    )
    context = tls_context(config)
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.check_hostname is True
    assert context.verify_mode is ssl.CERT_REQUIRED


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    link = CloudLink(cloud_config(1883, reconnect_max_s=60.0), MACHINE, boot_id="b")
    waits = [link.backoff(n) for n in range(1, 12)]
    assert 1.0 <= waits[0] <= 6.0
    assert all(w <= 60.0 for w in waits)
    assert waits[-1] == 60.0


def _nodelay_of_connections_to(port: int) -> list[bool]:
    """TCP_NODELAY of this process's sockets connected to 127.0.0.1:``port`` (read through
    duplicates of their descriptors)."""
    found = []
    for entry in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            if not os.readlink(entry).startswith("socket:"):
                continue
            with socket.fromfd(int(entry.name), socket.AF_INET, socket.SOCK_STREAM) as sock:
                if sock.getpeername() != ("127.0.0.1", port):
                    continue
                found.append(bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
    return found


def _tls_config(port: int, certs: dict[str, Path], **overrides: Any) -> CloudConfig:
    return cloud_config(
        port,
        tls=True,
        ca_file=str(certs["ca.crt"]),
        cert_file=str(certs["client.crt"]),
        key_file=str(certs["client.key"]),
        **overrides,
    )


async def test_tls_handshake_with_client_certificate_and_nodelay(tmp_path: Path) -> None:
    """The real handshake against mosquitto requiring a client certificate: up over TLS 1.2+,
    the online status reaches a plain subscriber, and the socket sends small packets at once
    (TCP_NODELAY: a command's PUBACK and result are not held for a delayed ACK)."""
    certs = make_certificates(tmp_path / "certs", client_cn=MACHINE)
    with TlsBroker(tmp_path / "broker", certs) as broker:
        observer = Observer(broker.port)
        ready = asyncio.Event()
        reader = asyncio.create_task(observer.run([f"vmc/{MACHINE}/status"], ready))
        await asyncio.wait_for(ready.wait(), WAIT_S)
        link = CloudLink(_tls_config(broker.tls_port, certs), MACHINE, boot_id="b", version="1")
        task = asyncio.create_task(link.run())
        try:
            await wait_state(link, LinkState.UP)
            await observer.wait_for("online over TLS", lambda: observer.on("status"))
            assert observer.on("status")[0]["online"] is True
            assert _nodelay_of_connections_to(broker.tls_port) == [True]
        finally:
            await link.stop()
            await asyncio.wait_for(task, 2)
            reader.cancel()


@pytest.mark.parametrize("fault", ["server_name", "foreign_client_certificate"])
async def test_tls_refused_for_a_wrong_server_name_or_a_foreign_client_certificate(
    tmp_path: Path, fault: str
) -> None:
    """A broker certificate for another address fails the host name check; a machine whose
    certificate another CA signed is refused by the broker. Either way the link stays down,
    says why, and never reaches UP."""
    server_ip = "127.0.0.2" if fault == "server_name" else "127.0.0.1"
    certs = make_certificates(tmp_path / "certs", client_cn=MACHINE, server_ip=server_ip)
    with TlsBroker(tmp_path / "broker", certs) as broker:
        overrides: dict[str, Any] = {}
        if fault == "foreign_client_certificate":
            other = make_certificates(tmp_path / "other-ca", client_cn=MACHINE)
            overrides = {"cert_file": other["client.crt"], "key_file": other["client.key"]}
        config = replace(_tls_config(broker.tls_port, certs), **overrides)
        link = CloudLink(config, MACHINE, boot_id="b", version="1")
        changes: list[LinkStatus] = []
        link.add_listener(changes.append)
        task = asyncio.create_task(link.run())
        try:
            deadline = time.monotonic() + WAIT_S
            while not any(c.state is LinkState.DOWN for c in changes):
                assert time.monotonic() < deadline, f"no DOWN state: {changes}"
                await asyncio.sleep(0.02)
        finally:
            await link.stop()
            await asyncio.wait_for(task, 2)
        assert LinkState.UP not in [c.state for c in changes]
        reason = next(c.detail for c in changes if c.state is LinkState.DOWN).lower()
        assert "internal error" not in reason
        if fault == "server_name":
            assert "certificate verify failed" in reason and "127.0.0.1" in reason
        else:
            # TLS 1.3: the client's handshake ends before the broker checks its certificate,
            # so the refusal shows as an alert, a closed connection or no CONNACK.
            words = ("ssl", "certificate", "closed", "eof", "timed out")
            assert any(word in reason for word in words), reason
