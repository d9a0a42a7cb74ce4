"""``explain(..., differentiable="stop" | "full")`` at a named layer of Flax linen, NNX and Equinox models.

The parameters travel with the model, differentiated by each library's own transform: ``jax.grad``
over the ``variables`` of ``module.bind(variables)`` (or of ``variables=``), ``nnx.grad`` over an NNX
model, ``eqx.filter_grad`` over an Equinox model. Checked, in float64, on small tanh networks whose
head (a 1x1 convolution, tanh, pooling, dense) makes dy/dA depend on A, so that the two modes differ:
gradients against central finite differences (parameters and input, both modes); the named layer
against the split form ``(features, head)`` with ``params=`` of the same network (maps and parameter
gradients within 1e-12, hypothesis); a jitted GAIN step (optax) against the split form's; one
compiled program per shape under the transforms; errors by name.
"""

import dataclasses

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcam_ref
from gradcam_ref import gain

F64 = jnp.float64
CLASSES = 3
LABELS = np.array([0, 2, 1])
TRACES: list[str] = []
"""One entry per Python trace of a model's ``__call__`` (a side effect at trace time only)."""


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


# --- One network, three libraries: conv -> tanh -> conv -> tanh = A ("body"); 1x1 conv -> tanh -> mean -> dense


class LinenBody(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(3, (3, 3), padding="VALID", param_dtype=F64, name="c0")(x))
        return jnp.tanh(nn.Conv(4, (2, 2), padding="VALID", param_dtype=F64, name="c1")(x))


class LinenNet(nn.Module):
    """Channels-last, unmodified; ``features`` and ``head`` give the split form of the same network."""

    def setup(self):
        self.body = LinenBody()
        self.mix = nn.Conv(4, (1, 1), param_dtype=F64, bias_init=nn.initializers.normal(0.5))
        self.fc = nn.Dense(CLASSES, param_dtype=F64, bias_init=nn.initializers.normal(1.0))

    def features(self, x):
        return self.body(x)

    def head(self, a):
        return self.fc(jnp.tanh(self.mix(a)).mean(axis=(1, 2)))

    def __call__(self, x):
        TRACES.append("linen")
        return self.head(self.features(x))


def linen_features(variables, x):
    return LinenNet().apply(variables, x, method=LinenNet.features)


def linen_head(variables, a):
    return LinenNet().apply(variables, a, method=LinenNet.head)


class NnxNet(nnx.Module):
    def __init__(self, seed):
        rngs = nnx.Rngs(seed)
        conv = dict(padding="VALID", param_dtype=F64, rngs=rngs)
        self.body = nnx.Sequential(nnx.Conv(2, 3, (3, 3), **conv), jnp.tanh, nnx.Conv(3, 4, (2, 2), **conv), jnp.tanh)
        self.mix = nnx.Conv(4, 4, (1, 1), param_dtype=F64, rngs=rngs, bias_init=nnx.initializers.normal(0.5))
        self.fc = nnx.Linear(4, CLASSES, param_dtype=F64, rngs=rngs, bias_init=nnx.initializers.normal(1.0))

    def head(self, a):
        return self.fc(jnp.tanh(self.mix(a)).mean(axis=(1, 2)))

    def __call__(self, x):
        TRACES.append("nnx")
        return self.head(self.body(x))


class EqxNet(eqx.Module):
    """One example ``(2, H, W)`` per call, channels-first."""

    body: eqx.nn.Sequential
    mix: eqx.nn.Conv2d
    fc: eqx.nn.Linear

    def __init__(self, seed):
        k = jax.random.split(jax.random.key(seed), 5)
        self.body = eqx.nn.Sequential([eqx.nn.Conv2d(2, 3, 3, key=k[0], dtype=F64), eqx.nn.Lambda(jnp.tanh),
                                       eqx.nn.Conv2d(3, 4, 2, key=k[1], dtype=F64), eqx.nn.Lambda(jnp.tanh)])
        mix = eqx.nn.Conv2d(4, 4, 1, key=k[2], dtype=F64)
        self.mix = eqx.tree_at(lambda m: m.bias, mix, 0.5 * jax.random.normal(k[4], mix.bias.shape, F64))
        self.fc = eqx.nn.Linear(4, CLASSES, key=k[3], dtype=F64)

    def head(self, a):
        return self.fc(jnp.tanh(self.mix(a)).mean(axis=(1, 2)))

    def __call__(self, x):
        TRACES.append("equinox")
        return self.head(self.body(x))


