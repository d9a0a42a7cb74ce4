"""The torch backend's promises under bad or unusual use: the model in training mode is left as it
was (buffers, random state), maps are reproducible, meta tensors and bad options get clear errors."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import gradcam_ref
from gradcam_ref.backends import torch as torch_backend
from gradcam_ref.backends.torch import _state
from tests.backends.torch_nets import assert_same_state, model_state


def stochastic_net(seed: int = 0) -> nn.Sequential:
    """conv -> batch norm -> ReLU -> dropout -> GAP -> linear: every kind of training-mode state."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 6, 3), bn=nn.BatchNorm2d(6), relu=nn.ReLU(), drop=nn.Dropout(0.5),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 4),
    )).double()


def inputs(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).standard_normal((n, 3, 8, 8)))


@pytest.mark.parametrize(("guided", "method"), [(False, "grad-cam"), (True, "grad-cam"), (False, "score-cam"),
                                               (False, "ablation-cam")])
@pytest.mark.parametrize("call", [None, -1])
def test_training_mode_leaves_buffers_and_random_state_as_they_were(guided, method, call):
    """Gradient and perturbation methods alike (Score-CAM and Ablation-CAM updated the batch norm's
    statistics and drew from the caller's generator before they ran inside the same guard)."""
    model = stochastic_net().train()
    x = inputs()
    before = model_state(model)
    rng = torch.get_rng_state()
    options = {} if method == "grad-cam" else {"denominator": "abs"} if method == "ablation-cam" else {}
    with pytest.warns(gradcam_ref.TrainingModeWarning, match="training mode"), warnings.catch_warnings():
        warnings.simplefilter("ignore", gradcam_ref.ZeroGradientWarning)
        first = gradcam_ref.explain(model, x, layer="relu", guided=guided, call=call, method=method, **options)
    assert_same_state(before, model_state(model))  # num_batches_tracked and running statistics included
    assert int(model.bn.num_batches_tracked) == 0
    assert torch.equal(rng, torch.get_rng_state())  # the caller's random stream is untouched
    with pytest.warns(gradcam_ref.TrainingModeWarning), warnings.catch_warnings():
        warnings.simplefilter("ignore", gradcam_ref.ZeroGradientWarning)
        second = gradcam_ref.explain(model, x, layer="relu", guided=guided, call=call, method=method, **options)
    torch.testing.assert_close(second.maps, first.maps, rtol=0, atol=0)  # same dropout masks each call
    assert all(m.training for m in model.modules())


def test_training_mode_batch_norm_uses_the_batch_statistics_as_the_model_would():
    """The maps are those of the model in the mode it is in: batch statistics, one dropout mask."""
    model = stochastic_net()
    model.drop.p = 0.0  # no randomness: the reference below can be computed by plain autograd
    model.train()
    x = inputs()
    with pytest.warns(gradcam_ref.TrainingModeWarning):
        got = gradcam_ref.explain(model, x, 2, layer="relu")
    reference = stochastic_net()
    reference.drop.p = 0.0
    reference.train()
    a = reference.relu(reference.bn(reference.conv(x)))  # batch statistics (training mode)
    a_leaf = a.detach().requires_grad_(True)
    scores = reference.fc(reference.flat(reference.pool(reference.drop(a_leaf))))
    (g,) = torch.autograd.grad(scores[:, 2].sum(), a_leaf)
    torch.testing.assert_close(got.gradients, g, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.maps, gradcam_ref.grad_cam(a_leaf.detach(), g), rtol=1e-12, atol=1e-14)


def test_the_guided_pass_draws_the_dropout_masks_of_the_grad_cam_pass():
    """With A = the input and no ReLU, guided backpropagation is the plain input gradient, which is
    the Grad-CAM gradient: equal exactly when both passes use the same dropout mask."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).double().train()
    x = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # training mode, no guided ReLU: both warned about
        e = gradcam_ref.explain(model, x, 1, layer="0", at="input", guided=True)
    torch.testing.assert_close(e.guided_backprop, e.gradients, rtol=0, atol=0)
    assert float(e.gradients.abs().max()) > 0


class ReadsTraining(nn.Module):
    """A user's module whose forward depends on self.training (like a hand-written dropout)."""

    def forward(self, x):
        return x * 0.5 if self.training else x


