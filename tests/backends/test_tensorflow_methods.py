"""The CAM family on the TensorFlow backend: every ``explain(method=...)`` on Keras twins equals the
NumPy oracle (and the torch twin) in float64; ``perturb`` (Score-CAM, Ablation-CAM) runs only the part
after the layer, holds tensors that skip over it fixed, works in the split form, leaves the model as it
was and refuses bad input; the core's functions on ``tf.Tensor`` (gradcam_ref._tf_array_api) equal
their NumPy results, exact zeros, ties and huge/tiny values included.

torchvision is imported first by tests/conftest.py (importing it after TensorFlow crashes)."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcam_ref
from gradcam_ref._methods import _smooth_weights
from gradcam_ref.backends import numpy_backend
from gradcam_ref.backends import tensorflow as tf_backend
from gradcam_ref.backends.numpy_backend import Oracle
from gradcam_ref.backends.tensorflow import _split
from gradcam_ref.verify.twins import keras_oracle, torch_oracle
from tests.backends.test_tensorflow_backend import batch_norm_model, model_state, residual_net
from tests.test_methods import assert_the_float32_map_cast, spy_on_score_weights

TOL = 1e-10
PERTURBATION = ("score-cam", "ablation-cam")


def last(x):
    """NCHW NumPy -> NHWC."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(x), 1, -1))


@pytest.fixture(scope="module")
def oracle():
    rng = np.random.default_rng(11)
    net = Oracle.random(rng, in_channels=2, widths=[4, 5], kernel_sizes=[3, 3], num_classes=3, head="gap-mlp")
    return net, rng.standard_normal((2, 2, 8, 7)), keras_oracle(net, "float64")


def smooth_reference(net, x, targets, layer, n_samples, std, seed):
    """Smooth Grad-CAM++ of the oracle with the noise drawn as explain draws it for channels-last inputs."""
    rng = np.random.default_rng(seed)
    clean = numpy_backend.capture(net, x, targets, layer=layer)
    gradients = []
    for _ in range(n_samples):
        noise = np.moveaxis(std * rng.standard_normal(last(x).shape), -1, 1)
        gradients.append(numpy_backend.capture(net, x + noise, clean.targets, layer=layer).gradients)
    weights = _smooth_weights(np, clean.activations, np.stack(gradients))
    return gradcam_ref.Explanation.from_capture(clean, method="smooth-grad-cam++", weights=weights)


def check_every_method(oracle, layer, targets, torch_too=False):
    net, x, model = oracle
    for method in gradcam_ref.METHODS:
        options = {"batch_size": 3} if method in PERTURBATION else {}
        if method == "smooth-grad-cam++":
            options = {"n_samples": 3, "std": 0.3, "seed": 5}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
            ours = gradcam_ref.explain(model, last(x), targets, layer=layer, method=method, **options)
            if method == "smooth-grad-cam++":
                expected = smooth_reference(net, x, targets, layer, **options)
            else:
                expected = gradcam_ref.explain(net, x, targets, layer=layer, method=method, **options)
            others = [expected]
            if torch_too and method != "smooth-grad-cam++":  # torch draws the noise channels-first
                others.append(gradcam_ref.explain(torch_oracle(net, inplace=False), torch.from_numpy(x), targets,
                                                  layer=layer, method=method, **options).numpy())
        assert ours.method == method
        assert isinstance(ours.maps, tf.Tensor) and ours.maps.dtype == tf.float64, method
        assert isinstance(ours.activations, tf.Tensor) and ours.activations.shape == expected.activations.shape
        got = ours.numpy()
        np.testing.assert_array_equal(got.targets, expected.targets)
        scale = np.abs(expected.maps).max()
        assert scale > 0, method
        for other in others:
            np.testing.assert_allclose(got.maps, other.maps, rtol=0, atol=TOL * scale, err_msg=method)
            if other.weights is not None:
                np.testing.assert_allclose(got.weights, other.weights, rtol=0,
                                           atol=TOL * np.abs(other.weights).max(), err_msg=method)
            for key in ("maps", "signed"):
                if getattr(other, key) is not None and key != "maps":
                    np.testing.assert_allclose(getattr(got, key), getattr(other, key), rtol=0,
                                               atol=TOL * np.abs(getattr(other, key)).max(), err_msg=method)


