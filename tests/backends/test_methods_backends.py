"""The CAM family on every backend: NumPy oracle vs torch vs JAX in float64, the ``perturb`` ability,
and each method against pytorch-grad-cam and torchcam (run as libraries)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import gradcam_ref
from gradcam_ref.backends import jax as jax_backend
from gradcam_ref.backends import torch as torch_backend
from gradcam_ref.backends.numpy_backend import Oracle
from gradcam_ref.backends.numpy_backend import perturb as numpy_perturb
from gradcam_ref.backends.torch import _perturb
from gradcam_ref.verify import peers
from gradcam_ref.verify.twins import jax_oracle, torch_oracle
from tests.test_methods import assert_the_float32_map_cast, spy_on_score_weights

TOL = 1e-10


@pytest.fixture(scope="module")
def jax_twins(oracle):
    """One JAX twin per layer for the whole module: jax.jit compiles each program once."""
    with jax.enable_x64(True):
        return {layer: jax_oracle(oracle[0], layer=layer) for layer, _ in JAX_CASES}


@pytest.fixture(scope="module")
def oracle():
    rng = np.random.default_rng(11)
    net = Oracle.random(rng, in_channels=2, widths=[4, 5], kernel_sizes=[3, 3], num_classes=3, head="gap-mlp")
    return net, rng.standard_normal((2, 2, 8, 7))


JAX_CASES = {("conv1", 2), ("relu1", 1)}
"""(layer, target rank) pairs also run on JAX (its eager core ops compile once per shape: ~40 s each)."""


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["relu0", "conv1", "relu1"])
@pytest.mark.parametrize("targets", [[0, 2], np.array([[0, 1], [2, 1]])], ids=["N", "NxT"])
def test_numpy_torch_and_jax_agree_in_float64_for_every_method(oracle, jax_twins, layer, targets):
    net, x = oracle
    for method in gradcam_ref.METHODS:
        options = {"batch_size": 3} if method in ("score-cam", "ablation-cam") else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
            ours = gradcam_ref.explain(net, x, targets, layer=layer, method=method, **options)
            # inplace ReLUs (the default twin): A must be taken before the next op changes it
            on_torch = gradcam_ref.explain(torch_oracle(net), torch.from_numpy(x), targets, layer=layer,
                                           method=method, **options).numpy()
            others = [on_torch]
            if (layer, np.ndim(targets)) in JAX_CASES:  # JAX's eager ops compile per shape: two cases
                with jax.enable_x64(True):
                    others.append(gradcam_ref.explain(jax_twins[layer], jnp.asarray(x), targets, method=method,
                                                      **options).numpy())
        scale = np.abs(ours.maps).max()
        assert scale > 0, method
        for other in others:
            assert other.method == method
            np.testing.assert_allclose(other.maps, ours.maps, rtol=0, atol=TOL * scale, err_msg=method)
            if ours.weights is not None:
                np.testing.assert_allclose(other.weights, ours.weights, rtol=0,
                                           atol=TOL * np.abs(ours.weights).max(), err_msg=method)


class Skip(nn.Module):
    """conv -> ReLU -> (layer) -> + the conv's output (a skip around the layer) -> GAP -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, dtype=torch.float64)
        self.layer = nn.Conv2d(4, 4, 1, dtype=torch.float64)
        self.fc = nn.Linear(4, 3, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc((self.layer(h) + h).mean(dim=(2, 3)))


def test_ablation_cam_runs_only_the_part_after_the_layer(oracle):
    net, x = oracle
    model = torch_oracle(net, inplace=False)
    seen = []
    model.conv0.register_forward_hook(lambda m, args, out: seen.append(int(args[0].shape[0])))
    e = gradcam_ref.explain(model, torch.from_numpy(x), [0, 1], layer="relu0", method="ablation-cam",
                            denominator="abs", batch_size=2)
    assert seen == [2]  # one forward pass of the batch; no example ran again for its 4 ablations
    reference = gradcam_ref.explain(net, x, [0, 1], layer="relu0", method="ablation-cam", denominator="abs")
    np.testing.assert_allclose(e.numpy().weights, reference.weights, rtol=0, atol=TOL)


def test_a_skip_around_the_layer_falls_back_to_a_substituting_hook_with_the_same_numbers():
    torch.manual_seed(0)
    model = Skip().eval()
    assert _perturb._tail(model, "layer") is None  # the tail reads h, computed before the layer
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    e = gradcam_ref.explain(model, x, [0, 2], layer="layer", method="ablation-cam", denominator="abs", batch_size=3)
    with torch.no_grad():  # by hand: the layer's output with channel k zeroed, the rest as in forward
        h = torch.relu(model.conv(x))
        a = model.layer(h)
        y = model.fc((a + h).mean(dim=(2, 3)))
        for n, c in enumerate([0, 2]):
            for k in range(4):
                ablated = a[n:n + 1].clone()
                ablated[:, k] = 0
                yk = model.fc((ablated + h[n:n + 1]).mean(dim=(2, 3)))[0, c]
                expected = (y[n, c] - yk) / y[n, c].abs()
                assert abs(float(e.weights[n, k] - expected)) <= TOL * max(1.0, abs(float(expected)))


def test_perturb_leaves_the_model_as_it_was(oracle):
    net, x = oracle
    model = torch_oracle(net)
    model.train()
    model.head[1].weight.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with warnings.catch_warnings():  # training mode changes nothing in conv/ReLU/linear: no warning
        warnings.simplefilter("error", gradcam_ref.TrainingModeWarning)
        for method in ("score-cam", "ablation-cam"):
            gradcam_ref.explain(model, torch.from_numpy(x), [0, 1], layer="relu1", method=method,
                                denominator="abs") if method == "ablation-cam" else \
                gradcam_ref.explain(model, torch.from_numpy(x), [0, 1], layer="relu1", method=method)
    assert all(m.training for m in model.modules())
    assert not model.head[1].weight.requires_grad and model.head[1].bias.requires_grad
    for name, p in model.named_parameters():
        assert p.grad is None and torch.equal(p, before[name])
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def test_split_form_and_jax_channels_last(oracle):
    net, x = oracle
    model = torch_oracle(net, inplace=False)
    split = (model[:4], model[4:])  # up to relu1 | head
    whole = gradcam_ref.explain(model, torch.from_numpy(x), [0, 1], layer="relu1", method="score-cam")
    parts = gradcam_ref.explain(split, torch.from_numpy(x), [0, 1], method="score-cam")
    torch.testing.assert_close(parts.weights, whole.weights, rtol=0, atol=TOL)
    with jax.enable_x64(True):
        features, head = jax_oracle(net, layer="relu1")

        def features_last(v):
            return jnp.moveaxis(features(v), 1, -1)

        def head_last(a):
            return head(jnp.moveaxis(a, -1, 1))

        e = gradcam_ref.explain((features_last, head_last), jnp.asarray(x), [0, 1], method="ablation-cam",
                                channel_axis=-1, denominator="abs")
    ours = gradcam_ref.explain(net, x, [0, 1], method="ablation-cam", denominator="abs")
    np.testing.assert_allclose(np.asarray(e.weights), ours.weights, rtol=0, atol=TOL)


# --- each method against its library ------------------------------------------------------------


def test_every_method_matches_pytorch_grad_cam_and_torchcam_on_the_small_cnns():
    checks, notes = peers.method_peer_checks(peers.peer_cases()[:2], perturbation="all")
    failed = [c for c in checks if not c.passed]
    assert not failed, failed
    assert not notes
    names = {c.check for c in checks}
    for peer in peers.METHOD_PEERS:  # every method of both libraries, on both small CNNs
        assert sum(n.startswith(f"{peer.convention} {peer.method} on ") for n in names) == 2, peer.method


@pytest.mark.slow
def test_every_method_matches_its_library_on_resnet18():
    """resnet18 (random init, layer3 of a 64x64 input): the gradient methods and, one model run per
    channel and image, Score-CAM and Ablation-CAM."""
    checks, _ = peers.method_peer_checks(peers.peer_cases()[2:], perturbation="all")
    assert len(checks) == len(peers.METHOD_PEERS)
    failed = [c for c in checks if not c.passed]
    assert not failed, failed


# --- Score-CAM: one model run per distinct channel ------------------------------------------------


class Duplicated(nn.Module):
    """A conv layer whose channels 1 and 3 are one filter, and whose channels 2 and 4 are zero
    after the ReLU (bias -1e3), then a linear head: 5 channels, 3 distinct masks per image."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(2, 5, 3, padding=1).double()
        with torch.no_grad():
            self.conv.weight[3] = self.conv.weight[1]
            self.conv.bias[3] = self.conv.bias[1]
            self.conv.bias[2] = self.conv.bias[4] = -1e3
        self.relu = nn.ReLU()
        self.fc = nn.Linear(5 * 36, 4).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("variant", ["paper", "pytorch-grad-cam", "torchcam"])
def test_score_cam_runs_each_distinct_mask_once_with_the_same_weights(variant):
    model = Duplicated().eval()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    seen: list[int] = []
    handle = model.conv.register_forward_hook(lambda m, args, out: seen.append(int(args[0].shape[0])))
    try:
        e = gradcam_ref.explain(model, x, [0, 3], layer="relu", method="score-cam", variant=variant, batch_size=2)
    finally:
        handle.remove()
    a = e.activations
    assert torch.equal(a[:, 1], a[:, 3]) and not a[:, 2].any() and not a[:, 4].any()
    assert seen == [2, 2, 1, 2, 1]  # the batch once, then channels (0, 1), (2,) per image: 3 runs of 5
    masks = gradcam_ref.score_cam_masks(a, (6, 6), variant=variant)
    with torch.no_grad():  # by hand: every channel's masked input scored by the model itself
        for n, c in enumerate([0, 3]):
            s = torch.stack([model(x[n:n + 1] * masks[n, k])[0, c] for k in range(5)])
            np.testing.assert_allclose(e.weights[n].numpy(), torch.softmax(s, 0).numpy(), rtol=1e-13, atol=0)


def test_score_cam_in_channels_last_leaves_the_model_as_it_was():
    model = Duplicated().eval().float()
    x = torch.randn(1, 2, 6, 6)
    before = {name: (p.detach().clone(), p.stride()) for name, p in model.named_parameters()}
    fast = gradcam_ref.explain(model, x, [1], layer="relu", method="score-cam")
    plain = gradcam_ref.explain(model, x, [1], layer="relu", method="score-cam", memory_format="preserve")
    for name, p in model.named_parameters():  # same values, same layout (the copy took channels_last)
        assert torch.equal(p, before[name][0]) and p.stride() == before[name][1] and p.grad is None
    np.testing.assert_allclose(fast.weights.numpy(), plain.weights.numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="memory_format must be 'channels_last' or 'preserve', got 'nhwc'"):
        gradcam_ref.explain(model, x, [1], layer="relu", method="score-cam", memory_format="nhwc")


# --- torchcam's SmoothGradCAMpp: its noise, its weights, its last sample ---------------------------


def test_torchcam_smooth_grad_cam_plus_plus_is_reproduced_with_its_own_noise():
    case = peers.peer_cases()[0]  # float64
    expected = peers._torchcam_smooth(case)  # torch seeded with SMOOTH_SEED, its defaults n=4, std=0.3
    assert expected.max() > 0.99 and (expected > 0).mean() > 0.2  # a real map, not a flat one

    def ours(noise, variant="torchcam"):
        e = gradcam_ref.explain(case.model, case.inputs, case.targets, layer=case.layer,
                                method="smooth-grad-cam++", variant=variant, noise=noise)
        return np.asarray(e.heatmap(None, "torchcam" if variant == "torchcam" else "paper")), e

    same, e = ours(peers.torchcam_noise(case))
    np.testing.assert_allclose(same, expected, rtol=0, atol=1e-12)
    assert dict(e.options)["noise"] == "given" and dict(e.options)["n_samples"] == 4
    # each departure matters: the paper's reduction on the same draws, or other draws, miss it
    paper, _ = ours(peers.torchcam_noise(case), variant="paper")
    assert np.abs(paper - expected).max() > 0.05
    torch.manual_seed(peers.SMOOTH_SEED + 1)
    other = [torch.distributions.Normal(0, 0.3).sample(case.inputs.size()) for _ in range(4)]
    assert np.abs(ours(other)[0] - expected).max() > 0.05
    with pytest.raises(ValueError, match="explain\\(..., method='smooth-grad-cam\\+\\+', variant='torchcam'\\)"):
        _.heatmap(None, "torchcam")  # a paper-variant explanation is refused under torchcam's convention
    with pytest.raises(ValueError, match="noise must be n >= 1 draws of the inputs' shape"):
        gradcam_ref.explain(case.model, case.inputs, case.targets, layer=case.layer,
                            method="smooth-grad-cam++", noise=[case.inputs[:1]])
    with pytest.raises(ValueError, match="variant must be 'paper' or 'torchcam', got 'pgc'"):
        gradcam_ref.explain(case.model, case.inputs, case.targets, layer=case.layer,
                            method="smooth-grad-cam++", variant="pgc")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_method_runs_in_half_precision_close_to_float64(dtype):
    """Every method on a float16 / bfloat16 model returns that dtype, near the float64 maps (torch has
    no half-precision SVD, and NumPy no bfloat16: Eigen-CAM and Score-CAM raised their internals)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 10, 10)
    eps = torch.finfo(dtype).eps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
        for method in gradcam_ref.METHODS:
            options = {"seed": 0} if method == "smooth-grad-cam++" else {}
            low = gradcam_ref.explain(net.to(dtype), x.to(dtype), [0, 1], layer="1", method=method, **options)
            wide = gradcam_ref.explain(net.double(), x.double(), [0, 1], layer="1", method=method, **options)
            assert low.maps.dtype == dtype and bool(torch.isfinite(low.maps).all()), method
            if method in ("eigen-cam", "eigen-grad-cam"):  # the sign of v_1 may flip with A's rounding:
                a, g = low.activations.double(), low.gradients.double()  # the same A (and G) in float64
                wide = gradcam_ref.eigen_cam(a) if method == "eigen-cam" else gradcam_ref.eigen_grad_cam(a, g)
            else:
                wide = wide.maps
            scale = float(wide.abs().max())
            torch.testing.assert_close(low.maps.double(), wide, rtol=0, atol=64 * eps * scale, msg=method)


