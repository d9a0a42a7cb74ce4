r"""Is the map right? Localisation, faithfulness and sanity metrics, in float64, with defined corner cases.

Three families, each function returning one value per example, ``(N,)`` (curves: a :class:`Curve`):

- localisation against masks or boxes (no model): :func:`pointing_game`, :func:`relevance_mass`,
  :func:`relevance_rank`, :func:`top_k_intersection`, :func:`localisation_auc`,
  :func:`weakly_supervised_localisation` (with :func:`map_boxes`, :func:`box_iou`, :func:`boxes_to_masks`);
- faithfulness, re-scoring the model on perturbed inputs through ``score``, a callable
  ``inputs (B, C, *spatial) -> scores (B, classes)`` (:func:`scorer` builds one from a model and a
  backend): :func:`deletion`, :func:`insertion`, :func:`region_perturbation`, :func:`road`,
  :func:`average_drop`, :func:`increase_in_confidence`, :func:`confidence_change`;
- sanity: :func:`similarity` (Spearman, SSIM), :func:`model_randomisation`, :func:`random_logit`.

Maps are ``(N, *spatial)`` at the size of the masks/inputs; any array library is accepted and the
metrics are computed in NumPy float64 (results are NumPy). Orders are stable sorts (ties keep raster
order) or, where said, tie-averaged: no result depends on a sort's whim. A NaN or Inf map, a mask of
the wrong shape or batch, an empty mask, is a one-line error naming it; a value a metric cannot
define (an all-zero map for relevance mass, a constant map for Spearman) is NaN with a
:class:`~gradcam_ref.MetricWarning` naming the examples. How each metric differs from Quantus 0.6,
pytorch-grad-cam and torchcam, with numbers: docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from gradcam_ref._arrays import Array, check_choice, check_flag, check_int, check_nonnegative, shown, to_numpy
from gradcam_ref._warnings import MetricWarning

__all__ = [
    "SANITY_CONVENTIONS",
    "Curve",
    "average_drop",
    "box_iou",
    "boxes_to_masks",
    "confidence_change",
    "deletion",
    "increase_in_confidence",
    "insertion",
    "localisation_auc",
    "map_boxes",
    "model_randomisation",
    "noisy_linear_imputation",
    "pointing_game",
    "random_classes",
    "random_logit",
    "region_perturbation",
    "relevance_mass",
    "relevance_rank",
    "road",
    "scorer",
    "similarity",
    "top_k_intersection",
    "weakly_supervised_localisation",
]

Score = Callable[[np.ndarray], Any]
"""``score(inputs (B, C, *spatial) float64) -> scores (B, classes)``, any array library."""


# --- Checks ----------------------------------------------------------------------------------


def _maps(maps: Array, name: str = "maps", min_rank: int = 2) -> np.ndarray:
    m = np.asarray(to_numpy(maps))
    if m.dtype.kind not in "fiu":
        raise TypeError(f"{name} must have a real numeric dtype, got {m.dtype}")
    m = m.astype(np.float64, copy=False)
    if m.ndim < min_rank:
        raise ValueError(f"{name} must have shape (N, *spatial), got shape {m.shape}")
    if 0 in m.shape:
        raise ValueError(f"{name} must not be empty, got shape {m.shape}")
    finite = np.isfinite(m).reshape(m.shape[0], -1).all(axis=1)
    if not finite.all():
        raise ValueError(f"{name} contains NaN or Inf in examples {np.flatnonzero(~finite).tolist()}")
    return m


def _masks(masks: Array, shape: tuple[int, ...], empty: str = "raise", full_ok: bool = True) -> np.ndarray:
    s = np.asarray(to_numpy(masks))
    if s.dtype != bool:
        if s.dtype.kind not in "iuf" or not np.isin(s, (0, 1)).all():
            raise TypeError(f"masks must be boolean (or 0/1), got {s.dtype} with other values")
        s = s.astype(bool)
    if s.shape != shape:
        raise ValueError(f"masks must have the shape of maps {shape} (N, *spatial), got shape {s.shape}")
    check_choice("empty", empty, ("raise", "nan"))
    counts = s.reshape(shape[0], -1).sum(axis=1)
    bad = counts == 0 if full_ok else (counts == 0) | (counts == s[0].size)
    if bad.any() and empty == "raise":
        what = "empty" if full_ok else "empty or full (the metric needs pixels inside and outside)"
        raise ValueError(
            f"masks of examples {np.flatnonzero(bad).tolist()} are {what}: the metric is undefined there "
            "(pass empty='nan' to get NaN for them)"
        )
    return s


def _undefined(values: np.ndarray, bad: np.ndarray, why: str) -> np.ndarray:
    """Set ``values[bad]`` to NaN with a warning saying why."""
    if bad.any():
        warnings.warn(f"{why} for examples {np.flatnonzero(bad).tolist()}: their value is NaN",
                      MetricWarning, stacklevel=3)
        values = values.copy()
        values[bad] = np.nan
    return values


# --- Localisation ----------------------------------------------------------------------------


def pointing_game(maps: Array, masks: Array, *, tolerance: float = 0.0, ties: str = "share",
                  empty: str = "raise") -> np.ndarray:
    r"""The pointing game (Zhang et al., "Top-down neural attention by excitation backprop", 2016).

    A hit when the map's maximum lies in the mask (or within ``tolerance`` pixels of it; Zhang et
    al. use 15 pixels): with :math:`M_i = \{p : L_{ip} = \max_q L_{iq}\}` the maxima,

    .. math::

        \mathrm{hit}_i = |M_i \cap S_i^{\oplus t}| / |M_i| \quad \text{(ties = share)}

    the share of tied maxima inside the (dilated) mask: the expected hit of a random tie-break, 1 or
    0 without ties, the mask's area fraction for an all-zero map. ``ties='any'`` counts a hit when
    any maximum is inside (Quantus), ``'all'`` when all are.

    Args:
      maps: ``(N, *spatial)`` maps at the masks' size.
      masks: ``(N, *spatial)`` boolean masks of the object.
      tolerance: Euclidean distance in pixels within which a maximum still hits (default 0).
      ties: ``'share'`` (default), ``'any'`` or ``'all'``.
      empty: an empty mask is an error (``'raise'``, default) or NaN (``'nan'``), never a hit.

    Returns:
      ``(N,)`` float64 in [0, 1].
    """
    m = _maps(maps)
    s = _masks(masks, m.shape, empty)
    check_choice("ties", ties, ("share", "any", "all"))
    if isinstance(tolerance, (bool, np.bool_)) or not isinstance(tolerance, (int, float, np.integer, np.floating)):
        raise TypeError(f"tolerance must be a number of pixels >= 0, got {tolerance!r}")
    if not tolerance >= 0:  # NaN too
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    if tolerance > 0:
        from scipy import ndimage

        s = np.stack([ndimage.distance_transform_edt(~si) <= tolerance if si.any() else si for si in s])
    n = m.shape[0]
    flat, inside = m.reshape(n, -1), s.reshape(n, -1)
    top = flat == flat.max(axis=1, keepdims=True)
    hits, count = (top & inside).sum(axis=1), top.sum(axis=1)
    if ties == "share":
        result = hits / count
    elif ties == "any":
        result = (hits > 0).astype(np.float64)
    else:
        result = (hits == count).astype(np.float64)
    return _nan_where_empty(result, s)


def _nan_where_empty(result: np.ndarray, s: np.ndarray) -> np.ndarray:
    empty = np.asarray(~s.reshape(s.shape[0], -1).any(axis=1))
    return _undefined(result, empty, "the mask is empty") if empty.any() else result


def relevance_mass(maps: Array, masks: Array, *, positive: bool = True, empty: str = "raise") -> np.ndarray:
    r"""The share of the map's mass inside the mask (relevance mass accuracy, Arras et al.,
    "CLEVR-XAI", 2022; the energy-based pointing game of Score-CAM, Wang et al. 2020):

    .. math::

        \mu_i = \sum_{p \in S_i} R_{ip} \Big/ \sum_p R_{ip}, \qquad R = \max(L, 0) \text{ if positive else } L

    Args:
      maps: ``(N, *spatial)``; masks: ``(N, *spatial)`` boolean.
      positive: keep only positive relevance (Arras et al.; default). ``False``: the raw map (Quantus).
      empty: ``'raise'`` (default) or ``'nan'`` for empty masks.

    Returns:
      ``(N,)`` float64; NaN (with a :class:`~gradcam_ref.MetricWarning`) where the total is 0.
    """
    m = _maps(maps)
    s = _masks(masks, m.shape, empty)
    check_flag("positive", positive)
    n = m.shape[0]
    r = np.maximum(m, 0.0) if positive else m
    flat = r.reshape(n, -1)
    inside = np.where(s.reshape(n, -1), flat, 0.0).sum(axis=1)
    total = flat.sum(axis=1)
    zero = total == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        result = inside / np.where(zero, 1.0, total)
    return _nan_where_empty(_undefined(result, zero, "the map's total relevance is 0"), s)


def _top_hits(row: np.ndarray, inside: np.ndarray, k: int, ties: str) -> float:
    """How many of the k largest values of ``row`` are ``inside``; ties at the cut averaged or stable."""
    if ties == "stable":
        order = np.argsort(-row, kind="stable")[:k]
        return float(inside[order].sum())
    cut = np.partition(row, row.size - k)[row.size - k]  # the k-th largest value
    above = row > cut
    tied = row == cut
    take = k - int(above.sum())
    return float((above & inside).sum()) + take * float((tied & inside).sum()) / float(tied.sum())


def relevance_rank(maps: Array, masks: Array, *, ties: str = "average", empty: str = "raise") -> np.ndarray:
    r"""Relevance rank accuracy (Arras et al. 2022): of the :math:`K_i = |S_i|` highest-ranked pixels,
    the share inside the mask,

    .. math::

        \mathrm{rank}_i = |\mathrm{top}_{K_i}(L_i) \cap S_i| / K_i .

    Ties at the cut (common: Grad-CAM maps have many exact zeros) are averaged by default: the tied
    pixels that fit count with the share of the tied group inside the mask (the expected value over
    tie-breaks; no sort order involved). ``ties='stable'`` takes them in raster order (a stable sort).

    Returns:
      ``(N,)`` float64 in [0, 1].
    """
    m = _maps(maps)
    s = _masks(masks, m.shape, empty)
    check_choice("ties", ties, ("average", "stable"))
    n = m.shape[0]
    flat, inside = m.reshape(n, -1), s.reshape(n, -1)
    result = np.full(n, np.nan)
    for i in range(n):
        k = int(inside[i].sum())
        if k:
            result[i] = _top_hits(flat[i], inside[i], k, ties) / k
    return _nan_where_empty(result, s)


def top_k_intersection(maps: Array, masks: Array, *, k: int = 1000, ties: str = "average",
                       empty: str = "raise") -> np.ndarray:
    r"""Top-k intersection (Theiner et al. 2021): the share of the ``k`` highest-ranked pixels inside the mask,
    :math:`|\mathrm{top}_k(L_i) \cap S_i| / k`; ties at the cut as in :func:`relevance_rank`. Default
    ``k = 1000`` (Quantus).

    Returns:
      ``(N,)`` float64 in [0, 1].
    """
    m = _maps(maps)
    s = _masks(masks, m.shape, empty)
    check_choice("ties", ties, ("average", "stable"))
    size = int(np.prod(m.shape[1:]))
    k = check_int("k (the pixels of a map)", k, 1, size + 1)
    n = m.shape[0]
    flat, inside = m.reshape(n, -1), s.reshape(n, -1)
    result = np.array([_top_hits(flat[i], inside[i], k, ties) / k for i in range(n)])
    return _nan_where_empty(result, s)


def localisation_auc(maps: Array, masks: Array, *, empty: str = "raise") -> np.ndarray:
    r"""The area under the ROC curve of the map as a detector of mask pixels (Fawcett 2006), by ranks:

    .. math::

        \mathrm{AUC}_i = \frac{1}{P\,Q} \sum_{p \in S_i} \sum_{q \notin S_i}
        \big([L_{ip} > L_{iq}] + \tfrac12 [L_{ip} = L_{iq}]\big)

    with :math:`P = |S_i|`, :math:`Q` the pixels outside (the Mann-Whitney U statistic: average ranks
    for ties, equal to scikit-learn's ``roc_auc_score``). 0.5 is chance. Exact (integer counts, one
    rounding): the inside and outside values are sorted once each, and two stable merges of the
    sorted runs count, for every inside value, the outside values below it and at or below it.

    Returns:
      ``(N,)`` float64 in [0, 1]. A mask covering the whole map (Q = 0) is undefined like an empty one.
    """
    m = _maps(maps)
    s = _masks(masks, m.shape, empty, full_ok=False)
    n = m.shape[0]
    flat, inside = m.reshape(n, -1), s.reshape(n, -1)
    result = np.full(n, np.nan)
    for i in range(n):
        row, mask = flat[i], inside[i]
        positives, negatives = np.sort(row[mask]), np.sort(row[~mask])
        p, q = positives.size, negatives.size
        if p and q:
            result[i] = _mann_whitney_u2(positives, negatives) / (2 * p * q)
    p = inside.sum(axis=1)
    return _undefined(result, (p == 0) | (p == inside.shape[1]), "the mask is empty or covers the whole map")


def _mann_whitney_u2(positives: np.ndarray, negatives: np.ndarray) -> int:
    r"""``2 U`` for sorted ``positives`` and ``negatives``: :math:`\sum_v \#\{q < v\} + \#\{q \le v\}`.

    In a stable merge of the two sorted runs, the k-th positive at merged position j has j - k
    negatives before it: all those at or below it when the negatives come first among equal values,
    those strictly below it when the positives come first. The sum of positions is an integer:
    no rounding until the one division by 2PQ."""
    p, q = positives.size, negatives.size
    at_or_below = np.flatnonzero(np.argsort(np.concatenate([negatives, positives]), kind="stable") >= q)
    below = np.flatnonzero(np.argsort(np.concatenate([positives, negatives]), kind="stable") < p)
    return int(at_or_below.sum()) + int(below.sum()) - p * (p - 1)


def boxes_to_masks(boxes: Array, shape: tuple[int, int]) -> np.ndarray:
    """Boolean masks ``(N, H, W)`` of boxes ``(N, 4)`` = ``(x0, y0, x1, y1)``, half-open pixel ranges
    ``[y0, y1) x [x0, x1)``."""
    shape = _image_shape(shape)
    b = _boxes(boxes, shape)
    masks = np.zeros((b.shape[0], *shape), dtype=bool)
    for mask, (x0, y0, x1, y1) in zip(masks, b, strict=True):
        mask[y0:y1, x0:x1] = True
    return masks


def _image_shape(shape: Any) -> tuple[int, int]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, np.ndarray)) or np.ndim(shape) != 1 \
            or any(isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) for s in shape):
        raise TypeError(f"shape must be (H, W), two ints >= 1, got {shown(shape)}")
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (H, W), two ints >= 1, got {shown(shape)}")
    return int(shape[0]), int(shape[1])


def _boxes(boxes: Array, shape: tuple[int, int] | None = None, name: str = "boxes") -> np.ndarray:
    b = np.asarray(to_numpy(boxes))
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) = (x0, y0, x1, y1), got shape {b.shape}")
    if b.dtype.kind not in "iu" and not (b.dtype.kind == "f" and np.all(b == np.round(b))):
        raise TypeError(f"{name} must hold integer pixel coordinates, got {b.dtype}")
    b = b.astype(np.int64)
    bad = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]) | (b[:, :2] < 0).any(axis=1)
    if shape is not None:
        bad |= (b[:, 2] > shape[1]) | (b[:, 3] > shape[0])
    if bad.any():
        where = f" inside {shape[1]} x {shape[0]} (W x H)" if shape else ""
        raise ValueError(f"{name} must satisfy 0 <= x0 < x1, 0 <= y0 < y1{where}; "
                         f"rows {np.flatnonzero(bad).tolist()} do not: {b[bad][:3].tolist()}")
    return b


def box_iou(boxes: Array, others: Array) -> np.ndarray:
    r"""Intersection over union of two ``(N, 4)`` sets of boxes ``(x0, y0, x1, y1)`` (half-open), row by row:
    :math:`|A \cap B| / |A \cup B|`. Returns ``(N,)`` float64."""
    a, b = _boxes(boxes), _boxes(others, name="others")
    if a.shape != b.shape:
        raise ValueError(f"others must have the shape of boxes {a.shape}, got {b.shape}")
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = (w * h).astype(np.float64)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def map_boxes(maps: Array, *, threshold: float = 0.15, connectivity: int = 2) -> np.ndarray:
    r"""The Grad-CAM paper's box (Selvaraju et al. 2017, Sec. 4.1): the bounding box of the largest
    connected segment of :math:`\{p : L_p > \text{threshold} \cdot \max L\}`.

    Args:
      maps: ``(N, H, W)``.
      threshold: fraction of each map's maximum (default 0.15, the paper's).
      connectivity: 2 (8-neighbours, default; scikit-image's default) or 1 (4-neighbours).

    Returns:
      ``(N, 4)`` int64 boxes ``(x0, y0, x1, y1)``, half-open; the largest segment's ties go to the
      first in raster order. A map with no positive value has no box: an error naming it.
    """
    from scipy import ndimage

    m = _maps(maps)
    if m.ndim != 3:
        raise ValueError(f"maps must have shape (N, H, W), got shape {m.shape}")
    _check_segments(threshold, connectivity)
    top = m.reshape(m.shape[0], -1).max(axis=1)
    if (top <= 0).any():
        raise ValueError(f"maps of examples {np.flatnonzero(top <= 0).tolist()} have no positive value: no box")
    structure = ndimage.generate_binary_structure(2, connectivity)
    boxes = np.empty((m.shape[0], 4), dtype=np.int64)
    for i, (mi, t) in enumerate(zip(m, top, strict=True)):
        labels, count = ndimage.label(mi > threshold * t, structure=structure)
        largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
        rows, columns = ndimage.find_objects(labels)[largest - 1]
        boxes[i] = (columns.start, rows.start, columns.stop, rows.stop)
    return boxes


def _check_segments(threshold: Any, connectivity: Any) -> None:
    """:func:`map_boxes`'s options: a threshold in [0, 1) and a connectivity of 1 or 2."""
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, (int, float, np.integer, np.floating)):
        raise TypeError(f"threshold must be a number in [0, 1), got {shown(threshold)}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    if isinstance(connectivity, (bool, np.bool_)) or not isinstance(connectivity, (int, np.integer)) \
            or connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 or 2, got {shown(connectivity)}")


