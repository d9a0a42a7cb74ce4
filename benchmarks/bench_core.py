"""The core math against a streaming pass over the same arrays.

Grad-CAM reads A and dy/dA once each; nothing it does should cost much more than a pass that
reads both and writes one array of the same size (``np.add(A, G, out=buf)``). Compared:
our ``grad_cam`` (mean of G, then one batched matmul), the mean-multiply-sum formulation common in
peers (full-size temporary of alpha * A), and an einsum.
"""

from __future__ import annotations

import numpy as np

import gradcam_ref
from benchmarks.timing import paired_ratios


def _numpy_methods(a: np.ndarray, g: np.ndarray) -> dict:
    buf = np.empty_like(a)
    return {
        "streaming np.add(A, G, out=buf)": lambda: np.add(a, g, out=buf),
        "gradcam_ref.grad_cam": lambda: gradcam_ref.grad_cam(a, g),
        "mean-multiply-sum": lambda: np.maximum((g.mean(axis=(2, 3), keepdims=True) * a).sum(axis=1), 0),
        "einsum": lambda: np.maximum(np.einsum("nk,nkhw->nhw", g.mean(axis=(2, 3)), a), 0),
    }


def run(quick: bool = False) -> list[dict]:
    rows = []
    rounds = 15 if quick else 40
    shape = (8, 2048, 7, 7)
    rng = np.random.default_rng(0)
    for dtype in (np.float64,):  # the NumPy reference path computes in float64
        a = rng.random(shape).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        results = paired_ratios(_numpy_methods(a, g), "streaming np.add(A, G, out=buf)", rounds=rounds, inner=5)
        rows += [{"suite": "core", "library": "numpy", "dtype": np.dtype(dtype).name, "shape": list(shape),
                  "method": name, **r} for name, r in results.items()]
    try:
        import torch
    except ImportError:
        return rows
    for dtype in (torch.float32, torch.float64):
        a = torch.rand(shape, dtype=dtype)
        g = torch.randn(shape, dtype=dtype)
        buf = torch.empty_like(a)
        methods = {
            "streaming torch.add(A, G, out=buf)": lambda a=a, g=g, buf=buf: torch.add(a, g, out=buf),
            "gradcam_ref.grad_cam": lambda a=a, g=g: gradcam_ref.grad_cam(a, g),
            "mean-multiply-sum": lambda a=a, g=g: (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1).clamp(min=0),
        }
        results = paired_ratios(methods, "streaming torch.add(A, G, out=buf)", rounds=rounds, inner=5)
        rows += [{"suite": "core", "library": "torch", "dtype": str(dtype).removeprefix("torch."),
                  "shape": list(shape), "method": name, **r} for name, r in results.items()]
    return rows
