"""Every benchmarked method, built the way its library's documentation says to call it.

``make(name, model, layer, x, targets)`` returns a :class:`Method`: ``call()`` runs one
explanation of the batch ``x`` (``(N, ...)``) for ``targets`` (int ``(N,)``: one target per
image, or ``(N, T)``: T targets per image), ``close()`` removes whatever the library left on the
model (hooks). Peers are called with the same model, layer, input tensor and class indices.

One target per image (``ONE_TARGET``):

- ``forward``: ``model(x)`` under ``torch.no_grad()``: the baseline, inference alone;
- ``gradcam_ref``: ``gradcam_ref.explain(model, x, targets, layer=layer)``;
- ``captum``: ``LayerGradCam(model, layer).attribute(x, target=targets)``;
- ``pytorch-grad-cam``: ``GradCAM(model=model, target_layers=[layer])(input_tensor=x,
  targets=[ClassifierOutputTarget(c) for c in targets])``;
- ``torchcam``: ``GradCAM(model, layer)`` built once (it hooks the model), then per call
  ``scores = model(x)`` (grad mode on, as torchcam requires) and ``cam(class_idx=targets,
  scores=scores)``.

T targets per image (``MULTI_TARGET``), each library by its own means:

- ``gradcam_ref``: one call with the ``(N, T)`` target array (one forward, one batched backward);
- ``captum: T calls`` and ``pytorch-grad-cam: T calls``: one call per target column;
- ``captum: batch of copies`` and ``pytorch-grad-cam: batch of copies``: one call on the
  ``N*T`` images ``x.repeat_interleave(T, 0)`` with one target each (both libraries take one
  target per example);
- ``torchcam: 1 forward + T backward``: ``scores = model(x)`` once, then T calls
  ``cam(class_idx=targets[:, t], scores=scores, retain_graph=True)`` (the last one without).

Memory only (``MEMORY_ONLY``): ``captum: T calls, maps detached``, the T calls with each map
detached as it comes. captum's maps are built from the layer's output inside the autograd graph
and keep that graph (every saved activation of the forward pass) alive while they are held, so
T held maps hold T graphs; detached, one graph at a time.

pytorch-grad-cam and torchcam keep hooks on the model for the life of their extractor object:
give them a model of their own (``PERSISTENT_HOOKS``) so that their hooks never run inside
another method's timing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

ONE_TARGET = ("forward", "gradcam_ref", "captum", "pytorch-grad-cam", "torchcam")
MULTI_TARGET = (
    "forward",
    "gradcam_ref",
    "captum: T calls",
    "captum: batch of copies",
    "pytorch-grad-cam: T calls",
    "pytorch-grad-cam: batch of copies",
    "torchcam: 1 forward + T backward",
)
MEMORY_ONLY = ("captum: T calls, maps detached",)
PERSISTENT_HOOKS = ("pytorch-grad-cam", "torchcam")

_PACKAGES = {"captum": "captum", "pytorch-grad-cam": "pytorch_grad_cam", "torchcam": "torchcam"}


class Method(NamedTuple):
    call: Callable[[], object]
    close: Callable[[], None]


def library(name: str) -> str:
    """The library a method name belongs to: ``"captum: T calls"`` -> ``"captum"``."""
    return name.split(":")[0]


def available(name: str) -> bool:
    """Whether the method's library is installed (ours and the baseline always are)."""
    package = _PACKAGES.get(library(name))
    return package is None or importlib.util.find_spec(package) is not None


def has_persistent_hooks(name: str) -> bool:
    return library(name) in PERSISTENT_HOOKS


def _nothing() -> None:
    return None


def make(name: str, model: Any, layer: str, x: Any, targets: np.ndarray) -> Method:
    """The method ``name`` on ``model`` at ``layer`` (a dotted name), input ``x``, ``targets``."""
    multi = targets.ndim == 2
    if name == "forward":
        return Method(_forward(model, x), _nothing)
    if name == "gradcam_ref":
        return Method(_gradcam_ref(model, layer, x, targets), _nothing)
    if library(name) == "captum":
        return _captum(name, model, layer, x, targets, multi)
    if library(name) == "pytorch-grad-cam":
        return _pytorch_grad_cam(name, model, layer, x, targets, multi)
    if library(name) == "torchcam":
        return _torchcam(name, model, layer, x, targets, multi)
    raise ValueError(f"unknown method {name!r}; methods: {ONE_TARGET + MULTI_TARGET + MEMORY_ONLY}")


