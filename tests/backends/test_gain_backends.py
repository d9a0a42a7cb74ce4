"""GAIN through the backends: ``explain(..., differentiable="stop" | "full")``.

Checked against central finite differences in float64 (torch and JAX, both modes, a tanh net so
that the maps are smooth), and torch against JAX: the same L_self / L_ext and parameter gradients
(1e-10) and the same parameters after 5 optimiser steps (torch.optim vs optax, 1e-8).
"""

import warnings

import array_api_compat
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import gradcam_ref
from gradcam_ref import gain
from gradcam_ref.backends import numpy_backend
from tests.backends import twins

NET = twins.SMOOTH_NET
N = 3
LABELS = np.array([0, 3, 1])


def rel_err(actual, expected):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("gain") / "smooth.npz"
    twins.write_weights(path, NET, seed=11)
    return twins.read_weights(path)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((N, *NET["input"]))
    masks = (rng.random((N, *NET["input"][1:])) > 0.5).astype(np.float64)
    return x, masks, np.array([1.0, 0.0, 1.0]), rng.standard_normal((N, 4, 4))


def _directions(weights, seed):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(v.shape) for k, v in weights.items()} for _ in range(3)]


# --- torch ------------------------------------------------------------------------------------


def _torch_map_loss(weights, x, probe, mode, alpha0=None):
    """sum(probe * map) of the torch twin; ``alpha0`` held fixed for the "stop" derivative."""
    features, head = twins.torch_twin(NET, weights, torch.float64)
    named = twins.torch_named_parameters(NET, features, head)
    e = gradcam_ref.explain((features, head), torch.as_tensor(x), LABELS, differentiable=mode)
    maps = e.maps if alpha0 is None else torch.relu(gradcam_ref.cam(e.activations, alpha0))
    return (torch.as_tensor(probe) * maps).sum(), named, e


@pytest.mark.parametrize("mode", ["stop", "full"])
def test_torch_map_gradients_match_central_differences(weights, data, mode):
    """d/d eps L(theta + eps v) by central differences == <grad L, v>, three random directions v.

    For "stop" the differenced function keeps alpha at its value at theta (the mode's meaning);
    for "full" it is the map itself, alpha moving with theta.
    """
    x, _, _, probe = data
    loss, named, e = _torch_map_loss(weights, x, probe, mode)
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()), allow_unused=True), strict=True))
    alpha0 = e.weights.detach() if mode == "stop" else None
    if mode == "stop":  # alpha constant: the head's parameters do not reach the map
        assert all(grads[k] is None for k in ("c1.weight", "c1.bias", "fc.weight", "fc.bias"))
    eps = 1e-6
    for v in _directions(weights, 0):
        analytic = sum(float((grads[k] * torch.as_tensor(v[k])).sum()) for k in grads if grads[k] is not None)
        plus = {k: weights[k] + eps * v[k] for k in weights}
        minus = {k: weights[k] - eps * v[k] for k in weights}
        numeric = (float(_torch_map_loss(plus, x, probe, mode, alpha0)[0].detach())
                   - float(_torch_map_loss(minus, x, probe, mode, alpha0)[0].detach())) / (2 * eps)
        assert abs(analytic - numeric) <= 1e-7 * max(1.0, abs(numeric)), (analytic, numeric)
        assert abs(analytic) > 1e-6  # a direction that moves the map: the check means something


