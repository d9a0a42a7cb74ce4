"""Each convention against its library, run on the same model, layer, input and targets.

Within 1e-5 of the peer map's largest magnitude, on small CNNs (float64 and float32, valid and
padded convolutions, batch norm, pooling, odd and non-square sizes) and a random-init resnet18.
The peers are test dependencies (the ``peers`` extra); tf-keras-vis needs TensorFlow and is
checked against scipy in tests/test_conventions.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import LayerAttribution, LayerGradCam
from pytorch_grad_cam import GradCAM as PgcGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torchcam.methods import GradCAM as TorchcamGradCAM

import gradcam_ref
from gradcam_ref.backends.numpy_backend import Oracle
from gradcam_ref.conventions import postprocess
from gradcam_ref.verify.twins import torch_oracle

RTOL = 1e-5


def oracle_cnn():
    """Valid 3x3 and 2x2 convs, float64, 11x13 input -> 8x10 maps; the layer is after the last ReLU."""
    oracle = Oracle.random(np.random.default_rng(21), in_channels=3, widths=[5, 6], kernel_sizes=[3, 2],
                           num_classes=4)
    x = torch.as_tensor(np.random.default_rng(22).standard_normal((3, 3, 11, 13)))
    return torch_oracle(oracle, torch.float64, inplace=False), "relu1", x, [0, 3, 1]


def padded_cnn():
    """Padding, batch norm, max pooling, stride 2; float32; the layer is a conv before its ReLU."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 6),
    ).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 23, 17, generator=torch.Generator().manual_seed(4))
    return model, "4", x, [5, 2]


