"""The peer libraries run on the cases ``verify`` compares them on, each against its convention.

Each :class:`Peer` runs the library itself on a torch model and returns its maps; the checks
compare them with ``Explanation.heatmap(convention=...)`` of the same model, layer, input and
targets within :data:`PEER_RTOL` of the map's largest magnitude.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

import gradcam_ref
from gradcam_ref._arrays import to_numpy
from gradcam_ref.backends.numpy_backend import Oracle
from gradcam_ref.verify import goldens
from gradcam_ref.verify._checks import PEER_RTOL, Check, MethodPeer, PeerCase, compare, installed
from gradcam_ref.verify.twins import torch_oracle


def peer_cases() -> list[PeerCase]:
    """The models the peers are compared on: small CNNs (float64 and float32) and resnet18."""
    import torch
    from torch import nn

    golden = goldens.load("random_gap_2d")
    cases = [PeerCase("random_gap_2d (float64)", torch_oracle(Oracle(*golden.oracle()), inplace=False), "relu1",
                      torch.from_numpy(golden.inputs), [int(t) for t in golden.targets])]
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()
    with torch.no_grad():  # batch-norm statistics that are not the identity
        bn: Any = cnn[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 19, 19, generator=torch.Generator().manual_seed(1))
    cases.append(PeerCase("cnn-bn-pool 19x19 -> 7x7 (float32)", cnn, "4", x, [1, 7, 4]))
    if installed("torchvision") and torchvision_is_safe():
        import torchvision

        torch.manual_seed(0)
        resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        cases.append(PeerCase("resnet18 random init, layer3 (float32)", resnet, "layer3", x, [3, 8]))
    return cases


def torchvision_is_safe() -> bool:
    """False when TensorFlow is imported and torchvision is not: importing torchvision now would
    crash the interpreter (torch 2.14.1, torchvision 0.29.1, tensorflow 2.21.0; docs/backends.md)."""
    return "torchvision" in sys.modules or "tensorflow" not in sys.modules


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
)
"""The torch peers compared with their conventions (tf-keras-vis and xplique: :mod:`gradcam_ref.verify.tf_peers`)."""


# --- the CAM family: each method of each peer against its convention -------------------------


def _pgc_method(class_name: str) -> Callable[[PeerCase], np.ndarray]:
    def run(case: PeerCase) -> np.ndarray:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cls = getattr(pytorch_grad_cam, class_name)
        with cls(model=case.model, target_layers=[case.model.get_submodule(case.layer)]) as method:
            maps = method(input_tensor=case.inputs, targets=[ClassifierOutputTarget(t) for t in case.targets])
        case.model.zero_grad(set_to_none=True)  # it leaves .grad on every parameter
        return maps

    return run


def _torchcam_method(class_name: str) -> Callable[[PeerCase], np.ndarray]:
    def run(case: PeerCase) -> np.ndarray:
        import torch
        import torchcam.methods

        cls = getattr(torchcam.methods, class_name)
        with cls(case.model, target_layer=case.layer, input_shape=tuple(case.inputs.shape[1:])) as extractor, \
                torch.enable_grad():
            scores = case.model(case.inputs)
            (maps,) = extractor(class_idx=list(case.targets), scores=scores)
        return maps.detach().numpy()

    return run


SMOOTH_SEED = 0
"""torch's global seed before torchcam's SmoothGradCAMpp draws its noise (and before ours draws the same)."""


def torchcam_noise(case: PeerCase, n_samples: int = 4, std: float = 0.3) -> list[Any]:
    """The noise torchcam's ``SmoothGradCAMpp`` (defaults n=4, std=0.3) draws after ``torch.manual_seed(SMOOTH_SEED)``.

    It calls ``torch.distributions.Normal(0, std).sample(x.shape)`` once per sample on torch's
    global generator, and nothing between the draws uses that generator (eval-mode models).
    """
    import torch

    torch.manual_seed(SMOOTH_SEED)
    normal = torch.distributions.Normal(0, std)
    return [normal.sample(case.inputs.size()).to(device=case.inputs.device) for _ in range(n_samples)]


def _torchcam_smooth(case: PeerCase) -> np.ndarray:
    import torch
    from torchcam.methods import SmoothGradCAMpp

    torch.manual_seed(SMOOTH_SEED)
    with SmoothGradCAMpp(case.model, target_layer=case.layer, input_shape=tuple(case.inputs.shape[1:])) as extractor, \
            torch.enable_grad():
        case.model(case.inputs)
        (maps,) = extractor(class_idx=list(case.targets))
    case.model.zero_grad(set_to_none=True)
    return maps.detach().numpy()


_PGC = {"grad-cam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "xgrad-cam": "XGradCAM",
        "layercam": "LayerCAM", "eigen-cam": "EigenCAM", "eigen-grad-cam": "EigenGradCAM",
        "score-cam": "ScoreCAM", "ablation-cam": "AblationCAM"}
_TORCHCAM = {"xgrad-cam": "XGradCAM", "layercam": "LayerCAM", "score-cam": "ScoreCAM"}
_PERTURBATION = ("score-cam", "ablation-cam")

METHOD_PEERS = tuple(
    MethodPeer("pytorch-grad-cam", method, f"pytorch_grad_cam.{cls}", "pytorch_grad_cam", "grad-cam",
               _pgc_method(cls), True, method in _PERTURBATION) for method, cls in _PGC.items()
) + tuple(
    MethodPeer("torchcam", method, f"torchcam.methods.{cls}", "torchcam", "torchcam",
               _torchcam_method(cls), False, method in _PERTURBATION) for method, cls in _TORCHCAM.items()
) + (MethodPeer("torchcam", "smooth-grad-cam++", "torchcam.methods.SmoothGradCAMpp", "torchcam", "torchcam",
                _torchcam_smooth, False),)
"""Every CAM method of pytorch-grad-cam 1.5.7 and torchcam 0.5 that a convention reproduces."""


def method_options(convention: str, method: str) -> dict[str, Any]:
    """The ``explain`` options that select ``convention``'s variant of a method fixed at ``explain`` time."""
    from gradcam_ref.conventions import get_convention

    fixed = method in _PERTURBATION or method == "smooth-grad-cam++"
    return dict(get_convention(convention).methods[method]) if fixed else {}


