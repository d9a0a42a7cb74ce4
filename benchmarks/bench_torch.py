"""Time of one explanation against a no-grad forward pass of the same model, batch and input.

For each model and batch size, every method of :mod:`benchmarks.methods` that is installed runs
interleaved with the baseline (``forward``) and the median of the per-round ratios is reported
(:func:`benchmarks.timing.tiered_ratios`). Methods whose library keeps hooks on the model get a
copy of it of their own. Peers' setup (building their explainer object, hooking the model and
unhooking it) is timed apart, against the batch-1 forward.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from benchmarks import methods as M
from benchmarks import models
from benchmarks.timing import paired_ratios, tiered_ratios


def _methods(names: Sequence[str], model: Any, layer: str, x: Any, targets: Any) -> dict[str, M.Method]:
    built = {}
    for name in names:
        if M.available(name):
            own = copy.deepcopy(model) if M.has_persistent_hooks(name) else model
            built[name] = M.make(name, own, layer, x, targets)
    return built


def time_config(
    model_name: str, model: Any, layer: str, batch: int, per_image: int, *, budget_s: float, max_rounds: int,
    min_rounds: int = 5, costly_min_rounds: int = 3, names: Sequence[str] | None = None,
) -> list[dict]:
    """Rows of one (model, batch, targets per image) configuration.

    ``names``: the methods (default: all of ``ONE_TARGET`` or ``MULTI_TARGET``, when installed).
    """
    x = models.inputs(model_name, batch)
    targets = models.targets(model_name, batch, per_image)
    if names is None:
        names = M.ONE_TARGET if per_image == 1 else M.MULTI_TARGET
    built = _methods(names, model, layer, x, targets)
    try:
        results = tiered_ratios({n: m.call for n, m in built.items()}, "forward", budget_s=budget_s,
                                max_rounds=max_rounds, min_rounds=min_rounds,
                                costly_min_rounds=costly_min_rounds)
    finally:
        for method in built.values():
            method.close()
    return [{"suite": "time", "model": model_name, "batch": batch, "targets": per_image, "method": name,
             "library": M.library(name), **r} for name, r in results.items()]


def time_setup(model_name: str, model: Any, layer: str, *, rounds: int) -> list[dict]:
    """Peers' setup cost (build the explainer, hook, unhook) against the batch-1 forward."""
    x = models.inputs(model_name, 1)
    calls = {"forward": M.make("forward", model, layer, x, models.targets(model_name, 1, 1)).call}
    for name in M.ONE_TARGET[2:]:
        if M.available(name):
            calls[f"{name} setup"] = M.setup(name, model, layer)
    results = paired_ratios(calls, "forward", rounds=rounds, warmup=1)
    return [{"suite": "setup", "model": model_name, "batch": 1, "targets": 1, "method": name,
             "library": M.library(name.removesuffix(" setup")), **r}
            for name, r in results.items() if name != "forward"]


def run(
    model_names: Sequence[str] = models.MODELS,
    batches: Sequence[int] = (1, 8),
    multi_targets: int = 10,
    multi_batch: int = 1,
    *,
    budget_s: float = 25.0,
    multi_budget_s: float = 40.0,
    max_rounds: int = 30,
    min_rounds: int = 5,
    costly_min_rounds: int = 3,
    setup_rounds: int = 10,
    log: Any = None,
) -> list[dict]:
    """All time rows: per model, 1 target at each batch size, then ``multi_targets`` targets."""
    rows: list[dict] = []
    for name in model_names:
        model, layer = models.build(name)
        configs = []
        for batch in batches:
            configs.append((batch, 1, budget_s))
        if multi_targets > 1:
            configs.append((multi_batch, multi_targets, multi_budget_s))
        for batch, per_image, budget in configs:
            new = time_config(name, model, layer, batch, per_image, budget_s=budget, max_rounds=max_rounds,
                              min_rounds=min_rounds, costly_min_rounds=costly_min_rounds)
            rows += new
            if log:
                log(new)
        if setup_rounds:
            new = time_setup(name, model, layer, rounds=setup_rounds)
            rows += new
            if log:
                log(new)
    return rows
