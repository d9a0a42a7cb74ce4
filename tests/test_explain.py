"""explain and Explanation: backend selection, and what an Explanation holds."""

import numpy as np
import pytest

import gradcam_ref
from gradcam_ref import backends
from gradcam_ref.backends import numpy_backend


def _oracle():
    rng = np.random.default_rng(0)
    model = numpy_backend.Oracle.random(rng, in_channels=2, widths=[3], kernel_sizes=[2], num_classes=4)
    return model, rng.standard_normal((2, 2, 5, 5))


def test_explanation_holds_the_core_math_of_the_captured_arrays():
    model, x = _oracle()
    e = gradcam_ref.explain(model, x, [1, 3])
    np.testing.assert_array_equal(e.targets, [1, 3])
    np.testing.assert_array_equal(e.weights, gradcam_ref.neuron_importance(e.gradients))
    np.testing.assert_array_equal(e.maps, gradcam_ref.grad_cam(e.activations, e.gradients))
    assert e.maps.shape == (2, 4, 4) and e.weights.shape == (2, 3) and e.scores.shape == (2, 4)


def test_numpy_copy_is_float64_and_independent():
    model, x = _oracle()
    e = gradcam_ref.explain(model, x)
    copy = e.numpy()
    assert all(getattr(copy, f).dtype == np.float64 for f in ("maps", "activations", "gradients", "weights", "scores"))
    copy.maps[...] = -1
    assert (e.maps >= 0).all()
    assert copy.targets is e.targets


def test_backend_is_detected_or_forced():
    model, x = _oracle()
    assert backends.select(model, x) is numpy_backend
    assert backends.select(object(), x, backend="numpy") is numpy_backend
    with pytest.raises(TypeError, match=r"cannot tell which framework model of type builtins.object.*pass backend="):
        gradcam_ref.explain(object(), x)
    with pytest.raises(ValueError, match=r"backend must be one of \('numpy', 'torch', 'jax', 'tensorflow'\), got 'tf'"):
        gradcam_ref.explain(model, x, backend="tf")


def test_public_namespace_is_small_and_explicit():
    assert sorted(gradcam_ref.__all__) == sorted(
        ["Capture", "Evaluation", "Explanation", "MetricWarning", "NoGuidedReLUWarning", "TrainingModeWarning",
         "ZeroGradientWarning", "cam", "conventions", "evaluate", "explain", "explain_dataset", "gain", "grad_cam",
         "grad_cam_plus_plus",
         "guided_grad_cam", "guided_image", "metrics", "neuron_importance", "normalize", "upsample",
         # the CAM family (issue 14)
         "METHODS", "NonPositiveScoreWarning", "ablated_activations", "ablation_cam_weights", "eigen_cam",
         "eigen_grad_cam", "fuse_maps", "hires_cam", "layer_cam", "layercam_scale", "score_cam_masks",
         "score_cam_weights", "smooth_grad_cam_plus_plus", "torchcam_smooth_weights", "xgrad_cam", "xgrad_cam_weights",
         # the TensorFlow peers' methods (issue 15)
         "fem", "tf_keras_vis_plus_plus_weights",
         # a model whose output is a softmax
         "ProbabilityScoresWarning"]
    )
    assert all(hasattr(gradcam_ref, name) for name in gradcam_ref.__all__)
