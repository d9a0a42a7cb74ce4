"""The core math against a streaming pass over the same arrays.

Grad-CAM reads A and dy/dA once each; nothing it does should cost much more than a pass that
reads both and writes one array of the same size (``np.add(A, G, out=buf)``). Compared:
our ``grad_cam`` (mean of G, then one batched matmul), the mean-multiply-sum formulation common in
peers (full-size temporary of alpha * A), and an einsum.

Shapes: ResNet-50's last block at batch 8, ``(8, 2048, 7, 7)``, and 10 targets for one image,
A ``(1, 2048, 7, 7)`` with G ``(1, 10, 2048, 7, 7)`` (the streaming pass then reads G and a
broadcast A and writes an array the size of G).
"""

from __future__ import annotations

import numpy as np

import gradcam_ref
from benchmarks.timing import paired_ratios

SHAPES = {"(8, 2048, 7, 7)": ((8, 2048, 7, 7), None), "(1, 2048, 7, 7) x 10 targets": ((1, 2048, 7, 7), 10)}


def _numpy_methods(a: np.ndarray, g: np.ndarray) -> dict:
    buf = np.empty(np.broadcast_shapes(a.shape, g.shape) if g.ndim == a.ndim else g.shape, dtype=a.dtype)
    multi = g.ndim == a.ndim + 1
    a_b = a[:, None] if multi else a
    spatial = tuple(range(g.ndim - 2, g.ndim))
    mean_multiply_sum = lambda: np.maximum(  # noqa: E731
        (g.mean(axis=spatial, keepdims=True) * a_b).sum(axis=-3), 0)
    einsum = lambda: np.maximum(  # noqa: E731
        np.einsum("n...k,nkhw->n...hw", g.mean(axis=spatial), a), 0)
    return {
        "streaming np.add(A, G, out=buf)": lambda: np.add(a_b, g, out=buf),
        "gradcam_ref.grad_cam": lambda: gradcam_ref.grad_cam(a, g),
        "mean-multiply-sum": mean_multiply_sum,
        "einsum": einsum,
    }


def _torch_methods(torch, a, g) -> dict:  # type: ignore[no-untyped-def]
    multi = g.ndim == a.ndim + 1
    a_b = a[:, None] if multi else a
    buf = torch.empty(g.shape, dtype=a.dtype)
    spatial = tuple(range(g.ndim - 2, g.ndim))
    return {
        "streaming torch.add(A, G, out=buf)": lambda: torch.add(a_b, g, out=buf),
        "gradcam_ref.grad_cam": lambda: gradcam_ref.grad_cam(a, g),
        "mean-multiply-sum": lambda: (g.mean(dim=spatial, keepdim=True) * a_b).sum(dim=-3).clamp(min=0),
    }


def run(
    quick: bool = False, rounds: int | None = None, shapes: dict | None = None, inner: int = 5
) -> list[dict]:
    """Rows ``{"suite": "core", "library", "dtype", "shape", "method", "ratio", ...}``.

    ``shapes``: ``{label: (shape of A, T or None)}`` (default :data:`SHAPES`).
    """
    rows = []
    rounds = rounds if rounds is not None else (15 if quick else 40)
    rng = np.random.default_rng(0)
    arrays = {}
    for label, (shape, targets) in (SHAPES if shapes is None else shapes).items():
        g_shape = shape if targets is None else (shape[0], targets, *shape[1:])
        arrays[label] = (rng.random(shape), rng.standard_normal(g_shape))
    for label, (a, g) in arrays.items():  # the NumPy reference path computes in float64
        results = paired_ratios(_numpy_methods(a, g), "streaming np.add(A, G, out=buf)", rounds=rounds, inner=inner)
        rows += [{"suite": "core", "library": "numpy", "dtype": "float64", "shape": label,
                  "method": name, **r} for name, r in results.items()]
    try:
        import torch
    except ImportError:
        return rows
    for dtype in (torch.float32, torch.float64):
        for label, (a64, g64) in arrays.items():
            a, g = torch.as_tensor(a64, dtype=dtype), torch.as_tensor(g64, dtype=dtype)
            results = paired_ratios(_torch_methods(torch, a, g), "streaming torch.add(A, G, out=buf)",
                                    rounds=rounds, inner=inner)
            rows += [{"suite": "core", "library": "torch", "dtype": str(dtype).removeprefix("torch."),
                      "shape": label, "method": name, **r} for name, r in results.items()]
    return rows
