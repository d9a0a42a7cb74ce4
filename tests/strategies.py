"""Hypothesis strategies for arrays where numerical defects live, shared by every test module.

Random normals almost never hit the values that break numerical code. These strategies draw
them on purpose: exact zeros (and -0.0), ties (arrays filled from a pool of a few values: flat
maps, equal maxima), ReLU kinks (0 next to tiny positive and negative values), subnormals, and
huge values up to the largest float64. Use them for every new method and backend:
``edgy_arrays(shape)`` for one array, ``feature_maps()`` for ``(activations, gradients)``.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

TINY = 5e-324  # the smallest subnormal float64
SMALLEST_NORMAL = 2.2250738585072014e-308
LARGEST = 1.7976931348623157e308

EDGES = (
    0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 3.0,  # exact zeros, small integers (ties, exact sums)
    TINY, -TINY, 3 * TINY, SMALLEST_NORMAL, -SMALLEST_NORMAL, 1e-300,  # subnormals, ReLU kinks
    1e150, -1e150, 1e300, -1e300, 1e308, LARGEST, -LARGEST,  # huge: products and sums overflow
)
"""Values that break numerical code."""

ordinary = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False, allow_subnormal=True)
values = st.one_of(st.sampled_from(EDGES), ordinary)
"""One float64: an edge value or an ordinary one (half of the draws each, roughly)."""

moderate_values = st.one_of(st.sampled_from([v for v in EDGES if abs(v) < 1e100]), ordinary)
"""Like :data:`values` without the huge ones: for properties that must hold without overflow."""


@st.composite
def edgy_arrays(draw, shape, elements=values):
    """A float64 array of ``shape``: either every element free, or all from a pool of 1-3 values (ties)."""
    if draw(st.booleans()):
        pool = draw(st.lists(elements, min_size=1, max_size=3))
        elements = st.sampled_from(pool)
    return draw(hnp.arrays(np.float64, shape, elements=elements))


@st.composite
def map_shapes(draw, min_rank=1, max_rank=2, max_side=3, batch=(1, 2)):
    """``(N, *spatial)`` with small sides."""
    n = draw(st.integers(*batch))
    spatial = draw(st.lists(st.integers(1, max_side), min_size=min_rank, max_size=max_rank))
    return (n, *spatial)


@st.composite
def feature_maps(draw, elements=values, multi=None):
    """``(activations (N, K, *spatial), gradients)``; gradients ``(N, K, ...)`` or ``(N, T, K, ...)``.

    ``multi`` None draws either layout; True/False forces one.
    """
    n, *spatial = draw(map_shapes())
    k = draw(st.integers(1, 3))
    a = draw(edgy_arrays((n, k, *spatial), elements))
    multi = draw(st.booleans()) if multi is None else multi
    g_shape = (n, draw(st.integers(1, 2)), k, *spatial) if multi else (n, k, *spatial)
    return a, draw(edgy_arrays(g_shape, elements))


resize_cases = st.fixed_dictionaries({
    "seed": st.integers(0, 2**32 - 1),
    "n": st.integers(1, 2),
    "shape_in": st.lists(st.integers(1, 9), min_size=1, max_size=3),
    "shape_out": st.lists(st.integers(1, 23), min_size=3, max_size=3),
})
"""A resize: seeded maps ``(n, *shape_in)`` (1 to 3 spatial axes) and sizes to take the first
``len(shape_in)`` of ``shape_out`` (smaller or larger than the input)."""
