"""Torch and JAX twins of small CNNs, built from one weight file, and a torch Grad-CAM reference.

A twin is a list of layers (a plain spec) and one ``.npz`` of weights; :func:`torch_twin` and
:func:`jax_twin` build the same ``(features, head)`` from both, each with its own framework's
operations (``torch.nn`` modules, ``jax.lax``). :func:`torch_grad_cam` is Grad-CAM written out
in torch (autograd for dy/dA, Eq. 1 and Eq. 2 by hand): a reference that uses none of gradcam_ref.
:func:`torch_sequential` joins a torch twin into one ``nn.Sequential``, for the torch backend's
``layer=`` route.

Layers: ``("conv", name, stride, padding)``, ``("relu",)``, ``("tanh",)``, ``("maxpool", size)``,
``("gap",)`` (global average pool to ``(N, K)``), ``("flatten",)``, ``("linear", name)``.
Convolution weights are ``(K_out, K_in, k, k)`` with bias ``(K_out,)``; linear ``(out, in)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import array_api_compat
import numpy as np

Spec = Sequence[tuple]

GAP_NET = {
    "features": [("conv", "c0", 1, 1), ("relu",), ("conv", "c1", 2, 0), ("relu",), ("maxpool", 2)],
    "head": [("gap",), ("linear", "fc")],
    "shapes": {"c0": (5, 3, 3, 3), "c1": (6, 5, 3, 3), "fc": (7, 6)},
    "input": (3, 13, 13),
}
"""conv -> ReLU -> conv /2 -> ReLU -> max-pool | GAP -> linear: Grad-CAM == ReLU(CAM)/Z."""

DEEP_HEAD_NET = {
    "features": [("conv", "c0", 1, 0), ("relu",)],
    "head": [("conv", "c1", 1, 1), ("relu",), ("maxpool", 2), ("flatten",), ("linear", "fc")],
    "shapes": {"c0": (4, 2, 3, 3), "c1": (5, 4, 3, 3), "fc": (6, 5 * 4 * 4)},
    "input": (2, 10, 10),
}
"""conv -> ReLU | conv -> ReLU -> max-pool -> flatten -> linear: gradients vary over space."""

CONV_HEAD_NET = {
    "features": [("conv", "c0", 1, 0), ("relu",)],
    "head": [("conv", "c1", 1, 1), ("relu",), ("flatten",), ("linear", "fc")],
    "shapes": {"c0": (4, 2, 3, 3), "c1": (5, 4, 3, 3), "fc": (6, 5 * 8 * 8)},
    "input": (2, 10, 10),
}
"""DEEP_HEAD_NET without the max-pool (cheaper to compile): for the tests of targets and layouts."""

SMOOTH_NET = {
    "features": [("conv", "c0", 1, 0), ("tanh",)],
    "head": [("conv", "c1", 1, 1), ("tanh",), ("flatten",), ("linear", "fc")],
    "shapes": {"c0": (3, 2, 3, 3), "c1": (4, 3, 3, 3), "fc": (5, 4 * 4 * 4)},
    "input": (2, 6, 6),
}
"""A twice-differentiable net (tanh), for finite differences of the maps themselves."""


def write_weights(path: Any, net: dict, seed: int) -> None:
    """One weight file for both twins: weights scaled by 1/sqrt(fan-in), small biases (float64)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in net["shapes"].items():
        fan_in = math.prod(shape[1:])
        arrays[f"{name}.weight"] = rng.standard_normal(shape) / math.sqrt(fan_in)
        arrays[f"{name}.bias"] = 0.1 * rng.standard_normal(shape[0])
    np.savez(path, **arrays)


def case(name: str, folder: Any, seed: int) -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    """``(net, weights, inputs)`` for ``name`` ``"gap"`` or ``"deep-head"``: weights seeded
    ``seed`` written to ``folder`` and read back, and 3 inputs from ``seed + 1``."""
    net = {"gap": GAP_NET, "deep-head": DEEP_HEAD_NET}[name]
    path = Path(folder) / f"{name}.npz"
    write_weights(path, net, seed=seed)
    return net, read_weights(path), np.random.default_rng(seed + 1).standard_normal((3, *net["input"]))


def read_weights(path: Any) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {name: f[name] for name in f.files}


def torch_twin(net: dict, weights: dict[str, np.ndarray], dtype: Any) -> tuple[Any, Any]:
    """``(features, head)`` as ``torch.nn.Sequential`` modules in eval mode, built in ``dtype``.

    The modules are created in ``dtype`` and the file's float64 weights copied in (casting a
    float32 module to float64 afterwards would have rounded them to float32 on the way).
    """
    import torch
    from torch import nn

    def build(spec: Spec) -> nn.Sequential:
        layers: list[nn.Module] = []
        for kind, *args in spec:
            if kind == "conv":
                name, stride, padding = args
                w = torch.from_numpy(weights[f"{name}.weight"])
                conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], stride=stride, padding=padding, dtype=dtype)
                _load(conv, w, torch.from_numpy(weights[f"{name}.bias"]))
                layers.append(conv)
            elif kind == "linear":
                w = torch.from_numpy(weights[f"{args[0]}.weight"])
                linear = nn.Linear(w.shape[1], w.shape[0], dtype=dtype)
                _load(linear, w, torch.from_numpy(weights[f"{args[0]}.bias"]))
                layers.append(linear)
            elif kind == "maxpool":
                layers.append(nn.MaxPool2d(args[0]))
            elif kind == "gap":
                layers.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
            else:
                layers.append({"relu": nn.ReLU, "tanh": nn.Tanh, "flatten": nn.Flatten}[kind]())
        return nn.Sequential(*layers).eval()

    def _load(module: Any, w: Any, b: Any) -> None:
        with torch.no_grad():
            module.weight.copy_(w)
            module.bias.copy_(b)

    return build(net["features"]), build(net["head"])


