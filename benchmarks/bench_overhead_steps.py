"""The torch backend's fixed cost, paired in one process and timed in thread CPU time, step by step.

``python -m benchmarks.bench_overhead_steps [--model head|efficientnet] [--targets 1 10]
[--rounds R] [--base CHECKOUT]`` prints, per number of targets, the median over rounds of each
call's thread CPU time (``time.thread_time``: the time other processes hold the core is left
out) minus the no-grad forward's of the same round (and the median of per-round ratios to it): the floor
(:func:`benchmarks.bench_overhead.autograd_alone`, all-head model only), this tree's
``gradcam_ref.explain`` and, with ``--base``, the explain of another checkout (copied under the
package name ``gradcam_ref_base`` and imported into the same process). Each round runs every
call once in a fresh random order. Then each step of one explain call, timed the same way right
after a forward pass of the model (as in real use, with the caches that pass leaves), this tree's
and the base's calls alternating in random order: medians in microseconds. ``--floor-variants``:
ways of computing the floor itself (the same gradients to the bit), against it. One torch
thread; ``os.getloadavg()`` is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_overhead import CLASSES, SIZE, K, _targets, autograd_alone

STEPS = (
    ("backend detection", "gradcam_ref.backends", "select"),
    ("layer, training-mode check", "gradcam_ref.backends.torch._forward", "resolve_layer", "check_has_data"),
    ("layer, training-mode check", "gradcam_ref.backends.torch._state", "warn_if_training"),
    ("forward pass with the hook", "gradcam_ref.backends.torch._forward", "hooked"),
    ("output checks, targets", "gradcam_ref.backends.torch._forward", "check_captured"),
    ("output checks, targets", "gradcam_ref.backends.torch", "resolve_targets"),
    ("seeds and backward pass", "gradcam_ref.backends.torch._backward", "gradients"),
    ("core: Eq. 1, Eq. 2, checks, ReLU", "gradcam_ref.backends.torch", "grad_cam_fields"),
    ("zero-gradient check", "gradcam_ref.backends.torch._backward", "warn_if_zero_gradients"),
    ("Explanation", "gradcam_ref.backends.torch", "Explanation.from_capture"),
    # the same functions in a base from before the torch backend was split into modules
    ("layer, training-mode check", "gradcam_ref.backends.torch", "_resolve_layer", "_warn_if_training",
     "_check_has_data"),
    ("forward pass with the hook", "gradcam_ref.backends.torch", "_forward_hooked"),
    ("output checks, targets", "gradcam_ref.backends.torch", "_check_captured"),
    ("seeds and backward pass", "gradcam_ref.backends.torch", "_gradients"),
    ("zero-gradient check", "gradcam_ref.backends.torch", "_warn_zero_gradients"),
)
"""(step, module, functions...): the functions each step times (module names of this tree; a step may
span several modules, one row each)."""


def base_copy(checkout: Path, folder: Path) -> str:
    """``checkout``'s gradcam_ref (with its backends/ inside, as installed) under ``folder`` as the
    package ``gradcam_ref_base``, every ``gradcam_ref`` in its sources renamed; returns the name."""
    target = folder / "gradcam_ref_base"
    shutil.copytree(checkout / "gradcam_ref", target, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(checkout / "backends", target / "backends", ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.rglob("*.py"):
        path.write_text(re.sub(r"\bgradcam_ref\b", "gradcam_ref_base", path.read_text()))
    return "gradcam_ref_base"


@contextlib.contextmanager
def timed_steps(package: str, spent: dict[str, float]) -> Iterator[None]:
    """Wrap each step's functions in ``package`` so that their thread CPU time adds to ``spent``."""
    undo: list[Callable[[], None]] = []
    try:
        for step, module_name, *names in STEPS:
            try:
                module = importlib.import_module(module_name.replace("gradcam_ref", package, 1))
            except ModuleNotFoundError:  # not in this version
                continue
            for name in names:
                owner, attr = module, name
                if "." in name:
                    klass, attr = name.split(".")
                    owner = getattr(module, klass)
                original = (owner.__dict__ if isinstance(owner, type) else vars(owner)).get(attr)
                if original is None:  # not in this version
                    continue
                function = original.__func__ if isinstance(original, classmethod) else original

                def timed(*args: Any, _f: Any = function, _step: str = step, **kwargs: Any) -> Any:
                    start = time.thread_time()
                    try:
                        return _f(*args, **kwargs)
                    finally:
                        spent[_step] = spent.get(_step, 0.0) + time.thread_time() - start

                setattr(owner, attr, classmethod(timed) if isinstance(original, classmethod) else timed)
                undo.append(lambda owner=owner, attr=attr, original=original: setattr(owner, attr, original))
        yield
    finally:
        for restore in reversed(undo):
            restore()


