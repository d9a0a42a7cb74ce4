"""The NumPy oracle's networks rebuilt in torch, in ``jax.lax`` and in Keras 3, with the same weights.

One copy, used by ``gradcam-ref verify``, the goldens and the tests: a layer name (``conv{i}``,
``relu{i}``) means the same tensor in the oracle and in every twin (Keras: channels-last).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def jax_oracle(oracle: Any, *, layer: str) -> tuple[Any, Any]:
    """An oracle network in ``jax.lax`` as ``(features, head)``, split after ``layer``.

    ``layer`` is an oracle layer name: ``conv{i}`` (before its ReLU) or ``relu{i}`` (after it).
    Call under ``jax.enable_x64(True)`` for float64.
    """
    import jax
    import jax.numpy as jnp

    convs, head, head_params = oracle.convs, oracle.head, oracle.head_params
    steps: list[tuple[str, Callable[[Any], Any]]] = []
    for i, (weight, bias) in enumerate(convs):
        w, b = jnp.asarray(weight), jnp.asarray(bias)
        rank = weight.ndim - 2

        def conv(x: Any, w: Any = w, b: Any = b, rank: int = rank) -> Any:
            y = jax.lax.conv_general_dilated(x, w, (1,) * rank, "VALID", precision=jax.lax.Precision.HIGHEST)
            return y + b.reshape((-1,) + (1,) * rank)

        steps += [(f"conv{i}", conv), (f"relu{i}", jax.nn.relu)]
    names = [name for name, _ in steps]
    if layer not in names:
        raise ValueError(f"layer must be one of {names}, got {layer!r}")
    cut = names.index(layer) + 1
    dense = [(jnp.asarray(w), jnp.asarray(b)) for w, b in head_params]

    def classify(a: Any) -> Any:
        if head == "flatten":
            (w, b), = dense
            return a.reshape(a.shape[0], -1) @ w.T + b
        pooled = a.reshape(a.shape[0], a.shape[1], -1).mean(axis=-1)
        if head == "gap":
            (w, b), = dense
            return pooled @ w.T + b
        (w1, b1), (w2, b2) = dense
        return jax.nn.relu(pooled @ w1.T + b1) @ w2.T + b2

    def features(x: Any) -> Any:
        for _, step in steps[:cut]:
            x = step(x)
        return x

    def rest(a: Any) -> Any:
        for _, step in steps[cut:]:
            a = step(a)
        return classify(a)

    return features, rest


def torch_oracle(oracle: Any, dtype: Any = None, inplace: bool = True) -> Any:
    """The oracle as an eval-mode ``nn.Sequential`` (valid, stride-1 convs), same weights.

    Submodules carry the oracle's layer names (``conv0``, ``relu0``, ...) and end in ``head``,
    so ``model[:-1]`` and ``model.head`` are the split form; ``model.head[1]`` is the (first)
    linear layer. ``dtype`` defaults to float64; ``inplace`` uses ``ReLU(inplace=True)``, the
    case that breaks naive gradient hooks.
    """
    from collections import OrderedDict

    import torch
    from torch import nn

    dtype = torch.float64 if dtype is None else dtype

    def load(layer: Any, weight: np.ndarray, bias: np.ndarray) -> Any:
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(weight))
            layer.bias.copy_(torch.as_tensor(bias))
        return layer

    class GlobalAvgPool(nn.Module):
        """Mean over every spatial axis: ``(N, K, *spatial) -> (N, K)``, for any spatial rank."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(2).mean(dim=2)

    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    parts: list[tuple[str, nn.Module]] = []
    for i, (weight, bias) in enumerate(oracle.convs):
        conv = convs[weight.ndim - 2](weight.shape[1], weight.shape[0], weight.shape[2:], dtype=dtype)
        parts += [(f"conv{i}", load(conv, weight, bias)), (f"relu{i}", nn.ReLU(inplace=inplace))]
    linears = [load(nn.Linear(w.shape[1], w.shape[0], dtype=dtype), w, b) for w, b in oracle.head_params]
    if oracle.head == "flatten":
        head = nn.Sequential(nn.Flatten(), *linears)
    elif oracle.head == "gap":
        head = nn.Sequential(GlobalAvgPool(), *linears)
    else:  # "gap-mlp"
        head = nn.Sequential(GlobalAvgPool(), linears[0], nn.ReLU(), linears[1])
    parts.append(("head", head))
    return nn.Sequential(OrderedDict(parts)).eval()


def keras_oracle(oracle: Any, dtype: str = "float64", *, channels_last_input: bool = True) -> Any:
    """The oracle as a channels-last Keras 3 functional model (TensorFlow backend), same weights.

    Layers carry the oracle's names (``conv0``, ``relu0``, ...), then ``head`` layers; inputs are
    ``(N, *spatial, C)`` (the oracle's ``(N, C, *spatial)`` with the channels moved last), so
    ``explain(model, np.moveaxis(x, 1, -1), layer="relu1")`` is the oracle's Grad-CAM with A moved
    channels-first by the TensorFlow backend. The ``flatten`` head flattens channels-first, as the
    oracle does (a ``Permute`` before ``Flatten``). ``dtype`` is every layer's dtype.
    """
    import keras

    convs, head, head_params = oracle.convs, oracle.head, oracle.head_params
    rank = convs[0][0].ndim - 2
    conv_class = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[rank]
    pool_class = {1: keras.layers.GlobalAveragePooling1D, 2: keras.layers.GlobalAveragePooling2D,
                  3: keras.layers.GlobalAveragePooling3D}[rank]
    spatial: tuple[int | None, ...] = (None,) * rank
    if head == "flatten":  # the flatten head's width fixes the input's size: K * side**rank
        side = round((head_params[0][0].shape[1] / convs[-1][0].shape[0]) ** (1 / rank))
        spatial = (side + sum(w.shape[2] - 1 for w, _ in convs),) * rank
    inputs = keras.Input(spatial + (convs[0][0].shape[1],), dtype=dtype)
    x, loads = inputs, []
    for i, (weight, bias) in enumerate(convs):
        conv = conv_class(weight.shape[0], weight.shape[2:], padding="valid", dtype=dtype, name=f"conv{i}")
        x = conv(x)
        # (K_out, K_in, *kernel) -> (*kernel, K_in, K_out)
        loads.append((conv, [np.moveaxis(weight, (0, 1), (-1, -2)), bias]))
        x = keras.layers.ReLU(dtype=dtype, name=f"relu{i}")(x)
    if head == "flatten":
        x = keras.layers.Permute((rank + 1, *range(1, rank + 1)), dtype=dtype, name="head_channels_first")(x)
        x = keras.layers.Flatten(dtype=dtype, name="head_flatten")(x)
    else:
        x = pool_class(dtype=dtype, name="head_pool")(x)
    for j, (weight, bias) in enumerate(head_params):
        last = j == len(head_params) - 1
        dense = keras.layers.Dense(weight.shape[0], activation=None if last else "relu", dtype=dtype,
                                   name=f"head_dense{j}")
        x = dense(x)
        loads.append((dense, [weight.T, bias]))
    model = keras.Model(inputs, x, name="oracle")
    for layer, values in loads:
        layer.set_weights([np.asarray(v, dtype=dtype) for v in values])
    return model
