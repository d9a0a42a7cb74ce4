"""The JAX backend: CAM identity on random GAP networks, the NumPy oracle, torch twins from one
weight file, multi-target and callable targets, differentiability, compilation cache, bad input."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcam_ref
from gradcam_ref import backends
from gradcam_ref.backends import jax as jax_backend
from gradcam_ref.backends import numpy_backend
from tests.backends import twins


def rel_err(actual, expected):
    """max |actual - expected| / max |expected|: the agreement measure of every comparison here."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _conv(x, w, b):
    rank = w.ndim - 2
    out = jax.lax.conv_general_dilated(x, w, (1,) * rank, "VALID", precision=jax.lax.Precision.HIGHEST)
    return out + b.reshape((-1,) + (1,) * rank)


def _gap_net(rng, *, rank, depth, kernel, k_in, classes):
    """Random conv -> ReLU stack and a GAP -> linear head (float64 under x64), and W."""
    convs, c = [], k_in
    for width in rng.integers(1, 5, size=depth):
        convs.append((jnp.asarray(rng.standard_normal((width, c) + (kernel,) * rank) / np.sqrt(c * kernel**rank)),
                      jnp.asarray(0.1 * rng.standard_normal(width))))
        c = int(width)
    w, b = jnp.asarray(rng.standard_normal((classes, c))), jnp.asarray(rng.standard_normal(classes))

    def features(x):
        for wi, bi in convs:
            x = jax.nn.relu(_conv(x, wi, bi))
        return x

    def head(a):
        return a.reshape(a.shape[0], a.shape[1], -1).mean(axis=-1) @ w.T + b

    return features, head, np.asarray(w)


# --- Identities and oracles ----------------------------------------------------------------------

gap_nets = st.fixed_dictionaries({
    "seed": st.integers(0, 2**32 - 1), "rank": st.integers(1, 3), "depth": st.integers(1, 2),
    "kernel": st.integers(1, 2), "n": st.integers(1, 3), "classes": st.integers(1, 5),
    "targets": st.sampled_from(["argmax", "per-example", "multi"]),
})


