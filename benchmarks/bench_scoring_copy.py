"""Score-CAM's scoring copy: whole calls with and without the fused oneDNN convolutions, one process.

ResNet-18 at ``layer4`` on the chelsea photo (as ``benchmarks.bench_family``), ``variant=
"pytorch-grad-cam"``, one thread. Each round runs, in random order, ours with
``fuse_convolutions=True`` (this tree's default), ours with ``fuse_convolutions=False`` (the
folded ``channels_last`` copy before it) and, unless ``--no-peers``, pytorch-grad-cam; each is
timed by ``time.thread_time`` (CPU time of the calling thread: fair under load) and wall clock.
Prints per-round ratios to the fused call and their medians, the load before and after, and
the largest difference between the maps of the two variants of ours.
"""

from __future__ import annotations

import os
import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any


def calls(peers: bool) -> tuple[dict[str, Callable[[], Any]], Callable[[], None]]:
    """The timed calls by name, and the closer of pytorch-grad-cam's hooks."""
    import gradcam_ref
    from benchmarks import models
    from benchmarks.bench_family import photo, pytorch_grad_cam

    model, layer = models.build("resnet18")
    x = photo()
    target = int(models.targets("resnet18", 1, 1)[0])

    def ours(fuse: bool) -> Callable[[], Any]:
        def call() -> Any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
                return gradcam_ref.explain(model, x, [target], layer=layer, method="score-cam",
                                           variant="pytorch-grad-cam", fuse_convolutions=fuse).maps
        return call

    named: dict[str, Callable[[], Any]] = {"fused": ours(True), "unfused": ours(False)}
    close: Callable[[], None] = lambda: None  # noqa: E731
    if peers:
        named["pytorch-grad-cam"], cam = pytorch_grad_cam(model, layer, x, target, "score-cam")
        close = cam.activations_and_grads.release
    return named, close


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.bench_scoring_copy [--rounds 3] [--no-peers]``"""
    import argparse

    from benchmarks.run import set_threads

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scoring_copy", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args(argv)
    set_threads(1)
    import numpy as np
    import torch

    torch.set_num_threads(1)
    named, close = calls(peers=not args.no_peers)
    maps = {k: np.asarray(named[k]()) for k in ("fused", "unfused")}  # warm-up, and the maps compared
    print(f"max |fused - unfused| map difference: {float(np.abs(maps['fused'] - maps['unfused']).max()):.3g}")
    cpu: dict[str, list[float]] = {k: [] for k in named}
    wall: dict[str, list[float]] = {k: [] for k in named}
    load = [os.getloadavg()[0]]
    try:
        for _ in range(args.rounds):
            order = list(named)
            random.shuffle(order)
            for k in order:
                t, w = time.thread_time(), time.perf_counter()
                named[k]()
                cpu[k].append(time.thread_time() - t)
                wall[k].append(time.perf_counter() - w)
    finally:
        close()
    load.append(os.getloadavg()[0])
    for k in named:
        if k == "fused":
            continue
        r_cpu = [a / b for a, b in zip(cpu[k], cpu["fused"], strict=True)]
        r_wall = [a / b for a, b in zip(wall[k], wall["fused"], strict=True)]
        print(f"{k} / fused: CPU {statistics.median(r_cpu):.3f}x (rounds {', '.join(f'{r:.3f}' for r in r_cpu)}), "
              f"wall {statistics.median(r_wall):.3f}x (rounds {', '.join(f'{r:.3f}' for r in r_wall)})")
    for k in named:
        print(f"{k:17s} CPU {statistics.median(cpu[k]):7.2f} s, wall {statistics.median(wall[k]):7.2f} s (medians)")
    print(f"rounds {args.rounds}, load {load[0]:.2f} before, {load[1]:.2f} after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