@pytest.mark.parametrize(("module", "warns"), [
    (nn.Flatten(), False), (nn.ReLU(), False), (nn.Identity(), False), (nn.AdaptiveAvgPool2d(1), False),
    (nn.Linear(2, 2), False), (nn.Dropout(0.1), True), (nn.BatchNorm1d(2), True), (nn.RReLU(), True),
    (nn.InstanceNorm1d(2), False), (nn.InstanceNorm1d(2, track_running_stats=True), True),
    (nn.AlphaDropout(0.1), True), (ReadsTraining(), True), (nn.MultiheadAttention(4, 2, dropout=0.1), True),
])
def test_training_mode_warning_only_where_the_flag_changes_the_result(module, warns):
    assert _state._depends_on_mode(module) is warns


def test_a_fresh_stateless_head_on_an_eval_network_does_not_warn():
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).double().eval()
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()  # training mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradcam_ref.explain((features, head), inputs())
    features.train()
    with pytest.warns(gradcam_ref.TrainingModeWarning):
        gradcam_ref.explain((features, head), inputs())


def test_meta_tensors_get_a_clear_error():
    with torch.device("meta"):
        meta_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(4, 3)).eval()
    with pytest.raises(ValueError, match=r"the model's '0.weight' is on the meta device \(shapes, no values\)"):
        gradcam_ref.explain(meta_model, torch.randn(1, 3, 8, 8), layer="1")
    real = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with pytest.raises(ValueError, match=r"inputs are on the meta device"):
        gradcam_ref.explain(real, torch.randn(1, 3, 8, 8, device="meta"), layer="1")


def test_the_core_passes_meta_tensors_through_as_shapes():
    a = torch.empty(2, 3, 4, 5, device="meta")
    g = torch.empty(2, 2, 3, 4, 5, device="meta")
    for out, shape in [(gradcam_ref.grad_cam(a, g), (2, 2, 4, 5)), (gradcam_ref.grad_cam_plus_plus(a, g), (2, 2, 4, 5)),
                       (gradcam_ref.neuron_importance(a), (2, 3)),
                       (gradcam_ref.normalize(gradcam_ref.upsample(gradcam_ref.grad_cam(a, a), (8, 8))), (2, 8, 8))]:
        assert out.is_meta and tuple(out.shape) == shape


@pytest.mark.parametrize(("reshape", "shown"), [("ab", "'ab'"), ((2.5, 2), r"\(2.5, 2\)"), ((True, 2), r"\(True, 2\)"),
                                                (3, "3"), ((), r"\(\)"), ((0, 2), r"\(0, 2\)")])
def test_bad_reshape_is_named(reshape, shown):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with pytest.raises(TypeError, match=rf"reshape must be a callable .* positive ints, e.g. \(14, 14\), got {shown}$"):
        gradcam_ref.explain(model, torch.randn(1, 3, 8, 8), lambda s: s.sum((1, 2, 3)), layer="0", reshape=reshape)


def test_backend_numpy_on_a_torch_model_is_a_type_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with pytest.raises(TypeError, match=r"the numpy backend runs an Oracle network, got model of type Sequential"):
        gradcam_ref.explain(model, torch.randn(1, 3, 8, 8), layer="0", backend="numpy")