@settings(max_examples=10)
@given(gap_nets)
def test_gap_network_maps_equal_relu_cam_over_z(p):
    """conv -> GAP -> linear: alpha_k^c = w_k^c / Z, so Grad-CAM == ReLU(CAM(A, w^c)) / Z exactly."""
    rng = np.random.default_rng(p["seed"])
    with jax.enable_x64(True):
        features, head, w = _gap_net(rng, rank=p["rank"], depth=p["depth"], kernel=p["kernel"], k_in=2,
                                     classes=p["classes"])
        size = 5 if p["rank"] < 3 else 4
        x = jnp.asarray(rng.standard_normal((p["n"], 2) + (size,) * p["rank"]))
        target = {"argmax": None, "per-example": rng.integers(0, p["classes"], p["n"]),
                  "multi": rng.integers(0, p["classes"], (p["n"], 2))}[p["targets"]]
        e = gradcam_ref.explain((features, head), x, target)
        assert e.maps.dtype == jnp.float64
    a = np.asarray(e.activations)
    z = np.prod(a.shape[2:])
    if target is None:
        np.testing.assert_array_equal(e.targets, np.asarray(e.scores).argmax(axis=1))
    else:
        np.testing.assert_array_equal(e.targets, target)
    expected = np.maximum(gradcam_ref.cam(a, w[e.targets]), 0) / z
    np.testing.assert_allclose(np.asarray(e.maps), expected, rtol=1e-12, atol=1e-13 * np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(e.weights), w[e.targets] / z, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("head", numpy_backend.HEADS)
def test_equals_the_numpy_oracle_and_its_hand_written_gradients(head):
    rng = np.random.default_rng(7)
    oracle = numpy_backend.Oracle.random(rng, in_channels=2, widths=[3, 4], kernel_sizes=[2, 2], num_classes=5,
                                         head=head, input_size=6)
    x = rng.standard_normal((3, 2, 6, 6))
    expected = gradcam_ref.explain(oracle, x, [[0, 4], [2, 2], [3, 1]])
    with jax.enable_x64(True):
        convs = [(jnp.asarray(w), jnp.asarray(b)) for w, b in oracle.convs]

        def features(x):
            for w, b in convs:
                x = jax.nn.relu(_conv(x, w, b))
            return x

        def head_fn(a):
            return _oracle_head(oracle, a)

        e = gradcam_ref.explain((features, head_fn), jnp.asarray(x), [[0, 4], [2, 2], [3, 1]])
    for field in ("maps", "activations", "gradients", "weights", "scores"):
        assert rel_err(getattr(e, field), getattr(expected, field)) < 1e-12, field
    np.testing.assert_array_equal(e.targets, expected.targets)


def _oracle_head(oracle, a):
    """The oracle's three heads (numpy_backend.Oracle._head) in jax.numpy."""
    pooled = a.reshape(a.shape[0], a.shape[1], -1).mean(axis=-1)
    if oracle.head == "flatten":
        (w, b), = oracle.head_params
        return a.reshape(a.shape[0], -1) @ w.T + b
    if oracle.head == "gap":
        (w, b), = oracle.head_params
        return pooled @ w.T + b
    (w1, b1), (w2, b2) = oracle.head_params
    return jax.nn.relu(pooled @ w1.T + b1) @ w2.T + b2


# --- Torch twins from one weight file ------------------------------------------------------------

TARGETS = {
    "argmax": lambda n, c: None,
    "per example": lambda n, c: np.arange(n) % c,
    "multi": lambda n, c: np.stack([np.arange(n) % c, (np.arange(n) + 2) % c, np.zeros(n, int)], axis=1),
    "callable": lambda n, c: twins.log_softmax_target(1),
}


@pytest.fixture(scope="module", params=["gap", "deep-head"])
def twin(request, tmp_path_factory):
    return twins.case(request.param, tmp_path_factory.mktemp("twins"), seed=3)


@pytest.mark.parametrize("kind", TARGETS)
def test_torch_and_jax_twins_agree_in_float64(twin, kind):
    """JAX against Grad-CAM written out in torch, and against the torch backend (split form and
    one nn.Sequential with layer=), all from one weight file."""
    import torch

    net, weights, x = twin
    t_features, t_head = twins.torch_twin(net, weights, torch.float64)
    with jax.enable_x64(True):
        features, head = twins.jax_twin(net, weights, jnp.float64)
        target = TARGETS[kind](x.shape[0], net["shapes"]["fc"][0])
        e = gradcam_ref.explain((features, head), jnp.asarray(x), target)
        assert e.maps.dtype == jnp.float64
    picked = e.targets if kind == "argmax" else target
    by_hand = twins.torch_grad_cam(t_features, t_head, x, picked)
    sequential, layer = twins.torch_sequential(t_features, t_head)
    split = gradcam_ref.explain((t_features, t_head), torch.from_numpy(x), target, backend="torch").numpy()
    hooked = gradcam_ref.explain(sequential, torch.from_numpy(x), target, layer=layer).numpy()
    for ref in (by_hand, split.__dict__, hooked.__dict__):
        for field in ("maps", "activations", "gradients", "weights", "scores"):
            assert rel_err(getattr(e, field), ref[field]) < 1e-10, field
    for torch_e in (split, hooked):
        np.testing.assert_array_equal(e.targets, torch_e.targets)
    assert np.asarray(e.maps).max() > 0  # a real map, not the empty one


def test_torch_and_jax_twins_agree_in_float32(twin):
    import torch

    net, weights, x = twin
    features, head = twins.jax_twin(net, weights, jnp.float32)
    e = gradcam_ref.explain((features, head), jnp.asarray(x, dtype=jnp.float32), [[0, 1]] * 3)
    assert e.maps.dtype == jnp.float32
    ref = twins.torch_grad_cam(*twins.torch_twin(net, weights, torch.float32), x, [[0, 1]] * 3)
    for field in ("maps", "gradients", "weights", "scores"):
        assert rel_err(getattr(e, field), ref[field]) < 1e-5, field


# --- Targets -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep():
    with jax.enable_x64(True):
        weights = {}
        rng = np.random.default_rng(5)
        for name, shape in twins.CONV_HEAD_NET["shapes"].items():
            weights[f"{name}.weight"] = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
            weights[f"{name}.bias"] = 0.1 * rng.standard_normal(shape[0])
        model = twins.jax_twin(twins.CONV_HEAD_NET, weights, jnp.float64)
    return model, rng.standard_normal((4, *twins.CONV_HEAD_NET["input"]))


def test_multi_target_equals_one_explanation_per_target(deep):
    model, x = deep
    targets = np.array([[0, 5, 3], [1, 1, 2], [4, 0, 0], [2, 3, 5]])
    with jax.enable_x64(True):
        multi = gradcam_ref.explain(model, jnp.asarray(x), targets)
        singles = [gradcam_ref.explain(model, jnp.asarray(x), targets[:, t]) for t in range(3)]
    assert multi.maps.shape == (4, 3, 8, 8) and multi.gradients.shape == (4, 3, 4, 8, 8)
    np.testing.assert_array_equal(multi.targets, targets)
    for t, single in enumerate(singles):
        np.testing.assert_allclose(multi.maps[:, t], single.maps, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(multi.gradients[:, t], single.gradients, rtol=1e-13, atol=1e-15)
        np.testing.assert_array_equal(multi.activations, single.activations)


def test_callable_targets(deep):
    """A callable picking y^c equals target c; the log-softmax's gradient is dy^c - sum_j p_j dy^j."""
    model, x = deep
    with jax.enable_x64(True):
        xj = jnp.asarray(x)
        picked = gradcam_ref.explain(model, xj, lambda s: s[:, 2])
        by_index = gradcam_ref.explain(model, xj, 2)
        log_softmax = gradcam_ref.explain(model, xj, twins.log_softmax_target(2))
        every_class = gradcam_ref.explain(model, xj, np.tile(np.arange(6), (4, 1)))
    assert picked.targets is None and log_softmax.targets is None
    np.testing.assert_array_equal(by_index.targets, [2, 2, 2, 2])
    np.testing.assert_allclose(picked.maps, by_index.maps, rtol=1e-13, atol=1e-15)
    scores, grads = np.asarray(by_index.scores), np.asarray(every_class.gradients)  # float64 NumPy
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)  # softmax, (N, C)
    expected = grads[:, 2] - np.einsum("nc,nc...->n...", p, grads)
    assert rel_err(log_softmax.gradients, expected) < 1e-12


def test_channels_last_features_give_the_channels_first_explanation(deep):
    (features, head), x = deep
    nhwc = (lambda x: jnp.moveaxis(features(x), 1, -1), lambda a: head(jnp.moveaxis(a, -1, 1)))
    with jax.enable_x64(True):
        first = gradcam_ref.explain((features, head), jnp.asarray(x), [[1, 3]] * 4)
        last = gradcam_ref.explain(nhwc, jnp.asarray(x), [[1, 3]] * 4, channel_axis=-1)
    for field in ("maps", "activations", "gradients", "weights", "scores"):
        np.testing.assert_array_equal(getattr(last, field), getattr(first, field))
    assert jax_backend._channel_axis(3, 4) == jax_backend._channel_axis(-1, 4) == 3


# --- How it runs ---------------------------------------------------------------------------------


def test_jax_inputs_select_the_jax_backend_without_importing_torch():
    script = """
import sys
import jax, jax.numpy as jnp
import gradcam_ref
from gradcam_ref import backends
w = jnp.ones((2, 3))
features = lambda x: jnp.tanh(x)
head = lambda a: a.mean(axis=(2, 3)) @ w
x = jnp.arange(2 * 2 * 3 * 3, dtype=jnp.float32).reshape(2, 2, 3, 3) / 10
assert backends.select((features, head), x).NAME == "jax"
e = gradcam_ref.explain((features, head), x)
assert isinstance(e.maps, jax.Array) and e.maps.shape == (2, 3, 3)
print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_numpy_inputs_with_backend_jax_and_capture(deep):
    model, x = deep
    with jax.enable_x64(True):
        e = gradcam_ref.explain(model, x, 1, backend="jax")
        c = backends.load("jax").capture(model, jnp.asarray(x), 1)
        eager = gradcam_ref.Explanation.from_capture(c)  # the core's math, op by op
    assert isinstance(e.maps, jax.Array) and e.maps.dtype == jnp.float64
    for name in ("activations", "gradients", "scores", "targets"):
        np.testing.assert_array_equal(getattr(c, name), getattr(e, name))
    np.testing.assert_allclose(eager.maps, e.maps, rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(eager.weights, e.weights, rtol=1e-13, atol=1e-16)


def test_gradcam_ref_explain_takes_the_compiled_path(deep, monkeypatch):
    """gradcam_ref.explain uses the backend's explain (one program), not capture + eager core math."""
    model, x = deep

    def no_capture(*args, **kwargs):
        raise AssertionError("capture called")

    with jax.enable_x64(True):
        expected = jax_backend.explain(model, jnp.asarray(x), [2, 0, 1, 5])
        monkeypatch.setattr(jax_backend, "capture", no_capture)
        e = gradcam_ref.explain(model, jnp.asarray(x), [2, 0, 1, 5])
    np.testing.assert_array_equal(e.maps, expected.maps)


def test_arrays_stay_on_the_default_device_in_the_model_dtype(deep):
    _, x = deep
    weights = {"c0.weight": np.ones((4, 2, 3, 3)) / 18, "c0.bias": np.zeros(4), "c1.weight": np.ones((5, 4, 3, 3)) / 36,
               "c1.bias": np.zeros(5), "fc.weight": np.eye(6, 320), "fc.bias": np.zeros(6)}
    model32 = twins.jax_twin(twins.CONV_HEAD_NET, weights, jnp.float32)
    e = gradcam_ref.explain(model32, jnp.asarray(x, dtype=jnp.float32))
    assert e.targets.dtype == np.int64 and isinstance(e.targets, np.ndarray)
    for field in ("maps", "activations", "gradients", "weights", "scores"):
        value = getattr(e, field)
        assert isinstance(value, jax.Array) and value.dtype == jnp.float32, field
        assert value.devices() == {jax.devices()[0]}, field


def test_compiled_once_per_function_and_shape():
    traces = []
    w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)))

    def features(x):
        traces.append(x.shape)
        return jax.nn.relu(x)

    def head(a):
        return a.mean(axis=(2, 3)) @ w.T

    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 5, 5)), dtype=jnp.float32)
    first = gradcam_ref.explain((features, head), x, [0, 1])
    count = len(traces)
    assert count >= 1
    for target in ([2, 0], [1, 1], [0, 2]):  # new target values: the same program
        again = gradcam_ref.explain((features, head), x, target)
    assert len(traces) == count
    assert not np.array_equal(again.maps, first.maps)
    gradcam_ref.explain((features, head), jnp.concatenate([x, x]), [0, 1, 2, 0])  # new shape: traced again
    assert len(traces) > count


