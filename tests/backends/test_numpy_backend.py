"""The NumPy oracle: its convolution against SciPy, its hand-written gradients against finite
differences, for every head and spatial rank."""

import numpy as np
import pytest
import scipy.signal
from hypothesis import assume, given
from hypothesis import strategies as st

import gradcam_ref
from gradcam_ref.backends import numpy_backend
from gradcam_ref.backends.numpy_backend import Oracle, conv, conv_input_gradient

shapes = st.fixed_dictionaries(
    {"seed": st.integers(0, 2**32 - 1), "rank": st.integers(1, 3), "kernel": st.integers(1, 3),
     "size": st.integers(3, 6), "c_in": st.integers(1, 3), "c_out": st.integers(1, 3)}
)


@given(shapes)
def test_conv_equals_scipy_correlate(p):
    rng = np.random.default_rng(p["seed"])
    x = rng.standard_normal((2, p["c_in"]) + (p["size"],) * p["rank"])
    w = rng.standard_normal((p["c_out"], p["c_in"]) + (p["kernel"],) * p["rank"])
    b = rng.standard_normal(p["c_out"])
    out = conv(x, w, b)
    for n in range(2):
        for o in range(p["c_out"]):
            ref = b[o] + sum(scipy.signal.correlate(x[n, i], w[o, i], mode="valid") for i in range(p["c_in"]))
            np.testing.assert_allclose(out[n, o], ref, rtol=1e-12, atol=1e-12)


@given(shapes)
def test_conv_input_gradient_is_the_adjoint_of_conv(p):
    """<conv(x) - b, g> == <x, conv_input_gradient(g)> for all x, g: the definition of the backward."""
    rng = np.random.default_rng(p["seed"])
    x = rng.standard_normal((2, p["c_in"]) + (p["size"],) * p["rank"])
    w = rng.standard_normal((p["c_out"], p["c_in"]) + (p["kernel"],) * p["rank"])
    y = conv(x, w, np.zeros(p["c_out"]))
    g = rng.standard_normal(y.shape)
    np.testing.assert_allclose(np.vdot(y, g), np.vdot(x, conv_input_gradient(g, w)), rtol=1e-10)


nets = st.fixed_dictionaries(
    {"seed": st.integers(0, 2**32 - 1), "rank": st.integers(1, 3), "head": st.sampled_from(numpy_backend.HEADS),
     "depth": st.integers(1, 2), "layer": st.integers(0, 3)}
)


def _oracle(p: dict) -> tuple[np.random.Generator, Oracle, int]:
    """The random oracle that ``nets`` describes (2 input channels, 3 classes), its generator and input size."""
    rng = np.random.default_rng(p["seed"])
    size = 5 if p["rank"] < 3 else 4
    model = Oracle.random(rng, in_channels=2, widths=[3] * p["depth"], kernel_sizes=[2] * p["depth"],
                          num_classes=3, spatial_rank=p["rank"], head=p["head"], input_size=size)
    return rng, model, size