@dataclasses.dataclass(frozen=True)
class Case:
    """One library's network: its parameters as a pytree, the model rebuilt from them, the split form.

    ``model(params)`` is the unmodified model holding ``params``; ``native_grad(loss)(params)`` is
    the library's own transform applied to ``loss(model)``, its result flattened to ``params``'
    leaves; ``split`` is ``(features(params, x), head(params, A))`` of the same network.
    """

    library: str
    params: object
    model: object
    native_grad: object
    split: tuple
    channel_axis: int
    channels_last: bool

    def named(self, weights, x, target, mode=False, **options):
        if self.library == "linen-unbound":
            return gradcam_ref.explain(LinenNet(), x, target, layer="body", differentiable=mode, variables=weights,
                                       **options)
        return gradcam_ref.explain(self.model(weights), x, target, layer="body", differentiable=mode, **options)

    def by_split(self, params, x, target, mode, **options):
        return gradcam_ref.explain(self.split, x, target, params=params, differentiable=mode,
                                   channel_axis=self.channel_axis, **options)

    def x(self, rng, n):
        x = rng.standard_normal((n, 2, 7, 7))
        return jnp.asarray(np.moveaxis(x, 1, -1) if self.channels_last else x)


def _leaves(tree):
    return jax.tree.leaves(tree)


def build(library, seed=0):
    if library in ("linen", "linen-unbound"):
        variables = LinenNet().init(jax.random.key(seed), jnp.zeros((1, 7, 7, 2), F64))

        def native_grad(loss):
            if library == "linen":
                return lambda v: _leaves(jax.grad(lambda w: loss(LinenNet().bind(w)))(v))
            return lambda v: _leaves(jax.grad(lambda w: loss((LinenNet(), w)))(v))

        return Case(library, variables, lambda v: LinenNet().bind(v), native_grad, (linen_features, linen_head),
                    -1, True)
    if library == "nnx":
        graphdef, state = nnx.split(NnxNet(seed))

        def native_grad(loss):  # nnx.grad over the model itself (its Params)
            return lambda s: _leaves(nnx.grad(loss)(nnx.merge(graphdef, s)))

        def features(s, x):
            return nnx.merge(graphdef, s).body(x)

        def head(s, a):
            return nnx.merge(graphdef, s).head(a)

        return Case(library, state, lambda s: nnx.merge(graphdef, s), native_grad, (features, head), -1, True)
    params, static = eqx.partition(EqxNet(seed), eqx.is_array)

    def native_grad(loss):  # eqx.filter_grad over the model itself
        return lambda p: _leaves(eqx.filter(eqx.filter_grad(loss)(eqx.combine(p, static)), eqx.is_array))

    def features(p, x):
        return jax.vmap(eqx.combine(p, static).body)(x)

    def head(p, a):
        return jax.vmap(eqx.combine(p, static).head)(a)

    return Case(library, params, lambda p: eqx.combine(p, static), native_grad, (features, head), 1, False)


LIBRARIES = ["linen", "linen-unbound", "nnx", "equinox"]


def _explain_model(case, model, x, target, mode, **options):
    """explain on what the library's transform hands the loss: a model (an unbound module and variables)."""
    if isinstance(model, tuple):
        return gradcam_ref.explain(model[0], x, target, layer="body", differentiable=mode, variables=model[1],
                                   **options)
    return gradcam_ref.explain(model, x, target, layer="body", differentiable=mode, **options)


