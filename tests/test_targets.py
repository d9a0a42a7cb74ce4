"""resolve_targets: the one parser of `target` that every backend uses."""

import numpy as np
import pytest

from gradcam_ref._targets import resolve_targets

SCORES = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])  # argmax: [1, 0]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (None, [1, 0]),
        (2, [2, 2]),
        (np.int32(1), [1, 1]),
        ([2, 0], [2, 0]),
        (np.array([1, 1]), [1, 1]),
        ([[0, 1], [2, 2]], [[0, 1], [2, 2]]),
    ],
)
def test_target_forms(target, expected):
    out = resolve_targets(target, SCORES)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, expected)


def test_callable_is_kept():
    f = lambda s: -s[:, 0]  # noqa: E731
    assert resolve_targets(f, SCORES) is f


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        (3, ValueError, r"target out of range: the scores have C = 3 classes, so targets must lie in \[0, 2\], got \[3\]"),
        (-1, ValueError, r"target out of range.*got \[-1\]"),
        # Values as the user wrote them: no OverflowError, no uint64 wrapped to a negative number.
        (2**70, ValueError, r"target out of range.*got \[1180591620717411303424\]"),
        ([2**70, 1], ValueError, r"target out of range.*got \[1180591620717411303424\]"),
        (np.array([2**63 + 5, 1], dtype=np.uint64), ValueError, r"target out of range.*got \[9223372036854775813\]"),
        (np.uint64(2**64 - 1), ValueError, r"got \[18446744073709551615\]"),
        ([], ValueError, r"target must be an int, N ints or an \(N, T\) int array, got an empty one \(shape \(0,\)\)"),
        ([[], []], ValueError, r"got an empty one \(shape \(2, 0\)\)"),
        ([0, 1, 2], ValueError, r"a sequence of N = 2 ints or an \(N, T\) = \(2, T\) int array, got shape \(3,\)"),
        ([[[0]], [[1]]], ValueError, r"got shape \(2, 1, 1\)"),
        ([0.5, 1.0], TypeError, r"target must hold integers \(class indices\), got dtype float64"),
        (True, TypeError, r"target must be None, an int"),
        ("cat", TypeError, r"target must hold integers"),
    ],
)
def test_bad_targets(target, error, message):
    with pytest.raises(error, match=message):
        resolve_targets(target, SCORES)


def test_scores_must_be_n_by_c():
    with pytest.raises(ValueError, match=r"scores\) must have shape \(N, C\).*got shape \(2,\)"):
        resolve_targets(0, np.zeros(2))