def test_torch_full_mode_gradient_reaches_the_input_and_the_model_is_left_alone(weights, data):
    """Maps carry autograd to the input; the model keeps its flags, no .grad is written, no hooks stay."""
    x, _, _, probe = data
    features, head = twins.torch_twin(NET, weights, torch.float64)
    model, layer = twins.torch_sequential(features, head)
    model.train()
    xt = torch.as_tensor(x).requires_grad_(True)
    e = gradcam_ref.explain(model, xt, LABELS, layer=layer, differentiable="full")
    loss = (torch.as_tensor(probe) * e.maps).sum()
    (gx,) = torch.autograd.grad(loss, [xt])
    v = np.random.default_rng(1).standard_normal(x.shape)
    eps = 1e-6

    def f(xv):
        return float((torch.as_tensor(probe) * gradcam_ref.explain(
            model, torch.as_tensor(xv), LABELS, layer=layer, differentiable="full").maps).sum().detach())

    numeric = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    assert abs(float((gx * torch.as_tensor(v)).sum()) - numeric) <= 1e-7 * max(1.0, abs(numeric))
    assert model.training and all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_torch_scores_and_maps_come_from_one_forward_pass_in_train_mode():
    """Dropout in train mode: the returned scores are those the map was computed from."""
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Tanh()).double()
    head = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)).double()
    features.train(), head.train()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # differentiable: training mode is the point, no warning
        e = gradcam_ref.explain((features, head), x, [0, 2], differentiable="stop")
    # y^c = w^c . dropout(A) + b: its gradient at A is w^c * mask / (1 - p), the dropout mask of that pass
    a = e.activations.detach()
    kept = (e.gradients.detach() != 0).flatten(1)
    rebuilt = (a.flatten(1) * kept * 2) @ head[2].weight.T + head[2].bias
    np.testing.assert_allclose(e.scores.detach().numpy()[[0, 1], [0, 2]], rebuilt.detach().numpy()[[0, 1], [0, 2]],
                               rtol=1e-12)


def test_differentiable_bad_values_and_backends(weights, data):
    x, *_ = data
    features, head = twins.torch_twin(NET, weights, torch.float64)
    with pytest.raises(ValueError, match=r"differentiable must be one of .*got True"):
        gradcam_ref.explain((features, head), torch.as_tensor(x), differentiable=True)
    with pytest.raises(ValueError, match=r"differentiable must be one of .*got 'second'"):
        gradcam_ref.explain((features, head), torch.as_tensor(x), differentiable="second")
    with pytest.raises(ValueError, match="guided=True cannot be combined"):
        gradcam_ref.explain((features, head), torch.as_tensor(x), guided=True, differentiable="stop")
    oracle = numpy_backend.Oracle.random(np.random.default_rng(0), in_channels=1, widths=[2], kernel_sizes=[2],
                                         num_classes=3)
    with pytest.raises(TypeError, match="differentiable='full': the numpy backend has no autograd"):
        gradcam_ref.explain(oracle, np.ones((1, 1, 4, 4)), differentiable="full")
    # the default path is unchanged: detached tensors
    e = gradcam_ref.explain((features, head), torch.as_tensor(x))
    assert not e.maps.requires_grad and not e.scores.requires_grad


# --- JAX ----------------------------------------------------------------------------------------


def _jax_map_loss(params, x, probe, mode, alpha0=None):
    features, head = _JAX_FUNCTIONS
    e = gradcam_ref.explain((features, head), x, jnp.asarray(LABELS), params=params, differentiable=mode)
    maps = e.maps if alpha0 is None else jax.nn.relu(gradcam_ref.cam(e.activations, alpha0))
    return (probe * maps).sum()


_JAX_FUNCTIONS = twins.jax_twin_functions(NET)
_jax_map_loss_jit = jax.jit(_jax_map_loss, static_argnames="mode")


@pytest.mark.parametrize("mode", ["stop", "full"])
def test_jax_map_gradients_match_central_differences(weights, data, mode):
    x, _, _, probe = data
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v) for k, v in weights.items()}
        xj, pj = jnp.asarray(x), jnp.asarray(probe)
        grads = jax.jit(jax.grad(_jax_map_loss), static_argnames="mode")(params, xj, pj, mode)
        alpha0 = None
        if mode == "stop":
            alpha0 = gradcam_ref.explain(_JAX_FUNCTIONS, xj, LABELS, params=params).weights
            assert all(float(jnp.abs(grads[k]).max()) == 0.0 for k in ("c1.weight", "fc.weight", "fc.bias"))
        eps = 1e-6
        for v in _directions(weights, 0):
            analytic = sum(float((grads[k] * v[k]).sum()) for k in grads)
            plus = {k: params[k] + eps * v[k] for k in params}
            minus = {k: params[k] - eps * v[k] for k in params}
            numeric = (float(_jax_map_loss_jit(plus, xj, pj, mode, alpha0))
                       - float(_jax_map_loss_jit(minus, xj, pj, mode, alpha0))) / (2 * eps)
            assert abs(analytic - numeric) <= 1e-7 * max(1.0, abs(numeric)), (analytic, numeric)
            assert abs(analytic) > 1e-6


