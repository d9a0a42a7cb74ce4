"""gradcam_ref: the reference implementation of Grad-CAM (Selvaraju et al.).

The core is pure math on arrays (NumPy in float64 as the reference path; torch and JAX arrays are
accepted and returned as they are). Backends in :mod:`gradcam_ref.backends` run models and
supply the activations, gradients and scores that :func:`explain` turns into maps.
"""

from gradcam_ref import conventions, gain, metrics
from gradcam_ref._evaluate import Evaluation, evaluate
from gradcam_ref._explain import Capture, Explanation, explain
from gradcam_ref._gradcam import cam, grad_cam, grad_cam_plus_plus, neuron_importance, tf_keras_vis_plus_plus_weights
from gradcam_ref._guided import guided_grad_cam, guided_image
from gradcam_ref._methods import (
    METHODS,
    ablated_activations,
    ablation_cam_weights,
    eigen_cam,
    eigen_grad_cam,
    fem,
    fuse_maps,
    hires_cam,
    layer_cam,
    layercam_scale,
    score_cam_masks,
    score_cam_weights,
    smooth_grad_cam_plus_plus,
    torchcam_smooth_weights,
    xgrad_cam,
    xgrad_cam_weights,
)
from gradcam_ref._postprocess import normalize, upsample
from gradcam_ref._warnings import (
    MetricWarning,
    NoGuidedReLUWarning,
    NonPositiveScoreWarning,
    ProbabilityScoresWarning,
    TrainingModeWarning,
    ZeroGradientWarning,
)
from gradcam_ref.dataset import explain_dataset

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Capture",
    "Evaluation",
    "Explanation",
    "MetricWarning",
    "NoGuidedReLUWarning",
    "NonPositiveScoreWarning",
    "ProbabilityScoresWarning",
    "TrainingModeWarning",
    "ZeroGradientWarning",
    "ablated_activations",
    "ablation_cam_weights",
    "cam",
    "conventions",
    "evaluate",
    "explain",
    "gain",
    "eigen_cam",
    "eigen_grad_cam",
    "explain_dataset",
    "fem",
    "fuse_maps",
    "grad_cam",
    "grad_cam_plus_plus",
    "guided_grad_cam",
    "guided_image",
    "metrics",
    "hires_cam",
    "layer_cam",
    "layercam_scale",
    "neuron_importance",
    "normalize",
    "score_cam_masks",
    "score_cam_weights",
    "smooth_grad_cam_plus_plus",
    "tf_keras_vis_plus_plus_weights",
    "torchcam_smooth_weights",
    "upsample",
    "xgrad_cam",
    "xgrad_cam_weights",
]