class _Float(nn.Module):
    """``x.float()``: a half-precision model whose scores are float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_method_maps_in_the_activations_dtype_with_float32_scores(dtype, monkeypatch):
    """A half-precision model ending in ``.float()``: A is half, the scores float32. Every method's maps,
    signed maps and weights come back in A's dtype; Score-CAM's and Ablation-CAM's weights (from the float32
    scores) made their maps float32, and are now cast to A's dtype, the maps being the float32 computation
    cast (tests/test_methods.py: assert_the_float32_map_cast states the tolerance and why)."""
    spied = spy_on_score_weights(monkeypatch)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3), _Float()).to(dtype).eval()
    x = torch.randn(2, 3, 10, 10).to(dtype)
    u = torch.finfo(dtype).eps / 2
    for method in gradcam_ref.METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
            e = gradcam_ref.explain(net, x, [0, 1], layer="3", method=method)
        assert e.scores.dtype == torch.float32 and e.activations.dtype == dtype
        for name in ("maps", "signed", "weights"):
            value = getattr(e, name)
            assert value is None or value.dtype == dtype, (method, name, value.dtype)
        if method in ("score-cam", "ablation-cam"):
            got = e.numpy()
            assert np.abs(got.maps).max() > 0, method
            assert_the_float32_map_cast(got.maps, got.weights, got.activations, spied[method].double().numpy(),
                                        lambda v: torch.from_numpy(np.asarray(v)).to(dtype).double().numpy(), u)


class _Scored(Exception):
    """Raised by the test's ``scored``: the backend handed over the scores."""


