"""The JAX backend's promises under bad or unusual use: no memory kept after the caller lets go,
a signal (NaN) for traced targets out of range, the zero-gradient warning, clear errors."""

from __future__ import annotations

import gc
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradcam_ref
from gradcam_ref.backends import jax as jax_backend

W = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), dtype=jnp.float32)
X = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 4, 4)), dtype=jnp.float32)


def features(x):
    return jax.nn.relu(x)


def head(a):
    return a.mean(axis=(2, 3)) @ W


def head_holding(big):
    return lambda a: a.mean(axis=(2, 3)) @ W + jnp.asarray(big[:1, :4])


def test_guided_records_release_the_callers_closures():
    """Explaining with new closures, each holding a large array, keeps none of them once dropped."""
    refs = []
    before = len(jax_backend._GUIDED_RECORDS)  # records of other tests' live functions stay
    for i in range(5):
        big = np.full((1000, 1000), float(i), dtype=np.float32)  # 4 MB each, held by the closure
        h = head_holding(big)
        gradcam_ref.explain((features, h), X, guided=True)
        refs.append((weakref.ref(h), weakref.ref(big)))
        del h, big
    jax.clear_caches()  # jax.jit's cache holds static arguments until then: JAX's own rule
    gc.collect()
    assert all(h() is None and b() is None for h, b in refs)
    assert len(jax_backend._GUIDED_RECORDS) <= before  # none of the five closures' records is left


class Unreferenceable:
    """A hashable callable that cannot be weakly referenced (__slots__ without __weakref__)."""

    __slots__ = ("k",)

    def __init__(self, k):
        self.k = k

    def __call__(self, a):
        return a.mean(axis=(2, 3)) @ W * self.k

    def __hash__(self):
        return hash(self.k)

    def __eq__(self, other):
        return isinstance(other, Unreferenceable) and other.k == self.k


def test_guided_records_of_unreferenceable_functions_are_bounded():
    for k in range(jax_backend._WeakRecords.STRONG_LIMIT + 5):
        gradcam_ref.explain((features, Unreferenceable(float(k + 1))), X, guided=True)
    assert len(jax_backend._GUIDED_RECORDS._strong) == jax_backend._WeakRecords.STRONG_LIMIT
    jax.clear_caches()


class Model:
    """Bound methods are made anew at each attribute access (and compare equal)."""

    def features(self, x):
        return jnp.tanh(x)  # no ReLU: the guided pass warns

    def head(self, a):
        return a.mean(axis=(2, 3)) @ W


def test_guided_warnings_survive_the_jit_cache_for_bound_methods():
    model = Model()
    for _ in range(2):  # the second call hits jax.jit's cache: the record must still be found
        with pytest.warns(gradcam_ref.NoGuidedReLUWarning, match="no ReLU"):
            gradcam_ref.explain((model.features, model.head), X, guided=True)


def test_traced_targets_out_of_range_poison_their_maps_with_nan():
    """NaN, not a silent zero map, for exactly the examples whose traced target is out of range."""

    @jax.jit
    def run(x, labels):
        e = gradcam_ref.explain((features, head), x, labels, guided=True)
        return e.maps, e.weights, e.gradients, e.guided_backprop

    x = jnp.concatenate([X, X])
    labels = jnp.asarray([1, 4, -1, 3])  # C = 4: 4 and -1 are out of range
    maps, weights, gradients, guided = run(x, labels)
    bad = np.array([False, True, True, False])
    for field in (maps, weights, gradients, guided):
        field = np.asarray(field)
        assert np.isnan(field[bad]).all() and np.isfinite(field[~bad]).all()
    eager = gradcam_ref.explain((features, head), x[~bad], np.asarray(labels)[~bad])
    np.testing.assert_array_equal(np.asarray(maps)[~bad], eager.maps)
    # (N, T): per (example, target)
    multi = jax.jit(lambda x, t: gradcam_ref.explain((features, head), x, t).maps)(X, jnp.asarray([[0, 7], [2, 1]]))
    assert np.isnan(np.asarray(multi)[0, 1]).all()
    assert np.isfinite(np.asarray(multi)[[0, 1, 1], [0, 0, 1]]).all()


def test_zero_gradients_warn_as_in_torch():
    mask = jnp.asarray([1.0, 0.0], dtype=jnp.float32)
    with pytest.warns(gradcam_ref.ZeroGradientWarning, match=r"exactly zero for example \[1\]"):
        e = gradcam_ref.explain((features, head), X, lambda s: s[:, 0] * mask)
    assert float(jnp.abs(e.maps[1]).max()) == 0.0 and float(jnp.abs(e.maps[0]).max()) > 0
    w = W.at[:, 3].set(0.0)  # class 3 ignores the features
    with pytest.warns(gradcam_ref.ZeroGradientWarning, match=r"\(example, target\) \[\(1, 1\)\]:"):
        gradcam_ref.explain((features, lambda a: a.mean(axis=(2, 3)) @ w), X, [[0, 1], [2, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradcam_ref.explain((features, head), X, [0, 1])  # non-zero gradients: silent
        jax.jit(lambda x: gradcam_ref.explain((features, head), x, lambda s: s[:, 0] * mask).maps)(X)  # traced: no host read


@pytest.mark.parametrize("out", [lambda s: (s, s), lambda s: {"logits": s}])
def test_a_head_returning_a_tuple_or_dict_gets_a_clear_error(out):
    def many(a):
        return out(a.mean(axis=(2, 3)) @ W)

    with pytest.raises(TypeError, match=r"head\(A\) must return one array of scores, got a (tuple|dict); .*head\(a\)\[0\]"):
        gradcam_ref.explain((features, many), X)
