"""The stand-in backend's store and operator command line (no broker needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hil.backend.__main__ import main
from hil.backend.store import BackendStore, BatchInvalid


def record(seq: int, rtype: str = "inventory_changed", **data: Any) -> dict[str, Any]:
    return {
        "seq": seq,
        "id": f"id-{seq}",
        "boot_id": "b",
        "ts": "2026-11-22T22:40:00.123Z",
        "type": rtype,
        "data": data,
        "source": {"kind": "local"},
    }


def batch(*seqs: int, journal: str = "J1") -> dict[str, Any]:
    return {"machine": "M", "journal": journal, "records": [record(s) for s in seqs]}


def test_duplicates_dropped_and_ack_is_the_highest_contiguous_seq(tmp_path: Path) -> None:
    store = BackendStore(tmp_path)
    assert store.store_batch("M", batch(1, 2, 3))[1].upto == 3
    outcome = store.store_batch("M", batch(2, 3, 4))[1]
    assert (outcome.stored, outcome.duplicates, outcome.upto) == (1, 2, 4)
    assert store.store_batch("M", batch(7, 8))[1].upto == 4  # a gap: 5 and 6 missing
    assert store.store_batch("M", batch(5, 6))[1].upto == 8
    assert store.store_batch("M", batch(1, 2))[1].upto == 8  # all duplicates: acked again
    assert [r["seq"] for r in store.records("M", "J1")] == list(range(1, 9))
    # Another journal of the same machine (a wiped database) is a sequence of its own.
    assert store.store_batch("M", batch(1, journal="J2"))[1].upto == 1
    assert store.acked_upto("M", "J1") == 8
    store.close()
    assert BackendStore(tmp_path).acked_upto("M", "J1") == 8  # durable


@pytest.mark.parametrize(
    "payload",
    [
        {"machine": "OTHER", "journal": "J", "records": [record(1)]},
        {"machine": "M", "journal": "J", "records": []},
        {"machine": "M", "journal": "J", "records": [record(2), record(1)]},
        {"machine": "M", "journal": "J", "records": [record(1)] * 2},
        {"machine": "M", "journal": 5, "records": [record(1)]},
        {"machine": "M", "journal": "J", "records": [{"seq": "1"}]},
        {"machine": "M", "journal": "J", "records": [record(i) for i in range(1, 502)]},
    ],
)
def test_batches_that_break_the_contract_are_refused(
    tmp_path: Path, payload: dict[str, Any]
) -> None:
    with pytest.raises(BatchInvalid):
        BackendStore(tmp_path).store_batch("M", payload)


def test_operator_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = BackendStore(tmp_path)
    store.store_batch(
        "M",
        {
            "machine": "M",
            "journal": "J",
            "records": [
                record(1, "sale", slot="A1", price=150),
                record(2, "sale", slot="A1", price=150),
                record(3, "sale", slot="B1", price=200),
            ],
        },
    )
    store.put_latest("M", "status", {"online": True, "boot_id": "b"})
    store.put_latest("M", "telemetry", {"slots": [{"slot": "A1", "stock": 3}], "journal": {}})
    store.close()
    state = ["--state", str(tmp_path)]
    assert main(["sales", *state]) == 0
    sales = json.loads(capsys.readouterr().out)
    assert sales["total"] == {"count": 3, "amount": 500}
    assert sales["slots"]["A1"] == {"count": 2, "amount": 300}
    assert main(["stock", *state, "--machine", "M"]) == 0
    assert json.loads(capsys.readouterr().out)["slots"][0]["stock"] == 3
    assert main(["status", *state]) == 0
    assert json.loads(capsys.readouterr().out)["online"] is True
    assert main(["records", *state, "--type", "sale", "--limit", "2"]) == 0
    assert [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()] == [1, 2]
