"""Change planning for a coin changer: which coins pay an amount exactly, with the fewest coins.

Pure: no I/O. Tubes are given as ``coin_type -> (value, count available)`` with values in any
one unit (minor units or the changer's scaled units), the amount in the same unit.

Greedy selection (largest coin first) is wrong in two common cases: coin values that are not
"canonical" (values {30, 25, 10} paying 40: greedy takes 30 and is stuck, 25 + ... fails too,
while 10 + 30 works) and limited tube counts (no 50s left, several 20s). So the planner is a
bounded knapsack: each tube's count is split into bundles of 1, 2, 4, ... coins (any count up
to the tube's is a sum of distinct bundles), and a 0/1 dynamic programme over the amount finds
the fewest coins. All values and the amount are first divided by their greatest common divisor,
so the table is as small as the coin set allows (a changer with 5-cent coins paying 20.00 works
on 400 cells, not 2000).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from functools import reduce
from math import gcd

#: Coin counts and values of one changer: coin_type -> (value, count available).
Tubes = Mapping[int, tuple[int, int]]

#: Guard against a caller passing an absurd amount (the table is amount / gcd cells long).
MAX_PLAN_CELLS = 1_000_000

_UNREACHABLE = 1 << 30


def _usable(tubes: Tubes, limit: int) -> list[tuple[int, int, int]]:
    """(coin_type, value, count) of tubes that can contribute to amounts up to ``limit``."""
    out: list[tuple[int, int, int]] = []
    for coin_type, (value, count) in sorted(tubes.items()):
        if value <= 0 or count <= 0 or value > limit:
            continue
        out.append((coin_type, value, min(count, limit // value)))
    return out


def _bundles(count: int) -> Iterator[int]:
    """1, 2, 4, ... and a remainder: every n <= count is a sum of distinct bundles."""
    size = 1
    while count > 0:
        take = min(size, count)
        yield take
        count -= take
        size *= 2


def plan_change(amount: int, tubes: Tubes) -> dict[int, int] | None:
    """Coin counts per coin type paying exactly ``amount`` with the fewest coins, or None.

    ``{}`` pays 0. The result never uses more coins of a type than its tube holds. Among plans
    with equally few coins the choice is deterministic for a given input.
    """
    if amount < 0:
        raise ValueError(f"amount must not be negative: {amount}")
    if amount == 0:
        return {}
    usable = _usable(tubes, amount)
    if not usable:
        return None
    unit = reduce(gcd, (value for _, value, _ in usable), amount)
    target = amount // unit
    if target > MAX_PLAN_CELLS:
        raise ValueError(f"amount {amount} too large to plan in units of {unit}")
    # Bundles: (coin_type, coins in the bundle, weight of the bundle in units).
    items: list[tuple[int, int, int]] = []
    for coin_type, value, count in usable:
        step = value // unit
        items.extend((coin_type, n, n * step) for n in _bundles(count))
    best = [_UNREACHABLE] * (target + 1)
    best[0] = 0
    taken: list[bytearray] = []
    for _, coins, weight in items:
        took = bytearray(target + 1)
        for w in range(target, weight - 1, -1):
            candidate = best[w - weight] + coins
            if candidate < best[w]:
                best[w] = candidate
                took[w] = 1
        taken.append(took)
    if best[target] >= _UNREACHABLE:
        return None
    plan: dict[int, int] = {}
    w = target
    for (coin_type, coins, weight), took in zip(reversed(items), reversed(taken), strict=True):
        if took[w]:
            plan[coin_type] = plan.get(coin_type, 0) + coins
            w -= weight
    assert w == 0, "change plan reconstruction did not reach zero"
    return plan


def coin_step(tubes: Tubes) -> int:
    """The smallest amount step the coins can ever make: the gcd of the coin values (0 if
    there are no coins)."""
    return reduce(gcd, (value for value, count in tubes.values() if value > 0 and count > 0), 0)


def payable_amounts(tubes: Tubes, limit: int) -> int:
    """A bit set: bit ``a`` is 1 when ``a`` (0 <= a <= limit) can be paid exactly."""
    if limit < 0:
        raise ValueError(f"limit must not be negative: {limit}")
    mask = (1 << (limit + 1)) - 1
    reach = 1
    for _, value, count in _usable(tubes, limit):
        for n in _bundles(count):
            reach |= (reach << (n * value)) & mask
    return reach


def max_exact_change(tubes: Tubes, limit: int, step: int | None = None) -> int:
    """The largest amount ``m <= limit`` such that every multiple of ``step`` in (0, m] can be
    paid exactly; 0 when not even ``step`` can. ``step`` defaults to ``coin_step(tubes)``:
    prices are multiples of the smallest coin unit, other amounts can never be paid."""
    if step is None:
        step = coin_step(tubes)
    if step <= 0:
        return 0
    reach = payable_amounts(tubes, limit)
    best = 0
    for amount in range(step, limit + 1, step):
        if not (reach >> amount) & 1:
            break
        best = amount
    return best


def can_pay_all_up_to(limit: int, tubes: Tubes, step: int | None = None) -> bool:
    """True when every multiple of ``step`` up to ``limit`` can be paid exactly: the changer is
    out of the "exact change only" state for prices up to ``limit``."""
    if step is None:
        step = coin_step(tubes)
    if limit <= 0:
        return True
    if step <= 0:
        return False
    return max_exact_change(tubes, limit, step) >= limit - limit % step


def coins_within(
    coins: Mapping[int, int], limit: int, value_of: Callable[[int], int]
) -> dict[int, int]:
    """The coins of ``coins`` (type -> count) worth at most ``limit``, dropping the largest
    first: what a payout may record when more was counted than it may have paid."""
    kept = dict(coins)
    for coin_type in sorted(kept, key=value_of, reverse=True):
        while kept[coin_type] > 0 and sum(value_of(t) * n for t, n in kept.items()) > limit:
            kept[coin_type] -= 1
    return {t: n for t, n in kept.items() if n > 0}
