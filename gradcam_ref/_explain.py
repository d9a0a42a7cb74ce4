"""``explain``: a backend captures A, dy/dA and y at a layer; the core turns them into maps.

The contract between the two is ``gradcam_ref.backends._contract.Backend``; an
:class:`Explanation` is built in one place, :meth:`Explanation.from_capture`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from gradcam_ref._arrays import Array, to_numpy
from gradcam_ref._gradcam import cam, grad_cam_parts, relu_map
from gradcam_ref._guided import guided_grad_cam
from gradcam_ref._targets import Target
from gradcam_ref.conventions import postprocess

DIFFERENTIABLE_MODES = (False, "stop", "full")
"""``explain(differentiable=...)``: inference; alpha held constant (GAIN's choice); second order."""


def differentiable_mode(differentiable: Any, guided: bool = False) -> str | None:
    """``differentiable`` checked: None for False, else ``"stop"`` or ``"full"``."""
    if differentiable is False:
        return None
    if isinstance(differentiable, bool) or differentiable not in ("stop", "full"):
        raise ValueError(
            f"differentiable must be one of {DIFFERENTIABLE_MODES} (True is ambiguous: say which "
            f"gradient mode), got {differentiable!r}"
        )
    if guided:
        raise ValueError(f"guided=True cannot be combined with differentiable={differentiable!r}")
    return str(differentiable)


class Capture(NamedTuple):
    """What a backend returns: everything Grad-CAM needs from a model, and nothing computed.

    Attributes:
      activations: :math:`A`, the layer's output (or input), ``(N, K, *spatial)``.
      gradients: :math:`\\partial y^c / \\partial A`, ``(N, K, *spatial)``, or
        ``(N, T, K, *spatial)`` for ``(N, T)`` targets.
      scores: the model's output, usually ``(N, C)`` pre-softmax scores.
      targets: the class indices explained, int ``(N,)`` or ``(N, T)``; None for a callable target.
      guided_backprop: guided backpropagation to the input, ``(N, C, *S)`` or ``(N, T, C, *S)``
        (see :mod:`gradcam_ref._guided`); None unless asked for (``guided=True``).
    """

    activations: Array
    gradients: Array
    scores: Array
    targets: Any
    guided_backprop: Array | None = None


class GradCamFields(NamedTuple):
    """What the core computes from a :class:`Capture` (see :func:`grad_cam_fields`)."""

    weights: Array
    signed: Array
    maps: Array
    guided_grad_cam: Array | None


def grad_cam_fields(capture: Capture) -> GradCamFields:
    """Eq. 1 (``weights``), Eq. 2 before and after its ReLU (``signed``, ``maps``) and Guided Grad-CAM.

    Array code only, so a backend may run it inside a compiled program (``jax.jit``); the
    finiteness checks of :func:`gradcam_ref.grad_cam` run when the values can be read.
    """
    weights, signed = grad_cam_parts(capture.activations, capture.gradients)
    maps = relu_map(signed)
    guided = capture.guided_backprop
    ggc = None if guided is None else guided_grad_cam(
        guided, maps, spatial_rank=len(capture.activations.shape) - 2)
    return GradCamFields(weights, signed, maps, ggc)


@dataclasses.dataclass(frozen=True)
class Explanation:
    """A Grad-CAM explanation and every intermediate, as arrays of the model's library.

    Attributes:
      maps: :math:`L^c = \\mathrm{ReLU}(\\sum_k \\alpha_k^c A^k)` at the layer's resolution,
        ``(N, *spatial)``, or ``(N, T, *spatial)`` for ``(N, T)`` targets.
      activations: :math:`A`, ``(N, K, *spatial)``.
      gradients: :math:`\\partial y^c / \\partial A`, the shape of ``activations`` or
        ``(N, T, K, *spatial)``.
      weights: :math:`\\alpha^c` (Eq. 1), ``(N, K)`` or ``(N, T, K)``.
      scores: the model's output for ``inputs``, e.g. ``(N, C)`` logits.
      targets: the explained classes, int64 NumPy ``(N,)`` or ``(N, T)``; None when the
        target was a callable.
      guided_backprop: with ``guided=True``, :math:`\\partial^{\\text{guided}} y^c / \\partial x`,
        the gradient of the score w.r.t. the input through guided ReLUs, ``(N, C, *S)`` (the
        input's shape) or ``(N, T, C, *S)``; else None.
      guided_grad_cam: with ``guided=True``, ``guided_grad_cam(guided_backprop, maps)``: the
        guided gradients times ``maps`` upsampled to the input, same shape; else None.
        :func:`gradcam_ref.guided_image` makes either displayable.

    The signed map (before the ReLU) is ``gradcam_ref.cam(activations, weights)``.
    """

    maps: Array
    activations: Array
    gradients: Array
    weights: Array
    scores: Array
    targets: np.ndarray | None
    guided_backprop: Array | None = None
    guided_grad_cam: Array | None = None

    @classmethod
    def from_capture(cls, capture: Capture, fields: GradCamFields | None = None) -> Explanation:
        """The explanation of what a backend captured: Eq. 1, Eq. 2 and Guided Grad-CAM applied.

        ``fields`` are ``grad_cam_fields(capture)`` when the backend computed them
        already (inside its own compiled program); else they are computed here.
        """
        if fields is None:
            fields = grad_cam_fields(capture)
        return cls(
            maps=fields.maps,
            activations=capture.activations,
            gradients=capture.gradients,
            weights=fields.weights,
            scores=capture.scores,
            targets=capture.targets,
            guided_backprop=capture.guided_backprop,
            guided_grad_cam=fields.guided_grad_cam,
        )

    def heatmap(self, size: int | tuple[int, ...] | None = None, convention: str = "paper") -> Array:
        """The map post-processed as ``convention`` defines it, at ``size`` (e.g. the input's).

        ``"paper"`` (default): ReLU, half-pixel bilinear upsampling to ``size``, then per-map
        min-max into [0, 1]. ``"pytorch-grad-cam"``, ``"captum"``, ``"torchcam"`` and
        ``"tf-keras-vis"`` reproduce what those libraries return for the same model, layer,
        input and target; ``size=None`` keeps the layer's resolution. The steps and why each
        library differs: :func:`gradcam_ref.conventions.describe`, or ``gradcam-ref verify --explain LIB``.
        Shape ``(N, *size)`` (or ``(N, T, *size)``), in the library of ``maps``.
        """
        return postprocess(
            cam(self.activations, self.weights), convention, size=size,
            spatial_rank=len(self.activations.shape) - 2,
        )

    def numpy(self) -> Explanation:
        """A copy with every array as a float64 NumPy array on the host (targets stay int)."""
        convert = lambda x: None if x is None else np.array(to_numpy(x), dtype=np.float64)  # noqa: E731
        return dataclasses.replace(
            self,
            **{f.name: convert(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name != "targets"},
        )


def explain(
    model: Any,
    inputs: Any,
    target: Target = None,
    *,
    layer: Any = None,
    backend: str | None = None,
    guided: bool = False,
    differentiable: bool | str = False,
    **options: Any,
) -> Explanation:
    """Grad-CAM of ``model`` on ``inputs`` at ``layer``, for ``target``.

    The backend (``"numpy"``, ``"torch"`` or ``"jax"``) is picked from the types of ``model``
    and ``inputs`` without importing any framework the caller has not imported; ``backend``
    forces one. The backend runs the model and captures the layer's activations :math:`A`, the
    gradients :math:`\\partial y^c / \\partial A` and the scores; the core then computes
    :math:`\\alpha^c` (Eq. 1) and the map (Eq. 2), see :func:`gradcam_ref.grad_cam`. A backend
    that compiles whole programs (JAX) runs the same core functions inside its program.

    Args:
      model: a model of a backend's kind: a ``backends.numpy_backend.Oracle``, a torch
        ``nn.Module``, a ``(features, head)`` pair, ...
      inputs: a batch ``(N, ...)`` in the model's library.
      target: ``None`` (the predicted class), an int, N ints, an int array ``(N, T)`` (T maps
        per example) or a callable ``scores -> (N,)`` for any differentiable output.
      layer: where to take :math:`A` (a name or module; the backend's default when None).
      backend: the backend's name, to override detection.
      guided: also compute guided backpropagation and Guided Grad-CAM (the Explanation's
        ``guided_backprop`` and ``guided_grad_cam``). The backend then runs one more forward
        pass, with autograd from the input, and a backward pass to the input.
      differentiable: False (default: inference, today's cost), ``"stop"`` or ``"full"``: the
        maps carry autograd to the model's parameters and input, for training through them
        (GAIN, :mod:`gradcam_ref.gain`). ``"stop"`` holds :math:`\alpha^c` (Eq. 1) constant, as
        GAIN does; ``"full"`` differentiates through it too (second order). Backends: torch,
        jax (the NumPy oracle has no autograd); the cost of each: docs/gain.md.
      **options: passed to the backend's ``capture``.

    Returns:
      An :class:`Explanation` holding ``maps`` and every intermediate.
    """
    from gradcam_ref import backends

    chosen = backends.select(model, inputs, backend)
    if guided and not chosen.GUIDED:
        raise TypeError(f"guided=True: the {chosen.NAME} backend does not compute guided backpropagation")
    if differentiable_mode(differentiable, guided) is not None:
        if not chosen.DIFFERENTIABLE:
            raise TypeError(
                f"differentiable={differentiable!r}: the {chosen.NAME} backend has no autograd; "
                "use the torch or jax backend"
            )
        options["differentiable"] = differentiable  # passed only when set: backends without it keep working
    return chosen.explain(model, inputs, target, layer=layer, guided=guided, **options)