def test_maps_are_differentiable_against_central_differences():
    """d/dx and d/dW of sum(maps^2) (C^1, twice-differentiable net) against central differences."""
    net = twins.SMOOTH_NET
    rng = np.random.default_rng(11)
    weights = {}
    for name, shape in net["shapes"].items():
        weights[f"{name}.weight"] = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        weights[f"{name}.bias"] = 0.3 * rng.standard_normal(shape[0])
    x0 = rng.standard_normal((2, *net["input"]))
    with jax.enable_x64(True):
        features, head = twins.jax_twin(net, weights, jnp.float64)

        def loss_x(x):
            return jnp.sum(gradcam_ref.explain((features, head), x, [1, 3]).maps ** 2)

        def loss_w(w):  # the head's last layer as a differentiable parameter, closed over
            def head_w(a):
                h = head_prefix(a)
                return h @ w.T + weights["fc.bias"]
            return jnp.sum(gradcam_ref.explain((features, head_w), jnp.asarray(x0), [1, 3]).maps ** 2)

        prefix = twins.jax_twin({**net, "head": net["head"][:-1]}, weights, jnp.float64)
        head_prefix = prefix[1]
        x = jnp.asarray(x0)
        w0 = jnp.asarray(weights["fc.weight"])
        assert float(loss_x(x)) > 0
        for loss, at in ((jax.jit(loss_x), x), (jax.jit(loss_w), w0)):  # each traced once
            grad = jax.grad(loss)(at)
            direction = jnp.asarray(rng.standard_normal(at.shape))
            h = 1e-5
            numeric = (loss(at + h * direction) - loss(at - h * direction)) / (2 * h)
            analytic = jnp.vdot(grad, direction)
            assert abs(float(numeric - analytic)) < 1e-7 * max(1.0, abs(float(analytic))), (numeric, analytic)


