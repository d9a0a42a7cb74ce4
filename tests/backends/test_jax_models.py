"""The JAX backend on Flax (linen, NNX) and Equinox models at a named layer: the CAM identity on
random GAP networks of each library, the split form's maps, guided backpropagation, one program
per shape, no linearisation before the layer, the model left as it was, and errors by name.
(Agreement with torch on a real network: tests/zoo/test_efficientnet_lite0.py.)"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcam_ref
from gradcam_ref import backends
from gradcam_ref.backends import jax as jax_backend

F64 = jnp.float64


# --- One GAP network, three libraries: conv -> ReLU (-> conv -> ReLU) = A, GAP -> linear -------------


class LinenBody(nn.Module):
    widths: tuple[int, ...]
    kernel: int

    @nn.compact
    def __call__(self, x):
        for width in self.widths:
            x = nn.relu(nn.Conv(width, (self.kernel,) * (x.ndim - 2), padding="VALID", param_dtype=F64,
                                bias_init=nn.initializers.normal(0.1))(x))
        return x


class LinenGap(nn.Module):
    """Channels-last; ``features`` and ``head`` methods give the split form of the same network."""

    widths: tuple[int, ...]
    kernel: int
    classes: int

    def setup(self):
        self.body = LinenBody(self.widths, self.kernel)
        self.fc = nn.Dense(self.classes, param_dtype=F64, bias_init=nn.initializers.normal(1.0))

    def features(self, x):
        return self.body(x)

    def head(self, a):
        return self.fc(a.mean(axis=tuple(range(1, a.ndim - 1))))

    def __call__(self, x):
        return self.head(self.features(x))


class NnxGap(nnx.Module):
    def __init__(self, widths, kernel, rank, k_in, classes, seed):
        rngs, layers, c = nnx.Rngs(seed), [], k_in
        for width in widths:
            layers += [nnx.Conv(c, width, (kernel,) * rank, padding="VALID", param_dtype=F64, rngs=rngs,
                                bias_init=nnx.initializers.normal(0.1)), nnx.relu]
            c = width
        self.body = nnx.Sequential(*layers)
        self.fc = nnx.Linear(c, classes, param_dtype=F64, rngs=rngs, bias_init=nnx.initializers.normal(1.0))

    def head(self, a):
        return self.fc(a.mean(axis=tuple(range(1, a.ndim - 1))))

    def __call__(self, x):
        return self.head(self.body(x))


class EqxGap(eqx.Module):
    """One example ``(C, *spatial)`` per call, channels-first: Equinox's convention."""

    body: eqx.nn.Sequential
    fc: eqx.nn.Linear

    def __init__(self, widths, kernel, rank, k_in, classes, seed):
        keys, layers, c = jax.random.split(jax.random.key(seed), len(widths) + 1), [], k_in
        for key, width in zip(keys, widths, strict=False):
            layers += [eqx.nn.Conv(rank, c, width, kernel, key=key, dtype=F64), eqx.nn.Lambda(jax.nn.relu)]
            c = width
        self.body = eqx.nn.Sequential(layers)
        self.fc = eqx.nn.Linear(c, classes, key=keys[-1], dtype=F64)

    def head(self, a):
        return self.fc(a.mean(axis=tuple(range(1, a.ndim))))

    def __call__(self, x):
        return self.head(self.body(x))


def build(library, p):
    """``(model, options for explain, the split form, W (classes, K), channels-last inputs?)``."""
    widths, kernel, rank, seed = p["widths"], p["kernel"], p["rank"], p["seed"]
    if library == "linen":
        module = LinenGap(widths, kernel, p["classes"])
        variables = module.init(jax.random.key(seed), jnp.zeros((1,) + (5,) * rank + (2,), F64))
        split = (lambda x: module.apply(variables, x, method=LinenGap.features),
                 lambda a: module.apply(variables, a, method=LinenGap.head))
        w = variables["params"]["fc"]["kernel"].T
        return module.bind(variables), {"layer": "body"}, split, w, True
    if library == "nnx":
        model = NnxGap(widths, kernel, rank, 2, p["classes"], seed)
        return model, {"layer": "body"}, (lambda x: model.body(x), lambda a: model.head(a)), model.fc.kernel[...].T, True
    model = EqxGap(widths, kernel, rank, 2, p["classes"], seed)
    split = (jax.vmap(model.body), jax.vmap(model.head))
    return model, {"layer": "body"}, split, model.fc.weight, False