def weakly_supervised_localisation(maps: Array, boxes: Array, *, threshold: float = 0.15,
                                   connectivity: int = 2) -> np.ndarray:
    """IoU of the map's box (:func:`map_boxes`) with the ground-truth ``boxes`` ``(N, 4)``; the paper
    counts IoU >= 0.5 as localised (Selvaraju et al. 2017, Table 1). Returns ``(N,)`` float64; NaN
    (with a :class:`~gradcam_ref.MetricWarning`) for a map with no positive value, which has no box."""
    m = _maps(maps)
    _check_segments(threshold, connectivity)
    b = _boxes(boxes, m.shape[1:3] if m.ndim == 3 else None)
    if b.shape[0] != m.shape[0]:
        raise ValueError(f"boxes must have one row per map: N = {m.shape[0]}, got {b.shape[0]}")
    live = m.reshape(m.shape[0], -1).max(axis=1) > 0
    result = np.full(m.shape[0], np.nan)
    if live.any():
        result[live] = box_iou(map_boxes(m[live], threshold=threshold, connectivity=connectivity), b[live])
    return _undefined(result, ~live, "the map has no positive value, so no box")


# --- Re-scoring ------------------------------------------------------------------------------


def scorer(model: Any, *, backend: str | None = None, **options: Any) -> Callable[[np.ndarray], np.ndarray]:
    """``score(inputs) -> scores (B, classes)`` float64 NumPy, running ``model`` through its backend's
    ``score`` (no gradients; the model is left as it was). ``backend`` as in :func:`~gradcam_ref.explain`
    (detected for numpy and torch models; pass ``backend='jax'`` for JAX)."""
    from gradcam_ref import backends

    chosen = backends.select(model, None, backend)

    def score(inputs: np.ndarray) -> np.ndarray:
        return np.asarray(to_numpy(chosen.score(model, inputs, **options)), dtype=np.float64)

    return score