def method_peer_checks(
    cases: list[PeerCase] | None = None, *, perturbation: str = "all"
) -> tuple[list[Check], list[str]]:
    """Each installed peer's CAM methods against their conventions on every case.

    ``perturbation``: ``"all"`` runs Score-CAM and Ablation-CAM on every case (a model run per
    channel and image, minutes on resnet18 on a CPU), ``"small"`` on the small CNNs only,
    ``"none"`` skips them.
    """
    if not installed("torch"):
        return [], ["method peers: torch is not installed, so no peer ran"]
    peers = [p for p in METHOD_PEERS if installed(p.module)]
    notes = sorted({f"method peers: {p.distribution} is not installed, so its methods were not compared"
                    for p in METHOD_PEERS if p not in peers})
    checks = []
    for case in cases if cases is not None else peer_cases():
        input_size = tuple(int(s) for s in case.inputs.shape[2:])
        for peer in peers:
            if peer.perturbation and (perturbation == "none" or (perturbation == "small" and "resnet" in case.name)):
                continue
            with warnings.catch_warnings():  # the library divides by negative scores too: reproduced
                warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
                options = {**method_options(peer.convention, peer.method), **peer.options}
                if peer.method == "smooth-grad-cam++":  # torch's generator, seeded as before torchcam's run
                    options["noise"] = torchcam_noise(case)
                e = gradcam_ref.explain(case.model, case.inputs, case.targets, layer=case.layer,
                                        method=peer.method, **options)
            checks.append(peer.check(case, e, input_size))
    if perturbation != "all":
        notes.append(f"method peers: Score-CAM and Ablation-CAM compared on {perturbation} cases only")
    return checks, notes


def peer_checks(cases: list[PeerCase] | None = None) -> tuple[list[Check], list[str]]:
    """Each installed peer against its convention on every case.

    When TensorFlow is already imported (and ``cases`` is None), the torch peers run in a fresh
    interpreter: torch's backward and torchvision have crashed processes that imported TensorFlow
    first (torch 2.14.1, torchvision 0.29.1, tensorflow 2.21.0).
    """
    if not installed("torch"):
        return [], ["peers: torch is not installed, so no peer ran"]
    if cases is None and "tensorflow" in sys.modules:
        return _isolated()
    peers = [p for p in PEERS if installed(p.module)]
    notes = [f"peers: {p.distribution} is not installed, so the {p.convention!r} convention was not "
             "compared with it" for p in PEERS if p not in peers]
    if installed("torchvision") and not torchvision_is_safe():
        notes.append("peers: resnet18 left out: TensorFlow was imported before torchvision in this process, "
                     "and importing torchvision now would crash it (import torchvision first)")
    checks = []
    for case in cases if cases is not None else peer_cases():
        e = gradcam_ref.explain(case.model, case.inputs, case.targets, layer=case.layer)
        input_size = tuple(int(s) for s in case.inputs.shape[2:])
        for peer in peers:
            expected = peer.run(case, input_size, e)
            ours = e.heatmap(input_size if peer.at_input_size else None, peer.convention)
            version = importlib.metadata.version(peer.distribution)
            what = f"{peer.distribution} {version}"
            checks.append(compare(f"{peer.convention} on {case.name}", what,
                                  to_numpy(ours), expected, PEER_RTOL))
    return checks, notes


def _isolated() -> tuple[list[Check], list[str]]:
    """:func:`peer_checks` in a fresh interpreter (``python -m gradcam_ref.verify.peers``)."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-m", "gradcam_ref.verify.peers"], capture_output=True, text=True)
    note = "peers: run in a fresh interpreter, TensorFlow being imported in this one"
    if out.returncode != 0:
        tail = " | ".join(out.stderr.strip().splitlines()[-3:])
        return [Check("torch peers (subprocess)", f"exit status {out.returncode}: {tail}", float("inf"), 0.0)], [note]
    result = json.loads(out.stdout)
    return [Check(**c) for c in result["checks"]], [note, *result["notes"]]


if __name__ == "__main__":
    import json

    found, written = peer_checks()
    json.dump({"checks": [dataclasses.asdict(c) for c in found], "notes": written}, sys.stdout)

