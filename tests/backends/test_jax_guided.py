"""Guided backpropagation in JAX: every recognised ReLU form against an explicit custom_vjp
reference, the forms left alone, control flow, the torch backend on twins from one weight file
and on EfficientNet-Lite0, the JAX backend's guided=True, warnings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import gradcam_ref
from gradcam_ref.backends import jax as jax_backend
from gradcam_ref.backends.jax.guided import guided, relu_counts
from tests.backends import twins

NoGuidedReLUWarning = gradcam_ref.NoGuidedReLUWarning


def rel_err(actual, expected):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def reference_relu(x, cap=None):
    """The straightforward reference: y = clip(x, 0, cap); dx = g * (0 < x < cap) * (g > 0)."""

    @jax.custom_vjp
    def relu(v):
        return jnp.maximum(v, 0) if cap is None else jnp.clip(v, 0, cap)

    def fwd(v):
        return relu(v), v

    def bwd(v, g):
        keep = (v > 0) & (g > 0) & (v < (jnp.inf if cap is None else cap))
        return (jnp.where(keep, g, 0.0),)

    relu.defvjp(fwd, bwd)
    return relu(x)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        arrays = [jnp.asarray(rng.standard_normal(s)) for s in ((4, 6), (6, 6), (6, 3), (4, 3))]
    return arrays


# --- the recognised forms -----------------------------------------------------------------------

RELU_FORMS = [  # (id, cap, the ReLU of v)
    ("jax.nn.relu", None, jax.nn.relu),
    ("maximum(v, 0)", None, lambda v: jnp.maximum(v, 0)),
    ("maximum(0., v)", None, lambda v: jnp.maximum(0.0, v)),
    ("maximum(v, zeros)", None, lambda v: jnp.maximum(v, jnp.zeros_like(v))),
    ("lax.max", None, lambda v: lax.max(v, 0.0)),
    ("clip(v, 0)", None, lambda v: jnp.clip(v, 0)),
    ("clip(v, min=0)", None, lambda v: jnp.clip(v, min=0)),
    ("where(v > 0, v, 0)", None, lambda v: jnp.where(v > 0, v, 0)),
    ("where(v <= 0, 0., v)", None, lambda v: jnp.where(v <= 0, 0.0, v)),
    ("where(0 < v, v, zeros)", None, lambda v: jnp.where(0 < v, v, jnp.zeros_like(v))),
    ("where(v < 0, 0, v)", None, lambda v: jnp.where(v < 0, 0, v)),
    ("jitted maximum", None, jax.jit(lambda v: jnp.maximum(v, 0))),
    ("checkpointed relu", None, jax.checkpoint(jax.nn.relu)),
    ("jax.nn.relu6", 6.0, jax.nn.relu6),
    ("clip(v, 0, 6)", 6.0, lambda v: jnp.clip(v, 0, 6)),
    ("lax.clamp(0, v, 2.5)", 2.5, lambda v: lax.clamp(0.0, v, 2.5)),
    ("minimum(maximum(v, 0), 6)", 6.0, lambda v: jnp.minimum(jnp.maximum(v, 0), 6)),
    ("where relu6 (the zoo's)", 6.0,
     lambda v: jnp.where(v <= 0, jnp.zeros_like(v), jnp.where(v >= 6, jnp.full_like(v, 6), v))),
    ("where(v > 0, minimum(v, 3), 0)", 3.0, lambda v: jnp.where(v > 0, jnp.minimum(v, 3.0), 0.0)),
]


@pytest.mark.parametrize(("cap", "relu"), [f[1:] for f in RELU_FORMS], ids=[f[0] for f in RELU_FORMS])
def test_each_relu_form_matches_the_reference(data, cap, relu):
    x, w, w2, seed = data
    with jax.enable_x64(True):
        def net(v):
            return relu(4.0 * (v @ w)) @ w2

        def reference(v):
            return reference_relu(4.0 * (v @ w), cap) @ w2

        z = 4.0 * (x @ w)
        assert (z < 0).any() and (z > 0).any() and (cap is None or (z > cap).any())
        assert relu_counts(net, x).counts == {"relu" if cap is None else "capped": 1}
        y, pull = jax.vjp(guided(net), x)
        y_ref, pull_ref = jax.vjp(reference, x)
        np.testing.assert_array_equal(y, y_ref)  # the forward numbers are the original's
        got, want = pull(seed)[0], pull_ref(seed)[0]
        plain = jax.vjp(net, x)[1](seed)[0]
    assert np.abs(np.asarray(want)).max() > 0 and rel_err(plain, want) > 1e-3  # guiding matters here
    assert rel_err(got, want) < 1e-14


def test_forms_that_are_not_relus_keep_their_derivative(data):
    x, w, _, _ = data
    with jax.enable_x64(True):
        def others(v):
            h = v @ w
            return (jax.nn.leaky_relu(h) + jnp.clip(h, -1.0) + jnp.maximum(h, v) + jnp.maximum(h, 0.5)
                    + jax.nn.silu(h) + h * (h > 0) + jnp.maximum(h, jnp.arange(6.0) - 2))

        assert not relu_counts(others, x).counts
        got = jax.vjp(guided(others), x)[1](jnp.flip(x))[0]
        want = jax.vjp(others, x)[1](jnp.flip(x))[0]
    assert rel_err(got, want) < 1e-14


def test_relus_in_cond_and_scan_are_guided(data):
    x, w, _, seed = data
    with jax.enable_x64(True):
        def in_cond(v):
            return lax.cond(v.sum() > -1e9, lambda u: jnp.maximum(u @ w, 0) @ w, lambda u: u, v)

        def in_scan(v):
            return lax.scan(lambda c, _: (jnp.maximum(c @ w, 0), None), v, None, length=3)[0]

        def unrolled(v):
            for _ in range(3):
                v = reference_relu(v @ w)
            return v

        for fn, reference, count in ((in_cond, lambda v: reference_relu(v @ w) @ w, 1), (in_scan, unrolled, 1)):
            assert relu_counts(fn, x).counts == {"relu": count}  # a scan body is traced once
            cotangent = jnp.flip(x)  # (4, 6), mixed signs
            got = jax.vjp(guided(fn), x)[1](cotangent)[0]
            want = jax.vjp(reference, x)[1](cotangent)[0]
            assert float(jnp.abs(want).max()) > 0 and rel_err(got, want) < 1e-14


def test_regions_that_cannot_be_guided_are_recorded(data):
    x, w, _, _ = data

    @jax.custom_vjp
    def own_rule(v):
        return jnp.maximum(v, 0) * 2

    own_rule.defvjp(lambda v: (own_rule(v), v), lambda v, g: (2 * g * (v > 0),))
    with jax.enable_x64(True):
        assert relu_counts(lambda v: own_rule(v @ w), x).unguided == ["custom_vjp_call"]
        loop = relu_counts(lambda v: lax.while_loop(lambda c: c[1] < 2, lambda c: (jnp.maximum(c[0], 0), c[1] + 1),
                                                    (v, 0))[0], x)
        assert loop.unguided == ["while"] and not loop.counts


def test_jit_and_vmap_of_the_guided_pull_back(data):
    x, w, w2, seed = data
    with jax.enable_x64(True):
        def net(v):
            return jax.nn.relu6(3.0 * jax.nn.relu(v @ w) @ w) @ w2

        @jax.jit
        def batched(v, seeds):
            _, pull = jax.vjp(guided(net), v)
            return jax.vmap(lambda s: pull(s)[0])(seeds)

        both = batched(x, jnp.stack([seed, -seed]))
        for i, s in enumerate((seed, -seed)):
            assert rel_err(both[i], jax.vjp(guided(net), x)[1](s)[0]) < 1e-14


# --- the JAX backend ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["gap", "deep-head"])
def twin(request, tmp_path_factory):
    return twins.case(request.param, tmp_path_factory.mktemp("twins"), seed=7)


TARGETS = {
    "argmax": lambda n: None,
    "per example": lambda n: np.arange(n) % 4,
    "multi": lambda n: np.stack([np.arange(n) % 4, (np.arange(n) + 3) % 6], axis=1),
    "callable": lambda n: twins.log_softmax_target(1),
}


@pytest.mark.parametrize("kind", TARGETS)
def test_torch_and_jax_twins_agree_in_float64(twin, kind):
    import torch

    net, weights, x = twin
    sequential, layer = twins.torch_sequential(*twins.torch_twin(net, weights, torch.float64))
    target = TARGETS[kind](len(x))
    ours = gradcam_ref.explain(sequential, torch.from_numpy(x), target, layer=layer, guided=True).numpy()
    with jax.enable_x64(True):
        features, head = twins.jax_twin(net, weights, jnp.float64)
        e = gradcam_ref.explain((features, head), jnp.asarray(x), target, guided=True)
        assert e.guided_backprop.dtype == jnp.float64
        assert rel_err(e.guided_grad_cam, gradcam_ref.guided_grad_cam(e.guided_backprop, e.maps)) < 1e-14
    expected_shape = (3, 2, 3, 13, 13) if kind == "multi" else (3, 3, 13, 13)
    if net is twins.DEEP_HEAD_NET:
        expected_shape = expected_shape[:-3] + (2, 10, 10)
    assert e.guided_backprop.shape == e.guided_grad_cam.shape == expected_shape
    assert rel_err(e.guided_backprop, ours.guided_backprop) < 1e-10
    assert rel_err(e.guided_grad_cam, ours.guided_grad_cam) < 1e-10


def test_hand_computed_guided_gradients():
    """The torch test's HandNet (tests/backends/test_torch_guided.py), written in JAX."""
    w1 = jnp.array([[1.0, -1.0], [1.0, 1.0]])
    w2 = jnp.array([[1.0, 1.0], [-1.0, 2.0]])
    w3 = jnp.array([[1.0, -1.0], [2.0, 1.0]])

    def features(x):  # (N, 2, 1, 1): two 1x1 convolutions, each followed by a ReLU
        h1 = jax.nn.relu(jnp.einsum("oi,nihw->nohw", w1, x))
        return jnp.maximum(jnp.einsum("oi,nihw->nohw", w2, h1), 0)

    def head(a):
        return a.reshape(len(a), -1) @ w3.T

    x = jnp.array([1.0, 2.0]).reshape(1, 2, 1, 1)
    e = gradcam_ref.explain((features, head), x, [[0, 1]], guided=True)
    np.testing.assert_array_equal(e.guided_backprop, np.array([[[1.0, 1.0], [4.0, 4.0]]])[..., None, None])
    np.testing.assert_array_equal(e.maps, [[[[0.0]], [[12.0]]]])
    np.testing.assert_array_equal(e.guided_grad_cam, np.array([[[0.0, 0.0], [48.0, 48.0]]])[..., None, None])
    plain = jax.grad(lambda v: head(features(v))[0, 0])(x)
    np.testing.assert_array_equal(plain, -np.ones((1, 2, 1, 1)))


