"""What the daemon plugs in: the cloud command ``dex`` and the DEX port task."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import structlog

from vmc.config import Config
from vmc.dex.port import DexPort
from vmc.dex.service import build_dex_report
from vmc.errors import VmcError
from vmc.journal import Journal, Source
from vmc.journal.records import format_ts

log = structlog.get_logger("vmc.dex")

#: The contract's topic suffix and QoS for the report (shared/contracts/cloud-mqtt.md).
DEX_TOPIC: Final = "dex"
DEX_QOS: Final = 1
#: The command result's error code when the report could not be built or published.
UNAVAILABLE: Final = "unavailable"

Publish = Callable[[str, Mapping[str, Any], int], Awaitable[bool]]


def cloud_dex_hook(
    config: Config, journal: Journal, publish: Publish
) -> Callable[[Source], Awaitable[str | None]]:
    """The ``dex {}`` command: build the report (a read without reset: the contract's command
    has no fields, and a back office differences lifetime counters) and publish it on
    ``vmc/M/dex`` as ``{"ts", "dex"}``, QoS 1, not retained."""

    async def publish_report(source: Source) -> str | None:
        try:
            text = await build_dex_report(journal, config, reset=False, via="cloud", source=source)
        except VmcError as exc:
            log.warning("dex report cannot be built", error=str(exc))
            return UNAVAILABLE
        payload = {"ts": format_ts(datetime.now(UTC)), "dex": text}
        try:
            published = await publish(DEX_TOPIC, payload, DEX_QOS)
        except ValueError as exc:  # over the contract's 64 KiB
            log.warning("dex report too large to publish", error=str(exc))
            return UNAVAILABLE
        return None if published else UNAVAILABLE

    return publish_report


def dex_port_task(config: Config, journal: Journal) -> Coroutine[Any, Any, None] | None:
    """The DEX port's serving coroutine, or None without ``[dex] port``."""
    if config.dex.port is None:
        return None
    return DexPort(config.dex.port, config, journal).run()
