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
    assert len(checks) == 4 + 3 + 3  # tf-keras-vis on 4 cases; xplique GradCAM and GradCAMPP on 3 (float32)
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


@settings(max_examples=15)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_cubic_tf_kernel_equals_tf_image_resize_bicubic(h, w, out_h, out_w, seed):
    """Up- and down-sampling, odd ratios, one-pixel axes: within float32 rounding of TensorFlow."""
    x = np.random.default_rng(seed).standard_normal((2, h, w)).astype(np.float32)
    x[0, 0] = 0.0  # exact zeros
    ref = tf.image.resize(x[..., None], (out_h, out_w), method="bicubic").numpy()[..., 0]
    ours = resize(np, x.astype(np.float64), (out_h, out_w), "cubic-tf")
    assert np.abs(ours - ref).max() <= 1e-6 * max(np.abs(ref).max(), 1e-30)