def _head_leaves(case, tree):
    """The leaves of ``tree`` (shaped like ``case.params``) that belong to the head (mix, fc)."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(case.params)[0]]
    return [leaf for path, leaf in zip(paths, _leaves(tree), strict=True) if "mix" in path or "fc" in path]


# --- Gradients against central finite differences --------------------------------------------------------


@pytest.mark.parametrize("mode", ["stop", "full"])
@pytest.mark.parametrize("library", LIBRARIES)
def test_parameter_and_input_gradients_match_central_differences(library, mode):
    """d/dparams (by the library's own transform) and d/dx of sum(probe * maps) against central differences.

    "stop": alpha^c is a constant, so the derivative is that of sum(probe * ReLU(CAM(A(theta), alpha0)))
    with alpha0 frozen at theta, and the head (after the layer) gets exactly zero; "full": alpha^c
    moves too, and the head gets a gradient.
    """
    case = build(library, seed=1)
    rng = np.random.default_rng(3)
    x = case.x(rng, 3)
    probe = jnp.asarray(rng.standard_normal((3, 4, 4)))

    def loss(model):
        return jnp.sum(probe * _explain_model(case, model, x, LABELS, mode).maps)

    grads = jax.jit(case.native_grad(loss))(case.params)
    alpha0 = case.named(case.params, x, LABELS, False).weights

    @jax.jit
    def value(params, x):
        e = case.named(params, x, LABELS, mode)
        maps = e.maps if mode == "full" else jax.nn.relu(gradcam_ref.cam(e.activations, alpha0))
        return jnp.sum(probe * maps)

    x_grad = jax.jit(jax.grad(lambda v: jnp.sum(probe * case.named(case.params, v, LABELS, mode).maps)))(x)
    eps = 1e-6
    for seed in range(2):
        d = np.random.default_rng(10 + seed)
        direction = jax.tree.map(lambda p, d=d: jnp.asarray(d.standard_normal(p.shape)), case.params)
        analytic = sum(float(jnp.sum(g * v)) for g, v in zip(grads, _leaves(direction), strict=True))
        plus = jax.tree.map(lambda p, v: p + eps * v, case.params, direction)
        minus = jax.tree.map(lambda p, v: p - eps * v, case.params, direction)
        numeric = (float(value(plus, x)) - float(value(minus, x))) / (2 * eps)
        assert abs(analytic - numeric) <= 1e-7 * max(1.0, abs(numeric)), (analytic, numeric)
        assert abs(analytic) > 1e-4
        dx = jnp.asarray(d.standard_normal(x.shape))
        analytic_x = float(jnp.sum(x_grad * dx))
        numeric_x = (float(value(case.params, x + eps * dx)) - float(value(case.params, x - eps * dx))) / (2 * eps)
        assert abs(analytic_x - numeric_x) <= 1e-7 * max(1.0, abs(numeric_x)), (analytic_x, numeric_x)
        assert abs(analytic_x) > 1e-4
    head = _head_leaves(case, jax.tree.unflatten(jax.tree.structure(case.params), grads))
    if mode == "stop":
        assert all(float(jnp.abs(g).max()) == 0.0 for g in head)
    else:
        assert max(float(jnp.abs(g).max()) for g in head) > 1e-3


# --- The named layer against the split form with params= ----------------------------------------------


def _agree(named, split):
    for a, b in zip(_leaves(named), _leaves(split), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(np.abs(b).max(), 1e-300)
        assert np.abs(a - b).max() <= 1e-12 * scale, (np.abs(a - b).max(), scale)


@pytest.mark.slow
@pytest.mark.parametrize("library", LIBRARIES)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3), mode=st.sampled_from(["stop", "full"]),
       targets=st.sampled_from(["argmax", "per-example", "multi"]),
       values=st.sampled_from(["normal", "normal", "zeros", "ties", "huge", "tiny"]),
       method=st.sampled_from(["grad-cam", "grad-cam", "grad-cam++", "hirescam", "layercam", "xgrad-cam"]))
def test_named_layer_gives_the_split_forms_maps_and_parameter_gradients(library, seed, n, mode, targets, values,
                                                                        method):
    """Maps, scores and d(loss)/dparams: the library's own transform at the named layer == jax.grad of the
    split form, for Grad-CAM and the gradient methods of the CAM family."""
    case = build(library, seed % 1000)
    rng = np.random.default_rng(seed)
    x = case.x(rng, n)
    x = {"normal": x, "zeros": jnp.zeros_like(x), "ties": jnp.full_like(x, 0.5), "huge": 1e150 * x,
         "tiny": 1e-150 * x}[values]
    target = {"argmax": None, "per-example": jnp.asarray(rng.integers(0, CLASSES, n)),
              "multi": jnp.asarray(rng.integers(0, CLASSES, (n, 2)))}[targets]
    probe = jnp.asarray(rng.standard_normal((n, 2, 4, 4) if targets == "multi" else (n, 4, 4)))

    named = case.named(case.params, x, target, mode, method=method)
    split = case.by_split(case.params, x, target, mode, method=method)
    for field in ("maps", "weights", "activations", "gradients", "scores"):
        _agree(getattr(named, field), getattr(split, field))

    def loss(model):
        return jnp.sum(probe * _explain_model(case, model, x, target, mode, method=method).maps)

    def split_loss(params):
        return jnp.sum(probe * case.by_split(params, x, target, mode, method=method).maps)

    grads_named = jax.jit(case.native_grad(loss))(case.params)
    grads_split = jax.jit(jax.grad(split_loss))(case.params)
    _agree(grads_named, grads_split)
    if values == "normal":
        assert max(float(jnp.abs(g).max()) for g in grads_named) > 0


# --- A jitted GAIN training step (optax) ---------------------------------------------------------------


def _gain_loss(e, classify, x, labels, masks, channels_last):
    """L_ext of one batch: cross-entropy of the explained pass's scores, L_am on the erased images, L_e."""
    maps = gain.normalize_maps(e.maps)
    images = jnp.moveaxis(x, -1, 1) if channels_last else x
    erased = gain.masked_image(images, maps)
    l_am = gain.attention_mining_loss(gain.sigmoid(classify(jnp.moveaxis(erased, 1, -1) if channels_last else erased)),
                                      labels)
    l_cl = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(e.scores, labels))
    l_e = gain.external_supervision_loss(maps, masks)
    return gain.gain_ext_loss(l_cl, l_am, l_e)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stop", "full"])