@given(nets)
def test_hand_written_gradients_equal_central_differences(p):
    rng, model, size = _oracle(p)
    x = rng.standard_normal((2,) + (2,) + (size,) * p["rank"])
    layer = model.layers[p["layer"] % len(model.layers)]
    target = 1
    e = gradcam_ref.explain(model, x, target, layer=layer)

    # Perturb the layer's output A and run the rest of the network from there.
    def score_from(a):
        names = model.layers
        i = names.index(layer)
        for name in names[i + 1:]:
            j = int(name[-1])
            if name.startswith("relu"):
                a = np.maximum(a, 0.0)
            else:
                a = conv(a, *model.convs[j])
        return model._head(a)[:, target].sum()

    a = e.activations
    h = 1e-6
    flat = a.reshape(-1)
    numeric = np.empty_like(flat)
    for i in range(flat.size):
        # skip positions where a ReLU downstream sits exactly at its kink (measure zero)
        up, down = flat.copy(), flat.copy()
        up[i] += h
        down[i] -= h
        numeric[i] = (score_from(up.reshape(a.shape)) - score_from(down.reshape(a.shape))) / (2 * h)
    np.testing.assert_allclose(e.gradients.reshape(-1), numeric, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(e.scores, model.forward(x)[1])


def test_multi_target_gradients_stack_the_single_ones():
    rng = np.random.default_rng(0)
    model = Oracle.random(rng, in_channels=1, widths=[2], kernel_sizes=[2], num_classes=4, head="flatten", input_size=5)
    x = rng.standard_normal((3, 1, 5, 5))
    targets = np.array([[0, 3], [1, 1], [2, 0]])
    e = gradcam_ref.explain(model, x, targets)
    assert e.gradients.shape == (3, 2, 2, 4, 4) and e.maps.shape == (3, 2, 4, 4)
    for t in range(2):
        single = gradcam_ref.explain(model, x, targets[:, t])
        np.testing.assert_array_equal(e.gradients[:, t], single.gradients)
        # the same numbers up to BLAS summation order (one (N, T, K) matmul vs T of them)
        np.testing.assert_allclose(e.maps[:, t], single.maps, rtol=1e-14, atol=0)


def test_default_target_is_the_argmax_and_default_layer_the_last_relu():
    rng = np.random.default_rng(1)
    model = Oracle.random(rng, in_channels=1, widths=[2, 3], kernel_sizes=[2, 2], num_classes=5)
    x = rng.standard_normal((4, 1, 6, 6))
    e = gradcam_ref.explain(model, x)
    np.testing.assert_array_equal(e.targets, model.forward(x)[1].argmax(axis=1))
    np.testing.assert_array_equal(e.activations, model.forward(x)[0]["relu1"])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"layer": "conv7"}, ValueError, r"layer must be one of \['conv0', 'relu0'\], got 'conv7'"),
        ({"target": 5}, ValueError, r"target out of range: the scores have C = 2 classes.*got \[5\]"),
        ({"target": lambda s: s[:, 0]}, TypeError, r"numpy backend has no autograd"),
        ({"inputs": np.ones((2, 4, 4))}, ValueError, r"inputs must have shape \(N, C, \*spatial\) with 2 spatial axes"),
        # "cannot reshape array of size 0", "window shape cannot be larger than input array shape"
        ({"inputs": np.ones((0, 1, 4, 4))}, ValueError, r"inputs must not be empty, got shape \(0, 1, 4, 4\)$"),
        ({"inputs": np.ones((2, 1, 4, 0))}, ValueError, r"inputs must not be empty, got shape \(2, 1, 4, 0\)$"),
        ({"inputs": np.ones((2, 1, 4, 1))}, ValueError,
         r"inputs must have spatial sizes >= \(3, 3\) \(the convolutions' receptive field\), got shape \(2, 1, 4, 1\)$"),
        ({"inputs": np.ones((2, 3, 4, 4))}, ValueError, r"inputs must have C = 1 channels \(the first convolution's\), "
         r"got shape \(2, 3, 4, 4\)$"),  # "shape-mismatch for sum"
        # the imaginary part was dropped with NumPy's ComplexWarning only (the core refuses complex arrays)
        ({"inputs": np.ones((2, 1, 4, 4), dtype=complex)}, TypeError, r"inputs must have a real numeric dtype, got complex128$"),
        ({"inputs": np.full((2, 1, 4, 4), "a")}, TypeError, r"inputs must have a real numeric dtype, got <U1$"),
        ({"layer": np.array(["conv0", "relu0"])}, ValueError,  # "truth value of an array ... is ambiguous"
         r"layer must be one of \['conv0', 'relu0'\], got array\(\['conv0', 'relu0'\], dtype='<U5'\)$"),
    ],
)
def test_oracle_bad_input(kwargs, error, message):
    model = Oracle.random(np.random.default_rng(0), in_channels=1, widths=[2], kernel_sizes=[3], num_classes=2)
    inputs = kwargs.pop("inputs", np.ones((2, 1, 4, 4)))
    with pytest.raises(error, match=message):
        gradcam_ref.explain(model, inputs, **kwargs)
    if "target" not in kwargs:  # re-scoring and perturbing check their inputs alike
        with pytest.raises(error, match=message):
            numpy_backend.perturb(model, inputs, lambda x, a, i, start, stop: a[i:i + 1], **kwargs)
        if "layer" not in kwargs:
            with pytest.raises(error, match=message):
                numpy_backend.score(model, inputs)