def test_every_method_equals_the_oracle_and_torch_in_float64(oracle):
    check_every_method(oracle, "relu1", np.array([[0, 1], [2, 1]]), torch_too=True)


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["relu0", "conv1"])
@pytest.mark.parametrize("targets", [[0, 2], np.array([[0, 1], [2, 1]])], ids=["N", "NxT"])
def test_every_method_equals_the_oracle_at_every_layer(oracle, layer, targets):
    check_every_method(oracle, layer, targets)


# --- perturb: only the part after the layer, the skip held fixed, the split form ---------------


class Counting(keras.layers.Layer):
    """The identity, counting the examples it sees (eagerly: ``compiled=False``)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def call(self, x):
        if x.shape[0] is not None:  # not while the functional model is built
            self.seen.append(int(x.shape[0]))
        return x


def test_ablation_cam_runs_the_part_after_the_layer_only_and_holds_the_skip_fixed():
    counting = Counting(dtype="float64", name="count")
    model = residual_net(counting)
    x = np.random.default_rng(0).standard_normal((2, 7, 7, 3))
    e = gradcam_ref.explain(model, x, [1, 3], layer="b", method="ablation-cam", denominator="abs",
                            batch_size=3, compiled=False)
    assert counting.seen == [2]  # one forward pass of the batch; the 2 x 4 ablations ran the head only
    skip = model.get_layer("a")(tf.constant(x))
    b = model.get_layer("b")(model.get_layer("r")(skip)).numpy()
    r6, gap, fc = (model.get_layer(n) for n in ("r6", "gap", "fc"))
    y = fc(gap(r6(skip + b))).numpy()
    for n, c in enumerate([1, 3]):  # by hand: channel k of b zeroed, a (the skip) as in the forward pass
        for k in range(4):
            ablated = b[n:n + 1].copy()
            ablated[..., k] = 0
            yk = fc(gap(r6(skip[n:n + 1] + ablated))).numpy()[0, c]
            expected = (y[n, c] - yk) / abs(y[n, c])
            assert abs(float(e.weights[n, k]) - expected) <= TOL * max(1.0, abs(expected)), (n, k)
    compiled = gradcam_ref.explain(model, x, [1, 3], layer="b", method="ablation-cam", denominator="abs",
                                   batch_size=3)
    np.testing.assert_allclose(compiled.weights.numpy(), e.weights.numpy(), rtol=0, atol=1e-14)


def test_score_cam_masks_the_inputs_and_runs_the_whole_model_in_batches():
    model = residual_net()
    x = np.random.default_rng(1).standard_normal((2, 7, 7, 3))
    e = gradcam_ref.explain(model, x, [0, 4], layer="r", method="score-cam", batch_size=3).numpy()
    a = np.moveaxis(model.get_layer("r")(model.get_layer("a")(tf.constant(x))).numpy(), -1, 1)  # (N, K, 7, 7)
    for n, c in enumerate([0, 4]):  # by hand: min-max normalised A^k (already at the input's size) times x
        low = a[n].min(axis=(1, 2), keepdims=True)
        span = a[n].max(axis=(1, 2), keepdims=True) - low
        masks = np.where(span > 0, (a[n] - low) / np.where(span > 0, span, 1), 0)
        masked = x[n][None] * masks[..., None]  # (K, 7, 7, 3)
        scores = model(masked, training=False).numpy()[:, c]
        expected = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        np.testing.assert_allclose(e.weights[n], expected, rtol=0, atol=TOL)


def test_split_form_and_channels_first_equal_the_keras_model(oracle):
    net, x, model = oracle
    features = keras.Model(model.inputs, model.get_layer("relu1").output)
    after = keras.Input(features.output.shape[1:], dtype="float64")
    h = after
    for name in ("head_pool", "head_dense0", "head_dense1"):
        h = model.get_layer(name)(h)
    head = keras.Model(after, h)

    def features_first(v):
        return tf.transpose(features(v), (0, 3, 1, 2))

    def head_first(a):
        return head(tf.transpose(a, (0, 2, 3, 1)))

    for method, options in (("score-cam", {}), ("ablation-cam", {"denominator": "abs"})):
        whole = gradcam_ref.explain(model, last(x), [0, 1], layer="relu1", method=method, **options).numpy()
        split = gradcam_ref.explain((features, head), tf.constant(last(x)), [0, 1], method=method, **options)
        first = gradcam_ref.explain((features_first, head_first), tf.constant(last(x)), [0, 1], method=method,
                                    channel_axis=1, **options)
        ref = gradcam_ref.explain(net, x, [0, 1], layer="relu1", method=method, **options)
        if method == "score-cam":  # channels-first A with channels-last inputs: the inputs need channel_axis=-1
            first = None
        for e in (whole, split.numpy()) + (() if first is None else (first.numpy(),)):
            np.testing.assert_allclose(e.weights, ref.weights, rtol=0, atol=TOL * np.abs(ref.weights).max())


def test_perturbation_leaves_the_model_as_it_was_and_batch_norm_in_inference():
    model, x = batch_norm_model()
    before = model_state(model)
    first = gradcam_ref.explain(model, x, layer="relu", method="score-cam")
    second = gradcam_ref.explain(model, x, layer="conv", method="ablation-cam", denominator="abs")
    after = model_state(model)
    for old, new in zip(before[0], after[0], strict=True):
        np.testing.assert_array_equal(old, new)
    assert before[1:] == after[1:]
    assert first.maps.dtype == tf.float32 and second.weights.dtype == tf.float32
    again = gradcam_ref.explain(model, x, layer="relu", method="score-cam")  # dropout off: deterministic
    np.testing.assert_array_equal(first.maps.numpy(), again.maps.numpy())
    np.testing.assert_allclose(first.scores.numpy(), model(x, training=False).numpy(), rtol=1e-6)


class _Scored(Exception):
    """Raised by the test's ``scored``: the backend handed over the scores."""


