"""tf-keras-vis 0.8.7 and xplique 2.0.2 themselves against the ``tf-keras-vis`` and ``xplique``
conventions, on Keras twins of the verify nets; TensorFlow's bicubic resize against the engine's
``cubic-tf`` kernel; and how tf-keras-vis turns a layer name into the tensor it differentiates.

torchvision is imported first by tests/conftest.py (importing it after TensorFlow crashes)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras_vis  # noqa: E402,F401  (part of make test: no skip)
import xplique  # noqa: E402,F401  (part of make test: no skip)
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcam_ref
from gradcam_ref._resample import resize
from gradcam_ref.verify import tf_peers


@pytest.fixture(scope="module")
def cases():
    return tf_peers.keras_cases()


def test_every_tf_peer_matches_its_convention_on_every_keras_case(cases):
    checks, notes = tf_peers.peer_checks(cases)
    assert len(checks) == 5 + 4 + 4  # tf-keras-vis on 5 cases; xplique GradCAM and GradCAMPP on 4 (float32)
    failed = [(c.check, c.max_abs_diff, c.tolerance) for c in checks if not c.passed]
    assert not failed
    assert any("xplique casts inputs and targets to float32" in note for note in notes)


def test_tf_keras_vis_explains_the_convolution_before_the_layer_it_is_named(cases):
    """penultimate_layer='relu1' is a hint: tf-keras-vis differentiates conv1 (before its ReLU); the
    map at the named layer is another map, which the check would catch."""
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.utils.scores import CategoricalScore

    case = cases[2]  # the conv-BN-pool CNN
    assert tf_peers.tf_keras_vis_layer(case.model, "relu1") == "conv1"
    assert tf_peers.tf_keras_vis_layer(case.model, "conv1") == "conv1"
    assert tf_peers.tf_keras_vis_layer(case.model, "fc") == "conv1"  # walking back from the classifier
    assert tf_peers.tf_keras_vis_layer(cases[3].model, "out_relu") == "Conv_1"  # before Conv_1_bn too
    theirs = Gradcam(case.model)(CategoricalScore(case.targets), case.inputs, penultimate_layer="relu1")
    size = case.inputs.shape[1:3]
    at_conv = gradcam_ref.explain(case.model, case.inputs, case.targets, layer="conv1").heatmap(size, "tf-keras-vis")
    at_relu = gradcam_ref.explain(case.model, case.inputs, case.targets, layer="relu1").heatmap(size, "tf-keras-vis")
    assert np.abs(at_conv - theirs).max() <= 1e-5 * np.abs(theirs).max()
    assert np.abs(at_relu - theirs).max() > 1e-2


def test_every_tf_peer_method_matches_its_convention_on_every_keras_case(cases):
    """tf-keras-vis's Layercam, GradcamPlusPlus and Scorecam and xplique's FEM, the libraries
    themselves, within 1e-5 of the max of their maps (Scorecam at layers of <= 64 channels here;
    at MobileNetV2's 1280: the slow test below)."""
    checks, notes = tf_peers.method_peer_checks(cases, perturbation="small")
    names = [c.check for c in checks]
    assert sum("tf-keras-vis layercam" in n for n in names) == 5
    assert sum("tf-keras-vis grad-cam++" in n for n in names) == 5
    assert sum("tf-keras-vis score-cam on" in n for n in names) == 3  # float32, <= 64 channels
    assert sum("tf-keras-vis score-cam (max_n=2) on" in n for n in names) == 3  # Faster-ScoreCAM
    assert sum("xplique fem" in n for n in names) == 4  # float32
    failed = [(c.check, c.max_abs_diff, c.tolerance) for c in checks if not c.passed]
    assert not failed
    assert all(c.tolerance > 0 for c in checks)
    assert any("Scorecam on float64 models: not run" in note for note in notes)
    assert any("FEM on float64 models: not run" in note for note in notes)


@pytest.mark.slow
def test_tf_keras_vis_score_cam_on_mobilenet_v2s_1280_channels(cases):
    """One masked forward pass per channel and image: 2560 MobileNetV2 runs in each library."""
    checks, _ = tf_peers.method_peer_checks([cases[3]], perturbation="all")
    score = [c for c in checks if "score-cam" in c.check]
    assert len(score) == 2 and all(c.passed for c in score), score  # max_N=None and max_N=2


def test_what_the_tf_method_peers_cannot_run_or_do_otherwise(cases):
    """The notes' reasons, shown on the libraries: Scorecam and FEM fail on float64 models;
    GradcamPlusPlus is not the paper's closed form; Faster-ScoreCAM (max_N) couples the batch,
    and explain(..., max_n=) couples it the same way."""
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.scorecam import Scorecam
    from tf_keras_vis.utils.scores import CategoricalScore
    from xplique.attributions import FEM

    double = cases[0]
    assert double.inputs.dtype == np.float64
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a double tensor but is a float"):
        Scorecam(double.model)(CategoricalScore(double.targets), double.inputs, penultimate_layer=double.layer)
    with pytest.raises(TypeError, match="float64 that does not match type float32"):
        FEM(double.model, conv_layer=double.layer).explain(double.inputs)

    case = cases[2]  # the conv-BN-pool CNN: tf-keras-vis explains conv1
    size = case.inputs.shape[1:3]
    theirs = GradcamPlusPlus(case.model)(CategoricalScore(case.targets), case.inputs, penultimate_layer=case.layer)
    e = gradcam_ref.explain(case.model, case.inputs, case.targets, layer="conv1", method="grad-cam++").numpy()
    paper = gradcam_ref.conventions.postprocess(gradcam_ref.grad_cam_plus_plus(e.activations, e.gradients, relu=False),
                                                "tf-keras-vis", size=size)
    assert np.abs(paper - theirs).max() > 1e-2  # the paper's weights: another map
    assert np.abs(e.heatmap(size, "tf-keras-vis") - theirs).max() <= 1e-5 * np.abs(theirs).max()  # its variant

    # max_N=1: the channels kept are the union over the batch of each image's top channel, so the
    # first image's map changes when the others join it; max_n=1 reproduces both
    alone = Scorecam(case.model)(CategoricalScore(case.targets[:1]), case.inputs[:1], penultimate_layer=case.layer,
                                 max_N=1)
    together = Scorecam(case.model)(CategoricalScore(case.targets), case.inputs, penultimate_layer=case.layer,
                                    max_N=1)
    assert np.abs(alone[0] - together[0]).max() > 1e-2
    for batch, theirs in ((1, alone), (3, together)):
        ours = gradcam_ref.explain(case.model, case.inputs[:batch], case.targets[:batch], layer="conv1",
                                   method="score-cam", variant="tf-keras-vis", max_n=1).heatmap(size, "tf-keras-vis")
        assert np.abs(np.asarray(ours) - theirs).max() <= 1e-5 * np.abs(theirs).max()


@settings(max_examples=15)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_cubic_tf_kernel_equals_tf_image_resize_bicubic(h, w, out_h, out_w, seed):
    """Up- and down-sampling, odd ratios, one-pixel axes: within float32 rounding of TensorFlow."""
    x = np.random.default_rng(seed).standard_normal((2, h, w)).astype(np.float32)
    x[0, 0] = 0.0  # exact zeros
    ref = tf.image.resize(x[..., None], (out_h, out_w), method="bicubic").numpy()[..., 0]
    ours = resize(np, x.astype(np.float64), (out_h, out_w), "cubic-tf")
    assert np.abs(ours - ref).max() <= 1e-6 * max(np.abs(ref).max(), 1e-30)
