"""The change planner against brute force, and the exact-change helpers."""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.mdb.change import (
    can_pay_all_up_to,
    coin_step,
    max_exact_change,
    payable_amounts,
    plan_change,
)

Tubes = dict[int, tuple[int, int]]


def brute_force(amount: int, tubes: Tubes) -> int | None:
    """Fewest coins paying ``amount`` exactly, by trying every combination of counts."""
    types = sorted(tubes)
    best: int | None = None
    ranges = [range(tubes[t][1] + 1) for t in types]
    for counts in itertools.product(*ranges):
        if sum(n * tubes[t][0] for n, t in zip(counts, types, strict=True)) == amount:
            coins = sum(counts)
            if best is None or coins < best:
                best = coins
    return best


def paid(plan: dict[int, int], tubes: Tubes) -> int:
    return sum(tubes[t][0] * n for t, n in plan.items())


small_tubes = st.dictionaries(
    keys=st.integers(0, 15),
    values=st.tuples(st.integers(1, 60), st.integers(0, 5)),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(amount=st.integers(0, 200), tubes=small_tubes)
def test_plan_matches_brute_force(amount: int, tubes: Tubes) -> None:
    expected = brute_force(amount, tubes)
    plan = plan_change(amount, tubes)
    if expected is None:
        assert plan is None
        return
    assert plan is not None
    assert paid(plan, tubes) == amount
    assert sum(plan.values()) == expected
    for coin_type, count in plan.items():
        assert 0 < count <= tubes[coin_type][1]


@settings(max_examples=200, deadline=None)
@given(tubes=small_tubes, limit=st.integers(0, 150))
def test_payable_amounts_matches_brute_force(tubes: Tubes, limit: int) -> None:
    reach = payable_amounts(tubes, limit)
    for amount in range(limit + 1):
        assert bool((reach >> amount) & 1) == (brute_force(amount, tubes) is not None), amount


@settings(max_examples=200, deadline=None)
@given(tubes=small_tubes, limit=st.integers(0, 150))
def test_max_exact_change_is_the_first_gap(tubes: Tubes, limit: int) -> None:
    step = coin_step(tubes)
    best = max_exact_change(tubes, limit)
    if step == 0:
        assert best == 0
        return
    assert best % step == 0 and best <= limit
    for amount in range(step, best + 1, step):
        assert plan_change(amount, tubes) is not None
    nxt = best + step
    if nxt <= limit:
        assert plan_change(nxt, tubes) is None
    assert can_pay_all_up_to(limit, tubes) == (best >= limit - limit % step)


def test_greedy_counterexample_values() -> None:
    # Greedy takes 30 and cannot finish 40; 30 + 10 is the answer, not 25 + ...
    tubes = {0: (30, 5), 1: (25, 5), 2: (10, 5)}
    assert plan_change(40, tubes) == {0: 1, 2: 1}
    # 50: two 25s (2 coins) beat 30 + 10 + 10 (3 coins).
    assert plan_change(50, tubes) == {1: 2}


def test_limited_counts_beat_greedy() -> None:
    # Greedy takes the one 50 and cannot make the remaining 10 from 20s.
    tubes = {0: (50, 1), 1: (20, 3)}
    assert plan_change(60, tubes) == {1: 3}
    assert plan_change(70, tubes) == {0: 1, 1: 1}
    assert plan_change(30, tubes) is None


def test_edges() -> None:
    assert plan_change(0, {}) == {}
    assert plan_change(5, {}) is None
    assert plan_change(5, {0: (5, 0)}) is None
    assert plan_change(5, {0: (0, 9), 1: (5, 1)}) == {1: 1}
    with pytest.raises(ValueError):
        plan_change(-1, {0: (5, 1)})
    assert can_pay_all_up_to(0, {})
    assert not can_pay_all_up_to(5, {})
    assert max_exact_change({0: (5, 3), 1: (10, 1)}, 100) == 25


def test_euro_changer_large_amount_is_fast() -> None:
    # A typical euro changer in cents: 5c, 10c, 20c, 50c, 1 EUR, 2 EUR tubes.
    tubes = {0: (5, 80), 1: (10, 80), 2: (20, 80), 3: (50, 60), 4: (100, 40), 5: (200, 30)}
    started = time.perf_counter()
    plan = plan_change(4995, tubes)
    elapsed = time.perf_counter() - started
    assert plan is not None and paid(plan, tubes) == 4995
    # 24 x 2 EUR + 1 EUR + 50 + 20 + 20 + 5 = 4995 in 29 coins.
    assert sum(plan.values()) == 29
    assert elapsed < 2.0  # generous on a loaded machine; typically a few ms
