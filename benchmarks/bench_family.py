"""The CAM family: each method of ours and of pytorch-grad-cam against a no-grad forward pass.

ResNet-18 at ``layer4`` (512 channels), batch 1, one target, the run's threads (one by default),
on a real photo (``skimage.data.chelsea()`` through the zoo's preprocessing: Score-CAM's cost
depends on how many channels are identical, see :func:`distinct_channels`).
Each method is timed interleaved with the baseline (``forward``) by
:func:`benchmarks.timing.tiered_ratios`; the perturbation methods cost hundreds of forward
passes, so they get the short "costly" series. Ours runs each library's variant where the two
differ (Score-CAM ``variant="pytorch-grad-cam"``, Ablation-CAM ``value="pytorch-grad-cam"``), so
both sides compute the same maps (``tests/test_benchmarks.py`` checks that on a small model).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import models, report
from benchmarks.timing import tiered_ratios

PGC_CLASSES = {"grad-cam": "GradCAM", "grad-cam++": "GradCAMPlusPlus", "hirescam": "HiResCAM",
               "xgrad-cam": "XGradCAM", "layercam": "LayerCAM", "eigen-cam": "EigenCAM",
               "eigen-grad-cam": "EigenGradCAM", "score-cam": "ScoreCAM", "ablation-cam": "AblationCAM"}
"""Each method's pytorch-grad-cam class."""

SAME_MAPS = {"score-cam": {"variant": "pytorch-grad-cam"}, "ablation-cam": {"value": "pytorch-grad-cam"}}
"""The options that make our method compute pytorch-grad-cam's maps."""

METHODS = tuple(PGC_CLASSES)


def ours(model: Any, layer: str, x: Any, target: int, method: str) -> Callable[[], object]:
    import gradcam_ref

    options = SAME_MAPS.get(method, {})

    def call() -> object:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
            return gradcam_ref.explain(model, x, [target], layer=layer, method=method, **options).maps

    return call


def pytorch_grad_cam(model: Any, layer: str, x: Any, target: int, method: str) -> tuple[Callable[[], object], Any]:
    """pytorch-grad-cam's class for ``method`` on its own copy of the model (it keeps hooks), and its closer."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    own = copy.deepcopy(model)
    cam = getattr(pgc, PGC_CLASSES[method])(model=own, target_layers=[own.get_submodule(layer)])
    targets = [ClassifierOutputTarget(target)]

    def call() -> object:
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):  # its tqdm progress bars
            return cam(input_tensor=x, targets=targets)

    return call, cam


def run(model_name: str = "resnet18", names: Sequence[str] = METHODS, *, budget_s: float, max_rounds: int,
        min_rounds: int, costly_min_rounds: int, peers: bool = True) -> list[dict]:
    """Rows ``{"suite": "family", "model", "batch": 1, "targets": 1, "method", "library", "ratio", ...}``."""
    model, layer = models.build(model_name)
    x = models.inputs(model_name, 1)
    source = "N(0, 1)"
    if tuple(x.shape[1:]) == (3, 224, 224):  # the ImageNet models: a real photo
        x, source = photo(), "chelsea"
    target = int(models.targets(model_name, 1, 1)[0])
    calls: dict[str, Callable[[], object]] = {"forward": lambda: _forward(model, x)}
    closers = []
    for method in names:
        calls[f"gradcam_ref {method}"] = ours(model, layer, x, target, method)
        if peers:
            call, cam = pytorch_grad_cam(model, layer, x, target, method)
            calls[f"pytorch-grad-cam {method}"] = call
            closers.append(cam)
    load_before = os.getloadavg()
    try:
        results = tiered_ratios(calls, "forward", budget_s=budget_s, max_rounds=max_rounds,
                                min_rounds=min_rounds, costly_min_rounds=costly_min_rounds)
    finally:
        for cam in closers:
            cam.activations_and_grads.release()
    load = [round(v, 2) for v in (*load_before[:1], *os.getloadavg()[:1])]
    distinct, channels = distinct_channels(model, layer, x)
    rows = []
    for name, r in results.items():
        library, _, method = name.partition(" ")
        extra = {"distinct_channels": distinct, "channels": channels} if method == "score-cam" else {}
        rows.append({"suite": "family", "model": model_name, "batch": 1, "targets": 1, "input": source,
                     "method": method or "forward", "library": library, **r, **extra,
                     "loadavg_1min_before_after": load})
    return rows


def photo() -> Any:
    """``skimage.data.chelsea()`` through the zoo's preprocessing: ``(1, 3, 224, 224)`` float32."""
    import numpy as np
    import skimage.data
    import torch

    from gradcam_ref.zoo.efficientnet_lite0 import preprocess

    return torch.from_numpy(preprocess(skimage.data.chelsea()).astype(np.float32)[None])


def distinct_channels(model: Any, layer: str, x: Any) -> tuple[int, int]:
    """How many of the layer's channels differ bit for bit on ``x`` (Score-CAM scores each once), of how many."""
    import gradcam_ref
    from gradcam_ref._explain import distinct_channels as distinct

    a = gradcam_ref.explain(model, x, [0], layer=layer).activations
    return len(distinct(a[0])[0]), int(a.shape[1])


def _forward(model: Any, x: Any) -> object:
    import torch

    with torch.no_grad():
        return model(x)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.bench_family [--methods score-cam] [--model resnet18] [--rounds 3] [--json FILE]``

    The family suite alone, or some of its methods (each timed against the forward pass, ours
    and pytorch-grad-cam's interleaved, ``--rounds`` rounds), on one thread unless ``--threads``;
    prints the rows and the speed-ups. ``--json FILE`` replaces those methods' rows in FILE
    (``benchmarks/results-family.json``), keeping the others.
    """
    import argparse
    import json

    from benchmarks.run import _has, set_threads

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_family", description=main.__doc__)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--model", default="resnet18", choices=(*models.MODELS, "tiny"))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each method against the forward pass")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", metavar="FILE", type=report.writable)
    parser.add_argument("--no-peers", action="store_true", help="ours only (no pytorch-grad-cam)")
    args = parser.parse_args(argv)
    names = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}, expected some of {list(METHODS)}")
    set_threads(args.threads)
    rows = run(args.model, names, budget_s=0.0, max_rounds=args.rounds, min_rounds=args.rounds,
               costly_min_rounds=args.rounds, peers=not args.no_peers and _has("pytorch_grad_cam"))
    forward = next(r for r in rows if r["method"] == "forward")
    for r in rows:
        if r["method"] == "forward":
            continue
        peer = next((p for p in rows if p["method"] == r["method"] and p["library"] == "pytorch-grad-cam"), None)
        r["forward_seconds"] = forward["seconds"]
        speedup = "" if peer is None or r is peer else (
            f", {peer['ratio'] / r['ratio']:.2f}x faster than pytorch-grad-cam "
            f"({peer['seconds'] / r['seconds']:.2f}x in seconds)")
        print(f"{args.model} {r['method']:15s} {r['library']:17s} {r['ratio']:8.2f}x ({r['q1']:.2f}-{r['q3']:.2f}) "
              f"{r['seconds']:8.3f} s, {r['rounds']} rounds, load {r['loadavg_1min_before_after']}{speedup}")
    if args.json:
        try:
            with open(args.json) as f:
                kept = [r for r in json.load(f)
                        if not (r.get("model") == args.model and r.get("method") in names)]
        except FileNotFoundError:
            kept = []
        report.save(args.json, kept + [r for r in rows if r["method"] != "forward"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
