"""explain and Explanation: backend selection, and what an Explanation holds."""

import re

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


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"noise": [1.0, 2.0]}, TypeError,  # was AttributeError 'float' object has no attribute 'shape'
     "noise must be n >= 1 draws of the inputs' shape (2, 2, 5, 5), got items of types ['float']"),
    ({"noise": "abc"}, TypeError, "noise must be n >= 1 draws of the inputs' shape (2, 2, 5, 5), "
                                  "got 'abc'"),
    ({"noise": 0.5}, TypeError, "noise must be n >= 1 draws of the inputs' shape (2, 2, 5, 5), got 0.5"),
    ({"noise": []}, ValueError, "noise must be n >= 1 draws of the inputs' shape (2, 2, 5, 5), "
                                "got shapes []"),
    ({"seed": -1}, ValueError, "seed must be an int >= 0 or None, got -1"),  # was NumPy's 'expected non-negative'
    ({"seed": 1.5}, TypeError, "seed must be an int >= 0 or None, got 1.5"),
    ({"seed": True}, TypeError, "seed must be an int >= 0 or None, got True"),
    ({"n_samples": 0}, ValueError, "n_samples must be an int >= 1, got 0"),
    ({"n_samples": 2.0}, ValueError, "n_samples must be an int >= 1, got 2.0"),  # ValueError for any refused value
    ({"n_samples": None}, ValueError, "n_samples must be an int >= 1, got None"),
    ({"variant": np.array(["paper"])}, ValueError, "variant must be 'paper' or 'torchcam', got array(['paper'], "
                                                   "dtype='<U5')"),
])
def test_smooth_options_are_named(options, error, message):
    model, x = _oracle()
    with pytest.raises(error, match="^" + re.escape(message) + "$"):
        gradcam_ref.explain(model, x, [1, 3], method="smooth-grad-cam++", **options)


@pytest.mark.parametrize(("method", "options", "message"), [
    ("score-cam", {"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ("ablation-cam", {"batch_size": 1.5}, "batch_size must be an int >= 1, got 1.5"),
    ("score-cam", {"batch_size": True}, "batch_size must be an int >= 1, got True"),
    ("score-cam", {"max_n": 0}, "max_n must be an int >= 1 or None (channels kept per example), got 0"),
    ("score-cam", {"max_n": "2"}, "max_n must be an int >= 1 or None (channels kept per example), got '2'"),
])
def test_perturbation_counts_are_named(method, options, message):
    """ValueError for every refused value, a wrong type included, as these options always raised."""
    model, x = _oracle()
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        gradcam_ref.explain(model, x, [1, 3], method=method, **options)


def test_smooth_noise_given_as_draws_is_the_seeded_noise():
    model, x = _oracle()
    draws = 0.3 * np.random.default_rng(5).standard_normal((2, *x.shape))
    seeded = gradcam_ref.explain(model, x, [1, 3], method="smooth-grad-cam++", seed=5, n_samples=2)
    given = gradcam_ref.explain(model, x, [1, 3], method="smooth-grad-cam++", noise=draws)  # an array of n draws
    np.testing.assert_array_equal(given.maps, seeded.maps)


@pytest.mark.parametrize(("options", "message"), [
    ({"method": "score-cam", "variant": np.array(["paper", "official"])},
     "variant must be one of ('paper', 'pytorch-grad-cam', 'torchcam', 'official', 'tf-keras-vis'), "
     "got array(['paper', 'official'], dtype='<U8')"),
    ({"method": "ablation-cam", "value": np.array(["zero"])},
     "value must be 'zero' or 'pytorch-grad-cam', got array(['zero'], dtype='<U4')"),
    ({"method": "ablation-cam", "denominator": "absolute"}, "denominator must be 'score' or 'abs', got 'absolute'"),
    ({"method": np.array(["grad-cam"])}, "method must be one of ['grad-cam', 'grad-cam++', 'hirescam', 'xgrad-cam', "
     "'layercam', 'eigen-cam', 'eigen-grad-cam', 'smooth-grad-cam++', 'fem', 'score-cam', 'ablation-cam'], "
     "got array(['grad-cam'], dtype='<U8')"),
    ({"differentiable": np.array(["stop"])}, "differentiable must be one of (False, 'stop', 'full') (True is "
     "ambiguous: say which gradient mode), got array(['stop'], dtype='<U4')"),
])
def test_names_given_an_array_are_one_line_errors(options, message, monkeypatch):
    """Each said 'The truth value of an array with more than one element is ambiguous' (or took a 1-element one).
    Refused before any model run: a wrong denominator was refused after every ablated copy was scored."""
    model, x = _oracle()
    monkeypatch.setattr(numpy_backend, "perturb", lambda *args, **kwargs: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        gradcam_ref.explain(model, x, [1, 3], **options)
