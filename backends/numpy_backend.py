"""The NumPy oracle: a small CNN with a hand-written forward and backward pass.

No autograd: every derivative below is written out, so that the numbers can be followed by hand
and checked against any framework. The network, for any spatial rank r >= 1::

    x (N, C, *S) -> [conv_i -> ReLU] for i = 0..L-1 -> head -> y (N, classes)

Layers are named ``"conv{i}"`` (the convolution's output, before its ReLU) and ``"relu{i}"``
(after it); the default layer is the last ReLU, the input of the head. Heads:

- ``"gap"``: :math:`y = W \\cdot \\mathrm{GAP}(A) + b` (CAM's architecture);
- ``"gap-mlp"``: :math:`y = W_2\\, \\mathrm{ReLU}(W_1 \\mathrm{GAP}(A) + b_1) + b_2`;
- ``"flatten"``: :math:`y = W \\cdot \\mathrm{vec}(A) + b` (gradients vary over space).

Convolutions are "valid" (no padding), stride 1, cross-correlations as in every framework.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradcam_ref.backends._contract import (
    Capture,
    Perturbed,
    check_where,
    class_indices,
    explaining,
    perturb_chunks,
    shape_of,
    warn_zero_gradients,
)

NAME = "numpy"
GUIDED = True
DIFFERENTIABLE = False
HEADS = ("gap", "gap-mlp", "flatten")


@dataclasses.dataclass
class Oracle:
    """The oracle network's parameters (float64).

    Attributes:
      convs: ``[(weight (K_out, K_in, *kernel), bias (K_out,)), ...]``, applied in order.
      head: one of ``HEADS``.
      head_params: ``[(weight, bias), ...]``: one pair for ``"gap"`` (``(classes, K)``) and
        ``"flatten"`` (``(classes, K * prod(spatial))``), two for ``"gap-mlp"``.
    """

    convs: list[tuple[np.ndarray, np.ndarray]]
    head: str
    head_params: list[tuple[np.ndarray, np.ndarray]]

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        *,
        in_channels: int,
        widths: Sequence[int],
        kernel_sizes: Sequence[int],
        num_classes: int,
        spatial_rank: int = 2,
        head: str = "gap",
        input_size: int | None = None,
        hidden: int = 8,
    ) -> Oracle:
        """A network with standard-normal weights scaled by 1/sqrt(fan-in).

        ``input_size`` (the side of the input) is needed only by the ``"flatten"`` head.
        """
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        convs, k_in = [], in_channels
        for k_out, size in zip(widths, kernel_sizes, strict=True):
            fan_in = k_in * size**spatial_rank
            weight = rng.standard_normal((k_out, k_in) + (size,) * spatial_rank) / math.sqrt(fan_in)
            convs.append((weight, 0.1 * rng.standard_normal(k_out)))
            k_in = k_out

        def dense(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
            return rng.standard_normal((n_out, n_in)) / math.sqrt(n_in), 0.1 * rng.standard_normal(n_out)

        if head == "gap":
            params = [dense(num_classes, k_in)]
        elif head == "gap-mlp":
            params = [dense(hidden, k_in), dense(num_classes, hidden)]
        else:
            if input_size is None:
                raise ValueError("the 'flatten' head needs input_size")
            side = input_size - sum(size - 1 for size in kernel_sizes)
            params = [dense(num_classes, k_in * side**spatial_rank)]
        return cls(convs, head, params)

    @property
    def layers(self) -> list[str]:
        """The layer names, in forward order."""
        return [f"{kind}{i}" for i in range(len(self.convs)) for kind in ("conv", "relu")]

    def forward(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Return ``(intermediates, scores)``: every layer's output by name, and y ``(N, classes)``."""
        outputs = {}
        for i, (weight, bias) in enumerate(self.convs):
            x = conv(x, weight, bias)
            outputs[f"conv{i}"] = x
            x = np.maximum(x, 0.0)
            outputs[f"relu{i}"] = x
        return outputs, self._head(x)

    def forward_from(self, layer: str, a: np.ndarray) -> np.ndarray:
        """The scores y when ``layer``'s output is ``a``: only the layers after it run."""
        _layer(self, layer)
        kind, i = layer[:4], int(layer[4:])
        x = np.maximum(a, 0.0) if kind == "conv" else a
        for weight, bias in self.convs[i + 1:]:
            x = np.maximum(conv(x, weight, bias), 0.0)
        return self._head(x)

    def _head(self, a: np.ndarray) -> np.ndarray:
        if self.head == "flatten":
            (w, b), = self.head_params
            return a.reshape(a.shape[0], -1) @ w.T + b
        pooled = a.reshape(a.shape[0], a.shape[1], -1).mean(axis=-1)  # GAP: (N, K)
        if self.head == "gap":
            (w, b), = self.head_params
            return pooled @ w.T + b
        (w1, b1), (w2, b2) = self.head_params
        return np.maximum(pooled @ w1.T + b1, 0.0) @ w2.T + b2

    def head_gradient(self, a: np.ndarray, seed: np.ndarray, guided: bool = False) -> np.ndarray:
        """:math:`\\sum_c \\text{seed}_{nc}\\, \\partial y_{nc} / \\partial A_n`, shape of ``a``.

        ``seed`` ``(N, classes)`` is the backward pass's starting vector (one-hot for one class).
        ``guided``: the MLP head's ReLU passes only positive gradients (see :meth:`guided_backward`).
        """
        n, k, *spatial = a.shape
        z = math.prod(spatial)
        if self.head == "flatten":
            (w, _), = self.head_params
            return (seed @ w).reshape(a.shape)  # y = W vec(A): dy/dA = W's row, reshaped
        if self.head == "gap":
            (w, _), = self.head_params
            d_pooled = seed @ w  # (N, K)
        else:
            (w1, b1), (w2, _) = self.head_params
            hidden = a.reshape(n, k, -1).mean(axis=-1) @ w1.T + b1
            d_hidden = seed @ w2
            keep = (hidden > 0) & (d_hidden > 0) if guided else hidden > 0
            d_pooled = (d_hidden * keep) @ w1  # back through ReLU and W1
        # GAP: pooled_k = (1/Z) sum_ij A_kij, so d pooled_k / d A_kij = 1/Z everywhere.
        return np.broadcast_to((d_pooled / z).reshape(n, k, *([1] * len(spatial))), a.shape).copy()

    def backward(self, x: np.ndarray, layer: str, seed: np.ndarray) -> np.ndarray:
        """:math:`\\sum_c \\text{seed}_{nc}\\, \\partial y_{nc} / \\partial (\\text{layer})`, by hand."""
        outputs, _ = self.forward(x)
        last = len(self.convs) - 1
        grad = self.head_gradient(outputs[f"relu{last}"], seed)  # d y / d relu_last
        for i in range(last, -1, -1):
            if layer == f"relu{i}":
                return grad
            grad = grad * (outputs[f"conv{i}"] > 0)  # ReLU: passes where its input was > 0
            if layer == f"conv{i}":
                return grad
            grad = conv_input_gradient(grad, self.convs[i][0])
        raise ValueError(f"layer must be one of {self.layers}, got {layer!r}")

    def guided_backward(self, x: np.ndarray, seed: np.ndarray) -> np.ndarray:
        """Guided backpropagation (Springenberg et al.) to the input ``x``, by hand.

        The backward pass of :meth:`backward`, carried down to ``x``, with every ReLU (those
        after the convolutions and the MLP head's) passing the gradient g it receives as
        :math:`g \\cdot [z > 0] \\cdot [g > 0]`, z the ReLU's input. Shape of ``x``.
        """
        outputs, _ = self.forward(x)
        last = len(self.convs) - 1
        grad = self.head_gradient(outputs[f"relu{last}"], seed, guided=True)
        for i in range(last, -1, -1):
            grad = grad * ((outputs[f"conv{i}"] > 0) & (grad > 0))
            grad = conv_input_gradient(grad, self.convs[i][0])
        return grad


def conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Valid, stride-1 cross-correlation of any spatial rank.

    :math:`\\text{out}_{n,o,p} = b_o + \\sum_{i,q} w_{o,i,q}\\, x_{n,i,p+q}`, with x
    ``(N, K_in, *S)``, weight ``(K_out, K_in, *kernel)``, out ``(N, K_out, *(S - kernel + 1))``.

    Example:
      >>> x = np.array([[[1.0, 2.0, 4.0]]])            # N=1, K_in=1, 1-D of length 3
      >>> conv(x, np.array([[[1.0, -1.0]]]), np.array([0.5]))  # x_p - x_{p+1} + 0.5
      array([[[-0.5, -1.5]]])
    """
    rank = weight.ndim - 2
    spatial = tuple(range(2, 2 + rank))
    windows = np.lib.stride_tricks.sliding_window_view(x, weight.shape[2:], axis=spatial)
    # windows: (N, K_in, *S_out, *kernel); contract K_in and the kernel axes.
    out = np.tensordot(windows, weight, axes=([1, *range(2 + rank, 2 + 2 * rank)], [1, *spatial]))
    return np.moveaxis(out, -1, 1) + bias.reshape((-1,) + (1,) * rank)


def conv_input_gradient(grad_out: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Backward of :func:`conv` w.r.t. its input: a full correlation with the flipped kernel.

    :math:`\\partial L / \\partial x_{n,i,p} = \\sum_{o,q} g_{n,o,p-q}\\, w_{o,i,q}`: pad g by
    kernel - 1 on both sides of each spatial axis and correlate with w flipped in space.

    Example:
      >>> g = np.array([[[1.0, 10.0]]])                # dL/d out for the conv example above
      >>> conv_input_gradient(g, np.array([[[1.0, -1.0]]]))  # [g_0, g_1 - g_0, -g_1]
      array([[[  1.,   9., -10.]]])
    """
    rank = weight.ndim - 2
    spatial = tuple(range(2, 2 + rank))
    pad = [(0, 0), (0, 0)] + [(s - 1, s - 1) for s in weight.shape[2:]]
    flipped = np.flip(weight, axis=spatial)  # (K_out, K_in, *kernel)
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(grad_out, pad), weight.shape[2:], axis=spatial)
    out = np.tensordot(windows, flipped, axes=([1, *range(2 + rank, 2 + 2 * rank)], [0, *spatial]))
    return np.moveaxis(out, -1, 1)