def test_a_jitted_gain_step_on_a_linen_model_at_a_named_layer_equals_the_split_forms(mode):
    """optax.adam on L_ext, jitted, 4 steps: the unmodified linen model (jax.grad over its variables)
    and the split form (params=) of the same network reach the same parameters within 1e-10."""
    case = build("linen", seed=2)
    rng = np.random.default_rng(4)
    x = case.x(rng, 3)
    masks = jnp.asarray((rng.random((3, 7, 7)) > 0.5).astype(np.float64))
    labels = jnp.asarray(LABELS)
    tx = optax.adam(0.05)

    def named_loss(variables, x, labels):
        model = LinenNet().bind(variables)
        e = gradcam_ref.explain(model, x, labels, layer="body", differentiable=mode)
        return _gain_loss(e, lambda v: LinenNet().apply(variables, v), x, labels, masks, True)

    def split_loss(variables, x, labels):
        e = gradcam_ref.explain(case.split, x, labels, params=variables, differentiable=mode, channel_axis=-1)
        return _gain_loss(e, lambda v: linen_head(variables, linen_features(variables, v)), x, labels, masks, True)

    def train(loss):
        @jax.jit
        def step(params, state, x, labels):
            value, grads = jax.value_and_grad(loss)(params, x, labels)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

        params, state, values = case.params, tx.init(case.params), []
        for _ in range(4):
            params, state, value = step(params, state, x, labels)
            values.append(float(value))
        return params, values

    named_params, named_values = train(named_loss)
    split_params, split_values = train(split_loss)
    np.testing.assert_allclose(named_values, split_values, rtol=1e-10)
    assert named_values[-1] < named_values[0]
    for a, b, start in zip(_leaves(named_params), _leaves(split_params), _leaves(case.params), strict=True):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-10
        assert np.abs(np.asarray(a) - np.asarray(start)).max() > 1e-3  # the steps moved every parameter