def test_channels_last_model_gives_channels_first_guided_arrays(twin):
    net, weights, x = twin
    with jax.enable_x64(True):
        features, head = twins.jax_twin(net, weights, jnp.float64)

        def features_nhwc(v):  # an NHWC model: channels last in and out
            return jnp.moveaxis(features(jnp.moveaxis(v, -1, 1)), 1, -1)

        def head_nhwc(a):
            return head(jnp.moveaxis(a, -1, 1))

        first = gradcam_ref.explain((features, head), jnp.asarray(x), [[0, 2]] * 3, guided=True)
        last = gradcam_ref.explain((features_nhwc, head_nhwc), jnp.asarray(np.moveaxis(x, 1, -1)), [[0, 2]] * 3,
                                   channel_axis=-1, guided=True)
        assert rel_err(last.guided_backprop, first.guided_backprop) < 1e-14
        assert rel_err(last.guided_grad_cam, first.guided_grad_cam) < 1e-14
        nhwc = np.moveaxis(x, 1, -1)

        def flat_features(v):  # flat inputs (N, H * W * C): their layout is not the activations'
            return features_nhwc(v.reshape(nhwc.shape))

        with pytest.raises(ValueError, match=r"channel_axis=-1.*rank of the activations; got inputs \(3, \d+\)"):
            gradcam_ref.explain((flat_features, head_nhwc), jnp.asarray(nhwc.reshape(3, -1)),
                                channel_axis=-1, guided=True)