# --- torch and JAX twins: GAIN losses, gradients, optimiser steps -------------------------------


def gain_losses(e, classify, x, labels, masks, present):
    """(L_self, L_ext) of one batch, in array-API code: the same function for torch and JAX.

    L_cl is the multi-label binary cross-entropy of the scores of the explained forward pass;
    s^c = sigmoid of the logits of the erased images (Eq. 5).
    """
    xp = array_api_compat.array_namespace(e.scores)
    maps = gain.normalize_maps(e.maps)
    erased = gain.masked_image(x, maps)
    l_am = gain.attention_mining_loss(gain.sigmoid(classify(erased)), labels)
    onehot = xp.astype(xp.asarray(labels)[:, None] == xp.arange(e.scores.shape[1])[None, :], e.scores.dtype)
    z = e.scores
    l_cl = xp.mean(xp.logaddexp(xp.zeros_like(z), z) - onehot * z)
    l_e = gain.external_supervision_loss(maps, masks, present)
    return gain.self_guided_loss(l_cl, l_am), gain.gain_ext_loss(l_cl, l_am, l_e)


def _torch_losses(weights, data, mode):
    x, masks, present, _ = data
    features, head = twins.torch_twin(NET, weights, torch.float64)
    named = twins.torch_named_parameters(NET, features, head)
    xt = torch.as_tensor(x)
    e = gradcam_ref.explain((features, head), xt, LABELS, differentiable=mode)
    l_self, l_ext = gain_losses(e, lambda v: head(features(v)), xt, torch.as_tensor(LABELS),
                                torch.as_tensor(masks), torch.as_tensor(present))
    return l_self, l_ext, named


def _jax_losses(params, data, mode):
    x, masks, present, _ = data
    features, head = _JAX_FUNCTIONS
    xj = jnp.asarray(x)
    e = gradcam_ref.explain((features, head), xj, jnp.asarray(LABELS), params=params, differentiable=mode)
    return gain_losses(e, lambda v: head(params, features(params, v)), xj, jnp.asarray(LABELS),
                       jnp.asarray(masks), jnp.asarray(present))


@pytest.mark.parametrize("mode", ["stop", "full"])
def test_torch_and_jax_twins_give_the_same_losses_and_parameter_gradients(weights, data, mode):
    l_self, l_ext, named = _torch_losses(weights, data, mode)
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v) for k, v in weights.items()}
        def both(p):
            return jnp.stack(_jax_losses(p, data, mode))

        j_losses, j_jacobian = jax.jit(lambda p: (both(p), jax.jacrev(both)(p)))(params)  # one compile
        for index, t_loss in enumerate((l_self, l_ext)):
            j_loss = j_losses[index]
            assert abs(float(t_loss) - float(j_loss)) <= 1e-10 * abs(float(j_loss))
            t_grads = torch.autograd.grad(t_loss, list(named.values()), retain_graph=True)
            j_grads = {k: v[index] for k, v in j_jacobian.items()}
            for name, t_grad in zip(named, t_grads, strict=True):
                assert rel_err(t_grad.numpy(), j_grads[name]) <= 1e-10, name
    assert float(l_ext) > float(l_self) > 0  # L_e > 0 here: the two losses are different numbers