class Checkpointed(nn.Module):
    """stem -> block under torch.utils.checkpoint -> head."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return self.head(checkpoint(self.block, self.stem(x), use_reentrant=self.reentrant))


def test_reentrant_checkpointing_is_named_and_the_other_kind_works():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    net = Checkpointed(reentrant=True).double().eval()
    with pytest.raises(ValueError, match=r"no autograd path from it to the score \(a layer run inside "
                                         r"torch.utils.checkpoint\(use_reentrant=True\)"):
        gradcam_ref.explain(net, x, [0, 1], layer="block.1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "None of the inputs have requires_grad=True"
        with pytest.raises(ValueError, match=r"^the model runs torch.utils.checkpoint\(use_reentrant=True\) between "
                                             r"the output of layer 'stem' and the score"):
            gradcam_ref.explain(net, x, [0, 1], layer="stem")
    plain = Checkpointed(reentrant=False).double().eval()
    plain.load_state_dict(net.state_dict())
    for layer in ("block.1", "stem"):
        got = gradcam_ref.explain(plain, x, [0, 1], layer=layer)
        a = got.activations.clone().requires_grad_(True)
        rest = (lambda v: plain.head(plain.block(v))) if layer == "stem" else plain.head
        (g,) = torch.autograd.grad(rest(a)[[0, 1], [0, 1]].sum(), a)
        torch.testing.assert_close(got.gradients, g, rtol=1e-12, atol=1e-15)


# --- state that explain, perturb and score leave as it was (fifth sweep) --------------------------


def test_score_in_training_mode_leaves_buffers_and_random_state_as_they_were():
    """score (metrics.scorer, evaluate) ran the model bare: batch norm's statistics moved and the
    caller's generator advanced, although its TrainingModeWarning says both are restored."""
    model = stochastic_net().train()
    x = inputs()
    before = model_state(model)
    rng = torch.get_rng_state()
    with pytest.warns(gradcam_ref.TrainingModeWarning):
        first = torch_backend.score(model, x)
    assert_same_state(before, model_state(model))
    assert int(model.bn.num_batches_tracked) == 0
    assert torch.equal(rng, torch.get_rng_state())
    with pytest.warns(gradcam_ref.TrainingModeWarning):
        second = torch_backend.score(model, x.numpy())
    torch.testing.assert_close(second, first, rtol=0, atol=0)  # the same dropout mask each call


class Temperature(nn.Module):
    """A head whose forward reads a plain attribute and a buffer: a torch.fx trace bakes both in."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3).double()
        self.temperature = 1.0
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.fc(a.mean(dim=(2, 3))) * self.scale / self.temperature


def test_ablation_cam_sees_attributes_and_buffers_changed_between_calls():
    """Ablation-CAM's traced tail was cached per model and layer: a changed attribute or a
    reassigned buffer was ignored (weights of the old model, no error)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Temperature()).double().eval()
    x = inputs(2)

    def weights() -> torch.Tensor:
        return gradcam_ref.explain(model, x, target=0, layer="1", method="ablation-cam").weights

    def expected() -> torch.Tensor:  # the same model, written without the traced tail
        fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Temperature()).double().eval()
        fresh.load_state_dict(model.state_dict())
        fresh[2].temperature = model[2].temperature
        return gradcam_ref.explain(fresh, x, target=0, layer="1", method="ablation-cam").weights

    weights()
    model[2].temperature = 4.0
    torch.testing.assert_close(weights(), expected(), rtol=0, atol=0)
    model[2].scale = torch.tensor([5.0, -2.0, 3.0], dtype=torch.float64)  # a new buffer object
    torch.testing.assert_close(weights(), expected(), rtol=0, atol=0)
    assert not torch.equal(weights()[0], torch.zeros(4, dtype=torch.float64))


class Keeps(nn.Module):
    """Keeps its last input and counts its calls (a common way to read features)."""

    def __init__(self) -> None:
        super().__init__()
        self.last: torch.Tensor | None = None
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.last = x
        return x