def resnet18():
    """torchvision's resnet18, seeded random init, float32, non-square input: layer3 is 3x5."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(5))
    return model, "layer3", x, [3, 8]


MODELS = {"oracle_cnn": oracle_cnn, "padded_cnn": padded_cnn, "resnet18": resnet18}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    model, layer, x, targets = MODELS[request.param]()
    e = gradcam_ref.explain(model, x, targets, layer=layer)
    return model, layer, x, targets, e


def assert_matches(ours, reference):
    ours = ours.detach().numpy() if isinstance(ours, torch.Tensor) else ours
    reference = reference.detach().numpy() if isinstance(reference, torch.Tensor) else reference
    reference = np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape
    scale = np.abs(reference).max()
    assert scale > 0 and np.ptp(reference) > 0, "a flat reference map would prove nothing"
    np.testing.assert_allclose(ours, reference, rtol=0, atol=RTOL * scale)
    return np.abs(ours - reference).max() / scale


def test_pytorch_grad_cam(case):
    model, layer, x, targets, e = case
    with PgcGradCAM(model=model, target_layers=[model.get_submodule(layer)]) as method:
        reference = method(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    model.zero_grad(set_to_none=True)
    assert reference.dtype == np.float32 and reference.shape == (x.shape[0], *x.shape[2:])
    assert_matches(e.heatmap(tuple(x.shape[2:]), "pytorch-grad-cam"), reference)


def test_captum_layer_grad_cam_and_interpolate_defaults(case):
    model, layer, x, targets, e = case
    raw = LayerGradCam(model, model.get_submodule(layer)).attribute(x, target=targets)
    reference = LayerAttribution.interpolate(raw, tuple(x.shape[2:]))
    assert reference.shape == (x.shape[0], 1, *x.shape[2:])  # captum keeps a channel axis of 1
    assert (raw < 0).any(), "captum's map keeps negative values: the case must have some"
    assert_matches(e.heatmap(tuple(x.shape[2:]), "captum"), reference[:, 0])
    assert_matches(e.heatmap(None, "captum"), raw[:, 0])


def test_torchcam_normalised_gradcam(case):
    model, layer, x, targets, e = case
    with TorchcamGradCAM(model, target_layer=layer) as extractor:
        (reference,) = extractor(class_idx=list(targets), scores=model(x))
    assert reference.shape == (x.shape[0], *e.maps.shape[1:])  # the layer's resolution
    assert_matches(e.heatmap(None, "torchcam"), reference)


def test_which_conventions_differ_from_the_papers(case):
    """captum's and tf-keras-vis's maps are measurably not the paper's: the matches above mean something.

    pytorch-grad-cam's is the paper's to float32 precision: it normalises, resizes (a linear
    map) and normalises again, and min-max of a linear resize of an affine image of x is min-max
    of the resize of x; only its eps (1e-7) and float32 remain. torchcam's is the paper's at the
    layer's resolution but for its eps, which it adds once: its top value is M / (M + 1e-8) for
    a map of maximum M, far from 1 when the raw map is tiny.
    """
    *_, x, _, e = case
    size = tuple(x.shape[2:])
    paper = e.heatmap(size).numpy()
    for name in ("captum", "tf-keras-vis"):
        assert np.abs(e.heatmap(size, name).numpy() - paper).max() > 1e-3, name
    assert np.abs(e.heatmap(size, "pytorch-grad-cam").numpy() - paper).max() < 1e-6
    eps_effect = (1e-8 / e.maps.flatten(1).amax(dim=1)).max().item()
    assert np.abs(e.heatmap(None, "torchcam").numpy() - e.heatmap(None).numpy()).max() < eps_effect + 1e-6


# --- what the peers do with an in-place operation after the layer ------------------------------


def test_in_place_relu_after_the_layer_changes_pgc_and_torchcam_but_not_captum():
    """conv1 followed by ReLU(inplace=True): the peers' forward hooks keep a view of the output.

    pytorch-grad-cam then uses A after the ReLU with dA from before it (recorded in its
    convention's differences, reason 8); torchcam explains the ReLU's output instead (A and dA
    after it); captum is unaffected. gradcam_ref gives the same map with and without in-place.
    """
    oracle = Oracle.random(np.random.default_rng(5), in_channels=3, widths=[4, 6], kernel_sizes=[3, 2], num_classes=5)
    x = torch.as_tensor(np.random.default_rng(6).standard_normal((2, 3, 9, 9)))
    targets = [1, 2]
    model = torch_oracle(oracle, torch.float64, inplace=True)
    e = gradcam_ref.explain(model, x, targets, layer="conv1")
    e_plain = gradcam_ref.explain(torch_oracle(oracle, torch.float64, inplace=False), x, targets, layer="conv1")
    np.testing.assert_array_equal(e.maps.numpy(), e_plain.maps.numpy())

    with PgcGradCAM(model=model, target_layers=[model.conv1]) as method:
        pgc = method(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    assert np.abs(e.heatmap((9, 9), "pytorch-grad-cam").numpy() - pgc).max() > 0.1  # not the layer's map
    mixed = postprocess(gradcam_ref.cam(torch.relu(e.activations), e.weights), "pytorch-grad-cam", size=(9, 9))
    assert_matches(mixed, pgc)  # ReLU(A) with the layer's own weights

    with TorchcamGradCAM(model, target_layer="conv1") as extractor:
        (tc,) = extractor(class_idx=targets, scores=model(x))
    assert np.abs(e.heatmap(None, "torchcam").numpy() - tc.numpy()).max() > 0.1
    after = gradcam_ref.explain(model, x, targets, layer="relu1")
    assert_matches(after.heatmap(None, "torchcam"), tc)  # the map of the next layer

    raw = LayerGradCam(model, model.conv1).attribute(x, target=targets)
    assert_matches(e.heatmap(None, "captum"), raw[:, 0])


@pytest.mark.parametrize("method, peer", [("grad-cam", "GradCAM"), ("layercam", "LayerCAM")])
def test_pytorch_grad_cam_with_several_layers(method, peer):
    """docs/conventions.md's recipe for several target layers reproduces pytorch-grad-cam itself:
    per layer its first pass (ReLU, min-max, resize), the mean over layers, then ReLU and min-max
    again (the mean of the per-layer heatmaps alone was off by 0.3)."""
    import dataclasses

    import pytorch_grad_cam

    from gradcam_ref.conventions import get_convention, method_signed_map

    model, _, x, targets = resnet18()
    layers, size = ["layer2", "layer3"], tuple(x.shape[2:])
    with getattr(pytorch_grad_cam, peer)(model=model, target_layers=[model.get_submodule(n) for n in layers]) as m:
        reference = m(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    pgc = get_convention("pytorch-grad-cam")
    first_pass = dataclasses.replace(pgc, steps=pgc.steps[:3])
    per_layer = [postprocess(method_signed_map(gradcam_ref.explain(model, x, targets, layer=n, method=method), pgc),
                             first_pass, size=size).numpy() for n in layers]
    assert_matches(postprocess(np.mean(per_layer, axis=0), pgc), reference)
    naive = gradcam_ref.fuse_maps([postprocess(torch.as_tensor(m), pgc).numpy() for m in per_layer], "mean")
    assert np.abs(naive - reference).max() > 1e-3  # what the old recipe gave: not pytorch-grad-cam's map


@pytest.mark.parametrize("scale", [1.0, 1e-8])
def test_torchcam_layercam_fuses_several_layers(scale):
    """fuse_maps(rule="torchcam") is torchcam's LayerCAM.fuse_cams, also on maps so small that its
    min-max epsilon (1e-8) leaves their maximum below 1, where rule "layercam" rescales them."""
    import torchcam.methods

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double().eval()
    with torch.no_grad():
        net[6].weight.mul_(scale)
        net[6].bias.mul_(scale)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    targets, layers = [1, 3], ["1", "3"]
    with torchcam.methods.LayerCAM(net, target_layer=layers, input_shape=(3, 12, 12)) as extractor:
        reference = extractor.fuse_cams(extractor(class_idx=targets, scores=net(x)))
    maps = [gradcam_ref.explain(net, x, targets, layer=n, method="layercam").heatmap(None, "torchcam") for n in layers]
    assert_matches(gradcam_ref.fuse_maps(maps, "torchcam"), reference)
    rescaled = gradcam_ref.fuse_maps(maps, "layercam").numpy()
    assert (np.abs(rescaled - reference.numpy()).max() > 0.5) == (scale < 1e-6)