@dataclasses.dataclass(frozen=True)
class Curve:
    """A perturbation curve per example.

    Attributes:
      x: ``(S,)`` the abscissae: the fraction of pixels perturbed (or the ROAD percentage / 100).
      scores: ``(N, S)`` the model's score (or accuracy) at each point; ``scores[:, 0]`` unperturbed
        for deletion/region perturbation, the baseline for insertion.
      auc: ``(N,)`` trapezoidal area under ``scores`` over ``x``.
    """

    x: np.ndarray
    scores: np.ndarray

    @property
    def auc(self) -> np.ndarray:
        return np.trapezoid(self.scores, self.x, axis=1)

    def aopc(self) -> np.ndarray:
        r"""Samek et al.'s area over the perturbation curve: :math:`\frac{1}{S} \sum_{k=0}^{S-1} (s_0 - s_k)`."""
        return np.mean(self.scores[:, :1] - self.scores, axis=1)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _targets(targets: Any, n: int) -> np.ndarray:
    t = np.asarray(to_numpy(targets))
    if t.ndim == 0:
        t = np.full(n, t)
    if t.shape != (n,) or t.dtype.kind not in "iu":
        raise ValueError(f"targets must be an int or N = {n} class indices, got {t.dtype} shape {t.shape}")
    if t.min() < 0:  # NumPy would read -1 as the last class
        raise ValueError(f"targets must be class indices >= 0, got {t.tolist()[:8]}")
    return t.astype(np.int64)


