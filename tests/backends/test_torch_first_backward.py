"""The torch backend's backward pass: the scalar form sum(seed * y) gives the vector-Jacobian product
that grad_outputs=seed gives, to the bit, and a process's first explanation imports no sympy."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcam_ref.backends.torch import _backward

ROOT = Path(__file__).resolve().parents[2]

values = st.one_of(st.just(0.0), st.just(1e-300), st.just(-1e300),
                   st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 4), k=st.integers(1, 3), c=st.integers(1, 5), seed=st.integers(0, 2**32 - 1),
       fill=st.lists(values, min_size=1, max_size=8), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_the_scalar_form_equals_grad_outputs_to_the_bit(n, k, c, seed, fill, dtype):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k, 3, 3, generator=generator, dtype=torch.float64)
    a.view(-1)[:len(fill)] = torch.tensor(fill, dtype=torch.float64)[: a.numel()]  # exact zeros, huge, tiny
    a = a.to(dtype).requires_grad_(True)
    w = torch.randn(k * 9, c, generator=generator, dtype=dtype)
    scores = torch.tanh(a.flatten(1)) @ w + torch.relu(a).amax(dim=(1, 2, 3))[:, None]  # ties, kinks
    targets = torch.randint(0, c, (n,), generator=generator).numpy()
    one_hot = torch.zeros_like(scores).scatter_(1, torch.as_tensor(targets[:, None]), 1.0)
    (expected,) = torch.autograd.grad(scores, [a], grad_outputs=one_hot, retain_graph=True)
    for imported in (False, True):  # the scalar form, then grad_outputs (once symbolic shapes are imported)
        with mock.patch.object(_backward, "_symbolic_shapes_imported", lambda imported=imported: imported):
            got = _backward.gradients(scores, a, targets, "A", attached="stop")  # "stop": keep the graph
        assert got.dtype == expected.dtype and torch.equal(got, expected)
        assert np.array_equal(got.numpy().view(np.uint8), expected.numpy().view(np.uint8))  # -0.0 too


def test_a_first_explanation_imports_no_symbolic_shapes():
    script = textwrap.dedent("""
        import sys, torch
        import gradcam_ref
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), torch.nn.Linear(4, 3))
        e = gradcam_ref.explain(model, torch.randn(2, 3, 8, 8), layer="1")
        assert e.maps.shape == (2, 6, 6)
        print("torch.fx.experimental.symbolic_shapes" in sys.modules, "sympy" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]
