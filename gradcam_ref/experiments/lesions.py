r"""SYNTHETIC dermoscopy-like images with exact lesion masks and a planted spurious cue.

No real dermoscopy data is used or downloaded: every image is drawn from a seeded procedure
(NumPy and SciPy only). Skin-toned textured background with hairs; a pigmented lesion whose
look follows the ABCD rule: benign lesions are round, symmetric, one colour, with a smooth
border; malignant ones are asymmetric, with an irregular border and several colours. How
malignant a lesion *looks* is a latent severity drawn per class from overlapping Beta
distributions, so the lesion alone does not give the label perfectly (as in real data).

A spurious cue -- a purple surgical-ink mark or a ruler at the image border (Winkler et al.,
JAMA Dermatology 2019) -- is present with probability ``p_cue[1]`` in malignant and
``p_cue[0]`` in benign images: correlated with the label in :data:`SPLITS` ``"train"`` and
``"biased"``, independent in ``"unbiased"``, anti-correlated in ``"reversed"`` (GAIN's
boat-without-water test). Every image comes with its exact lesion mask and cue mask.

API: :func:`make_lesions` (one set) and :func:`lesion_splits` (the named sets); both return
:class:`LesionSet`. Images are ``(N, 3, H, W)`` float64 in [0, 1], channels first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

__all__ = ["SPLITS", "SYNTHETIC_NOTE", "LesionSet", "lesion_splits", "make_lesions"]

SYNTHETIC_NOTE = "synthetic dermoscopy-like images (procedural, gradcam_ref.experiments.lesions), not patient data"

SPLITS: Mapping[str, tuple[float, float]] = {
    "train": (0.1, 0.9),
    "biased": (0.1, 0.9),
    "unbiased": (0.5, 0.5),
    "reversed": (0.9, 0.1),
}
"""``(p_cue | benign, p_cue | malignant)`` of each named set."""


@dataclasses.dataclass(frozen=True)
class LesionSet:
    """A set of synthetic images and everything known about them.

    Attributes:
      images: ``(N, 3, H, W)`` float64 RGB in [0, 1], channels first.
      lesion_masks: ``(N, H, W)`` bool, the exact lesion.
      cue_masks: ``(N, H, W)`` bool, the exact ink mark or ruler (all False without a cue).
      labels: ``(N,)`` int64, 1 malignant, 0 benign.
      has_cue: ``(N,)`` bool.
      severity: ``(N,)`` float64 in [0, 1], the latent "how malignant it looks".
      seed: the seed the set was drawn from.
      p_cue: ``(p_cue | benign, p_cue | malignant)``.
    """

    images: np.ndarray
    lesion_masks: np.ndarray
    cue_masks: np.ndarray
    labels: np.ndarray
    has_cue: np.ndarray
    severity: np.ndarray
    seed: int
    p_cue: tuple[float, float]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> LesionSet:
        """The examples at ``index`` (ints or a boolean mask)."""
        return dataclasses.replace(
            self, **{f: getattr(self, f)[index] for f in
                     ("images", "lesion_masks", "cue_masks", "labels", "has_cue", "severity")})


def make_lesions(
    n: int,
    *,
    seed: int,
    size: int = 64,
    p_cue: tuple[float, float] = SPLITS["train"],
    malignant_fraction: float = 0.5,
) -> LesionSet:
    """``n`` synthetic images, reproducible from ``seed``: image i depends on ``(seed, i)`` and the arguments only.

    Args:
      n: how many images (>= 1).
      seed: the seed of ``numpy.random.default_rng``.
      size: side of the square images in pixels, 32 to 512 (64-96 is the intended range).
      p_cue: ``(p_cue | benign, p_cue | malignant)``, each in [0, 1].
      malignant_fraction: the expected share of malignant images, in [0, 1].
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 32 <= size <= 512:
        raise ValueError(f"size must be an int in [32, 512], got {size!r}")
    if len(p_cue) != 2 or not all(0.0 <= float(p) <= 1.0 for p in p_cue):
        raise ValueError(f"p_cue must be two probabilities (benign, malignant) in [0, 1], got {p_cue!r}")
    if not 0.0 <= malignant_fraction <= 1.0:
        raise ValueError(f"malignant_fraction must be in [0, 1], got {malignant_fraction!r}")
    labels = np.empty(n, dtype=np.int64)
    has_cue = np.empty(n, dtype=bool)
    severity = np.empty(n)
    images = np.empty((n, 3, size, size))
    lesions = np.empty((n, size, size), dtype=bool)
    cues = np.zeros((n, size, size), dtype=bool)
    for i in range(n):  # image i depends on (seed, i) only, not on n
        rng = np.random.default_rng([seed, i])
        labels[i] = int(rng.random() < malignant_fraction)
        has_cue[i] = rng.random() < p_cue[labels[i]]
        severity[i] = rng.beta(5.0, 2.0) if labels[i] else rng.beta(2.0, 5.0)
        images[i], lesions[i], cues[i] = _render(rng, size, severity[i], bool(has_cue[i]))
    return LesionSet(images, lesions, cues, labels, has_cue, severity, int(seed), (float(p_cue[0]), float(p_cue[1])))


def lesion_splits(seed: int, sizes: Mapping[str, int], *, size: int = 64) -> dict[str, LesionSet]:
    """The sets named in ``sizes`` (keys of :data:`SPLITS`), each from its own seed derived from ``seed``."""
    out = {}
    for index, (name, count) in enumerate(sizes.items()):
        if name not in SPLITS:
            raise ValueError(f"sizes has an unknown set {name!r}; the sets are {list(SPLITS)}")
        out[name] = make_lesions(count, seed=int(np.random.SeedSequence([seed, index]).generate_state(1)[0]),
                                 size=size, p_cue=SPLITS[name])
    return out