@pytest.mark.parametrize("method", ["ablation-cam", "score-cam"])
def test_tracing_leaves_the_model_as_it_was(method):
    """torch.fx ran the model's forward on Proxies and left them in it: an attribute holding an
    fx Proxy (torch.save(model) then failed) and a call counter bumped by the trace."""
    import io

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), Keeps(), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    x = inputs(1)
    gradcam_ref.explain(model, x, target=0, layer="2", method=method)
    assert type(model[4].last) is torch.Tensor  # the input of the one real forward pass
    assert model[4].calls == 1
    torch.save(model, io.BytesIO())


class SubtractsInPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub_(0.5)


class Subtracts(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub(0.5)


@pytest.mark.parametrize("options", [
    {}, {"guided": True}, {"call": -1}, {"at": "input", "layer": "3"}, {"method": "grad-cam++"},
    {"method": "smooth-grad-cam++", "n_samples": 3, "std": 0.1}, {"method": "score-cam"},
    {"method": "score-cam", "memory_format": "preserve", "fold_batch_norms": False},
    {"method": "ablation-cam", "denominator": "abs"},
    {"split": True}, {"split": True, "method": "score-cam"},
    {"split": True, "method": "ablation-cam", "denominator": "abs"},
])
def test_a_model_that_writes_into_its_input_sees_the_callers_inputs_and_leaves_them(options):
    """The first pass ran on the caller's tensor: ``x.sub_`` changed it, and the guided pass, the
    noisy copies of Smooth Grad-CAM++ and Score-CAM's masks were made from the changed inputs."""
    options = dict(options)
    torch.manual_seed(0)
    body = [nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4, 3)]
    in_place = nn.Sequential(SubtractsInPlace(), *body).double().eval()
    out_of_place = nn.Sequential(Subtracts(), *body).double().eval()
    if options.pop("split", False):
        in_place = (in_place[:4], in_place[4:])  # type: ignore[assignment]
        out_of_place = (out_of_place[:4], out_of_place[4:])  # type: ignore[assignment]
    else:
        options.setdefault("layer", "2")
    x = inputs(2)
    given = x.clone()
    torch.manual_seed(1)
    got = gradcam_ref.explain(in_place, given, target=0, **options)
    torch.manual_seed(1)
    want = gradcam_ref.explain(out_of_place, x.clone(), target=0, **options)
    assert torch.equal(given, x)  # the caller's tensor as it was
    torch.testing.assert_close(got.maps, want.maps, rtol=0, atol=0)
    if options.get("guided"):
        torch.testing.assert_close(got.guided_backprop, want.guided_backprop, rtol=0, atol=0)


def test_score_leaves_the_callers_inputs_as_they_were():
    """score ran the model on the caller's tensor (and on the memory of a NumPy array)."""
    torch.manual_seed(0)
    model = nn.Sequential(SubtractsInPlace(), nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).double().eval()
    x = inputs(2)
    given, array = x.clone(), x.numpy().copy()
    got = torch_backend.score(model, given)
    torch_backend.score(model, array)
    assert torch.equal(given, x) and np.array_equal(array, x.numpy())
    torch.testing.assert_close(got, model[1:](x - 0.5), rtol=0, atol=0)


def observed_net(observer: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 4, 3), relu=nn.ReLU(), observer=observer, pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(), fc=nn.Linear(4, 3),
    )).eval()


@pytest.mark.parametrize("make", [
    lambda: torch.ao.quantization.MinMaxObserver(),
    lambda: torch.ao.quantization.PerChannelMinMaxObserver(ch_axis=1),  # empty buffers until it sees data
    lambda: torch.ao.quantization.HistogramObserver(),
    lambda: torch.ao.quantization.FakeQuantize(),
])
@pytest.mark.parametrize("calibrated", [True, False])
@pytest.mark.parametrize("options", [{"guided": True}, {"call": -1}, {"method": "score-cam"},
                                     {"method": "ablation-cam", "denominator": "abs"}])