def test_explain_inside_a_jitted_function_with_traced_labels(deep):
    model, x = deep
    labels = np.array([3, 0, 5, 1])
    with jax.enable_x64(True):
        @jax.jit
        def attention(x, labels):
            e = gradcam_ref.explain(model, x, labels)
            assert isinstance(e.targets, jax.core.Tracer)
            return e.maps

        maps = attention(jnp.asarray(x), jnp.asarray(labels))
        eager = gradcam_ref.explain(model, jnp.asarray(x), labels)
    np.testing.assert_allclose(maps, eager.maps, rtol=1e-13, atol=1e-15)


# --- Bad input: clear errors, before anything is compiled -----------------------------------------

W = jnp.ones((3, 4))


def _features(x):
    return jax.nn.relu(x)


def _head(a):
    return a.mean(axis=(2, 3)) @ W


X = jnp.ones((2, 3, 4, 4))


def _pooled_features(x):  # rank 2: the head below would fail on it inside the trace
    return x.mean(axis=(2, 3))


def _identity_head(a):
    return a


@pytest.mark.parametrize(("model", "inputs", "target", "options", "error", "message"), [
    ((_pooled_features, _head), X, None, {}, ValueError,
     r"features\(inputs\) must return activations of shape \(N, K, \*spatial\) .* got shape \(2, 3\) \(rank 2\)"),
    ((_features, _identity_head), X, None, {}, ValueError,
     r"scores\) must have shape \(N, C\) .* got shape \(2, 3, 4, 4\)"),
    ((_features, _head), X, 4, {}, ValueError,
     r"target out of range: the scores have C = 4 classes, so targets must lie in \[0, 3\], got \[4\]"),
    ((_features, _head), X, [[0, -1], [1, 2]], {}, ValueError, r"target out of range.*got \[-1\]"),
    ((_features, _head), X, [0, 1, 2], {}, ValueError, r"sequence of N = 2 ints .* got shape \(3,\)"),
    ((_features, _head), X, lambda s: s, {}, ValueError,
     r"callable target must return one floating score per example, shape \(N,\) = \(2,\), got shape \(2, 4\)"),
    ((_features, _head), X, None, {"layer": "conv1"}, ValueError, r"split form .* layer and call must be None, got layer='conv1'"),
    ((_features, _head), X, None, {"channel_axis": 0}, ValueError, r"channel_axis must name a non-batch axis"),
    ((_features, _head), X, None, {"channel_axis": 4}, ValueError, r"1\.\.3 or -3\.\.-1, got 4"),
    ((lambda x: x[:1], _head), X, None, {}, ValueError, r"features\(inputs\) must keep the batch axis first"),
    (_features, X, None, {}, TypeError, r"model must be a pair \(features, head\) of callables"),
    ((_features, _head), jnp.float32(1), None, {}, ValueError, r"inputs must be a non-empty batch \(N, \.\.\.\), got shape \(\)$"),
])
def test_bad_input_gives_clear_errors(model, inputs, target, options, error, message):
    with pytest.raises(error, match=message):
        jax_backend.explain(model, inputs, target, **options)


