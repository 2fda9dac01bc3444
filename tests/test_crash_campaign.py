"""The crash campaign, small: SIGKILL the daemon at random instants while customers vend, then
check the journal against the simulators' ledgers (hil/crash_campaign.py has the invariants;
`python -m hil.crash_campaign --kills 300` is the large run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.crash_campaign import run_campaign

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_kills_lose_no_money_and_never_vend_twice(tmp_path: Path) -> None:
    outcome = run_campaign(tmp_path, kills=8, seed=20261122, log=lambda _msg: None)

    assert outcome.failures == []
    assert outcome.figures["kills"] == 8
    # The campaign did real work between kills: money moved and products dropped.
    assert outcome.figures["money_in"] > 0
    assert outcome.figures["customer_actions"] > 8
