"""Importing torchvision after TensorFlow crashes the interpreter (torch 2.14.1, torchvision 0.29.1,
tensorflow 2.21.0; torch's backward crashed such a process too, once in a few runs). gradcam_ref never
does it: verify's TensorFlow half runs in its own interpreter, and the torch peers run in a fresh
one when TensorFlow came first. Checked in fresh interpreters, in the order that crashes."""

import subprocess
import sys

BAD_ORDER = """
import sys
import numpy as np
import keras, tensorflow as tf          # TensorFlow first: the order that crashes torchvision
import gradcam_ref
from gradcam_ref.verify import peers

inputs = keras.Input((6, 6, 1))
x = keras.layers.Conv2D(2, 3, name="conv")(inputs)
model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
e = gradcam_ref.explain(model, np.ones((1, 6, 6, 1), np.float32), layer="conv")
checks, notes = peers.peer_checks()     # the torch peers, through our API, after TensorFlow
assert checks and all(c.passed for c in checks), [c for c in checks if not c.passed]
assert any("fresh interpreter" in n for n in notes), notes
assert any("resnet18" in c.check for c in checks)  # torchvision's model ran, over there
print("torchvision" in sys.modules, e.maps.shape)
"""


def test_tensorflow_then_the_torch_peers_does_not_crash():
    out = subprocess.run([sys.executable, "-c", BAD_ORDER], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "False"  # torchvision was never imported after TensorFlow


def test_verify_runs_the_tensorflow_half_in_a_fresh_interpreter():
    """The parent process of verify never imports TensorFlow (so it may import torchvision freely);
    Score-CAM and Ablation-CAM on the small cases, as the ``report`` fixture of tests/verify runs them."""
    script = ("import sys\nfrom gradcam_ref.verify import tf_peers\n"
              "tf_peers.run_isolated = lambda directory=None, timeout=0, perturbation='all': ([], [])\n"
              "import gradcam_ref.verify as v\nv.peer_checks = lambda: ([], [])\nv.run(perturbation='small')\n"
              "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]