def _cpu(call: Callable[[], object]) -> float:
    start = time.thread_time()
    call()
    return time.thread_time() - start


def paired(calls: dict[str, Callable[[], object]], rounds: int, seed: int = 0,
           ratios: dict[str, float] | None = None) -> dict[str, float]:
    """Medians over rounds of each call's thread CPU time minus the forward's (same round), in ms.

    ``ratios``, when given, receives the medians of the per-round ratios to the forward's time.
    """
    order = list(calls)
    for name in order:
        calls[name]()
    extra: dict[str, list[float]] = {name: [] for name in order if name != "forward"}
    ratio: dict[str, list[float]] = {name: [] for name in extra}
    forward: list[float] = []
    shuffle = random.Random(seed).shuffle
    for _ in range(rounds):
        shuffle(order)
        spent = {name: _cpu(calls[name]) for name in order}
        forward.append(spent["forward"])
        for name in extra:
            extra[name].append(spent[name] - spent["forward"])
            ratio[name].append(spent[name] / spent["forward"])
    if ratios is not None:
        ratios.update({n: statistics.median(v) for n, v in ratio.items()})
    return {"forward": statistics.median(forward) * 1e3, **{n: statistics.median(v) * 1e3 for n, v in extra.items()}}


def steps(packages: dict[str, Any], model: Any, forward: Callable[[], object], inputs: Any, targets: np.ndarray,
          layer: str, rounds: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Median microseconds of each step of each package's ``explain``, by package label.

    Each round times one call of each package, in a fresh random order, each right after
    ``forward()`` (the caches as a real call finds them).
    """
    per_round: dict[str, dict[str, list[float]]] = {label: {} for label in packages}
    order = list(packages)
    shuffle = random.Random(seed).shuffle
    for i in range(rounds + 2):
        shuffle(order)
        for label in order:
            package = packages[label]
            spent: dict[str, float] = {}
            forward()
            with timed_steps(package.__name__, spent):
                start = time.thread_time()
                package.explain(model, inputs, targets, layer=layer)
                total = time.thread_time() - start
            if i < 2:
                continue  # warm-up
            spent["all but the forward pass"] = total - spent["forward pass with the hook"]
            timed = sum(v for k, v in spent.items() if k != "all but the forward pass")
            spent["the rest (explain's own lines)"] = total - timed
            for name, value in spent.items():
                per_round[label].setdefault(name, []).append(value * 1e6)
    return {label: {name: statistics.median(values) for name, values in found.items()}
            for label, found in per_round.items()}


def floor_variants(rounds: int) -> dict[str, float]:
    """Ways of computing the floor's 1-target gradients on the all-head model, each checked to equal
    the floor to the bit: paired medians of thread CPU time minus the floor's (same round), in us."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    head = nn.Sequential(nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(K, CLASSES)).eval()
    a = torch.randn(1, K, SIZE, SIZE)
    index = torch.as_tensor([[3]])

    def run(copy: bool, backward: str) -> Any:
        leaf = a.detach().requires_grad_(True)
        scores = head(leaf.clone() if copy else leaf)
        seed = torch.zeros_like(scores).scatter_(1, index, 1.0)
        if backward == "grad_outputs":
            return torch.autograd.grad(scores, [leaf], seed)[0]
        if backward == "sum(seed * y)":
            return torch.autograd.grad((scores * seed).sum(), [leaf])[0]
        if backward == "dot(seed, y)":
            return torch.autograd.grad(torch.dot(scores.reshape(-1), seed.reshape(-1)), [leaf])[0]
        return torch.autograd.grad(scores.gather(1, index).sum(), [leaf])[0]

    calls = {"floor (leaf copy, grad_outputs=seed)": lambda: run(True, "grad_outputs"),
             "no leaf copy": lambda: run(False, "grad_outputs"),
             "sum(seed * y), no grad_outputs": lambda: run(True, "sum(seed * y)"),
             "dot(seed, y), no grad_outputs": lambda: run(True, "dot(seed, y)"),
             "y.gather(targets).sum(), no grad_outputs": lambda: run(True, "gather")}
    expected = calls["floor (leaf copy, grad_outputs=seed)"]()
    for name, call in calls.items():
        assert torch.equal(call(), expected), name
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            times[name].append(_cpu(calls[name]))
    base = times["floor (leaf copy, grad_outputs=seed)"]
    return {name: statistics.median(t - b for t, b in zip(values, base, strict=True)) * 1e6
            for name, values in times.items()}


def _model(kind: str) -> tuple[Any, Any, str, Any]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == "head":
        model = nn.Sequential(nn.Identity(), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(K, CLASSES)).eval()
        return model, torch.randn(1, K, SIZE, SIZE), "0", model[1:]
    from gradcam_ref.zoo import efficientnet_lite0

    model = efficientnet_lite0.load_torch().eval()
    return model, torch.randn(1, 3, 224, 224), "_bn1", None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_overhead_steps",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("head", "efficientnet"), default="head")
    parser.add_argument("--targets", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--rounds", type=int, default=200, help="paired rounds (default 200)")
    parser.add_argument("--step-rounds", type=int, default=60, help="rounds of the step timing (default 60)")
    parser.add_argument("--base", type=Path, help="a checkout to compare with (e.g. /work/main)")
    parser.add_argument("--floor-variants", action="store_true",
                        help="instead, time ways of computing the floor's 1-target gradients (all-head model)")
    args = parser.parse_args(argv)
    if args.floor_variants:
        import torch

        torch.set_num_threads(1)
        load = os.getloadavg()[0]
        found = floor_variants(args.rounds)
        print(f"## floor variants, 1 target, {args.rounds} rounds, load {load:.1f} -> {os.getloadavg()[0]:.1f}")
        for name, us in found.items():
            print(f"{name}: {us:+.1f} us against the floor (paired median)")
        return

    import torch

    import gradcam_ref

    torch.set_num_threads(1)
    packages = {"this tree": gradcam_ref}
    folder = None
    if args.base is not None:
        folder = Path(tempfile.mkdtemp(prefix="bench-base-"))
        sys.path.insert(0, str(folder))
        packages["base"] = importlib.import_module(base_copy(args.base, folder))
    try:
        model, inputs, layer, head = _model(args.model)

        def forward() -> object:
            with torch.no_grad():
                return model(inputs)

        for t in args.targets:
            targets = _targets(t)
            calls: dict[str, Callable[[], object]] = {"forward": forward}
            if head is not None:
                calls["floor (autograd_alone)"] = lambda targets=targets: autograd_alone(head, inputs, targets)
            for label, package in packages.items():
                calls[f"explain, {label}"] = lambda p=package, targets=targets: p.explain(model, inputs, targets,
                                                                                           layer=layer)
            load = os.getloadavg()
            ratios: dict[str, float] = {}
            found = paired(calls, args.rounds, ratios=ratios)
            print(f"## {args.model}, {t} target(s), {args.rounds} rounds, load before {load[0]:.1f}, "
                  f"after {os.getloadavg()[0]:.1f}")
            print(f"forward: {found.pop('forward'):.3f} ms (thread CPU time, median)")
            for name, ms in found.items():
                print(f"{name}: {ms:.3f} ms more than the forward ({ratios[name]:.4f}x, median of per-round ratios)")
            table = steps(packages, model, forward, inputs, targets, layer, args.step_rounds)
            print(f"| step (us, median of {args.step_rounds}) | " + " | ".join(table) + " |")
            print("|---|" + "---|" * len(table))
            for name in table["this tree"]:
                print(f"| {name} | " + " | ".join(f"{table[label].get(name, float('nan')):.0f}" for label in table)
                      + " |")
    finally:
        if folder is not None:
            sys.path.remove(str(folder))
            for name in [m for m in sys.modules if m == "gradcam_ref_base" or m.startswith("gradcam_ref_base.")]:
                del sys.modules[name]
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
