"""Every backend on inputs where gradients are delicate: exact zeros (ReLU kinks: pre-activations
exactly 0), ties, subnormals. The NumPy oracle, torch and JAX must agree, warnings included
(JAX on inputs without subnormals: XLA flushes them to zero, see the last test).

A new backend joins ``BACKENDS`` below; the strategies are :mod:`tests.strategies`.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradcam_ref
from gradcam_ref.backends.numpy_backend import Oracle
from gradcam_ref.verify.twins import jax_oracle, torch_oracle
from tests.strategies import edgy_arrays, moderate_values

SHAPE = (2, 2, 5, 5)  # fixed: JAX compiles once


def oracle(zero_bias: bool) -> Oracle:
    net = Oracle.random(np.random.default_rng(5), in_channels=2, widths=[3, 4], kernel_sizes=[2, 2], num_classes=3,
                        head="gap-mlp")
    if zero_bias:  # zero inputs then give pre-activations of exactly 0: every ReLU sits on its kink
        net.convs = [(w, np.zeros_like(b)) for w, b in net.convs]
    return net


ORACLES = {zero: oracle(zero) for zero in (False, True)}
TORCH = {zero: torch_oracle(net, torch.float64, inplace=False) for zero, net in ORACLES.items()}
with jax.enable_x64(True):
    JAX = {(zero, layer): jax_oracle(net, layer=layer) for zero, net in ORACLES.items() for layer in ("conv1", "relu1")}


def run(backend: str, zero: bool, layer: str, x: np.ndarray, target: list[int]):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if backend == "numpy":
            e = gradcam_ref.explain(ORACLES[zero], x, target, layer=layer)
        elif backend == "torch":
            e = gradcam_ref.explain(TORCH[zero], torch.as_tensor(x), target, layer=layer)
        else:
            with jax.enable_x64(True):
                e = gradcam_ref.explain(JAX[zero, layer], jax.numpy.asarray(x), target)
    zero_warned = any(issubclass(w.category, gradcam_ref.ZeroGradientWarning) for w in caught)
    return e.numpy(), zero_warned


BACKENDS = ("numpy", "torch", "jax")


@given(edgy_arrays(SHAPE, elements=moderate_values), st.booleans(), st.sampled_from(["conv1", "relu1"]),
       st.lists(st.integers(0, 2), min_size=2, max_size=2))
def test_backends_agree_on_kinks_ties_and_subnormals(x, zero, layer, target):
    # XLA on CPU flushes subnormal numbers to zero (test below): JAX joins only without tiny values.
    tiny = bool(((x != 0) & (np.abs(x) < 1e-290)).any())
    results = {name: run(name, zero, layer, x, target) for name in BACKENDS if not (tiny and name == "jax")}
    reference, warned = results["numpy"]
    scale = max(float(np.abs(reference.gradients).max()), 1e-300)
    for name, (e, zero_warned) in results.items():
        assert zero_warned == warned, f"{name} {'did not warn' if warned else 'warned'} about zero gradients"
        assert np.isfinite(e.maps).all()
        np.testing.assert_allclose(e.gradients, reference.gradients, rtol=1e-10, atol=1e-10 * scale, err_msg=name)
        np.testing.assert_allclose(e.maps, reference.maps, rtol=1e-10,
                                   atol=1e-10 * max(float(np.abs(reference.maps).max()), 1e-300), err_msg=name)


def test_all_zero_input_sits_on_every_kink():
    """x = 0 with zero biases: every pre-activation is exactly 0, ReLU'(0) = 0 everywhere, so the
    gradient at conv1 is zero and every backend warns."""
    x = np.zeros(SHAPE)
    for name in BACKENDS:
        e, warned = run(name, True, "conv1", x, [0, 1])
        assert warned, name
        np.testing.assert_array_equal(e.maps, np.zeros((2, 3, 3)))


def test_jax_flushes_subnormals_to_zero():
    """XLA's CPU backend computes with subnormals flushed to zero (FTZ/DAZ), unlike NumPy and torch:
    on inputs of 5e-324 with zero biases JAX sits on every ReLU kink, as for x = 0."""
    x = np.full(SHAPE, 5e-324)
    flushed, warned = run("jax", True, "conv1", x, [0, 1])
    assert warned
    np.testing.assert_array_equal(flushed.gradients, run("jax", True, "conv1", np.zeros(SHAPE), [0, 1])[0].gradients)
    exact, _ = run("numpy", True, "conv1", x, [0, 1])
    assert np.abs(exact.gradients).max() > 0  # NumPy (and torch) keep the subnormals
