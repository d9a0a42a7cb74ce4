"""The TensorFlow half of ``verify``: goldens on the TensorFlow backend, tf-keras-vis and xplique themselves.

It runs in its own interpreter (:func:`run_isolated`, ``python -m gradcam_ref.verify.tf_peers``),
because importing torchvision after TensorFlow crashes the process (torch 2.14.1, torchvision
0.29.1, tensorflow 2.21.0: a segmentation fault); the parent, which runs the torch peers, never
imports TensorFlow. The child imports torchvision first when it is installed (the safe order) and
prints its checks as JSON.

Each library runs on Keras twins of the nets ``verify`` uses (:func:`keras_cases`) and is compared
with ``Explanation.heatmap(convention=...)`` of the same model, input and targets, at the layer the
library actually differentiates: tf-keras-vis resolves ``penultimate_layer`` with its
``find_layer`` (:func:`tf_keras_vis_layer`), and the check's name says which layer that was.
The rest of their CAM family (:data:`METHOD_PEERS`: tf-keras-vis's Layercam, GradcamPlusPlus and
Scorecam, xplique's FEM) is compared with ``explain(method=...)`` under the library's variant
the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from gradcam_ref.verify._checks import PEER_RTOL, Check, MethodPeer, compare, installed
from gradcam_ref.verify._checks import PeerCase as KerasCase

__all__ = ["METHOD_PEERS", "KerasCase", "MethodPeer", "keras_cases", "main", "method_peer_checks", "peer_checks",
           "run_isolated", "tf_keras_vis_layer"]


def keras_cases() -> list[KerasCase]:
    """Keras twins of the verify nets: the random_gap_2d oracle (float64, float32), a conv-BN-pool
    CNN (float32) and a random-init MobileNetV2 (ReLU6, batch norm; float32) at its last layer
    (2x2) and at an 8x8 residual sum."""
    import keras

    from gradcam_ref.backends.numpy_backend import Oracle
    from gradcam_ref.verify import goldens
    from gradcam_ref.verify.twins import keras_oracle

    golden = goldens.load("random_gap_2d")
    x = np.ascontiguousarray(np.moveaxis(golden.inputs, 1, -1))
    targets = [int(t) for t in golden.targets]
    cases = [KerasCase("random_gap_2d (float64)", keras_oracle(Oracle(*golden.oracle()), "float64"), "relu1",
                       x, targets),
             KerasCase("random_gap_2d (float32)", keras_oracle(Oracle(*golden.oracle()), "float32"), "relu1",
                       x.astype(np.float32), targets)]
    keras.utils.set_random_seed(0)
    cnn = keras.Sequential([
        keras.Input((19, 19, 3)),
        keras.layers.Conv2D(8, 3, padding="same", name="conv0"), keras.layers.BatchNormalization(name="bn0"),
        keras.layers.ReLU(name="relu0"), keras.layers.MaxPooling2D(2, name="pool0"),
        keras.layers.Conv2D(16, 3, name="conv1"), keras.layers.ReLU(name="relu1"),
        keras.layers.GlobalAveragePooling2D(name="gap"), keras.layers.Dense(10, name="fc"),
    ], name="cnn_bn_pool")
    rng = np.random.default_rng(1)
    bn = cnn.get_layer("bn0")  # statistics that are not the identity
    gamma, beta, _, _ = bn.get_weights()
    bn.set_weights([gamma, beta, rng.uniform(-0.5, 0.5, 8).astype(np.float32),
                    rng.uniform(0.5, 2.0, 8).astype(np.float32)])
    x = rng.standard_normal((3, 19, 19, 3)).astype(np.float32)
    cases.append(KerasCase("cnn-bn-pool 19x19 -> 7x7 (float32, Keras)", cnn, "relu1", x, [1, 7, 4]))
    keras.utils.set_random_seed(0)
    mobilenet = keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, weights=None, classes=10,
                                               classifier_activation=None)
    x = np.random.default_rng(2).standard_normal((2, 64, 64, 3)).astype(np.float32)
    cases.append(KerasCase("MobileNetV2 a=0.35 random init (float32)", mobilenet, "out_relu", x, [3, 8]))
    # an 8x8 layer in the middle (a residual sum): out_relu is 2x2, where FEM's 2-sigma masks are empty
    cases.append(KerasCase("MobileNetV2 a=0.35 random init, 8x8 block (float32)", mobilenet, "block_5_add", x, [3, 8]))
    return cases


def tf_keras_vis_layer(model: Any, name: str) -> str:
    """The layer tf-keras-vis 0.8.7 differentiates for ``penultimate_layer=name`` (the default
    ``seek_penultimate_conv_layer=True``): walking ``model.layers`` backwards from the named layer
    (nested models searched too), the first convolution, the named layer included."""
    from keras.src.layers.convolutional.base_conv import BaseConv

    def walk(layers: list[Any], started: bool) -> tuple[Any, bool]:
        for layer in reversed(layers):
            started = started or layer.name == name
            if started and isinstance(layer, BaseConv):
                return layer, started
            if hasattr(layer, "layers"):
                found, started = walk(layer.layers, started)
                if found is not None:
                    return found, started
        return None, started

    found, _ = walk(model.layers, False)
    if found is None:
        raise ValueError(f"tf-keras-vis finds no convolution at or before layer {name!r}")
    return str(found.name)


def _tf_keras_vis(case: KerasCase) -> tuple[np.ndarray, str]:
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.utils.scores import CategoricalScore

    maps = Gradcam(case.model)(CategoricalScore(case.targets), case.inputs, penultimate_layer=case.layer)
    return np.asarray(maps), tf_keras_vis_layer(case.model, case.layer)


def _xplique(case: KerasCase) -> tuple[np.ndarray, str]:
    from xplique.attributions import GradCAM

    classes = int(case.model.output_shape[-1])
    one_hot = np.eye(classes, dtype=np.float32)[case.targets]
    maps = GradCAM(case.model, conv_layer=case.layer).explain(case.inputs, one_hot)
    return np.asarray(maps)[..., 0], case.layer


PEERS = (("tf-keras-vis", "tf_keras_vis", "tf-keras-vis", _tf_keras_vis),
         ("xplique", "xplique", "xplique", _xplique))
"""(convention, module, distribution, run): ``run(case) -> (maps (N, H, W), layer explained)``."""


def peer_checks(cases: list[KerasCase] | None = None) -> tuple[list[Check], list[str]]:
    """tf-keras-vis and xplique (those installed) against their conventions on the Keras cases."""
    import gradcam_ref

    peers = [p for p in PEERS if installed(p[1])]
    notes = [f"peers: {dist} is not installed, so the {conv!r} convention was not compared with it"
             for conv, module, dist, _ in PEERS if not installed(module)]
    checks = []
    for case in cases if cases is not None else keras_cases():
        size = tuple(int(s) for s in case.inputs.shape[1:-1])
        float32 = case.inputs.dtype == np.float32
        if not float32:
            notes.append(f"xplique on {case.name}: not run, xplique casts inputs and targets to float32 and "
                         "a float64 model then fails in tf.multiply(predictions, targets)")
        for convention, _, dist, run in peers:
            if convention == "xplique" and not float32:
                continue
            expected, layer = run(case)
            e = gradcam_ref.explain(case.model, case.inputs, case.targets, layer=layer)
            ours = e.heatmap(size, convention)
            where = f"layer {case.layer!r}" + (f" -> {layer!r}" if layer != case.layer else "")
            what = f"{dist} {importlib.metadata.version(dist)}"
            checks.append(compare(f"{convention} on {case.name}, {where}", what, np.asarray(ours), expected,
                                  PEER_RTOL))
        if installed("xplique") and float32:
            checks.append(_xplique_plus_plus(case, size))
    return checks, notes


def _xplique_plus_plus(case: KerasCase, size: tuple[int, ...]) -> Check:
    r"""xplique's GradCAMPP: :math:`\sum_{ab} A` of the paper's alpha is its spatial *mean*, so its
    map is ``grad_cam_plus_plus(A / Z, dA)`` (Z the layer's spatial size), then its resize."""
    from xplique.attributions import GradCAMPP

    import gradcam_ref

    classes = int(case.model.output_shape[-1])
    one_hot = np.eye(classes, dtype=np.float32)[case.targets]
    expected = np.asarray(GradCAMPP(case.model, conv_layer=case.layer).explain(case.inputs, one_hot))[..., 0]
    e = gradcam_ref.explain(case.model, case.inputs, case.targets, layer=case.layer).numpy()
    z = int(np.prod(e.activations.shape[2:]))
    signed = gradcam_ref.grad_cam_plus_plus(e.activations / z, e.gradients, relu=False)
    ours = gradcam_ref.conventions.postprocess(signed, "xplique", size=size)
    return compare(f"xplique GradCAMPP on {case.name}, layer {case.layer!r}",
                   f"xplique {importlib.metadata.version('xplique')}: grad_cam_plus_plus(A / Z, dA)",
                   ours, expected, PEER_RTOL)


# --- the rest of the CAM family: each method of each library against its convention's variant ---


def _tf_keras_vis_method(class_name: str, module: str, **options: Any) -> Callable[[KerasCase], np.ndarray]:
    def run(case: KerasCase) -> np.ndarray:
        import importlib

        from tf_keras_vis.utils.scores import CategoricalScore

        cls = getattr(importlib.import_module(module), class_name)
        return np.asarray(cls(case.model)(CategoricalScore(case.targets), case.inputs, penultimate_layer=case.layer,
                                          **options))

    return run


def _xplique_fem(case: KerasCase) -> np.ndarray:
    from xplique.attributions import FEM

    return np.asarray(FEM(case.model, conv_layer=case.layer).explain(case.inputs))[..., 0]


SCORECAM_FLOAT64 = ("its Scorecam casts the weights to float32 and K.batch_dot then refuses the float64 "
                    "activations (InvalidArgumentError)")

METHOD_PEERS = (
    MethodPeer("tf-keras-vis", "layercam", "tf_keras_vis.layercam.Layercam", "tf_keras_vis", "tf-keras-vis",
               _tf_keras_vis_method("Layercam", "tf_keras_vis.layercam"), True, resolves_layer=True),
    MethodPeer("tf-keras-vis", "grad-cam++", "tf_keras_vis.gradcam_plus_plus.GradcamPlusPlus", "tf_keras_vis",
               "tf-keras-vis", _tf_keras_vis_method("GradcamPlusPlus", "tf_keras_vis.gradcam_plus_plus"), True,
               resolves_layer=True),
    MethodPeer("tf-keras-vis", "score-cam", "tf_keras_vis.scorecam.Scorecam", "tf_keras_vis", "tf-keras-vis",
               _tf_keras_vis_method("Scorecam", "tf_keras_vis.scorecam"), True, perturbation=True,
               resolves_layer=True, float64=SCORECAM_FLOAT64),
    MethodPeer("tf-keras-vis", "score-cam", "tf_keras_vis.scorecam.Scorecam(max_N=2)", "tf_keras_vis",
               "tf-keras-vis", _tf_keras_vis_method("Scorecam", "tf_keras_vis.scorecam", max_N=2), True,
               perturbation=True, resolves_layer=True, float64=SCORECAM_FLOAT64, options={"max_n": 2}),
    MethodPeer("xplique", "fem", "xplique.attributions.FEM", "xplique", "xplique", _xplique_fem, True,
               float64="its k is a float32 tensor and k * std fails on float64 activations (TypeError)"),
)
"""Every CAM method of tf-keras-vis 0.8.7 and xplique 2.0.2 beyond Grad-CAM (and xplique's GradCAMPP,
:func:`peer_checks`) that a convention reproduces."""


SMALL_CHANNELS = 64
"""``perturbation="small"``: Score-CAM is compared at layers of at most this many channels."""


def method_peer_checks(cases: list[KerasCase] | None = None, *, perturbation: str = "all"
                       ) -> tuple[list[Check], list[str]]:
    """Each installed library's CAM methods (:data:`METHOD_PEERS`) against their conventions on every case.

    ``perturbation``: ``"all"`` runs Score-CAM on every case, ``"small"`` only at layers of at most
    :data:`SMALL_CHANNELS` channels (not MobileNetV2's last, 1280: a model run each), ``"none"`` nowhere.
    """
    import warnings

    import gradcam_ref
    from gradcam_ref.conventions import get_convention

    peers = [p for p in METHOD_PEERS if installed(p.module)]
    notes = sorted({f"method peers: {p.distribution} is not installed, so its {p.method} was not compared"
                    for p in METHOD_PEERS if p not in peers})
    notes += sorted({f"{p.call.split('(')[0]} on float64 models: not run, {p.float64}" for p in peers
                     if p.float64 is not True})
    if perturbation != "all":
        notes.append(f"tf-keras-vis Scorecam compared on {perturbation} cases only"
                     + (f" (layers of at most {SMALL_CHANNELS} channels)" if perturbation == "small" else ""))
    checks = []
    for case in cases if cases is not None else keras_cases():
        size = tuple(int(s) for s in case.inputs.shape[1:-1])
        for peer in peers:
            if peer.float64 is not True and case.inputs.dtype != np.float32:
                continue
            if peer.perturbation and (perturbation == "none" or (
                    perturbation == "small" and case.model.get_layer(case.layer).output.shape[-1] > SMALL_CHANNELS)):
                continue
            layer = tf_keras_vis_layer(case.model, case.layer) if peer.resolves_layer else case.layer
            options = {**get_convention(peer.convention).methods[peer.method], **peer.options}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", gradcam_ref.NonPositiveScoreWarning)
                e = gradcam_ref.explain(case.model, case.inputs, case.targets, layer=layer, method=peer.method,
                                        **options)
            where = f", layer {case.layer!r}" + (f" -> {layer!r}" if layer != case.layer else "")
            checks.append(peer.check(case, e, size, where))
    return checks, notes


def golden_checks(directory: str | None = None) -> tuple[list[Check], list[str]]:
    """Every golden on the TensorFlow backend (and, where installed, against torch on the same weights)."""
    from gradcam_ref.verify import golden_checks as all_golden_checks

    return all_golden_checks(directory, backends=["tensorflow"], heatmaps=False)


def main(argv: list[str] | None = None) -> None:
    """Print ``{"checks": [...], "notes": [...]}`` as JSON: what :func:`run_isolated` reads.

    ``argv``: ``[goldens directory] [--perturbation all|small|none]`` (default: the shipped goldens, all).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    perturbation = "all"
    if "--perturbation" in argv:
        at = argv.index("--perturbation")
        perturbation = argv[at + 1]
        del argv[at:at + 2]
    if installed("torchvision"):
        import torchvision  # noqa: F401  (before TensorFlow: the other order crashes)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON only (Keras's predict prints progress bars)
        checks, notes = golden_checks(argv[0] if argv else None)
        cases = keras_cases()
        more, more_notes = peer_checks(cases)
        methods, method_notes = method_peer_checks(cases, perturbation=perturbation)
    json.dump({"checks": [dataclasses.asdict(c) for c in checks + more + methods],
               "notes": notes + more_notes + method_notes}, sys.stdout)


def run_isolated(goldens_directory: Any = None, timeout: float = 1800, perturbation: str = "all"
                 ) -> tuple[list[Check], list[str]]:
    """``main()`` (``python -m gradcam_ref.verify.tf_peers``) in a fresh interpreter: its checks and
    notes (a failing check if it crashed, a note if TensorFlow is not installed)."""
    if not installed("tensorflow") or not installed("keras"):
        return [], ["tensorflow: not installed, so the TensorFlow backend, tf-keras-vis and xplique were not run"]
    args = [] if goldens_directory is None else [str(goldens_directory)]
    args += ["--perturbation", perturbation]
    out = subprocess.run([sys.executable, "-m", "gradcam_ref.verify.tf_peers", *args], capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-3:]
        return [Check("tensorflow checks (subprocess)", f"exit status {out.returncode}: {' | '.join(tail)}",
                      float("inf"), 0.0)], []
    try:
        result = json.loads(out.stdout)
    except json.JSONDecodeError:
        return [Check("tensorflow checks (subprocess)", f"its output is not JSON: {out.stdout[:200]!r}",
                      float("inf"), 0.0)], []
    return [Check(**c) for c in result["checks"]], result["notes"]


if __name__ == "__main__":
    main()
