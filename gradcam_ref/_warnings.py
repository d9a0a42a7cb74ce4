"""Every warning class of gradcam_ref, in one place (all importable from ``gradcam_ref``)."""

from __future__ import annotations

__all__ = [
    "MetricWarning", "NoGuidedReLUWarning", "NonPositiveScoreWarning", "TrainingModeWarning", "ZeroGradientWarning",
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