def torch_sequential(features: Any, head: Any) -> tuple[Any, str]:
    """``(model, layer)``: one ``nn.Sequential`` of both halves and the name of the seam's module."""
    from torch import nn

    return nn.Sequential(*features, *head), str(len(features) - 1)


def jax_twin(net: dict, weights: dict[str, np.ndarray], dtype: Any) -> tuple[Callable, Callable]:
    """``(features, head)`` as functions of one argument over ``jax.lax`` operations."""
    import jax.numpy as jnp

    params = {name: jnp.asarray(value, dtype=dtype) for name, value in weights.items()}
    features, head = jax_twin_functions(net)
    return (lambda x: features(params, x)), (lambda a: head(params, a))


def jax_twin_functions(net: dict) -> tuple[Callable, Callable]:
    """``(features, head)`` as functions ``(params, x)`` of a dict of weights named as in the file.

    The form for ``jax.grad`` w.r.t. the weights (``explain(..., params=params)``).
    """
    import jax
    import jax.numpy as jnp

    def build(spec: Spec) -> Callable:
        def apply(params: Any, x: Any) -> Any:
            for kind, *args in spec:
                if kind == "conv":
                    name, stride, padding = args
                    x = jax.lax.conv_general_dilated(
                        x, params[f"{name}.weight"], (stride, stride), [(padding, padding)] * 2,
                        dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=jax.lax.Precision.HIGHEST,
                    ) + params[f"{name}.bias"][:, None, None]
                elif kind == "linear":
                    x = x @ params[f"{args[0]}.weight"].T + params[f"{args[0]}.bias"]
                elif kind == "relu":
                    x = jax.nn.relu(x)
                elif kind == "tanh":
                    x = jnp.tanh(x)
                elif kind == "maxpool":
                    size = args[0]
                    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, size, size), (1, 1, size, size), "VALID")
                elif kind == "gap":
                    x = x.mean(axis=(2, 3))
                elif kind == "flatten":
                    x = x.reshape(x.shape[0], -1)
            return x

        return apply

    return build(net["features"]), build(net["head"])


def torch_named_parameters(net: dict, features: Any, head: Any) -> dict[str, Any]:
    """The torch twin's parameters under the weight file's names (``c0.weight``, ``fc.bias``, ...)."""
    named = {}
    for spec, module in ((net["features"], features), (net["head"], head)):
        for (kind, *args), layer in zip(spec, module, strict=True):
            if kind in ("conv", "linear"):
                named[f"{args[0]}.weight"], named[f"{args[0]}.bias"] = layer.weight, layer.bias
    return named


def log_softmax_target(c: int) -> Callable[[Any], Any]:
    """``scores -> log softmax(scores)[:, c]``, one callable for torch and JAX (array API)."""

    def target(scores: Any) -> Any:
        xp = array_api_compat.array_namespace(scores)
        top = xp.max(scores, axis=1, keepdims=True)
        log_z = xp.log(xp.sum(xp.exp(scores - top), axis=1)) + top[:, 0]
        return scores[:, c] - log_z

    return target


def torch_grad_cam(features: Any, head: Any, x: np.ndarray, target: Any) -> dict[str, np.ndarray]:
    """Grad-CAM in torch alone: ``A = features(x)`` (no graph), then :func:`torch_grad_cam_at`."""
    import torch

    dtype = next(features.parameters()).dtype
    with torch.no_grad():
        a = features(torch.as_tensor(x, dtype=dtype))
    return torch_grad_cam_at(head, a, target)


def torch_grad_cam_at(head: Any, activations: Any, target: Any) -> dict[str, np.ndarray]:
    """Grad-CAM in torch alone, from the activations: ``target`` is N ints, ``(N, T)`` ints or a callable.

    dy/dA by ``torch.autograd.grad`` of :math:`\\sum_n y_n` (one call per target column);
    :math:`\\alpha = ` mean of dy/dA over space (Eq. 1), map :math:`= \\mathrm{ReLU}(\\sum_k \\alpha_k A^k)`
    (Eq. 2). Returns maps, activations, gradients, weights and scores as float64 NumPy arrays.
    """
    import torch

    a = activations.detach().clone().requires_grad_(True)
    scores = head(a)
    if callable(target):
        columns = [target]
    else:
        t = torch.as_tensor(np.asarray(target))
        columns = [lambda s, c=c: s.gather(1, c[:, None])[:, 0] for c in (t.T if t.ndim == 2 else [t])]
    grads = [torch.autograd.grad(pick(scores).sum(), a, retain_graph=True)[0] for pick in columns]
    g = torch.stack(grads, dim=1) if not callable(target) and np.ndim(target) == 2 else grads[0]
    weights = g.mean(dim=(-2, -1))
    a_b = a[:, None] if g.ndim == 5 else a
    maps = torch.relu((weights[..., None, None] * a_b).sum(dim=-3))
    out = {"maps": maps, "activations": a, "gradients": g, "weights": weights, "scores": scores}
    return {k: v.detach().numpy().astype(np.float64) for k, v in out.items()}