def test_the_scores_reach_scored_before_any_perturbed_copy(oracle):
    """The core checks the targets in ``scored``, before any perturbed copy is made (the other
    backends: tests/backends/test_methods_backends.py)."""
    net, x, model = oracle

    def never(*args):
        raise AssertionError("a perturbed copy was made before the scores were handed to scored")

    def scored(scores):
        assert tuple(scores.shape) == (2, 3)
        raise _Scored

    for where in ("activations", "inputs"):
        with pytest.raises(_Scored):
            tf_backend.perturb(model, tf.constant(last(x)), never, layer="relu1", where=where, scored=scored)
    for method in PERTURBATION:
        with pytest.raises(ValueError, match=r"target out of range: the scores have C = 3 classes"):
            gradcam_ref.explain(model, tf.constant(last(x)), [0, 7], layer="relu1", method=method)


def dtype_net(policy="float32"):
    """Rescaling -> conv 'conv' -> GAP -> float32 dense, built under the Keras dtype ``policy``."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(32)
        i = keras.Input((6, 6, 2))
        h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(keras.layers.Rescaling(1 / 64)(i))
        return keras.Model(i, keras.layers.Dense(4, dtype="float32")(keras.layers.GlobalAveragePooling2D()(h)))
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("method", PERTURBATION)
def test_perturbation_takes_inputs_of_another_dtype_than_the_layers(method):
    """Inputs are cast as Keras casts them (to its Input's dtype) before the core masks them: float64
    NumPy inputs and uint8 images on a float32 model give the maps of float32 inputs; a mixed_float16
    model (float16 A, float32 inputs) those of its float32 twin within float16's precision."""
    x = np.random.default_rng(32).integers(0, 256, (2, 6, 6, 2))
    model = dtype_net()

    def run(model, inputs):
        return gradcam_ref.explain(model, inputs, [1, 2], layer="conv", method=method).numpy()

    expected = run(model, x.astype(np.float32))
    for inputs in (x.astype(np.float64), x.astype(np.uint8)):
        got = run(model, inputs)
        np.testing.assert_array_equal(got.maps, expected.maps)
        np.testing.assert_array_equal(got.weights, expected.weights)
    mixed = dtype_net("mixed_float16")
    mixed.set_weights(model.get_weights())
    raw = gradcam_ref.explain(mixed, x.astype(np.float32), [1, 2], layer="conv", method=method)
    assert raw.activations.dtype == tf.float16
    got = raw.numpy()
    np.testing.assert_allclose(got.maps, expected.maps, rtol=0, atol=1e-2 * np.abs(expected.maps).max())


@pytest.fixture
def mixed_float16():
    """Keras's global policy mixed_float16 for the test, float32 (the default) again after it."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_every_method_maps_in_the_activations_dtype_under_mixed_float16(mixed_float16, monkeypatch):
    """Under mixed_float16 the layer's A is float16, and every method's maps, signed maps and weights come
    back in float16, with a float32 Dense head (as Keras recommends: float32 scores) or a float16 one.
    Score-CAM's and Ablation-CAM's weights come from the scores: they were float32 with a float32 head and
    made those maps float32 (array promotion); now they are cast to float16 and the maps are the float32
    computation cast (tests/test_methods.py: assert_the_float32_map_cast states the tolerance and why)."""
    spied = spy_on_score_weights(monkeypatch)
    x = np.random.default_rng(32).integers(0, 256, (2, 6, 6, 2)).astype(np.float32)
    for head in ("float32", None):  # None: the policy's, float16 scores
        keras.utils.set_random_seed(32)
        i = keras.Input((6, 6, 2))
        h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(keras.layers.Rescaling(1 / 64)(i))
        model = keras.Model(i, keras.layers.Dense(4, dtype=head)(keras.layers.GlobalAveragePooling2D()(h)))
        for method in gradcam_ref.METHODS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
                e = gradcam_ref.explain(model, x, [1, 2], layer="conv", method=method)
            assert e.scores.dtype == (tf.float32 if head else tf.float16)
            assert e.activations.dtype == tf.float16
            for name in ("maps", "signed", "weights"):
                value = getattr(e, name)
                assert value is None or value.dtype == tf.float16, (head, method, name, value.dtype)
            if method in PERTURBATION:
                got = e.numpy()
                assert np.abs(got.maps).max() > 0, method
                assert_the_float32_map_cast(got.maps, got.weights, got.activations,
                                            np.asarray(spied[method].numpy(), np.float64),
                                            lambda v: np.asarray(v).astype(np.float16).astype(np.float64), 2.0 ** -11)


def test_bad_perturbation_input():
    model = residual_net()
    x = np.zeros((2, 7, 7, 3))
    with pytest.raises(ValueError, match="where must be 'activations' or 'inputs', got 'both'"):
        tf_backend.perturb(model, x, lambda *a: None, layer="b", where="both")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        gradcam_ref.explain(model, x, layer="b", method="score-cam", batch_size=0)
    with pytest.raises(ValueError, match=r"make must return a tensor of 4 perturbed copies, got EagerTensor \(1, 4, 7, 7\)"):
        tf_backend.perturb(model, x, lambda x, a, n, start, stop: a[n:n + 1], layer="b", batch_size=4)
    with pytest.raises(ValueError, match=r"layer 'ad' is not a layer of 'residual'; did you mean"):
        gradcam_ref.explain(model, x, layer="ad", method="ablation-cam")
    with pytest.raises(ValueError, match="guided=True is for the gradient methods"):
        gradcam_ref.explain(model, x, layer="b", method="score-cam", guided=True)
    with pytest.raises(ValueError, match=r"activations must have shape \(N, K, \*spatial\).*got shape \(2, 5\)"):
        gradcam_ref.explain(model, x, layer="fc", method="ablation-cam")
    with pytest.raises(ValueError, match=r"where='inputs' with channel_axis=-1: .* got inputs \(2, 7\)"):
        gradcam_ref.explain((lambda v: tf.reshape(v, (2, 7, 1, 1)), lambda a: tf.reduce_sum(a, (1, 2))),
                            tf.zeros((2, 7), tf.float64), 0, method="score-cam")
    with pytest.raises(ValueError, match=r"target out of range"):
        gradcam_ref.explain(model, x, 9, layer="b", method="score-cam")


# --- the core on tf.Tensor ------------------------------------------------------------------------


values = st.sampled_from([0.0, 0.0, 1.0, -1.0, 2.5, 1e-300, -1e-300, 1e150, -1e150, 3.0])


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_the_core_on_tf_tensors_equals_numpy(data):
    """Each core function on float64 tf.Tensors: a tf.Tensor of the NumPy result, within 1e-12 of its scale."""
    n, k, h, w, t = (data.draw(st.integers(1, 3)) for _ in range(5))
    mode = data.draw(st.sampled_from(["random", "values", "zeros"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    if mode == "random":
        a, g, gt = (rng.standard_normal(s) * 10.0 ** rng.integers(-3, 4) for s in
                    ((n, k, h, w), (n, k, h, w), (n, t, k, h, w)))
    else:
        a, g, gt = (np.zeros(s) if mode == "zeros" else np.asarray(data.draw(st.lists(values, min_size=int(np.prod(s)),
                                                                                    max_size=int(np.prod(s))))).reshape(s)
                    for s in ((n, k, h, w), (n, k, h, w), (n, t, k, h, w)))
    a = np.abs(a)  # activations after a ReLU (the Eigen methods' and Score-CAM's inputs)
    calls = {
        "grad_cam": lambda m, a, g, gt: m.grad_cam(a, g),
        "grad_cam multi": lambda m, a, g, gt: m.grad_cam(a, gt, relu=False),
        "grad_cam_plus_plus": lambda m, a, g, gt: m.grad_cam_plus_plus(a, gt),
        "hires_cam": lambda m, a, g, gt: m.hires_cam(a, g),
        "layer_cam": lambda m, a, g, gt: m.layer_cam(a, gt),
        "xgrad_cam": lambda m, a, g, gt: m.xgrad_cam(a, g),
        "eigen_cam": lambda m, a, g, gt: m.eigen_cam(a),
        "eigen_grad_cam": lambda m, a, g, gt: m.eigen_grad_cam(a, g),
        "score_cam_masks": lambda m, a, g, gt: m.score_cam_masks(a, (2 * h + 1, w + 2)),
        "ablated_activations": lambda m, a, g, gt: m.ablated_activations(a, n - 1, range(k)),
        "upsample": lambda m, a, g, gt: m.upsample(a[:, 0], (h + 3, 2 * w)),
        "normalize": lambda m, a, g, gt: m.normalize(g[:, 0]),
    }
    for name, call in calls.items():
        try:
            expected = call(gradcam_ref, a, g, gt)
        except ValueError as error:  # refused (overflow, non-finite): refused the same way on tensors
            with pytest.raises(ValueError) as raised:
                call(gradcam_ref, *(tf.constant(v) for v in (a, g, gt)))
            assert str(raised.value) == str(error), name
            continue
        got = call(gradcam_ref, *(tf.constant(v) for v in (a, g, gt)))
        assert isinstance(got, tf.Tensor) and got.dtype == tf.float64, name
        expected = np.asarray(expected)
        scale = max(np.abs(expected).max(), np.finfo(np.float64).tiny)
        if name in ("grad_cam", "grad_cam multi", "hires_cam", "layer_cam", "xgrad_cam"):
            # sums that cancel (1 - 1 + 1e-300) depend on the order of summation, which TensorFlow's
            # reductions choose differently: within rounding of the terms' scale, not the result's
            scale = max(scale, np.abs(a).max() * max(np.abs(g).max(), np.abs(gt).max()))
        if name.startswith("eigen"):  # the SVD: LAPACK builds may differ in the last digits, and with a
            if mode != "random":  # repeated top singular value (ties, zeros) the component is not unique
                continue
            np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-9 * scale, err_msg=name)
        else:
            np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12 * scale, err_msg=name)
        np.testing.assert_array_equal(got.numpy() == 0, expected == 0, err_msg=name) if mode == "zeros" else None


def test_mixed_libraries_are_refused_by_name():
    with pytest.raises(TypeError, match="arrays must all come from one library"):
        gradcam_ref.grad_cam(tf.ones((1, 1, 2, 2), tf.float64), np.ones((1, 1, 2, 2)))


def test_relaxed_shapes_fall_back_to_the_core_outside_the_program(oracle):
    """A third batch size makes tf.function relax N to None: Eq. 1-2 then run on the tensors after
    the program (the core's own checks), with the same numbers."""
    net, x, model = oracle
    for n in (1, 2, 1, 2):
        e = gradcam_ref.explain(model, last(x[:n]), [1] * n, layer="relu1")
        ref = gradcam_ref.explain(net, x[:n], [1] * n, layer="relu1")
        assert isinstance(e.maps, tf.Tensor) and e.maps.dtype == tf.float64
        np.testing.assert_allclose(e.maps.numpy(), ref.maps, rtol=0, atol=TOL * np.abs(ref.maps).max())
    program, _ = _split.program_for(model, "relu1")
    traced = program._compiled[("single", -1, True, 4)].function  # (kind, channel axis, fields, rank of x)
    assert traced.experimental_get_tracing_count() == 2  # one exact trace, then one with N relaxed


def test_non_finite_values_are_named_by_the_core():
    x = np.ones((1, 4, 4, 2))
    x[0, 1, 1, 0] = np.nan
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        gradcam_ref.explain((lambda v: v, lambda a: tf.reduce_sum(a, axis=(1, 2))), tf.constant(x), [0])
