"""Paired, interleaved timing: ratios against a baseline measured in the same round.

This machine is shared and noisy, so absolute times are not comparable between runs. Each round
runs every method once, in a fresh random order, and divides each method's time by the
baseline's time *of that round*; the reported figure is the median of those ratios.
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


def paired_ratios(
    methods: dict[str, Callable[[], object]],
    baseline: str,
    *,
    rounds: int = 30,
    inner: int = 1,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{name: {"ratio": median of time/baseline-time, "seconds": median time}}``."""
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
    return {
        name: {
            "ratio": statistics.median(t / b for t, b in zip(times[name], base, strict=True)),
            "seconds": statistics.median(times[name]),
        }
        for name in methods
    }