def inputs(rng, p, channels_last):
    shape = (p["n"], 2) + (5,) * p["rank"]
    x = {"normal": rng.standard_normal(shape), "zeros": np.zeros(shape), "ties": np.full(shape, 0.5),
         "huge": 1e150 * rng.standard_normal(shape), "tiny": 1e-150 * rng.standard_normal(shape)}[p["values"]]
    return jnp.asarray(np.moveaxis(x, 1, -1) if channels_last else x)


gap_nets = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1), "rank": st.integers(1, 2),
    "widths": st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple), "kernel": st.integers(1, 2),
    "n": st.integers(1, 3), "classes": st.integers(1, 4),
    "targets": st.sampled_from(["argmax", "per-example", "multi"]),
    "values": st.sampled_from(["normal", "normal", "zeros", "ties", "huge", "tiny"]),
})


@pytest.mark.parametrize("library", ["linen", "nnx", "equinox"])
@settings(max_examples=6, deadline=None)
@given(p=gap_nets)
def test_gap_networks_of_each_library_give_relu_cam_over_z(library, p):
    """conv -> ReLU -> GAP -> linear at the named body: alpha^c = w^c / Z, Grad-CAM == ReLU(CAM(A, w^c)) / Z."""
    rng = np.random.default_rng(p["seed"])
    with jax.enable_x64(True):
        model, options, _, w, channels_last = build(library, p)
        x = inputs(rng, p, channels_last)
        target = {"argmax": None, "per-example": rng.integers(0, p["classes"], p["n"]),
                  "multi": rng.integers(0, p["classes"], (p["n"], 2))}[p["targets"]]
        e = gradcam_ref.explain(model, x, target, **options)
        assert e.maps.dtype == F64
    a, w = np.asarray(e.activations), np.asarray(w)
    assert a.shape == (p["n"], p["widths"][-1]) + a.shape[2:] and a.ndim == 2 + p["rank"]  # channels-first
    if target is None:
        np.testing.assert_array_equal(e.targets, np.asarray(e.scores).argmax(axis=1))
    else:
        np.testing.assert_array_equal(e.targets, target)
    z = np.prod(a.shape[2:])
    expected = np.maximum(gradcam_ref.cam(a, w[e.targets]), 0) / z
    np.testing.assert_allclose(np.asarray(e.maps), expected, rtol=1e-12, atol=1e-13 * np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(e.weights), w[e.targets] / z, rtol=1e-12, atol=1e-15 * np.abs(w).max())


P = {"seed": 3, "rank": 2, "widths": (3, 4), "kernel": 2, "n": 3, "classes": 5}


@pytest.mark.parametrize("library", ["linen", "nnx", "equinox"])
def test_the_split_form_gives_the_same_explanation(library):
    rng = np.random.default_rng(0)
    targets = [[0, 4], [2, 2], [3, 1]]
    with jax.enable_x64(True):
        model, options, split, _, channels_last = build(library, P)
        x = inputs(rng, {**P, "values": "normal"}, channels_last)
        named = gradcam_ref.explain(model, x, targets, **options)
        by_split = gradcam_ref.explain(split, x, targets, channel_axis=-1 if channels_last else 1)
    for field in ("maps", "activations", "gradients", "weights", "scores"):
        np.testing.assert_allclose(getattr(named, field), getattr(by_split, field), rtol=1e-14, atol=1e-15,
                                   err_msg=field)
    np.testing.assert_array_equal(named.maps, by_split.maps)
    assert np.asarray(named.maps).max() > 0


