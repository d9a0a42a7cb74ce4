"""Localisation metrics: hand-computed values, identities, corner cases and errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import roc_auc_score

from gradcam_ref import MetricWarning, metrics

# One 3 x 3 map, worked by hand below.
MAP = np.array([[[0.0, 0.0, 1.0],
                 [0.5, 2.0, 0.0],
                 [0.0, 2.0, 0.5]]])
MASK = np.array([[[False, False, True],
                  [False, True, False],
                  [False, False, False]]])


def test_pointing_game_by_hand():
    # Two maxima (2.0 at (1,1) inside, (2,1) outside): share 1/2, any 1, all 0.
    assert metrics.pointing_game(MAP, MASK).tolist() == [0.5]
    assert metrics.pointing_game(MAP, MASK, ties="any").tolist() == [1.0]
    assert metrics.pointing_game(MAP, MASK, ties="all").tolist() == [0.0]
    # A mask one pixel from the outside maximum: a hit with tolerance 1 but not 0.
    far = np.zeros((1, 3, 3), bool)
    far[0, 2, 2] = True
    assert metrics.pointing_game(MAP, far).tolist() == [0.0]
    assert metrics.pointing_game(MAP, far, tolerance=1).tolist() == [0.5]  # (2,1) within 1 px, (1,1) at sqrt 2
    assert metrics.pointing_game(MAP, far, tolerance=1.5).tolist() == [1.0]


def test_all_zero_map_scores_the_masks_area_not_a_hit():
    zero = np.zeros((1, 3, 3))
    assert metrics.pointing_game(zero, MASK).tolist() == [2 / 9]
    with pytest.warns(MetricWarning, match=r"total relevance is 0 for examples \[0\]"):
        assert np.isnan(metrics.relevance_mass(zero, MASK)).all()
    assert metrics.relevance_rank(zero, MASK).tolist() == [2 / 9]  # every pixel tied: the area share


def test_relevance_mass_by_hand():
    # Inside: 1 + 2 = 3 of a total 6.
    assert metrics.relevance_mass(MAP, MASK).tolist() == [0.5]
    signed = MAP - 0.5  # inside 0.5 + 1.5 = 2; positives 0.5 + 1.5 + 1.5 = 3.5; raw sum 6 - 4.5 = 1.5
    np.testing.assert_allclose(metrics.relevance_mass(signed, MASK), [2 / 3.5], rtol=0, atol=1e-15)
    np.testing.assert_allclose(metrics.relevance_mass(signed, MASK, positive=False), [2 / 1.5], rtol=0, atol=1e-15)


def test_relevance_rank_ties_averaged_or_stable():
    # K = 2: the two 2.0s are the top 2; one is inside: 1/2 (no tie at the cut).
    assert metrics.relevance_rank(MAP, MASK).tolist() == [0.5]
    # K = 3 with the mask below: the cut falls in the tie {0.5 at (1,0), 0.5 at (2,2)} after 2.0, 2.0, 1.0.
    mask = np.zeros((1, 3, 3), bool)
    mask[0, 2, 2] = mask[0, 1, 1] = mask[0, 0, 0] = True
    # top-2 strictly above the cut value 1.0 ... values sorted: 2, 2, 1, 0.5, 0.5: the 3rd is 1.0 (no tie).
    assert metrics.relevance_rank(MAP, mask).tolist() == [1 / 3]
    # k = 4: the cut is 0.5, tied between (1,0) outside and (2,2) inside: 1 of 2 slots' worth, shared.
    np.testing.assert_allclose(metrics.top_k_intersection(MAP, mask, k=4), [(1 + 0.5) / 4])
    # Stable order takes (1,0) first (raster order): (1,1) only -> 1/4.
    assert metrics.top_k_intersection(MAP, mask, k=4, ties="stable").tolist() == [0.25]


def test_localisation_auc_by_hand_and_against_scikit_learn():
    # Positives 1.0 and 2.0 against 0, 0, .5, 0, 2, .5 ... pairs: 1.0 beats 5 of 7 (0,0,.5,0,.5 ... ) etc.
    positives, negatives = [1.0, 2.0], [0.0, 0.0, 0.5, 0.0, 0.0, 2.0, 0.5]
    pairs = sum((p > q) + 0.5 * (p == q) for p in positives for q in negatives) / 14
    np.testing.assert_allclose(metrics.localisation_auc(MAP, MASK), [pairs], rtol=0, atol=1e-15)
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 4, (5, 8, 8)).astype(float)  # many ties
    masks = rng.random((5, 8, 8)) > 0.5
    expected = [roc_auc_score(s.ravel(), m.ravel()) for m, s in zip(maps, masks, strict=True)]
    np.testing.assert_allclose(metrics.localisation_auc(maps, masks), expected, rtol=0, atol=1e-12)


def test_boxes_by_hand():
    heat = np.zeros((1, 6, 8))
    heat[0, 1:3, 1:4] = 1.0  # the largest segment: 6 pixels
    heat[0, 4, 6] = 0.9  # a second, smaller segment
    heat[0, 5, 0] = 0.1  # below 15% of the max
    np.testing.assert_array_equal(metrics.map_boxes(heat), [[1, 1, 4, 3]])
    # IoU with (0, 0, 4, 3): 6 / 12.
    assert metrics.weakly_supervised_localisation(heat, np.array([[0, 0, 4, 3]])).tolist() == [0.5]
    assert metrics.box_iou(np.array([[0, 0, 2, 2]]), np.array([[2, 2, 4, 4]])).tolist() == [0.0]
    masks = metrics.boxes_to_masks(np.array([[1, 1, 4, 3]]), (6, 8))
    assert masks.sum() == 6 and masks[0, 1:3, 1:4].all()
    diagonal = np.zeros((1, 3, 3))
    diagonal[0, [0, 1, 2], [0, 1, 2]] = 1.0  # one segment with 8-connectivity, three with 4
    np.testing.assert_array_equal(metrics.map_boxes(diagonal), [[0, 0, 3, 3]])
    np.testing.assert_array_equal(metrics.map_boxes(diagonal, connectivity=1), [[0, 0, 1, 1]])


@pytest.mark.parametrize("function", [metrics.pointing_game, metrics.relevance_mass, metrics.relevance_rank,
                                      metrics.localisation_auc])
def test_bad_input_is_a_clear_error(function):
    maps, masks = np.random.default_rng(0).random((2, 4, 4)), np.ones((2, 4, 4), bool)
    masks[:, 0, 0] = False
    with pytest.raises(ValueError, match=r"masks must have the shape of maps \(2, 4, 4\).*got shape \(2, 4, 5\)"):
        function(maps, np.ones((2, 4, 5), bool))
    with pytest.raises(ValueError, match=r"masks must have the shape of maps.*got shape \(3, 4, 4\)"):
        function(maps, np.ones((3, 4, 4), bool))
    bad = maps.copy()
    bad[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match=r"maps contains NaN or Inf in examples \[1\]"):
        function(bad, masks)
    empty = masks.copy()
    empty[1] = False
    with pytest.raises(ValueError, match=r"masks of examples \[1\] are empty"):
        function(maps, empty)
    with pytest.warns(MetricWarning, match=r"examples \[1\]"):
        values = function(maps, empty, empty="nan")
    assert np.isnan(values[1]) and np.isfinite(values[0])
    with pytest.raises(TypeError, match="masks must be boolean"):
        function(maps, masks * 0.5)


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda m, s: metrics.pointing_game(m, s, tolerance=float("nan")), ValueError,
     "tolerance must be >= 0 pixels, got nan"),  # NaN read as 0
    (lambda m, s: metrics.pointing_game(m, s, tolerance="1"), TypeError, "tolerance must be a number of pixels"),
    (lambda m, s: metrics.top_k_intersection(m, s, k=2.5), TypeError,
     r"k \(the pixels of a map\) must be an int in \[1, 17\), got 2.5"),  # NumPy's "Partition index must be integer"
    (lambda m, s: metrics.top_k_intersection(m, s, k=True), TypeError,
     r"k \(the pixels of a map\) must be an int in \[1, 17\), got True"),
    (lambda m, s: metrics.top_k_intersection(m, s, k=17), ValueError,
     r"k \(the pixels of a map\) must be an int in \[1, 17\), got 17"),
    # a string read as True; an array where a name or number is expected (NumPy's "truth value ... ambiguous")
    (lambda m, s: metrics.relevance_mass(m, s, positive="no"), TypeError, "positive must be True or False, got 'no'"),
    (lambda m, s: metrics.pointing_game(m, s, ties=np.array(["any", "all"])), ValueError,
     r"ties must be one of \('share', 'any', 'all'\), got array\(\['any', 'all'\], dtype='<U3'\)$"),
    (lambda m, s: metrics.relevance_rank(m, s, empty=np.array(["nan", "raise"])), ValueError,
     r"empty must be 'raise' or 'nan', got array\("),
    (lambda m, s: metrics.map_boxes(m, threshold=None), TypeError, r"threshold must be a number in \[0, 1\), got None"),
    (lambda m, s: metrics.map_boxes(m, threshold=np.array([0.1, 0.2])), TypeError,
     r"threshold must be a number in \[0, 1\), got array\(\[0.1, 0.2\]\)"),
    (lambda m, s: metrics.map_boxes(m, connectivity=True), ValueError, "connectivity must be 1 or 2, got True"),
    (lambda m, s: metrics.map_boxes(m, connectivity=np.array([1, 2])), ValueError,
     r"connectivity must be 1 or 2, got array\(\[1, 2\]\)"),
    (lambda m, s: metrics.weakly_supervised_localisation(m, np.array([[0, 0, 2, 2]] * 2), threshold="0.2"),
     TypeError, r"threshold must be a number in \[0, 1\), got '0.2'"),
    (lambda m, s: metrics.boxes_to_masks(np.array([[0, 0, 2, 2]]), [6]), ValueError,
     r"shape must be \(H, W\), two ints >= 1, got \[6\]"),  # IndexError
    (lambda m, s: metrics.boxes_to_masks(np.array([[0, 0, 2, 2]]), None), TypeError,
     r"shape must be \(H, W\), two ints >= 1, got None"),
    (lambda m, s: metrics.boxes_to_masks(np.array([[0, 0, 2, 2]]), 7), TypeError,
     r"shape must be \(H, W\), two ints >= 1, got 7"),
    (lambda m, s: metrics.boxes_to_masks(np.array([[0, 0, 2, 2]]), (6, 0)), ValueError,
     r"shape must be \(H, W\), two ints >= 1, got \(6, 0\)"),
])
def test_bad_options_are_named(call, error, message):
    maps, masks = np.random.default_rng(0).random((2, 4, 4)), np.ones((2, 4, 4), bool)
    masks[:, 0, 0] = False
    with pytest.raises(error, match=message) as raised:
        call(maps, masks)
    assert "\n" not in str(raised.value)


def test_torch_and_jax_arrays_give_the_numpy_values():
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(1)
    maps, masks = rng.random((3, 7, 7)), rng.random((3, 7, 7)) > 0.6
    for function in (metrics.pointing_game, metrics.relevance_mass, metrics.relevance_rank, metrics.localisation_auc):
        expected = function(maps, masks)
        np.testing.assert_array_equal(function(torch.from_numpy(maps), torch.from_numpy(masks)), expected)
        np.testing.assert_allclose(function(jnp.asarray(maps, jnp.float32), jnp.asarray(masks)),
                                   function(maps.astype(np.float32), masks), rtol=0, atol=1e-15)


maps_and_masks = st.integers(1, 3).flatmap(lambda n: st.tuples(
    hnp.arrays(np.float64, (n, 5, 6), elements=st.sampled_from([0.0, 0.0, 1e-300, 0.25, 1.0, 3.0, 1e300])),
    hnp.arrays(np.bool_, (n, 5, 6)).filter(lambda s: s.reshape(s.shape[0], -1).any(axis=1).all()
                                           and not s.reshape(s.shape[0], -1).all(axis=1).any()),
))


@given(maps_and_masks)
def test_properties(pair):
    """Ranges; ties averaged equal the mean over many random tie-breaks; AUC = scikit-learn's."""
    maps, masks = pair
    n = maps.shape[0]
    pointing = metrics.pointing_game(maps, masks)
    rank = metrics.relevance_rank(maps, masks)
    auc = metrics.localisation_auc(maps, masks)
    for values in (pointing, rank, auc):
        assert values.shape == (n,) and ((values >= 0) & (values <= 1)).all()
    # Averaged ties = the expectation of the stable rule over random permutations of the pixels.
    rng = np.random.default_rng(0)
    flat, inside = maps.reshape(n, -1), masks.reshape(n, -1)
    for i in range(n):
        k = int(inside[i].sum())
        cut = np.sort(flat[i])[::-1][k - 1]
        tied, above = flat[i] == cut, flat[i] > cut
        exact = ((above & inside[i]).sum() + (k - above.sum()) * (tied & inside[i]).sum() / tied.sum()) / k
        np.testing.assert_allclose(rank[i], exact, rtol=0, atol=1e-12)
        perm = rng.permutation(flat.shape[1])
        stable = metrics.relevance_rank(flat[i:i + 1, perm], inside[i:i + 1, perm], ties="stable")[0]
        take, hits_above = k - above.sum(), (above & inside[i]).sum()
        tied_in, tied_out = (tied & inside[i]).sum(), (tied & ~inside[i]).sum()
        low, high = hits_above + max(0, take - tied_out), hits_above + min(take, tied_in)
        assert low / k - 1e-12 <= stable <= high / k + 1e-12  # any tie-break lies between the extremes
        assert low / k - 1e-12 <= rank[i] <= high / k + 1e-12
        expected_auc = roc_auc_score(inside[i], flat[i])
        np.testing.assert_allclose(auc[i], expected_auc, rtol=0, atol=1e-12)
    # Scaling a map by a positive number changes no localisation metric.
    np.testing.assert_array_equal(metrics.pointing_game(maps * 0.5, masks), pointing)
    np.testing.assert_array_equal(metrics.relevance_rank(maps * 0.5, masks), rank)


def test_weakly_supervised_localisation_of_an_all_zero_map_is_nan_not_a_crash():
    heat = np.zeros((2, 6, 8))
    heat[0, 1:3, 1:4] = 1.0
    with pytest.warns(MetricWarning, match=r"the map has no positive value, so no box for examples \[1\]"):
        iou = metrics.weakly_supervised_localisation(heat, np.array([[0, 0, 4, 3], [0, 0, 4, 3]]))
    assert iou[0] == 0.5 and np.isnan(iou[1])