def test_modules_that_write_buffers_in_eval_mode_are_left_as_they_were(make, calibrated, options):
    """torch.ao observers and fake quantizers update their statistics in eval mode too: the state
    was kept only for a model in training mode, so explain moved a calibrated range (no warning)."""
    model = observed_net(make())
    if calibrated:
        model(torch.rand(4, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8) * 10  # outside the calibrated range
    before = model_state(model)
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an eval-mode model: no TrainingModeWarning
        warnings.simplefilter("ignore", gradcam_ref.ZeroGradientWarning)
        gradcam_ref.explain(model, x, target=0, layer="relu", **options)
        torch_backend.score(model, x)
    assert_same_state(before, model_state(model))
    assert torch.equal(rng, torch.get_rng_state())


def test_old_style_spectral_norm_in_training_mode_is_kept_and_warned():
    """torch.nn.utils.spectral_norm updates its power-iteration vectors (buffers) from a forward
    pre-hook in training mode; the layer's own forward does not read the flag."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.utils.spectral_norm(nn.Linear(4, 3))).train()
    before = model_state(model)
    with pytest.warns(gradcam_ref.TrainingModeWarning):
        gradcam_ref.explain(model, torch.randn(2, 3, 8, 8), target=0, layer="1")
    assert_same_state(before, model_state(model))


def compiled_parts(backend: str) -> tuple[nn.Sequential, nn.Module]:
    """A plain conv net and a model whose first five modules are that net's, torch.compile'd."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 6)).eval()

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.compile(net[:5], backend=backend)
            self.head = net[5:]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    return net, Wrap()


def test_compiled_model_first_run_under_no_grad_is_explained_as_uncompiled() -> None:
    # Dynamo reused the graph compiled under no_grad without hooks: "layer never ran". Rerun eagerly.
    torch._dynamo.reset()
    net, model = compiled_parts("eager")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        model(x)
    targets = [1, 4, 2]
    for layer, plain in [("features._orig_mod.3", "3"), ("features._orig_mod.1", "1")]:
        got = gradcam_ref.explain(model, x, targets, layer=layer)
        want = gradcam_ref.explain(net, x, targets, layer=plain)
        np.testing.assert_array_equal(got.maps.numpy(), want.maps.numpy())
        last = gradcam_ref.explain(model, x, targets, layer=layer, call=-1)  # the counting pass too
        np.testing.assert_array_equal(last.maps.numpy(), want.maps.numpy())
    got = gradcam_ref.explain(model, x, targets, layer="features._orig_mod.3", method="score-cam")
    want = gradcam_ref.explain(net, x, targets, layer="3", method="score-cam")
    np.testing.assert_array_equal(got.maps.numpy(), want.maps.numpy())
    with torch.no_grad():  # the user's compiled inference is as it was
        assert not model(x).requires_grad and not torch.is_grad_enabled()
    model.spare = nn.ReLU()  # a module that the forward pass does not call
    with pytest.raises(ValueError, match=r"^layer 'spare' never ran .*torch.compile'd modules run eagerly"):
        gradcam_ref.explain(model, x, targets, layer="spare")


def test_guided_through_aot_compiled_module_with_donated_buffers() -> None:
    # AOTAutograd's backward donates its saved buffers and refuses retain_graph=True; the pooled
    # head's last (here only) backward pass retained it: a raw RuntimeError. (N, T) targets: the same.
    torch._dynamo.reset()
    net, model = compiled_parts("aot_eager")
    x = torch.randn(3, 3, 16, 16)
    model(x)
    for targets in ([1, 4, 2], np.array([[1, 0], [4, 5], [2, 2]])):
        gradcam_ref.explain(model, x, targets, layer="features._orig_mod.4", method="score-cam")
        got = gradcam_ref.explain(model, x, targets, layer="features", guided=True)
        want = gradcam_ref.explain(net, x, targets, layer="4", guided=True)
        np.testing.assert_array_equal(got.maps.numpy(), want.maps.numpy())
        np.testing.assert_array_equal(got.guided_backprop.numpy(), want.guided_backprop.numpy())