def test_capture_and_default_off(twin):
    net, weights, x = twin
    with jax.enable_x64(True):
        model = twins.jax_twin(net, weights, jnp.float64)
        captured = jax_backend.capture(model, x, [1, 2, 3], guided=True)
        e = gradcam_ref.explain(model, jnp.asarray(x), [1, 2, 3], guided=True)
        off = gradcam_ref.explain(model, jnp.asarray(x), [1, 2, 3])
    np.testing.assert_array_equal(captured.guided_backprop, e.guided_backprop)
    assert off.guided_backprop is None and off.guided_grad_cam is None
    np.testing.assert_array_equal(off.maps, e.maps)


def test_ordinary_gradients_are_exactly_as_before(twin):
    net, weights, x = twin
    with jax.enable_x64(True):
        features, head = twins.jax_twin(net, weights, jnp.float64)

        def plain():
            return jax.grad(lambda v: head(features(v))[:, 1].sum())(jnp.asarray(x))

        before = plain()
        gradcam_ref.explain((features, head), jnp.asarray(x), 1, guided=True)
        np.testing.assert_array_equal(plain(), before)


def test_warnings_for_relus_that_are_not_guided(tmp_path):
    path = tmp_path / "smooth.npz"
    twins.write_weights(path, twins.SMOOTH_NET, seed=9)
    features, head = twins.jax_twin(twins.SMOOTH_NET, twins.read_weights(path), jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2, 6, 6)), dtype=jnp.float32)
    with pytest.warns(NoGuidedReLUWarning, match="no ReLU that the guided pass recognises"):
        e = gradcam_ref.explain((features, head), x, [0, 1], guided=True)
    plain = jax.vjp(lambda v: head(features(v)), x)[1](jax.nn.one_hot(jnp.array([0, 1]), 5))[0]
    assert rel_err(e.guided_backprop, plain) < 1e-6

    @jax.custom_vjp
    def own_rule(v):
        return jnp.maximum(v, 0)

    own_rule.defvjp(lambda v: (own_rule(v), v), lambda v, g: (g * (v > 0),))

    def features_own(v):
        return own_rule(features(v))

    with pytest.warns(NoGuidedReLUWarning) as caught:
        gradcam_ref.explain((features_own, head), x, [0, 1], guided=True)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2 and "no ReLU that the guided pass recognises" in messages[0]
    assert "ReLU-like operations inside ['custom_vjp_call'] keep their ordinary derivative" in messages[1]