def capture(
    model: Oracle, inputs: Any, target: Any = None, *, layer: str | None = None, guided: bool = False
) -> Capture:
    """Activations, hand-derived gradients and scores of the oracle at ``layer``.

    Targets are class indices (None, an int, N ints or an ``(N, T)`` array); the oracle has no
    autograd, so callable targets are refused. ``guided`` adds guided backpropagation to the
    input (:meth:`Oracle.guided_backward`), ``(N, C, *S)`` or ``(N, T, C, *S)``.
    """
    if not isinstance(model, Oracle):
        raise TypeError(f"the numpy backend runs an Oracle network, got model of type {type(model).__name__}")
    if callable(target):
        raise TypeError("the numpy backend has no autograd: target must be class indices, not a callable")
    x = _inputs(model, inputs)
    layer = _layer(model, layer)
    outputs, scores = model.forward(x)
    targets = class_indices(target, scores)
    columns = targets if targets.ndim == 2 else targets[:, None]
    eye = np.eye(scores.shape[1])
    grads = np.stack([model.backward(x, layer, eye[columns[:, t]]) for t in range(columns.shape[1])], axis=1)
    gradients = grads if targets.ndim == 2 else grads[:, 0]
    guided_backprop = None
    if guided:
        rows = np.stack([model.guided_backward(x, eye[columns[:, t]]) for t in range(columns.shape[1])], axis=1)
        guided_backprop = rows if targets.ndim == 2 else rows[:, 0]
    _warn_zero_gradients(gradients, outputs[layer].ndim, layer)
    return Capture(outputs[layer], gradients, scores, targets, guided_backprop)