def test_non_finite_activations_are_named_even_where_the_relu_would_hide_them():
    """GAP -> linear: dy/dA does not depend on A, so only the signed map sees the NaN."""
    with pytest.raises(ValueError, match=r"activations contains NaN or Inf \(1 of 96 values\)"):
        gradcam_ref.explain((_features, _head), X.at[0, 0, 0, 0].set(jnp.nan))


def _flatten_head(a):  # (N, K, H, W) -> (N, 3): the reshape divides by N, as a Flax flatten head does
    return a.reshape(a.shape[0], -1) @ jnp.ones((a.shape[1] * a.shape[2] * a.shape[3], 3))


def test_an_empty_batch_is_refused_by_name_before_the_model_runs():
    """N = 0 reached the model: a flatten head failed inside the trace with 'integer modulo by zero'
    (ZeroDivisionError). It is refused first, in the words of the torch and TensorFlow backends;
    also by score and perturb (Score-CAM, Ablation-CAM), which trace the model too."""
    import flax.linen as nn

    class Flatten(nn.Module):  # the sweep's model: ZeroDivisionError inside the trace
        @nn.compact
        def __call__(self, x):
            a = nn.relu(nn.Conv(4, (3, 3), padding="VALID", name="conv")(x))
            return nn.Dense(3, name="fc")(a.reshape(a.shape[0], -1))

    linen = Flatten().bind(Flatten().init(jax.random.key(0), jnp.zeros((2, 8, 8, 3))))
    with pytest.raises(ValueError) as raised:
        gradcam_ref.explain(linen, jnp.zeros((0, 8, 8, 3)), layer="conv")
    assert str(raised.value) == "inputs must be a non-empty batch (N, ...), got shape (0, 8, 8, 3)"
    message = "inputs must be a non-empty batch (N, ...), got shape (0, 3, 4, 4)"
    model, empty = (_features, _flatten_head), np.zeros((0, 3, 4, 4), np.float32)
    calls = [lambda: jax_backend.explain(model, empty), lambda: jax_backend.capture(model, jnp.asarray(empty), 0),
             lambda: jax_backend.explain(model, empty, guided=True), lambda: jax_backend.score(model, empty),
             lambda: gradcam_ref.explain(model, jnp.asarray(empty), method="score-cam")]
    for call in calls:
        with pytest.raises(ValueError) as raised:
            call()
        assert str(raised.value) == message
    one = jax_backend.explain(model, np.ones((1, 3, 4, 4), np.float32))  # N = 1 runs
    np.testing.assert_array_equal(one.maps, np.full((1, 4, 4), 3.0))  # A = 1, dy/dA = 1: alpha_k = 1, K = 3