def _inputs(inputs: Array, maps: np.ndarray) -> np.ndarray:
    x = np.asarray(to_numpy(inputs), dtype=np.float64)
    if x.ndim != maps.ndim + 1 or x.shape[0] != maps.shape[0] or x.shape[2:] != maps.shape[1:]:
        raise ValueError(f"inputs must have shape (N, C, *spatial) = ({maps.shape[0]}, C, "
                         f"{', '.join(map(str, maps.shape[1:]))}) to match maps {maps.shape}, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("inputs contain NaN or Inf")
    return x


def _rescore(score: Score, batches: Iterator[np.ndarray], rows: np.ndarray, targets: np.ndarray,
             softmax: bool, total: int, progress: bool, what: str, accuracy: bool = False) -> np.ndarray:
    """Score every input the generator yields (chunks of at most batch_size); one value per input:
    the target's score (its probability with ``softmax``), or with ``accuracy`` 1.0 where the
    target is the top class, else 0.0."""
    out = np.empty(total)
    done = 0
    bar = _progress(total, progress, what)
    try:
        for chunk in batches:
            raw = np.asarray(to_numpy(score(chunk)), dtype=np.float64)
            if raw.ndim != 2 or raw.shape[0] != chunk.shape[0]:
                raise ValueError(f"score must return (B, classes) for B = {chunk.shape[0]} inputs, got {raw.shape}")
            if not np.isfinite(raw).all():
                raise ValueError("score returned NaN or Inf")
            if done == 0 and targets.max() >= raw.shape[1]:
                raise ValueError(f"targets must be class indices in [0, {raw.shape[1]}) (the classes score "
                                 f"returns), got {targets.tolist()[:8]}")
            b = chunk.shape[0]
            if accuracy:
                out[done:done + b] = np.argmax(raw, axis=1) == targets[rows[done:done + b]]
            else:
                probabilities = _softmax(raw) if softmax else raw
                out[done:done + b] = probabilities[np.arange(b), targets[rows[done:done + b]]]
            done += b
            if bar is not None:
                bar.update(b)
    finally:
        if bar is not None:
            bar.close()
    return out


def _progress(total: int | None, progress: bool, what: str) -> Any:
    check_flag("progress", progress)
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit="input")


