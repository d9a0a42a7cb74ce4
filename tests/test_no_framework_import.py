"""The core and the backend registry never import a framework (array-api-compat's own test of the
same promise is the model): checked in a fresh interpreter, where nothing is imported yet."""

import subprocess
import sys

FRAMEWORKS = ("torch", "jax", "jaxlib", "flax", "tensorflow", "keras", "tf_keras_vis", "xplique")

SCRIPT = """
import sys
import numpy as np
import gradcam_ref
import gradcam_ref.backends
from gradcam_ref.backends import numpy_backend

# use the core and the NumPy backend end to end, including backend detection
model = numpy_backend.Oracle.random(np.random.default_rng(0), in_channels=1, widths=[2],
                                    kernel_sizes=[2], num_classes=3)
e = gradcam_ref.explain(model, np.ones((1, 1, 4, 4)))
gradcam_ref.normalize(gradcam_ref.upsample(e.maps, (8, 8)))
gradcam_ref.grad_cam_plus_plus(e.activations, e.gradients)
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in {frameworks!r})))
"""


def test_core_and_backend_registry_import_no_framework():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(frameworks=set(FRAMEWORKS))],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "", f"frameworks imported: {out.stdout.strip()}"


def test_the_frameworks_are_importable_so_the_check_above_means_something():
    """The same interpreter can import torch and jax (and find tensorflow and keras): the empty list
    above is not for lack of them."""
    import importlib.util

    assert importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("keras") is not None
    out = subprocess.run(
        [sys.executable, "-c", "import torch, jax, sys; print('torch' in sys.modules and 'jax' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "True"