@pytest.mark.parametrize("library", ["linen", "nnx", "equinox"])
@pytest.mark.parametrize(("method", "options"), [("ablation-cam", {}), ("ablation-cam", {"value": "pytorch-grad-cam"}),
                                                 ("score-cam", {}), ("score-cam", {"variant": "pytorch-grad-cam"})])
def test_perturbation_methods_at_a_named_layer_equal_the_split_forms(library, method, options):
    """Score-CAM (masked inputs, channels-last ones too) and Ablation-CAM (the layer's output
    replaced, the part after it re-run) at a named layer: the split form's numbers."""
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        model, named_options, split, _, channels_last = build(library, P)
        x = inputs(rng, {**P, "values": "normal"}, channels_last)
        named = gradcam_ref.explain(model, x, [0, 4, 2], method=method, batch_size=3, **named_options, **options)
        by_split = gradcam_ref.explain(split, x, [0, 4, 2], method=method, batch_size=3,
                                       channel_axis=-1 if channels_last else 1, **options)
    for field in ("maps", "activations", "weights", "scores"):
        np.testing.assert_allclose(getattr(named, field), getattr(by_split, field), rtol=1e-13, atol=1e-14,
                                   err_msg=field)
    assert np.asarray(named.maps).max() > 0 and np.ptp(np.asarray(named.weights)) > 0


