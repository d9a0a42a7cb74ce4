"""The TensorFlow peers' CAM family: gradcam_ref's variant of each method beside the library's own call.

    python -m benchmarks.bench_tf_family [--rounds N] [--threads N]   (prints the rows as JSON)

Model: EfficientNet-Lite0 ported to Keras (float32), one image, one target, layer ``"head"`` (its
last ReLU6, A is ``(1, 7, 7, 1280)``). Every row is a ratio to the compiled no-grad forward of the
same model, measured in the same rounds (alternating, random order; :func:`benchmarks.timing.paired_ratios`),
with the load average beside it. The pairs:

- Grad-CAM++: ``explain(..., method="grad-cam++", variant="tf-keras-vis")`` and tf-keras-vis's
  ``GradcamPlusPlus`` (``seek_penultimate_conv_layer=False``: the same layer);
- LayerCAM: ``explain(..., method="layercam")`` and tf-keras-vis's ``Layercam``;
- FEM: ``explain(..., method="fem")`` and xplique's ``FEM(model, conv_layer="head")``.

Each library's map is post-processed its way (``heatmap(size, convention)`` for ours), so both
sides return what a user displays. Score-CAM is not here: 1280 masked forward passes per image
(its torch rows: ``bench_family``). Runs in its own interpreter (TensorFlow; see bench_tensorflow).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

from benchmarks.timing import paired_ratios

FORWARD = "compiled forward"
LAYER = "head"


def _calls(model: Any, x: np.ndarray, target: int) -> dict[str, Any]:
    import tensorflow as tf
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.layercam import Layercam
    from tf_keras_vis.utils.scores import CategoricalScore
    from xplique.attributions import FEM

    import gradcam_ref

    forward = tf.function(lambda v: model(v, training=False))
    xt = tf.constant(x)
    size = x.shape[1:3]

    def ours(method: str, convention: str, **options: Any) -> Any:
        return lambda: np.asarray(gradcam_ref.explain(model, xt, [target], layer=LAYER, method=method, **options)
                                  .heatmap(size, convention))

    score = CategoricalScore([target])
    plus_plus, layercam, fem = GradcamPlusPlus(model), Layercam(model), FEM(model, conv_layer=LAYER)
    return {
        FORWARD: lambda: forward(xt).numpy(),
        "gradcam_ref grad-cam++ (tf-keras-vis variant)": ours("grad-cam++", "tf-keras-vis", variant="tf-keras-vis"),
        "tf-keras-vis GradcamPlusPlus": lambda: plus_plus(score, x, penultimate_layer=LAYER,
                                                          seek_penultimate_conv_layer=False),
        "gradcam_ref layercam": ours("layercam", "tf-keras-vis"),
        "tf-keras-vis Layercam": lambda: layercam(score, x, penultimate_layer=LAYER, seek_penultimate_conv_layer=False),
        "gradcam_ref fem": ours("fem", "xplique"),
        "xplique FEM": lambda: np.asarray(fem.explain(x)),
    }


PAIRS = (("gradcam_ref grad-cam++ (tf-keras-vis variant)", "tf-keras-vis GradcamPlusPlus"),
         ("gradcam_ref layercam", "tf-keras-vis Layercam"), ("gradcam_ref fem", "xplique FEM"))
"""(ours, the library's) for each method: the same map (a test checks it on a tiny model)."""


def run(rounds: int = 15, model: Any = None, name: str = "efficientnet_lite0") -> list[dict]:
    """One row per method: ratio to the compiled forward (median of per-round ratios, quartiles).

    ``model``: a Keras model with a layer named ``"head"`` (default: EfficientNet-Lite0, float32).
    """
    if model is None:
        from gradcam_ref.zoo import efficientnet_lite0

        model = efficientnet_lite0.load_keras("float32")
    x = np.random.default_rng(0).standard_normal((1, *model.input_shape[1:])).astype(np.float32)
    calls = _calls(model, x, 3)
    before = os.getloadavg()
    results = paired_ratios(calls, FORWARD, rounds=rounds, warmup=2)
    load = [round(max(a, b), 2) for a, b in zip(before, os.getloadavg(), strict=True)]
    return [{"suite": "tf-family", "model": name, "layer": LAYER, "batch": 1, "targets": 1,
             "method": method, "library": method.split()[0], **r, "load_average": load}
            for method, r in results.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import importlib.util
    import warnings

    if importlib.util.find_spec("torchvision"):
        import torchvision  # noqa: F401  (before TensorFlow: the other order crashes)
    import tensorflow as tf

    warnings.filterwarnings("ignore")
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    json.dump(run(rounds=args.rounds), sys.stdout, default=float, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