def _never(*args):
    raise AssertionError("a perturbed copy was made before the scores were handed to scored")


def _scored(scores):
    assert tuple(np.shape(np.asarray(scores))) == (2, 3)
    raise _Scored


def test_the_scores_reach_scored_before_any_perturbed_copy(oracle, jax_twins):
    """The core checks the targets in ``scored``: a bad target fails before K forward passes (it
    failed after them). Every backend but TensorFlow (tests/backends/test_tensorflow_methods.py)."""
    net, x = oracle
    split = jax_twins["relu1"]  # (features, head)
    with jax.enable_x64(True):
        runs = [
            lambda where: numpy_perturb(net, x, _never, layer="relu1", where=where, scored=_scored),
            lambda where: torch_backend.perturb(torch_oracle(net), torch.from_numpy(x), _never, layer="relu1",
                                                where=where, scored=_scored),
            lambda where: jax_backend.perturb(split, jnp.asarray(x), _never, where=where, scored=_scored),
        ]
        for run in runs:
            for where in ("activations", "inputs"):
                with pytest.raises(_Scored):
                    run(where)
    for method in ("score-cam", "ablation-cam"):
        calls = [0]
        model = torch_oracle(net)
        model.register_forward_pre_hook(lambda m, args, calls=calls: calls.__setitem__(0, calls[0] + 1))
        with pytest.raises(ValueError, match=r"target out of range: the scores have C = 3 classes"):
            gradcam_ref.explain(model, torch.from_numpy(x), [0, 7], layer="relu1", method=method)
        assert calls[0] == 1  # the plain forward pass only