class Skip(nn.Module):
    """stem -> block, and the stem's output skips over the block to the head."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(3, (2, 2), name="stem", param_dtype=F64)(x))
        a = nn.relu(nn.Conv(3, (2, 2), name="block", param_dtype=F64)(h))
        return nn.Dense(4, name="fc", param_dtype=F64)((a + h).mean(axis=(1, 2)))


def test_ablation_cam_at_a_named_layer_holds_the_skip_and_runs_the_part_before_it_once():
    """The copies replace the layer's output under jax.vmap: the stem, which also feeds the head
    past the layer, is computed once (not batched over the copies) and held for every copy."""
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 5, 2)))
        variables = Skip().init(jax.random.key(0), x)
        model = Skip().bind(variables)
        e = gradcam_ref.explain(model, x, [1, 3], layer="block", method="ablation-cam", batch_size=2,
                                denominator="abs")
        seam, params, _ = jax_backend.jax_models.seam(model, "block")
        copies = jnp.zeros((7, 5, 5, 3), F64)
        text = jax.jit(lambda p, x1, c: seam.replaced(p, x1, c, 0)).lower(params, x[:1], copies).as_text()
        stem = nn.Conv(3, (2, 2), param_dtype=F64).apply({"params": variables["params"]["stem"]}, x)
        h = np.asarray(nn.relu(stem))
        fc = jax.tree.map(np.asarray, variables["params"]["fc"])
    scores, weights = np.asarray(e.scores), np.asarray(e.weights)
    convs = [line for line in text.splitlines() if "convolution" in line]
    assert len(convs) == 1 and "tensor<1x5x5x2x" in convs[0], convs  # the stem, once; the block is replaced
    # by hand: y_k = fc(mean(ReLU(A with channel k zeroed) + h)), w_k = (y - y_k) / y (A: the conv's output)
    a = np.asarray(e.activations)  # (N, K, 5, 5)
    for n, t in enumerate([1, 3]):
        y = scores[n, t]
        for k in range(3):
            ablated = np.moveaxis(a[n], 0, -1).copy()
            ablated[..., k] = 0
            y_k = ((np.maximum(ablated, 0) + h[n]).mean(axis=(0, 1)) @ fc["kernel"] + fc["bias"])[t]
            np.testing.assert_allclose(weights[n, k], (y - y_k) / abs(y), rtol=1e-12)


def test_perturbation_methods_in_the_split_form_with_params():
    """``params=`` reaches features and head when re-scoring too."""
    with jax.enable_x64(True):
        model, _, split, _, _ = build("linen", P)
        variables = model.unbind()[1]
        module = model.unbind()[0]
        features = lambda v, x: module.apply(v, x, method=LinenGap.features)  # noqa: E731
        head = lambda v, a: module.apply(v, a, method=LinenGap.head)  # noqa: E731
        x = inputs(np.random.default_rng(3), {**P, "values": "normal"}, True)
        for method in ("score-cam", "ablation-cam"):
            with_params = gradcam_ref.explain((features, head), x, method=method, params=variables, channel_axis=-1)
            closed = gradcam_ref.explain(split, x, method=method, channel_axis=-1)
            np.testing.assert_array_equal(with_params.maps, closed.maps)


@pytest.mark.parametrize("library", ["linen", "nnx", "equinox"])
def test_guided_backprop_equals_the_split_forms(library):
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        model, options, split, _, channels_last = build(library, P)
        x = inputs(rng, {**P, "values": "normal"}, channels_last)
        named = gradcam_ref.explain(model, x, [[1, 3]] * 3, guided=True, **options)
        by_split = gradcam_ref.explain(split, x, [[1, 3]] * 3, guided=True, channel_axis=-1 if channels_last else 1)
    assert named.guided_backprop.shape == (3, 2, 2, 5, 5)  # (N, T, C, H, W): channels-first, as A
    np.testing.assert_allclose(named.guided_backprop, by_split.guided_backprop, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(named.guided_grad_cam, by_split.guided_grad_cam, rtol=1e-13, atol=1e-15)
    assert np.abs(np.asarray(named.guided_backprop)).max() > 0


@pytest.mark.parametrize("library", ["linen", "equinox"])
def test_maps_at_a_named_layer_are_differentiable_as_the_split_forms(library):
    """d/dx and d/dparams of sum(maps^2), through the backward pass, equal the split form's."""
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        model, options, split, _, channels_last = build(library, P)
        x = inputs(rng, {**P, "values": "normal"}, channels_last)
        axis = -1 if channels_last else 1

        def named(x):
            return jnp.sum(gradcam_ref.explain(model, x, [1, 2, 3], **options).maps ** 2)

        def by_split(x):
            return jnp.sum(gradcam_ref.explain(split, x, [1, 2, 3], channel_axis=axis).maps ** 2)

        grad_named, grad_split = jax.grad(named)(x), jax.grad(by_split)(x)
        if library == "linen":  # the parameters too: they are an argument of the program
            module, variables = model.unbind()
            loss = lambda v: jnp.sum(gradcam_ref.explain(module, x, [1, 2, 3], variables=v, **options).maps ** 2)  # noqa: E731
            grads = jax.grad(loss)(variables)
            w = variables["params"]["fc"]["kernel"]
            h = 1e-6
            bump = jax.tree.map(jnp.zeros_like, variables)
            bump["params"]["fc"]["kernel"] = jnp.ones_like(w)
            plus = jax.tree.map(lambda v, b: v + h * b, variables, bump)
            minus = jax.tree.map(lambda v, b: v - h * b, variables, bump)
            numeric = (loss(plus) - loss(minus)) / (2 * h)
            assert abs(float(numeric) - float(jnp.sum(grads["params"]["fc"]["kernel"]))) < 1e-6 * max(1, abs(float(numeric)))
    grad_named, grad_split = np.asarray(grad_named), np.asarray(grad_split)
    assert np.abs(grad_named).max() > 0
    np.testing.assert_allclose(grad_named, grad_split, rtol=1e-12, atol=1e-14 * np.abs(grad_split).max())


def test_equinox_where_function_and_sequence_indices_name_the_same_layer():
    with jax.enable_x64(True):
        model = EqxGap((3, 4), 2, 2, 2, 5, seed=1)
        x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 2, 6, 6)))
        by_name = gradcam_ref.explain(model, x, [1, 2], layer="body.3")  # the second ReLU: the body's output
        by_long_name = gradcam_ref.explain(model, x, [1, 2], layer="body.layers.3")
        by_where = gradcam_ref.explain(model, x, [1, 2], layer=lambda m: m.body.layers[3])
        body = gradcam_ref.explain(model, x, [1, 2], layer="body")
        inner = gradcam_ref.explain(model, x, [1, 2], layer="body.2")  # the conv before the ReLU
    for e in (by_long_name, by_where, body):
        np.testing.assert_array_equal(e.maps, by_name.maps)
    np.testing.assert_array_equal(np.maximum(np.asarray(inner.activations), 0), np.asarray(by_name.activations))
    assert np.asarray(inner.activations).min() < 0


