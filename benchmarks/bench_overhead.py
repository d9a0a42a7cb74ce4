"""The fixed cost of one explanation: explain against the forward pass of a model that is all head.

The model's layer is its input: ``A`` ``(1, 1280, 7, 7)`` (EfficientNet-Lite0's last feature
maps) goes through ReLU6, global average pooling and a linear layer to 1000 scores, as
EfficientNet-Lite0's head does. So the forward pass costs almost nothing, and what explain adds
is what it adds to every model: the hook, the backward pass through the head, parsing the
targets, the core's Eq. 1 and 2 with their checks. ``extra_ms`` (median time of the method minus
the forward's) is that cost; it is a large fraction only of small models' batch-1 forward passes.

Torch: ``gradcam_ref.explain(model, a, targets, layer="0")`` (an ``nn.Identity`` first, so that
the hook is on a module) against ``model(a)`` under ``torch.no_grad()``; beside it the floor of
any Grad-CAM that starts the graph at the layer, :func:`autograd_alone` (the head with autograd
and one backward pass, nothing checked, no map). JAX: the jitted
``explain((features, head), a, targets)`` with ``features`` the identity, against the jitted
``head(features(a))``.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from benchmarks.timing import paired_ratios

K, SIZE, CLASSES = 1280, 7, 1000


def _targets(per_image: int) -> np.ndarray:
    return np.array([3]) if per_image == 1 else (3 + 100 * np.arange(per_image))[None, :]


def _rows(library: str, results: dict, per_image: int) -> list[dict]:
    base = results["forward"]["seconds"]
    return [{"suite": "overhead", "library": library, "model": "head only", "batch": 1, "targets": per_image,
             "method": name, **r, "extra_ms": (r["seconds"] - base) * 1e3} for name, r in results.items()]


def autograd_alone(head, a, targets: np.ndarray):
    """dy/dA of ``head(A)`` for ``targets`` with nothing around it: a leaf copy of ``a``, the head
    run with autograd, one-hot seeds, one (batched) backward pass. ``(1, K, ...)`` or ``(1, T, K, ...)``."""
    import torch

    leaf = a.detach().requires_grad_(True)
    scores = head(leaf.clone())
    index = torch.as_tensor(targets)
    if index.ndim == 1:
        seed = torch.zeros_like(scores).scatter_(1, index[:, None], 1.0)
        return torch.autograd.grad(scores, [leaf], seed)[0]
    seeds = torch.zeros((index.shape[1], *scores.shape)).scatter_(2, index.T[:, :, None], 1.0)
    return torch.autograd.grad(scores, [leaf], seeds, is_grads_batched=True)[0].movedim(0, 1)


def run_torch(rounds: int = 30, inner: int = 10) -> list[dict]:
    import torch
    from torch import nn

    import gradcam_ref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(K, CLASSES)).eval()
    a = torch.randn(1, K, SIZE, SIZE)
    rows = []
    for per_image in (1, 10):
        targets = _targets(per_image)

        def forward() -> object:
            with torch.no_grad():
                return model(a)

        calls = {"forward": forward,
                 "autograd alone (floor)": lambda targets=targets: autograd_alone(model[1:], a, targets),
                 "gradcam_ref.explain": lambda targets=targets: gradcam_ref.explain(model, a, targets, layer="0")}
        rows += _rows("torch", paired_ratios(calls, "forward", rounds=rounds, inner=inner), per_image)
    return rows


def run_jax(rounds: int = 30, inner: int = 10) -> list[dict]:
    import jax
    import jax.numpy as jnp

    import gradcam_ref

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((K, CLASSES)).astype(np.float32) / np.sqrt(K))
    a = jnp.asarray(rng.standard_normal((1, K, SIZE, SIZE)).astype(np.float32))

    def features(x: jax.Array) -> jax.Array:
        return x

    def head(x: jax.Array) -> jax.Array:
        return jnp.clip(x, 0, 6).mean(axis=(2, 3)) @ w

    forward = jax.jit(lambda x: head(features(x)))
    rows = []
    for per_image in (1, 10):
        targets = _targets(per_image)
        calls = {"forward": lambda: forward(a).block_until_ready(),
                 "gradcam_ref.explain (jitted)": lambda targets=targets: gradcam_ref.explain(
                     (features, head), a, targets).maps.block_until_ready()}
        rows += _rows("jax", paired_ratios(calls, "forward", rounds=rounds, inner=inner), per_image)
    return rows


def run(rounds: int = 30, inner: int = 10) -> list[dict]:
    rows = []
    if importlib.util.find_spec("torch") is not None:
        rows += run_torch(rounds, inner)
    if importlib.util.find_spec("jax") is not None:
        rows += run_jax(rounds, inner)
    return rows