def _forward(model: Any, x: Any) -> Callable[[], object]:
    import torch

    def call() -> object:
        with torch.no_grad():
            return model(x)

    return call


def _gradcam_ref(model: Any, layer: str, x: Any, targets: np.ndarray) -> Callable[[], object]:
    import gradcam_ref

    return lambda: gradcam_ref.explain(model, x, targets, layer=layer).maps


def _copies(x: Any, targets: np.ndarray) -> tuple[Any, np.ndarray]:
    """``N*T`` images (each image T times) and their ``N*T`` targets."""
    return x.repeat_interleave(targets.shape[1], 0), targets.reshape(-1)


def _captum(name: str, model: Any, layer: str, x: Any, targets: np.ndarray, multi: bool) -> Method:
    from captum.attr import LayerGradCam

    explainer = LayerGradCam(model, model.get_submodule(layer))
    if not multi:
        return Method(lambda: explainer.attribute(x, target=targets.tolist()), _nothing)
    if name == "captum: T calls":
        columns = [column.tolist() for column in targets.T]
        return Method(lambda: [explainer.attribute(x, target=c) for c in columns], _nothing)
    if name == "captum: T calls, maps detached":  # captum's maps hold their graph until detached
        columns = [column.tolist() for column in targets.T]
        return Method(lambda: [explainer.attribute(x, target=c).detach() for c in columns], _nothing)
    if name == "captum: batch of copies":
        xs, flat = _copies(x, targets)
        return Method(lambda: explainer.attribute(xs, target=flat.tolist()), _nothing)
    raise ValueError(f"unknown captum method {name!r}")


def _pytorch_grad_cam(name: str, model: Any, layer: str, x: Any, targets: np.ndarray, multi: bool) -> Method:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = GradCAM(model=model, target_layers=[model.get_submodule(layer)])

    def close() -> None:
        cam.activations_and_grads.release()

    def wrap(classes: np.ndarray) -> list[Any]:
        return [ClassifierOutputTarget(int(c)) for c in classes]

    if not multi:
        wrapped = wrap(targets)
        return Method(lambda: cam(input_tensor=x, targets=wrapped), close)
    if name == "pytorch-grad-cam: T calls":
        columns = [wrap(column) for column in targets.T]
        return Method(lambda: [cam(input_tensor=x, targets=c) for c in columns], close)
    if name == "pytorch-grad-cam: batch of copies":
        xs, flat = _copies(x, targets)
        wrapped = wrap(flat)
        return Method(lambda: cam(input_tensor=xs, targets=wrapped), close)
    raise ValueError(f"unknown pytorch-grad-cam method {name!r}")


def _torchcam(name: str, model: Any, layer: str, x: Any, targets: np.ndarray, multi: bool) -> Method:
    import torch
    from torchcam.methods import GradCAM

    cam = GradCAM(model, layer)

    def close() -> None:
        cam.remove_hooks()
        cam.reset_hooks()

    if not multi:
        classes = targets.tolist()

        def call() -> object:
            with torch.enable_grad():
                return cam(class_idx=classes, scores=model(x))

        return Method(call, close)
    if name != "torchcam: 1 forward + T backward":
        raise ValueError(f"unknown torchcam method {name!r}")
    columns = [column.tolist() for column in targets.T]

    def call_multi() -> object:
        with torch.enable_grad():
            scores = model(x)
            return [
                cam(class_idx=c, scores=scores, retain_graph=t + 1 < len(columns)) for t, c in enumerate(columns)
            ]

    return Method(call_multi, close)


def setup(name: str, model: Any, layer: str) -> Callable[[], None]:
    """A call that builds the library's explainer for ``model`` and removes it again (setup cost)."""
    if name == "captum":
        from captum.attr import LayerGradCam

        return lambda: None if LayerGradCam(model, model.get_submodule(layer)) else None
    if name == "pytorch-grad-cam":
        from pytorch_grad_cam import GradCAM

        def build_pgc() -> None:
            GradCAM(model=model, target_layers=[model.get_submodule(layer)]).activations_and_grads.release()

        return build_pgc
    if name == "torchcam":
        from torchcam.methods import GradCAM as TorchcamGradCAM

        def build_torchcam() -> None:
            TorchcamGradCAM(model, layer).remove_hooks()

        return build_torchcam
    raise ValueError(f"no setup step for {name!r}")