# --- drawing ------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A smooth random field, zero mean, unit standard deviation, correlated over about ``scale`` pixels.

    Fine scales: Gaussian-filtered white noise; coarse ones (``scale >= 3``): white noise on a
    grid ``scale`` pixels apart, bilinearly interpolated (the same look, far cheaper).
    """
    from scipy import ndimage

    if scale >= 3:
        coarse = rng.standard_normal((int(np.ceil(size / scale)) + 1,) * 2)
        field = ndimage.zoom(coarse, size / (coarse.shape[0] - 1), order=1, grid_mode=False)[:size, :size]
    else:
        field = ndimage.gaussian_filter(rng.standard_normal((size, size)), scale, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _render(
    rng: np.random.Generator, size: int, severity: float, cue: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy import ndimage

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    # skin: a tone, low-frequency shading and fine texture
    skin = np.array([0.86, 0.66, 0.55]) + rng.normal(0.0, 0.03, 3)
    shade = 1.0 + 0.05 * _smooth_noise(rng, size, size / 6) + 0.02 * _smooth_noise(rng, size, 1.0)
    image = skin[:, None, None] * shade[None]

    # the lesion: radius r(theta) = R (1 + sum_k a_k cos(k theta + phi_k)) around a jittered centre
    s = float(severity)
    cy, cx = size / 2 + rng.normal(0.0, size / 20, 2)
    radius = size * rng.uniform(0.16, 0.24)
    theta = np.arctan2(yy - cy, xx - cx)
    dist = np.hypot(yy - cy, xx - cx)
    shape = 1.0 + rng.normal(0.0, 0.04) * np.cos(2 * theta + rng.uniform(0, 2 * np.pi))  # mild ellipse
    for k in (1, 2, 3):  # asymmetry grows with severity
        shape += s * rng.uniform(0.05, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    for k in range(5, 12):  # border irregularity grows with severity
        shape += s * rng.uniform(0.0, 0.06) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    lesion = dist <= radius * shape
    # colour: one brown for benign-looking lesions, patches of dark brown / black / blue-grey / red
    # appearing with severity; the border is blurred more for smooth (benign-looking) lesions
    base = np.array([0.55, 0.36, 0.24]) + rng.normal(0.0, 0.03, 3)
    colours = [np.array([0.30, 0.18, 0.12]), np.array([0.12, 0.10, 0.10]),
               np.array([0.40, 0.45, 0.55]), np.array([0.70, 0.30, 0.30])]
    pigment = np.broadcast_to(base[:, None, None], (3, size, size)).copy()
    for colour in colours:
        if rng.random() < s:
            patch = _smooth_noise(rng, size, size / 14) > rng.uniform(0.2, 1.0)
            pigment[:, patch] = colour[:, None] + rng.normal(0.0, 0.02, (3, 1))
    pigment = pigment * (1.0 + 0.04 * _smooth_noise(rng, size, 1.5))[None]
    alpha = ndimage.gaussian_filter(lesion.astype(np.float64), 1.6 - 1.1 * s)
    image = image * (1 - alpha[None]) + pigment * alpha[None]

    # hairs: thin dark curves over everything
    for _ in range(rng.integers(0, 4)):
        p0, p1, p2 = rng.uniform(0, size, (3, 2))
        t = np.linspace(0.0, 1.0, 4 * size)[:, None]
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        hair = np.zeros((size, size))
        rows, cols = np.clip(curve.astype(int), 0, size - 1).T
        hair[rows, cols] = 1.0
        hair = np.clip(ndimage.gaussian_filter(hair, 0.5) * 3, 0, 1) * rng.uniform(0.5, 0.8)
        image = image * (1 - hair[None]) + np.array([0.2, 0.13, 0.1])[:, None, None] * hair[None]

    cue_mask = np.zeros((size, size), dtype=bool)
    if cue:
        cue_mask = _cue_mask(rng, size, yy, xx) & ~ndimage.binary_dilation(lesion, iterations=2)
        colour = np.array([0.45, 0.25, 0.60]) if rng.random() < 0.5 else np.array([0.95, 0.93, 0.85])
        image[:, cue_mask] = colour[:, None] + rng.normal(0.0, 0.02, (3, 1))
    return np.clip(image, 0.0, 1.0), lesion, cue_mask


def _cue_mask(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """An ink dot cluster or a ruler strip with ticks, along a random border of the image."""
    side = rng.integers(4)
    along = xx if side in (0, 1) else yy  # the coordinate running along the chosen border
    depth = {0: yy, 1: size - yy, 2: xx, 3: size - xx}[int(side)]  # distance from that border
    if rng.random() < 0.5:  # ink: a thick blob near the border
        centre = rng.uniform(0.2 * size, 0.8 * size)
        return np.hypot(along - centre, depth - 0.09 * size) <= 0.07 * size
    start = rng.uniform(0.05 * size, 0.35 * size)  # ruler: a strip with tick marks
    strip = (depth <= 0.06 * size) & (along >= start) & (along <= start + 0.55 * size)
    ticks = (depth <= 0.12 * size) & (np.mod(along - start, 0.1 * size) < 1.0) & (along >= start) & (
        along <= start + 0.55 * size)
    return strip | ticks
