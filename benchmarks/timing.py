"""Paired, interleaved timing: ratios against a baseline measured in the same round.

This machine is shared and noisy, so absolute times are not comparable between runs. Each round
runs every method once, in a fresh random order, and divides each method's time by the
baseline's time *of that round*; the reported figure is the median of those ratios, with its
quartiles as the spread.

:func:`tiered_ratios` adds a time budget: methods costing more than ``costly_above`` times the
baseline (a peer doing ten backward passes) are paired with the baseline in a second, shorter
series of rounds, so that the cheap methods, whose ratios are close to 1 and need the precision,
get most of the rounds.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable


def _once(fn: Callable[[], object], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def paired_ratios(
    methods: dict[str, Callable[[], object]],
    baseline: str,
    *,
    rounds: int = 30,
    inner: int = 1,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{name: {"ratio", "q1", "q3", "seconds", "rounds"}}``.

    ``ratio`` is the median over rounds of ``time(name) / time(baseline)`` (same round), ``q1``
    and ``q3`` the quartiles of those ratios, ``seconds`` the median time of one call.
    """
    if baseline not in methods:
        raise ValueError(f"baseline {baseline!r} is not one of the methods {list(methods)}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    order = list(methods)
    for name in order:
        for _ in range(warmup):
            methods[name]()
    shuffle = random.Random(seed).shuffle
    times: dict[str, list[float]] = {name: [] for name in order}
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            times[name].append(_once(methods[name], inner))
    base = times[baseline]
    results = {}
    for name in methods:
        ratios = [t / b for t, b in zip(times[name], base, strict=True)]
        q1, q3 = _quartiles(ratios)
        results[name] = {"ratio": statistics.median(ratios), "q1": q1, "q3": q3,
                         "seconds": statistics.median(times[name]), "rounds": rounds}
    return results


def tiered_ratios(
    methods: dict[str, Callable[[], object]],
    baseline: str,
    *,
    budget_s: float,
    max_rounds: int = 30,
    min_rounds: int = 5,
    costly_min_rounds: int = 3,
    costly_above: float = 4.0,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """:func:`paired_ratios` within a time budget of about ``budget_s`` seconds.

    Every method is called once first (warm-up), and that call's time is its estimated cost.
    Methods costing at most ``costly_above`` times the baseline are paired with it in
    ``budget / cost of a round`` rounds (between ``min_rounds`` and ``max_rounds``); the others
    with it in a second series, between ``costly_min_rounds`` and ``max_rounds`` rounds. The
    budget is split evenly between the two series when both exist.
    """
    if baseline not in methods:
        raise ValueError(f"baseline {baseline!r} is not one of the methods {list(methods)}")
    cost = {name: _once(fn, 1) for name, fn in methods.items()}
    limit = costly_above * cost[baseline]
    cheap = [n for n in methods if n == baseline or cost[n] <= limit]
    costly = [n for n in methods if n not in cheap]
    share = budget_s / (2 if costly else 1)

    def series(names: list[str], lowest: int) -> dict[str, dict[str, float]]:
        names = [baseline, *(n for n in names if n != baseline)]
        per_round = sum(cost[n] for n in names)
        rounds = max(lowest, min(max_rounds, int(share / max(per_round, 1e-9))))
        return paired_ratios({n: methods[n] for n in names}, baseline, rounds=rounds, warmup=0, seed=seed)

    results = series(cheap, min_rounds)
    if costly:
        results.update({n: r for n, r in series(costly, costly_min_rounds).items() if n != baseline})
    return {name: results[name] for name in methods}