# --- EfficientNet-Lite0 ----------------------------------------------------------------------------


@pytest.mark.slow
def test_efficientnet_lite0_jax_equals_torch():
    """Every one of the 33 ReLU6 (the zoo's where form) guided; torch and JAX agree in float64."""
    import skimage.data
    import torch

    from gradcam_ref.zoo import efficientnet_lite0 as zoo

    photo = zoo.preprocess(skimage.data.chelsea())[None]  # (1, 3, 224, 224) float64
    model = zoo.load_torch()
    state = model.state_dict()
    targets = [[281, 967]]  # tabby cat, espresso
    ours = gradcam_ref.explain(model.double(), torch.from_numpy(photo), targets, layer="_swish", call=1,
                               guided=True).numpy()
    with jax.enable_x64(True):
        params = zoo.jax_params("float64", state)

        def features(x):
            return zoo.jax_features(params, x)

        def head(a):
            return zoo.jax_head(params, a)

        x = jnp.asarray(photo)
        assert relu_counts(lambda v: head(features(v)), x).counts == {"capped": 33}
        e = gradcam_ref.explain((features, head), x, targets, guided=True)
    assert e.guided_backprop.shape == (1, 2, 3, 224, 224)
    assert rel_err(e.guided_backprop, ours.guided_backprop) < 1e-10
    assert rel_err(e.guided_grad_cam, ours.guided_grad_cam) < 1e-10


def test_guided_with_integer_inputs_is_refused_by_name_up_front():
    """uint8 images into a Flax model that promotes them: Grad-CAM runs (dy/dA needs no input
    gradient), guided=True differentiates w.r.t. the inputs and is refused before anything is
    traced, in the torch and TensorFlow backends' words (it was 'guided_backprop must have a real
    numeric dtype, got [('float0', 'V')]', JAX's integer cotangent, from the core's check)."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            a = nn.relu(nn.Conv(4, (3, 3), padding="VALID", name="conv")(x))
            return nn.Dense(3, name="fc")(a.mean(axis=(1, 2)))

    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    model = Net().bind(Net().init(jax.random.key(0), jnp.zeros((2, 8, 8, 3))))
    plain = gradcam_ref.explain(model, jnp.asarray(images), layer="conv")
    as_float = gradcam_ref.explain(model, jnp.asarray(images, jnp.float32), layer="conv")
    np.testing.assert_array_equal(plain.maps, as_float.maps)  # Flax promotes uint8 to float32
    for inputs, dtype in ((images, "uint8"), (images.astype(np.int32), "int32"), (images > 127, "bool")):
        with pytest.raises(TypeError) as raised:
            gradcam_ref.explain(model, jnp.asarray(inputs), layer="conv", guided=True)
        assert str(raised.value) == f"guided=True differentiates w.r.t. the inputs, which must be floating, got {dtype}"
    split = (lambda x: jax.nn.relu(x.astype(jnp.float32) - 100.0), lambda a: a.mean(axis=(2, 3)))
    with pytest.raises(TypeError, match=r"^guided=True differentiates w\.r\.t\. the inputs, which must be floating, "
                                        r"got uint8$"):
        jax_backend.capture(split, jnp.asarray(images.transpose(0, 3, 1, 2)), 0, guided=True)
