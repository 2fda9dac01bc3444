"""A stand-in for the cloud backend, following ../shared/contracts/cloud-mqtt.md (the demo,
the tests and the rig use it; docs/cloud.md says how to run it).

* :mod:`hil.backend.store`: SQLite: journal records deduplicated by (machine, journal, seq),
  the latest status and telemetry per machine, orders, command results;
* :mod:`hil.backend.service`: the MQTT side: stores what machines publish, acks each journal
  batch with the highest contiguous stored seq;
* :mod:`hil.backend.commands`: signs commands;
* ``python -m hil.backend``: serve, and the operator's command line.
"""