# --- How it runs -------------------------------------------------------------------------------------


def test_the_part_before_the_layer_is_not_linearised():
    """Three convolutions, A after the second: the program holds the three forward convolutions and
    one transposed one (the third's, to its input); differentiating the first two would add more."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(3, (3, 3), name="c0")(x))
            x = nn.relu(nn.Conv(3, (3, 3), name="c1")(x))
            return nn.Dense(4)(nn.Conv(2, (3, 3), name="c2")(x).mean(axis=(1, 2)))

    x = jnp.ones((2, 8, 8, 1))
    variables = Net().init(jax.random.key(0), x)
    seam, params, axis = jax_backend.jax_models.seam(Net().bind(variables), "c1")

    def program(x, params):
        return jax_backend._program_impl(x, params, None, seam=seam, target_fn=None, channel_axis=axis)

    convs = str(jax.make_jaxpr(program)(x, params)).count("conv_general_dilated[")
    assert convs == 4
    seam0, params0, _ = jax_backend.jax_models.seam(Net().bind(variables), "c0")
    convs0 = str(jax.make_jaxpr(lambda x, p: jax_backend._program_impl(
        x, p, None, seam=seam0, target_fn=None, channel_axis=-1))(x, params0)).count("conv_general_dilated[")
    assert convs0 == 5  # c1 and c2 pulled back to their inputs


def test_compiled_once_per_model_and_shape_and_parameters_are_arguments():
    traces = []

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            traces.append(x.shape)
            return nn.Dense(3)(nn.relu(nn.Conv(4, (3, 3), name="conv")(x)).mean(axis=(1, 2)))

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 2)), dtype=jnp.float32)
    variables = Net().init(jax.random.key(0), x)
    traces.clear()
    first = gradcam_ref.explain(Net().bind(variables), x, [0, 1], layer="conv")
    count = len(traces)
    assert count >= 1
    other = jax.tree.map(lambda v: v * 2, variables)  # new weights, the same program
    for model, target in ((Net().bind(variables), [2, 0]), (Net().bind(other), [0, 1])):
        again = gradcam_ref.explain(model, x, target, layer="conv")
    assert len(traces) == count
    assert not np.array_equal(again.maps, first.maps)
    gradcam_ref.explain(Net().bind(variables), jnp.concatenate([x, x]), layer="conv")  # new shape
    assert len(traces) > count


def test_the_models_are_left_as_they_were_and_numpy_inputs_select_jax():
    with jax.enable_x64(True):
        model = NnxGap((3,), 2, 2, 2, 4, seed=0)
        before = jax.tree.map(np.array, nnx.state(model))
        x = np.random.default_rng(0).standard_normal((2, 6, 6, 2))
        assert backends.select(model, x).NAME == "jax"
        e = gradcam_ref.explain(model, x, layer="body.layers.0")
        assert isinstance(e.maps, jax.Array) and e.maps.shape == (2, 5, 5)
        after = nnx.state(model)
        assert type(model.body.layers[0]) is nnx.Conv
        jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, after))
        eq_model = EqxGap((3,), 2, 2, 2, 4, seed=0)
        assert backends.select(eq_model, x).NAME == "jax"
        linen = LinenGap((3,), 2, 4)
        assert backends.select(linen, x).NAME == "jax"


def test_linen_unbound_module_with_variables_equals_the_bound_one():
    with jax.enable_x64(True):
        bound, options, _, _, _ = build("linen", P)
        module, variables = bound.unbind()
        x = inputs(np.random.default_rng(0), {**P, "values": "normal"}, True)
        a = gradcam_ref.explain(bound, x, 1, **options)
        b = gradcam_ref.explain(module, x, 1, variables=variables, **options)
        sub = gradcam_ref.explain(bound, x, 1, layer=bound.body)  # a bound submodule names itself
        captured = jax_backend.capture(bound, x, 1, **options)  # the same program as explain
    np.testing.assert_array_equal(a.maps, b.maps)
    np.testing.assert_array_equal(a.maps, sub.maps)
    for field in ("activations", "gradients", "scores", "targets"):
        np.testing.assert_array_equal(getattr(captured, field), getattr(a, field))


# --- Shared layers and errors ---------------------------------------------------------------------------


class Shared(nn.Module):
    """One conv applied twice (weights shared), and a submodule returning a pair."""

    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(2, (3, 3), padding="SAME", name="conv")
        h = nn.relu(conv(nn.relu(conv(x))))
        pair = Pair(name="pair")(h)
        return nn.Dense(3, name="fc")(pair[0].mean(axis=(1, 2)))


class Pair(nn.Module):
    def __call__(self, x):
        return x, x


def test_a_shared_linen_layer_needs_call_and_each_call_is_its_own_layer():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, 2)))
    with jax.enable_x64(True):
        variables = Shared().init(jax.random.key(0), x)
        model = Shared().bind(variables)
        with pytest.raises(ValueError, match=r"layer 'conv' runs 2 times in the forward pass: pass call="):
            gradcam_ref.explain(model, x, layer="conv")
        first, second, last = (gradcam_ref.explain(model, x, [0, 2], layer="conv", call=c) for c in (0, 1, -1))
        with pytest.raises(ValueError, match=r"call=2 but layer 'conv' runs 2 time\(s\)"):
            gradcam_ref.explain(model, x, layer="conv", call=2)
        # the first call's A, pulled through the second call by the chain rule: a different map
        kernel = variables["params"]["conv"]["kernel"]
        conv = nn.Conv(2, (3, 3), padding="SAME")
        a1 = conv.apply({"params": variables["params"]["conv"]}, x)
    np.testing.assert_array_equal(second.maps, last.maps)
    np.testing.assert_allclose(np.moveaxis(np.asarray(a1), -1, 1), first.activations, rtol=1e-14)
    assert not np.allclose(first.maps, second.maps)
    assert kernel.shape == (3, 3, 2, 2)


@pytest.mark.parametrize(("make", "layer", "options", "error", "message"), [
    ("linen", "bdy", {}, ValueError, r"layer 'bdy' did not run in the forward pass; did you mean \['body'\]\?"),
    ("linen", "fc", {}, ValueError, r"layer 'fc' must return activations of shape \(N, K, \*spatial\) .* \(rank 2\)"),
    ("linen", None, {}, ValueError, r"layer is required for a linen model"),
    ("linen", 3, {}, TypeError, r"layer must be the dotted name of a submodule of the linen model .* got 3"),
    ("linen-unbound", "body", {}, ValueError, r"the linen module LinenGap is unbound: pass module.bind\(variables\)"),
    ("linen", "body", {"variables": {}}, ValueError, r"variables= is for an unbound linen module"),
    ("nnx", "bodi", {}, ValueError, r"layer 'bodi' is not a submodule of NnxGap; did you mean \['body'"),
    ("nnx", "body.layers.7", {}, ValueError, r"layer 'body.layers.7' is not a submodule of NnxGap"),
    ("equinox", "body.9", {}, ValueError, r"layer 'body.9' is not a submodule of EqxGap; did you mean"),
    ("equinox", 2.5, {}, TypeError, r"layer must be a dotted name \(e.g. 'features.3'\) or a where function"),
    ("equinox", "body", {"call": "1"}, TypeError, r"call must be None or an int, got '1'"),
    ("equinox", "body", {"variables": {}}, ValueError, r"variables= is for an unbound flax.linen module"),
    ("shared", "pair", {}, TypeError, r"layer 'pair' must return one array \(its activations A\), got tuple"),
])
def test_bad_layers_give_clear_errors(make, layer, options, error, message):
    with jax.enable_x64(True):
        if make == "shared":
            x = jnp.ones((2, 5, 5, 2))
            model = Shared().bind(Shared().init(jax.random.key(0), x))
        else:
            model, _, _, _, channels_last = build(make.split("-")[0], P)
            x = inputs(np.random.default_rng(0), {**P, "values": "normal"}, channels_last)
            if make == "linen-unbound":
                model = model.unbind()[0]
        with pytest.raises(error, match=message):
            gradcam_ref.explain(model, x, layer=layer, **options)


def test_an_nnx_model_in_training_mode_is_refused_and_left_in_it():
    class WithBatchNorm(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, (3, 3), rngs=rngs)
            self.norm = nnx.BatchNorm(3, rngs=rngs)
            self.fc = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            return self.fc(self.norm(self.conv(x)).mean(axis=(1, 2)))

    model = WithBatchNorm(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5, 5, 2)), dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"\['BatchNorm'\] layers in training mode, .* call model.eval\(\) first"):
        gradcam_ref.explain(model, x, 0, layer="norm")
    assert model.norm.use_running_average is False  # left as it was
    model.eval()
    evaluated = gradcam_ref.explain(model, x, 0, layer="norm")
    scale = 1 / np.sqrt(1 + model.norm.epsilon)  # running statistics of a new model: mean 0, var 1
    conv = np.asarray(model.conv(x))
    np.testing.assert_allclose(evaluated.activations, np.moveaxis(conv * scale, -1, 1), rtol=1e-5, atol=1e-6)


NNX_NAMES = "layer must be the dotted name of a submodule of the nnx model (e.g. 'backbone.conv'), got "
EQX_NAMES = ("layer must be a dotted name (e.g. 'features.3') or a where function (e.g. lambda m: m.features[3]), "
             "got ")


@pytest.mark.parametrize(("make", "pick", "message"), [
    ("nnx", lambda m: m.body, NNX_NAMES + "a Sequential module; this one is at 'body': pass layer='body'"),
    ("nnx", lambda m: m.body.layers[0],
     NNX_NAMES + "a Conv module; this one is at 'body.layers.0': pass layer='body.layers.0'"),
    ("nnx", lambda m: nnx.Linear(2, 2, rngs=nnx.Rngs(0)), NNX_NAMES + "a Linear module; it is not a submodule of NnxGap"),
    ("equinox", lambda m: eqx.nn.Linear(2, 2, key=jax.random.key(0)),
     EQX_NAMES + "a Linear module; it is not a submodule of EqxGap"),
    ("equinox", lambda m: m.body[0], EQX_NAMES + "a Conv module; this one is at 'body.0': pass layer='body.0'"),
    ("equinox", lambda m: m.fc, EQX_NAMES + "a Linear module; this one is at 'fc': pass layer='fc'"),
    ("linen", lambda m: nn.Dense(3), "layer must be the dotted name of a submodule of the linen model "
     "(e.g. 'backbone.conv'), got a Dense module"),
    ("linen", lambda m: nn.Dense(3).bind({"params": {}}), "layer, a bound Dense module, is the root of its own "
     "binding, not a submodule of LinenGap: pass its dotted path (as in module.path)"),
    ("split", lambda m: m.fc, "in the split form (features, head) the layer is the seam between them; layer and "
     "call must be None, got layer=a Linear module, call=None"),
])
def test_a_module_object_where_a_name_is_wanted_is_named_on_one_line(make, pick, message):
    """NNX takes names only (an Equinox module is not a where function); the message named the module
    by its repr, many lines of every parameter. Now its type, and its name when it is the model's."""
    with jax.enable_x64(True):
        model, _, _, _, channels_last = build("nnx" if make == "split" else make, P)
        x = inputs(np.random.default_rng(0), {**P, "values": "normal"}, channels_last)
        layer = pick(model)
        if make == "split":
            net = model
            model = (lambda v: jnp.moveaxis(net.body(v), -1, 1), lambda a: net.head(jnp.moveaxis(a, 1, -1)))
        with pytest.raises((TypeError, ValueError)) as raised:
            gradcam_ref.explain(model, x, layer=layer)
        assert "\n" in repr(layer)  # what the message embedded
    assert str(raised.value) == message