@pytest.mark.slow
@pytest.mark.parametrize("library", ["nnx", "equinox"])
def test_jitted_gain_steps_of_nnx_and_equinox_models_train_them_as_the_split_form(library):
    """nnx.Optimizer under nnx.jit, or eqx.filter_jit with optax: three steps, the same loss values and
    parameters as the split form's jax.grad steps (1e-10), and the loss decreases."""
    rng = np.random.default_rng(5)
    labels = jnp.asarray(LABELS)
    masks = jnp.asarray((rng.random((3, 7, 7)) > 0.5).astype(np.float64))
    tx = optax.sgd(0.2, momentum=0.9)
    case = build(library, seed=3)
    x = case.x(rng, 3)
    features, head = case.split

    def loss(model):
        e = gradcam_ref.explain(model, x, labels, layer="body", differentiable="full")
        classify = model if library == "nnx" else jax.vmap(model)
        return _gain_loss(e, classify, x, labels, masks, case.channels_last)

    def split_loss(params):
        e = case.by_split(params, x, labels, "full")
        return _gain_loss(e, lambda v: head(params, features(params, v)), x, labels, masks, case.channels_last)

    @jax.jit
    def split_step(params, state):
        value, grads = jax.value_and_grad(split_loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    params, state, split_values = case.params, tx.init(case.params), []
    for _ in range(3):
        params, state, value = split_step(params, state)
        split_values.append(float(value))

    values = []
    model = case.model(case.params)
    if library == "nnx":
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def nnx_step(model, optimizer):
            value, grads = nnx.value_and_grad(loss)(model)
            optimizer.update(model, grads)
            return value

        for _ in range(3):
            values.append(float(nnx_step(model, optimizer)))
        trained = nnx.split(model)[1]
    else:
        opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

        @eqx.filter_jit
        def eqx_step(model, opt_state):
            value, grads = eqx.filter_value_and_grad(loss)(model)
            updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
            return eqx.apply_updates(model, updates), opt_state, value

        for _ in range(3):
            model, opt_state, value = eqx_step(model, opt_state)
            values.append(float(value))
        trained = eqx.filter(model, eqx.is_array)
    np.testing.assert_allclose(values, split_values, rtol=1e-10)
    assert values[-1] < values[0]
    for a, b in zip(_leaves(trained), _leaves(params), strict=True):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-10


# --- One program per shape --------------------------------------------------------------------------


@pytest.mark.parametrize("library", ["linen", "nnx", "equinox"])
def test_one_program_per_shape_under_the_libraries_transforms(library):
    """New parameters under the library's transform (jitted or not) do not trace the model again."""
    case = build(library, seed=0)
    x = case.x(np.random.default_rng(0), 2)

    def loss(model):
        return jnp.sum(gradcam_ref.explain(model, x, [0, 1], layer="body", differentiable="full").maps ** 2)

    grad = case.native_grad(loss)
    other = jax.tree.map(lambda v: 1.5 * v, case.params)
    jax.clear_caches()  # other tests compiled this very program: start from none
    TRACES.clear()
    first = grad(case.params)
    count = len(TRACES)
    assert count >= 1
    # new weights, then the same step inside an outer jax.jit: the model is not traced again
    results = [grad(other), jax.jit(grad)(case.params), jax.jit(grad)(other)]
    assert len(TRACES) == count, TRACES
    flat = [np.concatenate([np.ravel(leaf) for leaf in r]) for r in (first, *results)]
    assert not np.allclose(flat[1], flat[0])
    np.testing.assert_allclose(flat[2], flat[0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(flat[3], flat[1], rtol=1e-12, atol=1e-15)


# --- Errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("library", ["linen", "linen-unbound", "nnx", "equinox"])
@pytest.mark.parametrize(("options", "error", "message"), [
    ({"differentiable": True}, ValueError,
     r"^differentiable must be one of \(False, 'stop', 'full'\) \(True is ambiguous.*got True$"),
    ({"differentiable": "second"}, ValueError, r"^differentiable must be one of \(False, 'stop', 'full'\).*got 'second'$"),
    ({"differentiable": None}, ValueError, r"^differentiable must be one of .*got None$"),
    ({"differentiable": 1}, ValueError, r"^differentiable must be one of .*got 1$"),
    ({"differentiable": "stop", "guided": True}, ValueError, r"^guided=True cannot be combined with differentiable='stop'"),
    ({"differentiable": "full", "method": "score-cam"}, ValueError,
     r"^differentiable='full' is for the gradient methods, not method='score-cam'$"),
    ({"differentiable": "stop", "params": {}}, ValueError,
     r"^params= is for the split form .*; a \w+ model carries its own parameters: differentiate it with "),
])
def test_bad_differentiable_arguments_give_one_line_errors(library, options, error, message):
    case = build(library)
    x = case.x(np.random.default_rng(0), 2)
    options = dict(options)
    mode = options.pop("differentiable")
    with pytest.raises(error, match=message) as info:
        case.named(case.params, x, [0, 1], mode, **options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("library", ["linen", "nnx", "equinox"])
@pytest.mark.parametrize("stop", [False, True])
def test_without_an_outer_transform_the_part_before_the_layer_is_not_linearised(library, stop):
    """The program of each library's model, either mode: the three forward convolutions (c0, c1 = A,
    then the head's 1x1) and one more, the head's pulled back to A; differentiating c0 or c1 would add
    convolutions. Only an outer jax.grad / nnx.grad / eqx.filter_grad differentiates the rest."""
    from gradcam_ref.backends import jax as jax_backend

    case = build(library)
    x = case.x(np.random.default_rng(0), 2)
    seam, params, axis = jax_backend.jax_models.seam(case.model(case.params), "body")

    def program(x, params):
        return jax_backend._program_impl(x, params, None, seam=seam, target_fn=None, channel_axis=axis, stop=stop)

    assert str(jax.make_jaxpr(program)(x, params)).count("conv_general_dilated[") == 4
    outer = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(program(x, p)[1].maps)))(params)
    assert str(outer).count("conv_general_dilated[") > 4  # with a transform on top, the layers before A too
