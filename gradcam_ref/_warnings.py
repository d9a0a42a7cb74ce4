"""Every warning class of gradcam_ref, in one place (all importable from ``gradcam_ref``)."""

from __future__ import annotations

import warnings

import numpy as np

__all__ = [
    "MetricWarning", "NoGuidedReLUWarning", "NonPositiveScoreWarning", "ProbabilityScoresWarning",
    "TrainingModeWarning", "ZeroGradientWarning",
]


class NoGuidedReLUWarning(UserWarning):
    """A guided pass left ReLUs unguided: none was recognised (guided backpropagation is then the
    plain input gradient), or (JAX) some sit where they cannot be guided."""


class ZeroGradientWarning(UserWarning):
    """The score's gradient at the layer is exactly zero for some example: its map is zero."""


class TrainingModeWarning(UserWarning):
    """The model has layers whose training mode changes the result (dropout, batch norm)."""


class MetricWarning(UserWarning):
    """A metric is undefined for some examples (an all-zero or constant map, a mask covering
    everything): their value is NaN, and the message names them and says why."""


class NonPositiveScoreWarning(UserWarning):
    """Ablation-CAM divides by the target score, which is negative here: its weights change sign."""


class ProbabilityScoresWarning(UserWarning):
    """The model's output is a softmax (or log-softmax): the maps explain probabilities, not the
    pre-softmax logits that Grad-CAM's :math:`y^c` is (Selvaraju et al., Sec. 3)."""


def probabilities_message(model: str, name: str, layer: str, fix: str) -> str:
    """The :class:`ProbabilityScoresWarning` of every backend: ``model`` (how the backend names it)
    ends in ``name`` (``"softmax"`` or ``"log_softmax"``) at ``layer`` ("" or " 'fc' (Dense)");
    ``fix`` completes "explain ...", e.g. "the model without the final softmax"."""
    return (f"the scores of {model} are the {name} of its last layer{layer}, so the maps explain "
            f"{'log-' if name == 'log_softmax' else ''}probabilities, not the pre-softmax logits Grad-CAM is "
            "defined on (a saturated class has near-zero gradients, and every class's logit enters each score); "
            f"explain {fix}, or pass a callable target to explain a function of these scores on purpose")


def warn_zero_gradients(zero: np.ndarray, where: str, stacklevel: int) -> None:
    """Warn :class:`ZeroGradientWarning` (one message for every backend) when ``zero`` has a True.

    ``zero``: a NumPy bool array, ``(N,)`` (example n's gradients at the layer are all exactly
    zero) or ``(N, T)`` (per example and target); ``where`` names the layer, e.g.
    ``"layer 'conv'"``; ``stacklevel`` counts from the caller, as for ``warnings.warn``.
    """
    if not zero.any():
        return
    bad = [int(b[0]) if zero.ndim == 1 else tuple(int(i) for i in b) for b in np.argwhere(zero)]
    warnings.warn(
        f"the gradients of the score at {where} are exactly zero for "
        f"{'example' if zero.ndim == 1 else '(example, target)'} {bad[:10]}{' ...' if len(bad) > 10 else ''}: "
        "the score does not depend on the layer there, so the map is zero",
        ZeroGradientWarning,
        stacklevel=stacklevel + 1,
    )
