"""The synthetic lesion generator: reproducible, exact masks, the cue's planted correlation, ABCD."""

import numpy as np
import pytest
from scipy import ndimage

from gradcam_ref.experiments import lesions


@pytest.fixture(scope="module")
def mixed():
    return lesions.make_lesions(160, seed=7, p_cue=(0.5, 0.5))


def test_same_seed_same_arrays_other_seed_other_arrays():
    a, b = lesions.make_lesions(6, seed=3), lesions.make_lesions(6, seed=3)
    for field in ("images", "lesion_masks", "cue_masks", "labels", "has_cue", "severity"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.images, lesions.make_lesions(6, seed=4).images)
    # the first images do not depend on how many are drawn
    np.testing.assert_array_equal(lesions.make_lesions(3, seed=3).images, a.images[:3])


def test_shapes_ranges_and_masks(mixed):
    n = len(mixed)
    assert mixed.images.shape == (n, 3, 64, 64) and mixed.images.dtype == np.float64
    assert mixed.images.min() >= 0.0 and mixed.images.max() <= 1.0
    assert mixed.lesion_masks.shape == mixed.cue_masks.shape == (n, 64, 64)
    assert mixed.lesion_masks.reshape(n, -1).sum(axis=1).min() > 50  # every image has its lesion
    cue_pixels = mixed.cue_masks.reshape(n, -1).sum(axis=1)
    np.testing.assert_array_equal(cue_pixels > 0, mixed.has_cue)  # a cue mask exactly where there is a cue
    assert not (mixed.cue_masks & mixed.lesion_masks).any()  # the cue never covers the lesion
    # the cue's pixels are painted: they differ from the same image drawn without it? the colour is the mark's
    marked = mixed.images.transpose(0, 2, 3, 1)[mixed.cue_masks]
    purple, ivory = np.array([0.45, 0.25, 0.60]), np.array([0.95, 0.93, 0.85])
    assert (np.minimum(np.abs(marked - purple).max(axis=1), np.abs(marked - ivory).max(axis=1)) < 0.1).all()


def test_the_cue_rates_follow_p_cue():
    """Train: 90% of malignant, 10% of benign (binomial 4-sigma bounds); reversed: the opposite."""
    for name, (p_benign, p_malignant) in (("train", (0.1, 0.9)), ("reversed", (0.9, 0.1))):
        s = lesions.make_lesions(400, seed=1, p_cue=lesions.SPLITS[name])
        for label, p in ((0, p_benign), (1, p_malignant)):
            cue = s.has_cue[s.labels == label]
            assert abs(cue.mean() - p) <= 4 * np.sqrt(p * (1 - p) / cue.size), (name, label, cue.mean())


def test_abcd_malignant_lesions_are_less_symmetric_more_irregular_and_more_colourful(mixed):
    def asymmetry(mask):
        cy, cx = ndimage.center_of_mass(mask)
        shifted = ndimage.shift(mask.astype(float), (31.5 - cy, 31.5 - cx), order=0) > 0.5
        return 1 - (shifted & shifted[::-1, ::-1]).sum() / (shifted | shifted[::-1, ::-1]).sum()

    def irregularity(mask):
        border = mask & ~ndimage.binary_erosion(mask)
        return border.sum() ** 2 / mask.sum()

    def colour_spread(image, mask):
        return image[:, mask].std(axis=1).mean()

    stats = np.array([[asymmetry(m), irregularity(m), colour_spread(i, m)]
                      for i, m in zip(mixed.images, mixed.lesion_masks, strict=True)])
    benign, malignant = stats[mixed.labels == 0].mean(axis=0), stats[mixed.labels == 1].mean(axis=0)
    # measured at seed 7: asymmetry 1.9x, perimeter^2/area 1.14x, colour spread 1.36x
    assert (malignant > np.array([1.5, 1.08, 1.2]) * benign).all(), (benign, malignant)
    assert np.corrcoef(mixed.severity, stats[:, 0])[0, 1] > 0.5


def test_lesion_splits_names_and_seeds():
    sets = lesions.lesion_splits(0, {"train": 5, "unbiased": 4})
    assert list(sets) == ["train", "unbiased"] and len(sets["unbiased"]) == 4
    assert sets["unbiased"].p_cue == (0.5, 0.5) and sets["train"].seed != sets["unbiased"].seed
    assert len(sets["train"].subset(np.array([0, 2]))) == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n": 0}, "n must be a positive int, got 0"),
    ({"n": 2, "size": 16}, r"size must be an int in \[32, 512\], got 16"),
    ({"n": 2, "p_cue": (0.5, 1.5)}, r"p_cue must be two probabilities"),
    ({"n": 2, "malignant_fraction": -0.1}, r"malignant_fraction must be in \[0, 1\]"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lesions.make_lesions(seed=0, **kwargs)
    with pytest.raises(ValueError, match="unknown set 'test'"):
        lesions.lesion_splits(0, {"test": 3})
