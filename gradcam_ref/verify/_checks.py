"""One comparison of ``verify``: :class:`Check`, and how differences and tolerances are measured."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from gradcam_ref._arrays import to_numpy
from gradcam_ref.verify import goldens

PEER_RTOL = 1e-5
"""A peer's map must match its convention within this fraction of the map's largest magnitude."""


@dataclasses.dataclass(frozen=True)
class PeerCase:
    """What a peer library is run on: a model of its framework, a layer (dotted name for torch,
    layer name for Keras), inputs (channels-first for torch, ``(N, H, W, C)`` for Keras) and one
    target per example."""

    name: str
    model: Any
    layer: str
    inputs: Any
    targets: list[int]


@dataclasses.dataclass(frozen=True)
class MethodPeer:
    """One CAM method of a peer library (torch or TensorFlow), compared with ``explain(method=...)``
    under the library's convention; :mod:`~gradcam_ref.verify.peers` and
    :mod:`~gradcam_ref.verify.tf_peers` each run their library's.

    Attributes:
      convention: the convention's name (its record holds the library's variant of the method).
      method: the method's name in :data:`gradcam_ref.METHODS`.
      call: the library's class.
      module, distribution: what must be importable; its pip name.
      run: ``case -> the library's maps`` as NumPy (channel axes of 1 squeezed).
      at_input_size: whether the library's map is at the input's size (else at the layer's).
      perturbation: one model run per channel and image (Score-CAM, Ablation-CAM).
      resolves_layer: whether the library explains the convolution at or before the named layer
        (tf-keras-vis's ``find_layer``) rather than the layer itself.
      float64: True, or why the library cannot run a float64 model (a note says so).
      options: more ``explain`` options than the convention's (e.g. Faster-ScoreCAM's ``max_n``),
        named in the check.
    """

    convention: str
    method: str
    call: str
    module: str
    distribution: str
    run: Callable[[PeerCase], np.ndarray]
    at_input_size: bool
    perturbation: bool = False
    resolves_layer: bool = False
    float64: bool | str = True
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def check(self, case: PeerCase, explanation: Any, input_size: tuple[int, ...], where: str = "") -> Check:
        """The library's maps on ``case`` against ``explanation.heatmap`` under the convention,
        named ``<convention> <method>[ (option=value)] on <case><where>``."""
        ours = explanation.heatmap(input_size if self.at_input_size else None, self.convention)
        named = "".join(f" ({k}={v})" for k, v in self.options.items())
        what = f"{self.call} ({self.distribution} {importlib.metadata.version(self.distribution)})"
        return compare(f"{self.convention} {self.method}{named} on {case.name}{where}", what,
                       to_numpy(ours), self.run(case), PEER_RTOL)


@dataclasses.dataclass(frozen=True)
class Check:
    """One comparison: ``passed`` when ``max_abs_diff <= tolerance`` (a NaN or Inf never passes)."""

    check: str
    reference: str
    max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance)

    def as_dict(self) -> dict[str, Any]:
        """The JSON object; a non-finite difference (shape mismatch, NaN) is ``None``."""
        diff = self.max_abs_diff if math.isfinite(self.max_abs_diff) else None
        return {"check": self.check, "reference": self.reference, "max_abs_diff": diff,
                "tolerance": self.tolerance, "passed": self.passed}


def compare(check: str, reference: str, actual: Any, expected: Any, rtol: float) -> Check:
    """``max|actual - expected|`` against ``rtol * max|expected|`` (:func:`gradcam_ref.verify.goldens.difference`)."""
    diff, tolerance = goldens.difference(actual, expected, rtol)
    if np.shape(actual) != np.shape(expected):
        reference = f"{reference} (shape {np.shape(expected)}, got {np.shape(actual)})"
    return Check(check, reference, diff, tolerance)


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
