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

from benchmarks import models
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