def _jax_train(weights, data, mode, tx, steps):
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v) for k, v in weights.items()}
        state = tx.init(params)

        @jax.jit
        def step(params, state):
            loss, grads = jax.value_and_grad(lambda p: _jax_losses(p, data, mode)[1])(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        losses = []
        for _ in range(steps):
            params, state, loss = step(params, state)
            losses.append(float(loss))
        return {k: np.asarray(v) for k, v in params.items()}, losses


@pytest.mark.slow
@pytest.mark.parametrize(("optimiser", "mode"), [("sgd", "stop"), ("adam", "full")])
def test_five_optimiser_steps_agree_between_torch_and_optax(weights, data, optimiser, mode):
    """torch.optim.SGD(momentum=0.9) / Adam against optax.sgd(momentum=0.9) / adam, L_ext, a jitted JAX step."""
    features, head = twins.torch_twin(NET, weights, torch.float64)
    named = twins.torch_named_parameters(NET, features, head)
    if optimiser == "sgd":
        opt = torch.optim.SGD(list(named.values()), lr=0.05, momentum=0.9)
        tx = optax.sgd(0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(list(named.values()), lr=0.01)
        tx = optax.adam(0.01)
    x, masks, present, _ = data
    xt = torch.as_tensor(x)
    torch_losses = []
    for _ in range(5):
        e = gradcam_ref.explain((features, head), xt, LABELS, differentiable=mode)
        _, l_ext = gain_losses(e, lambda v: head(features(v)), xt, torch.as_tensor(LABELS),
                               torch.as_tensor(masks), torch.as_tensor(present))
        opt.zero_grad()
        l_ext.backward()
        opt.step()
        torch_losses.append(float(l_ext))
    jax_params, jax_losses = _jax_train(weights, data, mode, tx, 5)
    np.testing.assert_allclose(torch_losses, jax_losses, rtol=1e-10)
    assert torch_losses[-1] < torch_losses[0]  # the steps did train
    for name, value in named.items():
        assert np.abs(value.detach().numpy() - jax_params[name]).max() <= 1e-8, name
        assert np.abs(value.detach().numpy() - weights[name]).max() > 1e-4  # and moved the weights


def test_differentiable_bad_targets_and_layers(weights, data):
    """A target that does not depend on the layer, and a layer that never runs: errors naming them."""
    x, *_ = data
    features, head = twins.torch_twin(NET, weights, torch.float64)
    with pytest.raises(ValueError, match="the score does not depend on the output of features"):
        gradcam_ref.explain((features, head), torch.as_tensor(x), lambda s: torch.zeros(s.shape[0], dtype=s.dtype),
                            differentiable="stop")
    class WithUnused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features, self.head, self.extra = features, head, torch.nn.Linear(2, 2)

        def forward(self, v):
            return self.head(self.features(v))  # self.extra never runs

    unused = WithUnused()
    with pytest.raises(ValueError, match="layer 'extra' never ran in the forward pass"):
        gradcam_ref.explain(unused, torch.as_tensor(x), layer="extra", differentiable="full")


def test_torch_full_mode_with_several_targets_per_example(weights, data):
    """(N, T) targets (one batched second-order backward): maps and their parameter gradients equal
    those of T single-target calls."""
    x, *_ = data
    features, head = twins.torch_twin(NET, weights, torch.float64)
    named = twins.torch_named_parameters(NET, features, head)
    targets = np.stack([LABELS, (LABELS + 2) % 5], axis=1)
    e = gradcam_ref.explain((features, head), torch.as_tensor(x), targets, differentiable="full")
    rng = np.random.default_rng(2)
    probe = torch.as_tensor(rng.standard_normal(tuple(e.maps.shape)))
    params = list(named.values())

    def grad(loss):  # fc.bias does not reach any map (dy/dA does not depend on it): a zero gradient
        return [torch.zeros_like(p) if g is None else g
                for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True), strict=True)]

    together = grad((probe * e.maps).sum())
    apart = [torch.zeros_like(p) for p in named.values()]
    for t in range(2):
        single = gradcam_ref.explain((features, head), torch.as_tensor(x), targets[:, t], differentiable="full")
        torch.testing.assert_close(single.maps, e.maps[:, t], rtol=1e-12, atol=1e-14)
        grads = grad((probe[:, t] * single.maps).sum())
        apart = [a + g for a, g in zip(apart, grads, strict=True)]
    for a, b in zip(together, apart, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert sum(float(a.abs().sum()) for a in together[2:4]) > 0  # the head's conv is trained through alpha