def test_the_smallest_input_is_the_receptive_field():
    model = Oracle.random(np.random.default_rng(0), in_channels=1, widths=[2, 2], kernel_sizes=[2, 3], num_classes=2)
    x = np.random.default_rng(1).standard_normal((1, 1, 4, 5))
    outputs, scores = model.forward(x)
    assert outputs["relu1"].shape == (1, 2, 1, 2)
    np.testing.assert_array_equal(numpy_backend.score(model, x), scores)
    with pytest.raises(ValueError, match=r"spatial sizes >= \(4, 4\)"):
        numpy_backend.score(model, x[..., :3, :])


# --- guided backpropagation ------------------------------------------------------------------------


def test_guided_backward_golden():
    """1-D: conv [1, -1] on x = (1, 3, 2): z = (-2, 1), A = (0, 1); GAP head W = (2, -2), Z = 2.

    Class 0: dy/dA = (1, 1) -> guided (0, 1) -> dx = (0, 1, -1), the plain gradient too.
    Class 1: dy/dA = (-1, -1): every gradient negative, guided dx = 0; plain (0, -1, 1).
    """
    model = Oracle([(np.array([[[1.0, -1.0]]]), np.zeros(1))], "gap", [(np.array([[2.0], [-2.0]]), np.zeros(2))])
    x = np.array([[[1.0, 3.0, 2.0]]])
    e = gradcam_ref.explain(model, x, [[0, 1]], layer="conv0", guided=True)
    np.testing.assert_array_equal(e.guided_backprop, [[[[0.0, 1.0, -1.0]], [[0.0, 0.0, 0.0]]]])
    plain = conv_input_gradient(model.backward(x, "conv0", np.array([[0.0, 1.0]])), model.convs[0][0])
    np.testing.assert_array_equal(plain, [[[0.0, -1.0, 1.0]]])
    # Maps at conv0: dy/dz = +-[z > 0] = +-(0, 1), alpha = +-1/2, L = ReLU(+-z / 2): (0, 1/2) and (1, 0).
    np.testing.assert_array_equal(e.maps, [[[0.0, 0.5], [1.0, 0.0]]])
    # Upsampled 2 -> 3 (half-pixel): (0, 1/2) -> (0, 1/4, 1/2); times guided (0, 1, -1). Class 1: 0.
    np.testing.assert_array_equal(e.guided_grad_cam, [[[[0.0, 0.25, -0.5]], [[0.0, 0.0, 0.0]]]])


@given(nets)
def test_guided_backward_is_the_gradient_when_every_weight_is_positive(p):
    """With positive weights everywhere, every gradient reaching a ReLU is >= 0: guiding changes nothing."""
    rng, model, size = _oracle(p)
    model.convs = [(np.abs(w), b) for w, b in model.convs]
    model.head_params = [(np.abs(w), b) for w, b in model.head_params]
    x = rng.standard_normal((2, 2) + (size,) * p["rank"])
    seed = np.eye(3)[[0, 2]]
    plain = conv_input_gradient(model.backward(x, "conv0", seed), model.convs[0][0])
    assume(np.any(plain[0] != 0))  # every ReLU dead for class 0: nothing for guiding to block
    np.testing.assert_allclose(model.guided_backward(x, seed), plain, rtol=1e-13, atol=1e-15)
    model.head_params[-1][0][0] *= -1  # class 0 now has negative weights: guiding zeroes some of it
    flipped = model.guided_backward(x, seed)
    np.testing.assert_allclose(flipped[1], plain[1], rtol=1e-13, atol=1e-15)  # class 2: unchanged
    # Class 0's gradient is negative where it meets its first ReLU (the last conv's, or the MLP's
    # hidden one): guided backpropagation blocks all of it, for every head.
    assert np.all(flipped[0] == 0)
