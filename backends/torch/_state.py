"""The user's model left exactly as it was: its training flags, buffers and torch's random state.

:func:`warn_if_training` says whether a call must keep the model's state (a module whose result
depends on the flag is in training mode, which it warns about, or a module writes its buffers in
eval mode too); :func:`kept_as_it_was` then copies the buffers before and back after, forks
torch's random state and yields ``rewind``, so that every pass of one call draws the same dropout
masks. A model in eval mode pays for neither: :func:`nothing` is its ``rewind``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase
from torch.nn.utils.spectral_norm import SpectralNorm

from gradcam_ref.backends._contract import TrainingModeWarning


def nothing() -> None:
    """``rewind`` of a model in eval mode: nothing to set back."""


_MODE_DEPENDENT = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
    nn.modules.instancenorm._InstanceNorm,
    nn.RReLU,
)
"""torch.nn modules whose result depends on the training flag even where their ``forward`` does not
name it (instance norm reads it in a helper). Other modules: see :func:`_depends_on_mode`."""


def _depends_on_mode(module: nn.Module) -> bool:
    """Whether ``module``'s own forward pass may behave differently in training mode.

    True for batch norm, dropout, RReLU and instance norm with running statistics, for a module
    under ``torch.nn.utils.spectral_norm`` (its forward pre-hook updates the power iteration's
    buffers in training mode), and for any module whose ``forward`` reads ``training``
    (``self.training``, ``F.dropout(x, p, self.training)``: the name is in its bytecode); False for
    stateless modules such as ``nn.Flatten`` or ``nn.ReLU`` and for containers (their children are
    checked themselves).
    """
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return bool(module.track_running_stats)
    if isinstance(module, _MODE_DEPENDENT):
        return True
    if any(isinstance(hook, SpectralNorm) for hook in module._forward_pre_hooks.values()):
        return True
    code = getattr(type(module).forward, "__code__", None)
    return code is None or "training" in code.co_names


_BUFFER_WRITERS = (ObserverBase, FakeQuantizeBase)
"""Modules that write their buffers on every forward pass, in eval mode too: ``torch.ao`` observers
(calibration statistics) and fake quantizers (their observer's scale and zero point)."""


_WRITES_BUFFERS: dict[type, bool] = {}
"""``issubclass(kind, _BUFFER_WRITERS)`` per module type (an ABC check costs a microsecond)."""


def _writes_buffers(module: nn.Module) -> bool:
    """Whether ``module`` writes its buffers in eval mode too (:data:`_BUFFER_WRITERS`)."""
    kind = type(module)
    writes = _WRITES_BUFFERS.get(kind)
    if writes is None:
        if len(_WRITES_BUFFERS) >= 1024:  # fx makes a class per GraphModule: bounded
            _WRITES_BUFFERS.clear()
        writes = _WRITES_BUFFERS[kind] = issubclass(kind, _BUFFER_WRITERS)
    return writes


def warn_if_training(*models: nn.Module) -> bool:
    """Whether the call must keep the models' state (:func:`kept_as_it_was`); warns when it is
    because a module whose result depends on its training flag is in training mode.

    True also, without a warning, for a model in eval mode with a module that writes its buffers
    in any mode (:func:`_writes_buffers`). A freshly built stateless module (``nn.Flatten()`` in
    the head of an eval-mode network, a new ``nn.Sequential`` slice) is in training mode too, but
    that changes nothing: no warning, nothing kept.
    """
    kept = [_kept_for(model) for model in models]
    if "training" in kept:
        warnings.warn(
            "the model is in training mode: dropout and batch-norm make Grad-CAM maps random and "
            "mix examples; call model.eval() first (explain restores the buffers and the random "
            "state it used, so the model is left as it was)",
            TrainingModeWarning,
            stacklevel=4,
        )
        return True
    return "writes" in kept


@contextlib.contextmanager
def kept_as_it_was(models: tuple[nn.Module, ...], device: torch.device) -> Iterator[Callable[[], None]]:
    """Leave the models' buffers and torch's random state exactly as they were; yield ``rewind``.

    For a model in training mode, or with a module that writes its buffers in eval mode too (the
    caller skips it otherwise: nothing to do, nothing copied; :func:`warn_if_training`): batch
    norm then updates its running statistics and ``num_batches_tracked`` on every forward pass,
    observers their ranges, and dropout draws from the global generator. The buffers are copied
    before and copied back (into the same tensors, resized back where a module resized one) after;
    a buffer the model replaced is put back. The generator of the inputs' device is forked, and
    ``rewind()`` sets it back to its state at the start, so that every forward pass of one call
    (Grad-CAM, guided) draws the same dropout masks and two calls give the same maps.
    """
    saved = [
        (module, name, buffer, buffer.clone())
        for model in models for module in model.modules()
        for name, buffer in module._buffers.items() if buffer is not None
    ]
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in cuda]

        def rewind() -> None:
            torch.set_rng_state(cpu_state)
            for d, state in zip(cuda, cuda_states, strict=True):
                torch.cuda.set_rng_state(state, d)

        try:
            yield rewind
        finally:
            with torch.no_grad():
                for module, name, buffer, copy in saved:
                    module._buffers[name] = buffer
                    if buffer.shape != copy.shape:  # e.g. a per-channel observer's first statistics
                        buffer.resize_(copy.shape)
                    buffer.copy_(copy)


def _kept_for(model: nn.Module) -> str | None:
    """Why ``model``'s state must be kept: ``"training"`` when a module whose result depends on the
    flag is in training mode, else ``"writes"`` when a module writes its buffers in eval mode too
    (:func:`_writes_buffers`), else None.

    ``"training"`` is what ``any(m.training and _depends_on_mode(m) for m in model.modules())``
    says, without building every dotted name: a walk over ``_modules``, stopping at the first
    such module. Only modules with children are remembered (each is expanded once, so shared
    containers and cycles cost nothing more); a shared leaf may be looked at twice, which changes
    nothing. A tenth of a millisecond on EfficientNet-Lite0's 185 modules right after its forward
    pass; only modules with buffers are looked up for ``"writes"``.
    """
    stack: list[nn.Module | None] = [model]
    expanded: set[int] = set()
    writes = False
    while stack:
        module = stack.pop()
        if module is None:  # a child registered as None
            continue
        if module.training and _depends_on_mode(module):
            return "training"
        if not writes and module._buffers and _writes_buffers(module):
            writes = True
        children = module._modules
        if children and id(module) not in expanded:
            expanded.add(id(module))
            stack += children.values()
    return "writes" if writes else None

