"""Fixtures shared by the cloud-link tests: a real mosquitto broker on loopback (a free port
per test) and a TCP proxy in front of it that can cut, delay or drip the link."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mqtt_broker import Broker
from tests.tcp_proxy import TcpProxy


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def proxy(broker: Broker) -> Iterator[TcpProxy]:
    with TcpProxy(broker.port) as running:
        yield running