def test_score_cam_of_a_split_form_that_moves_a_channels_alone():
    """channel_axis=-1 on a pair that moves A's channels last while the inputs stay (N, C, H, W):
    Score-CAM took the inputs to be channels-last too and masked the wrong axes (maps off by 1.2,
    no error). Now refused where the inputs' spatial axes would be smaller than A's, and exact
    with input_channel_axis; channels-last inputs need none."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        w, f = jnp.asarray(rng.standard_normal((3, 2, 3, 3))), jnp.asarray(rng.standard_normal((2, 3)))
        x = jnp.asarray(rng.standard_normal((2, 2, 8, 8)))

        def features(v):
            return jax.nn.relu(jax.lax.conv(v, w, (1, 1), "VALID"))

        def head(a):
            return a.mean(axis=(2, 3)) @ f.T

        a_last = (lambda v: jnp.moveaxis(features(v), 1, -1), lambda a: head(jnp.moveaxis(a, -1, 1)))
        both_last = (lambda v: jnp.moveaxis(features(jnp.moveaxis(v, -1, 1)), 1, -1),
                     lambda a: head(jnp.moveaxis(a, -1, 1)))
        kw = {"method": "score-cam"}
        reference = gradcam_ref.explain((features, head), x, [0, 1], **kw).maps
        with pytest.raises(ValueError, match=r"with channel_axis=-1 their spatial axes would be \(2, 8\), smaller "
                                             r"than A's \(6, 6\); pass input_channel_axis"):
            gradcam_ref.explain(a_last, x, [0, 1], channel_axis=-1, **kw)
        first = gradcam_ref.explain(a_last, x, [0, 1], channel_axis=-1, input_channel_axis=1, **kw).maps
        last = gradcam_ref.explain(both_last, jnp.moveaxis(x, 1, -1), [0, 1], channel_axis=-1, **kw).maps
        assert float(jnp.abs(reference).max()) > 0
        np.testing.assert_array_equal(np.asarray(first), np.asarray(reference))
        np.testing.assert_array_equal(np.asarray(last), np.asarray(reference))
        with pytest.raises(ValueError, match=r"^input_channel_axis must name a non-batch axis of the inputs "
                                             r"\(rank 4\): 1..3 or -3..-1, got 5$"):
            gradcam_ref.explain(a_last, x, [0, 1], channel_axis=-1, input_channel_axis=5, **kw)
