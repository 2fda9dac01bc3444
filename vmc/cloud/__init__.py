"""The machine ↔ cloud link over MQTT (../shared/contracts/cloud-mqtt.md, docs/cloud.md).

* :mod:`vmc.cloud.link`: the connection (:class:`~vmc.cloud.link.CloudLink`), its state, the
  topics, and the :class:`~vmc.cloud.link.CommandSink` hook for signed commands;
* :mod:`vmc.cloud.sync`: the journal as the outbox (:class:`~vmc.cloud.sync.JournalSync`);
* :mod:`vmc.cloud.telemetry`: the retained telemetry, on change and as a heartbeat.
"""

from vmc.cloud.link import CloudLink, CommandSink, LinkState, LinkStatus, Topics

__all__ = ["CloudLink", "CommandSink", "LinkState", "LinkStatus", "Topics"]
