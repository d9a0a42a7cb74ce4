"""One comparison of ``verify``: :class:`Check`, and how differences and tolerances are measured."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any

import numpy as np

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
