"""gradcam_ref: the reference implementation of Grad-CAM (Selvaraju et al.).

The core is pure math on arrays (NumPy in float64 as the reference path; torch and JAX arrays are
accepted and returned as they are). Backends in :mod:`gradcam_ref.backends` run models and
supply the activations, gradients and scores that :func:`explain` turns into maps.
"""

from gradcam_ref import conventions
from gradcam_ref._explain import Capture, Explanation, explain
from gradcam_ref._gradcam import cam, grad_cam, grad_cam_plus_plus, neuron_importance
from gradcam_ref._guided import guided_grad_cam, guided_image
from gradcam_ref._postprocess import normalize, upsample
from gradcam_ref._warnings import NoGuidedReLUWarning, TrainingModeWarning, ZeroGradientWarning
from gradcam_ref.dataset import explain_dataset

__version__ = "0.1.0"

__all__ = [
    "Capture",
    "Explanation",
    "NoGuidedReLUWarning",
    "TrainingModeWarning",
    "ZeroGradientWarning",
    "cam",
    "conventions",
    "explain",
    "explain_dataset",
    "grad_cam",
    "grad_cam_plus_plus",
    "guided_grad_cam",
    "guided_image",
    "neuron_importance",
    "normalize",
    "upsample",
]