def _chunks(images: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    buffer: list[np.ndarray] = []
    for image in images:
        buffer.append(image)
        if len(buffer) == batch_size:
            yield np.stack(buffer)
            buffer = []
    if buffer:
        yield np.stack(buffer)


def _baseline(baseline: Any, x: np.ndarray, seed: int | None) -> np.ndarray:
    """The fill images ``(N, C, *spatial)``: a number, an array, 'min', 'mean', 'blur' or 'uniform'."""
    if isinstance(baseline, str):
        axes = tuple(range(1, x.ndim))
        if baseline == "min":  # Quantus's "black": each example's minimum over all channels
            return np.broadcast_to(x.min(axis=axes, keepdims=True), x.shape)
        if baseline == "mean":  # each example's own mean (Quantus's IROF uses the batch's)
            return np.broadcast_to(x.mean(axis=axes, keepdims=True), x.shape)
        if baseline == "blur":  # RISE's insertion start: Gaussian blur, sigma 5, 11 taps, zero padding
            from scipy import ndimage

            sigma = (0, 0) + (5.0,) * (x.ndim - 2)
            return ndimage.gaussian_filter(x, sigma=sigma, truncate=1.0, mode="constant")
        if baseline == "uniform":  # Samek et al.: uniform noise over the input's range, seeded
            rng = np.random.default_rng(seed)
            low, high = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
            return low + (high - low) * rng.random(x.shape)
        raise ValueError(f"baseline must be a number, an array or one of 'min', 'mean', 'blur', "
                         f"'uniform', got {baseline!r}")
    b = np.asarray(to_numpy(baseline))
    if b.dtype.kind not in "fiu":
        raise TypeError(f"baseline must be a number, an array or one of 'min', 'mean', 'blur', "
                        f"'uniform', got {shown(baseline)}")
    b = b.astype(np.float64, copy=False)
    if not np.isfinite(b).all():
        raise ValueError(f"baseline contains NaN or Inf ({int(np.count_nonzero(~np.isfinite(b)))} of {b.size} values)")
    try:
        return np.broadcast_to(b, x.shape)
    except ValueError:
        raise ValueError(f"baseline must broadcast to inputs {x.shape}, got shape {b.shape}") from None


def _curve(score: Score, x: np.ndarray, fill: np.ndarray, orders: Sequence[np.ndarray] | np.ndarray, counts: np.ndarray,
           targets: np.ndarray, *, insert: bool, softmax: bool, batch_size: int, progress: bool,
           what: str) -> np.ndarray:
    """Scores ``(N, S)``: the first ``counts[k]`` (or, for ``(N, S)`` counts, ``counts[i, k]``) pixels
    of example i's order replaced (by the fill, or for insertion by the input on top of the fill),
    every channel at once."""
    batch_size = check_int("batch_size", batch_size, 1)
    n, c = x.shape[:2]
    start, source = (fill, x) if insert else (x, fill)
    counts = np.broadcast_to(counts, (n, counts.shape[-1]))

    def images() -> Iterator[np.ndarray]:
        for i in range(n):
            current = start[i].reshape(c, -1).copy()
            new = source[i].reshape(c, -1)
            done = 0
            for count in counts[i]:
                pixels = orders[i][done:count]
                current[:, pixels] = new[:, pixels]
                done = count
                yield current.reshape(x.shape[1:]).copy()

    rows = np.repeat(np.arange(n), counts.shape[1])
    values = _rescore(score, _chunks(images(), batch_size), rows, targets, softmax, rows.size, progress, what)
    return values.reshape(n, counts.shape[1])


def _counts(pixels: int, steps: int) -> np.ndarray:
    steps = check_int("steps", steps, 1)
    step = -(-pixels // steps)
    return np.array([*range(0, pixels, step), pixels])


def _pixel_curve(score: Score, inputs: Array, maps: Array, targets: Any, *, steps: int, baseline: Any,
                 insert: bool, softmax: bool, batch_size: int, seed: int | None, progress: bool) -> Curve:
    m = _maps(maps)
    x = _inputs(inputs, m)
    t = _targets(targets, m.shape[0])
    seed = check_int("seed", seed, 0, none=True)
    check_flag("softmax", softmax)
    orders = np.argsort(-m.reshape(m.shape[0], -1), axis=1, kind="stable")
    counts = _counts(orders.shape[1], steps)
    values = _curve(score, x, _baseline(baseline, x, seed), orders, counts, t, insert=insert,
                    softmax=softmax, batch_size=batch_size, progress=progress,
                    what="insertion" if insert else "deletion")
    return Curve(counts / orders.shape[1], values)


def deletion(score: Score, inputs: Array, maps: Array, targets: Any, *, steps: int = 100,
             baseline: Any = 0.0, softmax: bool = True, batch_size: int = 64, seed: int | None = 0,
             progress: bool = False) -> Curve:
    r"""The deletion curve (Petsiuk et al., "RISE", 2018): pixels removed most relevant first.

    Pixels are ranked by a stable descending sort of the map (ties in raster order); at point k the
    first :math:`n_k = \min(k \lceil P/\text{steps} \rceil, P)` are set to ``baseline`` in every
    channel and the model re-scored: :math:`s_k = p(c \mid x^{(k)})`. A faithful map makes the
    curve fall fast: a low area :math:`\int s\, d(n/P)` (``Curve.auc``, trapezoid over the fraction).

    Args:
      score: ``inputs (B, C, *spatial) -> scores (B, classes)`` (:func:`scorer`).
      inputs: ``(N, C, *spatial)``; maps: ``(N, *spatial)``; targets: N class indices (or one int).
      steps: at most this many intervals (default 100; RISE's 224 pixels per step on 224 x 224
        is ``steps=224``; torchcam uses 20).
      baseline: a number (default 0, RISE's deletion), an array broadcasting to ``inputs``, ``'min'``,
        ``'mean'``, ``'blur'`` or ``'uniform'`` (seeded by ``seed``).
      softmax: score the softmax probability (default, RISE) or the raw score.
      batch_size: inputs per call of ``score`` (the only knob of memory and speed).
      progress: show a tqdm progress bar.

    Returns:
      :class:`Curve` with ``x`` ``(S,)`` fractions from 0 to 1 and ``scores`` ``(N, S)``.
    """
    return _pixel_curve(score, inputs, maps, targets, steps=steps, baseline=baseline, insert=False,
                        softmax=softmax, batch_size=batch_size, seed=seed, progress=progress)


def insertion(score: Score, inputs: Array, maps: Array, targets: Any, *, steps: int = 100,
              baseline: Any = "blur", softmax: bool = True, batch_size: int = 64, seed: int | None = 0,
              progress: bool = False) -> Curve:
    r"""The insertion curve (Petsiuk et al. 2018): starting from ``baseline`` (default ``'blur'``,
    RISE's Gaussian blur, sigma 5), the input's pixels are put back most relevant first, as in
    :func:`deletion`; a faithful map makes the curve rise fast (a high ``Curve.auc``)."""
    return _pixel_curve(score, inputs, maps, targets, steps=steps, baseline=baseline, insert=True,
                        softmax=softmax, batch_size=batch_size, seed=seed, progress=progress)


def region_perturbation(score: Score, inputs: Array, maps: Array, targets: Any, *, patch_size: int = 8,
                        regions: int = 100, order: str = "morf", baseline: Any = "min",
                        softmax: bool = True, batch_size: int = 64, seed: int | None = 0,
                        progress: bool = False) -> Curve:
    r"""Region perturbation (Samek et al., "Evaluating the visualization of what a deep neural network
    has learned", 2017): non-overlapping ``patch_size`` squares, ranked by their summed relevance
    (a stable sort: descending for ``order='morf'``, ascending for ``'lerf'``), replaced one after the
    other by ``baseline`` for ``regions`` steps. The curve is :math:`s_k = f(x^{(k)})`, k = 0..regions;
    Samek's AOPC is ``Curve.aopc()``; Quantus's curve is ``s_0 - s_k`` for k >= 1.

    The patch grid starts at the top-left corner; patches at the bottom/right edges of an image
    whose size is not a multiple of ``patch_size`` are partial (Quantus pads instead). Default
    ``baseline='min'`` is Quantus's "black" (each example's minimum); Samek et al. use ``'uniform'``.
    ``x`` is the number of regions perturbed.
    """
    m = _maps(maps)
    if m.ndim != 3:
        raise ValueError(f"maps must have shape (N, H, W), got shape {m.shape}")
    check_choice("order", order, ("morf", "lerf"))
    n, h, w = m.shape
    patch_size = min(check_int("patch_size", patch_size, 1), max(h, w))  # a larger patch is the same one patch
    seed = check_int("seed", seed, 0, none=True)
    check_flag("softmax", softmax)
    x = _inputs(inputs, m)
    t = _targets(targets, m.shape[0])
    rows, columns = -(-h // patch_size), -(-w // patch_size)
    patch = (np.arange(h)[:, None] // patch_size) * columns + np.arange(w)[None, :] // patch_size
    patch = patch.ravel()
    regions = check_int("regions (the patches of a map)", regions, 1, rows * columns + 1)
    sums = np.stack([np.bincount(patch, weights=mi.ravel(), minlength=rows * columns) for mi in m])
    ranked = np.argsort(-sums if order == "morf" else sums, axis=1, kind="stable")[:, :regions]
    # The pixels of the patches in their rank order; the counts at patch boundaries.
    # Each example's own counts: its partial edge patches may come at other ranks than another's.
    members = np.argsort(patch, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(patch, minlength=rows * columns))])
    orders = [np.concatenate([members[starts[r]:starts[r + 1]] for r in ranked_i]) for ranked_i in ranked]
    sizes = np.diff(starts)
    counts = np.concatenate([np.zeros((n, 1), dtype=np.int64), np.cumsum(sizes[ranked], axis=1)], axis=1)
    values = _curve(score, x, _baseline(baseline, x, seed), orders, counts, t, insert=False,
                    softmax=softmax, batch_size=batch_size, progress=progress, what=f"region perturbation {order}")
    return Curve(np.arange(regions + 1, dtype=np.float64), values)


def _confidence(score: Score, inputs: Array, maps: Array, targets: Any, softmax: bool,
                batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    check_flag("softmax", softmax)
    m = _maps(maps)
    if m.min() < 0 or m.max() > 1:
        raise ValueError(f"maps must be in [0, 1] (normalise them first, e.g. gradcam_ref.normalize), "
                         f"got values in [{m.min():.3g}, {m.max():.3g}]")
    x = _inputs(inputs, m)
    t = _targets(targets, m.shape[0])
    both = np.concatenate([x, x * m[:, None]])
    rows = np.concatenate([np.arange(x.shape[0])] * 2)
    values = _rescore(score, _chunks(iter(both), check_int("batch_size", batch_size, 1)), rows, t, softmax,
                      rows.size, False, "")
    return values[:x.shape[0]], values[x.shape[0]:]


def confidence_change(score: Score, inputs: Array, maps: Array, targets: Any, *, softmax: bool = True,
                      batch_size: int = 64) -> np.ndarray:
    r""":math:`O_i - Y_i`: the score on the explanation image :math:`x \odot L` minus the score on
    :math:`x` (pytorch-grad-cam's ``CamMultImageConfidenceChange``). ``maps`` in [0, 1] at the input's
    size. Returns ``(N,)``."""
    y, o = _confidence(score, inputs, maps, targets, softmax, batch_size)
    return o - y


def average_drop(score: Score, inputs: Array, maps: Array, targets: Any, *, softmax: bool = True,
                 eps: float = 0.0, batch_size: int = 64) -> np.ndarray:
    r"""The per-example drop of Chattopadhay et al. ("Grad-CAM++", 2018, Eq. 20):
    :math:`\max(0, Y_i - O_i) / (Y_i + \epsilon)`, with :math:`Y_i` the class probability on the
    input and :math:`O_i` on :math:`x \odot L` (``maps`` in [0, 1] at the input's size). The paper's
    average drop (%) is ``100 * mean``. ``eps`` >= 0, 0 by default (torchcam: 1e-7). Returns ``(N,)``."""
    check_nonnegative("eps", eps)
    y, o = _confidence(score, inputs, maps, targets, softmax, batch_size)
    denominator = y + eps
    zero = denominator == 0  # a score of 0 (softmax=False) with eps 0: the drop is undefined
    drop = np.maximum(y - o, 0.0) / np.where(zero, 1.0, denominator)
    return _undefined(drop, zero, "the score Y_i + eps is 0 (the drop divides by it)")


def increase_in_confidence(score: Score, inputs: Array, maps: Array, targets: Any, *, softmax: bool = True,
                           batch_size: int = 64) -> np.ndarray:
    r"""1.0 where :math:`Y_i < O_i` (Chattopadhay et al. 2018, Eq. 21; the paper's figure is
    ``100 * mean``), else 0.0. Returns ``(N,)``."""
    y, o = _confidence(score, inputs, maps, targets, softmax, batch_size)
    return (y < o).astype(np.float64)


# --- ROAD ------------------------------------------------------------------------------------

_ORDERING = "MMD_AT_PLUS_A"
"""SuperLU's column ordering: minimum degree on A^T + A suits this symmetric 2-D stencil."""

_NEIGHBOURS = ((1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12), (0, -1, 1 / 6),
               (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6))


def noisy_linear_imputation(image: Array, removed: Array, *, noise: float = 0.01,
                            rng: np.random.Generator | int | None = 0) -> np.ndarray:
    r"""Rong et al.'s noisy linear imputation (ROAD, ICML 2022): each removed pixel becomes the weighted
    mean of its 8 neighbours (weights 1/6 edge, 1/12 corner, renormalised at the border), solved jointly
    for all removed pixels as one sparse linear system (SciPy SuperLU, one factorisation for every
    channel), plus Gaussian noise of std ``noise``:

    .. math::

        \sum_{q \in \mathcal{N}(p)} w_{pq} (v_p - v_q) = 0 \quad \forall p \text{ removed}

    Args:
      image: ``(C, H, W)``; removed: ``(H, W)`` boolean, the pixels to impute (every channel).
      noise: standard deviation of the added noise (default 0.01, the paper's).
      rng: a seed or ``numpy.random.Generator``.

    Returns:
      ``(C, H, W)`` float64, ``image`` with the removed pixels imputed.
    """
    from scipy import sparse
    from scipy.sparse.linalg import splu

    x = np.asarray(to_numpy(image), dtype=np.float64)
    r = np.asarray(to_numpy(removed), dtype=bool)
    if x.ndim != 3 or r.shape != x.shape[1:]:
        raise ValueError(f"image must be (C, H, W) and removed (H, W) like it, got {x.shape} and {r.shape}")
    if not np.isfinite(x).all():  # a NaN spreads to every pixel imputed from it
        raise ValueError(f"image contains NaN or Inf ({int(np.count_nonzero(~np.isfinite(x)))} of {x.size} values)")
    check_nonnegative("noise", noise)
    if not isinstance(rng, np.random.Generator):
        rng = check_int("rng", rng, 0, none=True, note=" (or a numpy.random.Generator)")
    if r.all():
        raise ValueError("removed covers every pixel: nothing to impute from (use a percentage < 100)")
    c, h, w = x.shape
    flat = x.reshape(c, -1)
    ys, xs = np.nonzero(r)
    n = ys.size
    variable = np.full(h * w, -1)
    variable[ys * w + xs] = np.arange(n)
    diagonal = np.zeros(n)
    b = np.zeros((n, c))
    rows, cols, vals = [], [], []
    for dy, dx, weight in _NEIGHBOURS:
        qy, qx = ys + dy, xs + dx
        valid = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
        ids = np.flatnonzero(valid)
        q = qy[valid] * w + qx[valid]
        diagonal[ids] -= weight
        unknown = variable[q] >= 0
        rows.append(ids[unknown])
        cols.append(variable[q[unknown]])
        vals.append(np.full(int(unknown.sum()), weight))
        np.subtract.at(b, ids[~unknown], weight * flat[:, q[~unknown]].T)
    rows.append(np.arange(n))
    cols.append(np.arange(n))
    vals.append(diagonal)
    a = sparse.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    solution = splu(a, permc_spec=_ORDERING).solve(b)
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    out = flat.copy()
    out[:, ys * w + xs] = solution.T + noise * generator.standard_normal((c, n))
    return out.reshape(x.shape)


def road(score: Score, inputs: Array, maps: Array, targets: Any, *,
         percentages: Sequence[float] = tuple(range(1, 100, 2)), order: str = "morf", noise: float = 0.01,
         measure: str = "accuracy", softmax: bool = True, batch_size: int = 64, seed: int = 0,
         progress: bool = False) -> Curve:
    r"""ROAD, RemOve And Debias (Rong et al., ICML 2022): for each percentage p, the
    :math:`\lfloor pHW/100 \rfloor` pixels ranked first (stable sort of the map; ``'morf'``: most
    relevant first, ``'lerf'``: least) are replaced by :func:`noisy_linear_imputation` in every
    channel, and the model re-scored.

    Args:
      percentages: default 1, 3, ..., 99 (Quantus's).
      measure: ``'accuracy'`` (1.0 when the top class is still the target; the paper's and Quantus's)
        or ``'score'`` (the target's probability, or raw score with ``softmax=False``).
      seed: seeds the imputation noise (one generator for the whole call, examples in order).

    Returns:
      :class:`Curve` with ``x`` = percentages / 100.
    """
    m = _maps(maps)
    if m.ndim != 3:
        raise ValueError(f"maps must have shape (N, H, W), got shape {m.shape}")
    check_choice("order", order, ("morf", "lerf"))
    check_choice("measure", measure, ("accuracy", "score"))
    check_flag("softmax", softmax)
    check_nonnegative("noise", noise)
    check_int("seed", seed, 0, none=True)
    p = np.asarray(percentages, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or (p < 0).any() or (p >= 100).any():
        raise ValueError(f"percentages must be a non-empty list of values in [0, 100), got {percentages}")
    x = _inputs(inputs, m)
    t = _targets(targets, m.shape[0])
    n, size = m.shape[0], m[0].size
    flat = m.reshape(n, -1)
    orders = np.argsort(-flat if order == "morf" else flat, axis=1, kind="stable")
    rng = np.random.default_rng(seed)

    def images() -> Iterator[np.ndarray]:
        for i in range(n):
            for pi in p:
                removed = np.zeros(size, dtype=bool)
                removed[orders[i, :int(size * pi / 100)]] = True
                if removed.any():
                    yield noisy_linear_imputation(x[i], removed.reshape(m.shape[1:]), noise=noise, rng=rng)
                else:
                    yield x[i]

    rows = np.repeat(np.arange(n), p.size)
    values = _rescore(score, _chunks(images(), check_int("batch_size", batch_size, 1)), rows, t, softmax,
                      rows.size, progress, "ROAD",
                      accuracy=measure == "accuracy")
    return Curve(p / 100, values.reshape(n, p.size))


# --- Sanity checks ---------------------------------------------------------------------------


def similarity(maps: Array, others: Array, *, measure: str = "spearman") -> np.ndarray:
    r"""Similarity of two sets of maps, example by example (Adebayo et al., "Sanity checks for
    saliency maps", 2018).

    - ``'spearman'``: Spearman's rank correlation of the flattened maps (SciPy; average ranks for
      ties). Undefined (NaN, with a :class:`~gradcam_ref.MetricWarning`) when a map is constant,
      e.g. all zero.
    - ``'ssim'``: the structural similarity of the 2-D maps (scikit-image, Gaussian-free 7 x 7 window,
      ``data_range`` = the pair's joint max - min). Two identical constant maps give 1; a constant
      and a non-constant map are compared as they are.
    - ``'abs-spearman'``: ``|spearman|`` (Adebayo et al. also report it).

    Returns:
      ``(N,)`` float64.
    """
    check_choice("measure", measure, ("spearman", "abs-spearman", "ssim"))
    a, b = _maps(maps), _maps(others, "others")
    if a.shape != b.shape:
        raise ValueError(f"others must have the shape of maps {a.shape}, got {b.shape}")
    n = a.shape[0]
    if measure in ("spearman", "abs-spearman"):
        rho = _spearman(_centred_ranks(a), b)
        return np.abs(rho) if measure == "abs-spearman" else rho
    from skimage.metrics import structural_similarity

    if a.ndim != 3:
        raise ValueError(f"SSIM needs 2-D maps (N, H, W), got shape {a.shape}")
    values = np.empty(n)
    for i in range(n):
        span = max(a[i].max(), b[i].max()) - min(a[i].min(), b[i].min())
        values[i] = 1.0 if span == 0 else structural_similarity(a[i], b[i], data_range=span)
    return values


SANITY_CONVENTIONS = ("ours", "quantus")
"""How :func:`model_randomisation` and :func:`random_logit` take the maps: as they are (``'ours'``), or as
Quantus 0.6's ``MPRT`` and ``RandomLogit`` do (``'quantus'``; see :func:`model_randomisation`)."""


def _check_convention(convention: str, batch_size: int) -> None:
    check_choice("convention", convention, SANITY_CONVENTIONS)
    check_int("batch_size", batch_size, 1)


def _quantus_maps(m: np.ndarray, absolute: bool, batch_size: int) -> np.ndarray:
    """Quantus's ``normalise_by_max`` (one max of |values| per batch of ``batch_size``, an all-zero batch
    left as it is), then ``np.abs`` if ``absolute``."""
    out = m.copy()
    for start in range(0, m.shape[0], batch_size):
        chunk = out[start:start + batch_size]
        top = np.abs(chunk).max()
        if top > 0:
            chunk /= top
    return np.abs(out) if absolute else out


def _quantus_similarity(a: np.ndarray, b: np.ndarray, measure: str, name: str) -> np.ndarray:
    """Quantus's ``correlation_spearman`` (SciPy's, as :func:`similarity`) or ``ssim``: scikit-image's SSIM
    of the *flattened* maps (a 1-D window of 7), ``data_range`` = the pair's max - min."""
    if measure != "ssim":
        return _named_similarity(a, b, measure, name)
    from skimage.metrics import structural_similarity

    n = a.shape[0]
    fa, fb = a.reshape(n, -1), b.reshape(n, -1)
    values = np.empty(n)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(n):
            both = np.concatenate([fa[i], fb[i]])
            values[i] = structural_similarity(fa[i], fb[i], data_range=float(abs(both.max() - both.min())))
    return _undefined(values, ~np.isfinite(values), f"{name}: SSIM of two equal constant maps (data_range 0)")


def _centred_ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks of each flattened map (SciPy's ``rankdata``), minus their mean."""
    from scipy.stats import rankdata

    r = rankdata(a.reshape(a.shape[0], -1), axis=1)
    return r - r.mean(axis=1, keepdims=True)


def _spearman(ra: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho of maps whose centred ranks are ``ra`` with the maps ``b``: Pearson of the ranks."""
    rb = _centred_ranks(b)
    denominator = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    constant = denominator == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(axis=1) / denominator
    return _undefined(rho, constant, "a map is constant (e.g. all zero), so its ranks carry no order")


def model_randomisation(explain: Callable[[Any], Array], models: Iterable[tuple[str, Any]], *,
                        reference: Array | None = None, measure: str = "spearman", convention: str = "ours",
                        batch_size: int = 64, progress: bool = False) -> dict[str, np.ndarray]:
    r"""Model parameter randomisation (Adebayo et al. 2018): the similarity of the maps of the trained
    model to those of each randomised copy; a map that depends on what the model learnt falls.

    Args:
      explain: ``model -> maps (N, *spatial)`` on fixed inputs and targets.
      models: ``(name, randomised model)`` pairs, cascading or independent: from
        ``gradcam_ref.backends.torch.randomise.randomised`` or ``gradcam_ref.backends.jax.randomise``.
      reference: the trained model's maps, ``explain(model)`` (required).
      measure: as in :func:`similarity`.
      convention: ``'ours'`` (default): the maps as they are. ``'quantus'``: as Quantus 0.6's ``MPRT``
        (``abs=True, normalise=True``): every map divided by the max of |values| over its batch of
        ``batch_size`` (``normalise_by_max``), then its absolute value; ``'ssim'`` on the flattened
        maps. With the copies of ``randomised(model, seed=42, scheme='quantus')`` this is
        ``quantus.MPRT(layer_order='top_down' or 'independent')`` without its ``'original'`` entry.
        A constant map is NaN with a warning in both (Quantus aborts when a batch is all zero).
      batch_size: Quantus's ``batch_size`` (only the ``'quantus'`` normalisation depends on it).

    Returns:
      ``{name: (N,) similarity}``, in the order of ``models``: one explanation per model.
    """
    if reference is None:
        raise ValueError("reference must be the trained model's maps, explain(model)")
    _check_convention(convention, batch_size)
    ref = _maps(reference, "reference")
    if convention == "quantus":
        ref = _quantus_maps(ref, True, batch_size)
    check_choice("measure", measure, ("spearman", "abs-spearman", "ssim"))
    if measure == "ssim" and convention == "ours" and ref.ndim != 3:
        raise ValueError(f"SSIM needs 2-D maps (N, H, W), got shape {ref.shape}")
    results = {}
    ranks = None
    bar = _progress(None, progress, "randomised models")  # models may be a generator: one copy at a time
    try:
        for name, model in models:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MetricWarning)
                maps = _maps(explain(model), f"maps of {name}")
            if maps.shape != ref.shape:
                raise ValueError(f"maps of {name} must have the reference's shape {ref.shape}, got {maps.shape}")
            if convention == "quantus":
                maps = _quantus_maps(maps, True, batch_size)
            if measure in ("spearman", "abs-spearman"):  # the reference's ranks once, not once per model
                if ranks is None:
                    ranks = _centred_ranks(ref)
                rho = _named(functools.partial(_spearman, ranks, maps), name)
                results[name] = np.abs(rho) if measure == "abs-spearman" else rho
            elif convention == "quantus":
                results[name] = _quantus_similarity(ref, maps, measure, name)
            else:
                results[name] = _named_similarity(ref, maps, measure, name)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


def _named_similarity(a: np.ndarray, b: np.ndarray, measure: str, name: str) -> np.ndarray:
    return _named(lambda: similarity(a, b, measure=measure), name)


def _named(compute: Callable[[], np.ndarray], name: str) -> np.ndarray:
    """``compute()``, its MetricWarnings re-issued with ``name`` in front."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        values = compute()
    for warning in caught:
        warnings.warn(f"{name}: {warning.message}", MetricWarning, stacklevel=4)
    return values


def random_classes(targets: Any, num_classes: int, *, seed: int = 0, convention: str = "ours",
                   batch_size: int = 64) -> np.ndarray:
    r"""The other class of each example for :func:`random_logit`, drawn uniformly among the
    ``num_classes - 1`` classes that are not its target.

    - ``'ours'``: :math:`c' = (c + u) \bmod C`, :math:`u \sim U\{1, .., C-1\}` from
      ``numpy.random.default_rng(seed)``, once for the batch.
    - ``'quantus'``: Quantus 0.6's ``RandomLogit``: for each batch of ``batch_size`` examples,
      ``numpy.random.seed(seed)`` then ``u = randint(0, C - 1, size)`` and :math:`c' = u + [u \ge c]`
      (the legacy generator; NumPy's global state is not touched here).

    Returns:
      ``(N,)`` int64.
    """
    check_int("num_classes", num_classes, 2)
    _check_convention(convention, batch_size)
    check_int("seed", seed, 0, 2**32 if convention == "quantus" else None, none=True)  # RandomState's bound
    given = np.asarray(to_numpy(targets))
    if given.ndim != 1:
        raise ValueError(f"targets must be (N,) class indices, got shape {given.shape}")
    t = _targets(given, given.shape[0])
    if (t < 0).any() or (t >= num_classes).any():
        raise ValueError(f"targets must be class indices in [0, {num_classes}), got {t.tolist()[:8]}")
    if convention == "ours":
        return (t + np.random.default_rng(seed).integers(1, num_classes, size=t.shape[0])) % num_classes
    draws = np.concatenate([np.random.RandomState(seed).randint(0, num_classes - 1, t[s:s + batch_size].size)
                            for s in range(0, t.size, batch_size)])
    return (draws + (draws >= t)).astype(np.int64)


def random_logit(explain: Callable[[Any], Array], targets: Any, num_classes: int, *, seed: int = 0,
                 measure: str = "ssim", reference: Array | None = None, convention: str = "ours",
                 batch_size: int = 64) -> np.ndarray:
    r"""The random logit test (Sixt et al., "When explanations lie", 2020): the similarity of the map
    of the target class to the map of another class (:func:`random_classes`, seeded). Low is good.

    Args:
      explain: ``targets (N,) -> maps (N, *spatial)`` on fixed inputs.
      targets: N class indices; num_classes: C >= 2.
      reference: the maps of ``targets`` if already computed.
      convention: ``'ours'`` (default): the maps as they are, :func:`similarity`. ``'quantus'``: as
        Quantus 0.6's ``RandomLogit(seed=seed, num_classes=C)`` (``abs=False, normalise=True``): its
        classes, every map divided by the max of |values| over its batch of ``batch_size``, SSIM of the
        flattened maps (``measure='spearman'`` for its ``correlation_spearman``).
      batch_size: Quantus's ``batch_size`` (the ``'quantus'`` classes and normalisation depend on it).

    Returns:
      ``(N,)`` float64.
    """
    check_int("num_classes", num_classes, 2)
    _check_convention(convention, batch_size)
    ref = _maps(reference if reference is not None else explain(targets), "reference")
    other = random_classes(_targets(targets, ref.shape[0]), num_classes, seed=seed, convention=convention,
                           batch_size=batch_size)
    maps = _maps(explain(other), "maps of the random classes")
    if convention == "quantus":
        return _quantus_similarity(_quantus_maps(ref, False, batch_size), _quantus_maps(maps, False, batch_size),
                                   measure, "random logit")
    return similarity(ref, maps, measure=measure)