def _inputs(model: Oracle, inputs: Any) -> np.ndarray:
    """``inputs`` as float64, refused unless ``(N, C, *spatial)`` with the oracle's spatial rank and
    channels, no empty axis and every side at least the convolutions' receptive field (valid
    convolutions shrink each side by kernel - 1). Complex inputs are refused, as the core does."""
    x = np.asarray(inputs)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"inputs must have a real numeric dtype, got {x.dtype}")
    shape = shape_of(x)
    first = model.convs[0][0]
    rank = first.ndim - 2
    if len(shape) != rank + 2:
        raise ValueError(f"inputs must have shape (N, C, *spatial) with {rank} spatial axes, got shape {shape}")
    if 0 in shape:
        raise ValueError(f"inputs must not be empty, got shape {shape}")
    if shape[1] != first.shape[1]:
        raise ValueError(f"inputs must have C = {first.shape[1]} channels (the first convolution's), got shape {shape}")
    field = tuple(1 + sum(weight.shape[2 + axis] - 1 for weight, _ in model.convs) for axis in range(rank))
    if any(side < least for side, least in zip(shape[2:], field, strict=True)):
        raise ValueError(
            f"inputs must have spatial sizes >= {field} (the convolutions' receptive field), got shape {shape}"
        )
    return x.astype(np.float64, copy=False)


def _layer(model: Oracle, layer: Any) -> str:
    """``layer`` (the last ReLU when None) if it is one of the oracle's layer names."""
    layer = model.layers[-1] if layer is None else layer
    if not isinstance(layer, str) or layer not in model.layers:
        raise ValueError(f"layer must be one of {model.layers}, got {' '.join(repr(layer).split())}")
    return layer


def _warn_zero_gradients(gradients: np.ndarray, rank: int, layer: str) -> None:
    """Warn, as every backend does, about examples (and targets) whose gradients are zero everywhere."""
    lead = gradients.ndim - rank + 1  # 1 (N,) or 2 (N, T)
    zero = np.max(np.abs(gradients), axis=tuple(range(lead, gradients.ndim))) == 0
    warn_zero_gradients(zero, f"layer {layer!r}", stacklevel=4)


explain = explaining(capture)


def score(model: Oracle, inputs: Any) -> np.ndarray:
    """The oracle's scores ``(N, classes)`` on ``inputs`` (float64), for re-scoring."""
    if not isinstance(model, Oracle):
        raise TypeError(f"the numpy backend runs an Oracle network, got model of type {type(model).__name__}")
    return model.forward(_inputs(model, inputs))[1]


def perturb(
    model: Oracle, inputs: Any, make: Any, *, layer: str | None = None, where: str = "activations",
    batch_size: int = 32, count: Any = None, scored: Any = None,
) -> Perturbed:
    """The oracle scored on perturbed copies (see the Protocol's ``perturb``).

    ``where="activations"``: :meth:`Oracle.forward_from` runs only the layers after ``layer``.
    """
    if not isinstance(model, Oracle):
        raise TypeError(f"the numpy backend runs an Oracle network, got model of type {type(model).__name__}")
    check_where(where)
    x = _inputs(model, inputs)
    layer = _layer(model, layer)
    outputs, scores = model.forward(x)
    a = outputs[layer]
    rows = np.full((*a.shape[:2], scores.shape[1]), np.nan)
    if scored is not None:
        scored(scores)
    for i, _, spans in perturb_chunks(a, batch_size, count):
        for start, stop in spans:
            batch = make(x, a, i, start, stop)
            if where == "activations":
                rows[i, start:stop] = model.forward_from(layer, batch)  # only the layers after `layer`
            else:
                rows[i, start:stop] = model.forward(batch)[1]
    return Perturbed(a, scores, rows)
