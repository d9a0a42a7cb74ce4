"""Golden vectors: framework-neutral ``.npz`` files with Grad-CAM's answers, and their loader.

Each file is one case: a network (fully given in the file, or named and shipped elsewhere), an
input batch, a layer, targets, and the expected scores, activations :math:`A`, gradients
:math:`\\partial y^c/\\partial A`, weights :math:`\\alpha^c`, maps and heatmaps. The format is
documented in ``README.md`` next to the files, so that any implementation (TensorFlow, Julia, a
notebook) can check itself against them with nothing but an ``.npz`` reader. Files are read with
``allow_pickle=False``: only plain numeric and string arrays, never objects.

``gradcam-ref verify`` runs every golden through every installed backend. The files are written
by ``python -m gradcam_ref.verify.make_goldens``.

Example:
  >>> from gradcam_ref.verify import goldens
  >>> g = goldens.load("tiny_gap_relu0")
  >>> g.model, g.layer, g.targets.tolist()
  ('oracle', 'relu0', [0])
  >>> g["maps"]
  array([[[0.125, 0.375],
          [0.   , 0.125]]])
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

FORMAT = "gradcam-ref-golden/1"
"""The value of every file's ``format`` entry."""

DIRECTORY = Path(__file__).resolve().parent / "data"
"""Where the shipped goldens are."""

MODELS = ("oracle", "efficientnet-lite0")
"""``oracle``: the network is in the file; ``efficientnet-lite0``: ImageNet weights, shipped elsewhere."""

REQUIRED = ("format", "description", "model", "layer", "targets", "rtol",
            "scores", "activations", "gradients", "weights", "maps")
"""Entries every golden has."""

EXPECTED = ("scores", "activations", "gradients", "weights", "maps")
"""The answers every golden holds, compared entry by entry."""

HEATMAP_PREFIX = "heatmap."
"""``heatmap.<convention>``: the map post-processed by a convention, at ``heatmap_size``."""


@dataclasses.dataclass(frozen=True)
class Golden(Mapping[str, np.ndarray]):
    """One golden case: a read-only mapping from entry names to arrays, plus helpers.

    Attributes:
      name: the file's stem, e.g. ``"tiny_gap_relu0"``.
      path: the file.
      arrays: every entry of the file.
    """

    name: str
    path: Path
    arrays: Mapping[str, np.ndarray]

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self.arrays[key]
        except KeyError:
            raise KeyError(f"golden {self.name!r} has no entry {key!r}; it has {sorted(self.arrays)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)

    def _text(self, key: str) -> str:
        return str(self[key][()])

    @property
    def description(self) -> str:
        return self._text("description")

    @property
    def model(self) -> str:
        """``"oracle"`` or ``"efficientnet-lite0"``."""
        return self._text("model")

    @property
    def layer(self) -> str:
        return self._text("layer")

    @property
    def layer_call(self) -> int | None:
        """Which call of ``layer`` (from 0) when the module runs more than once, else None."""
        return int(self["layer_call"][()]) if "layer_call" in self.arrays else None

    @property
    def targets(self) -> np.ndarray:
        return self["targets"]

    @property
    def rtol(self) -> float:
        """The tolerance of every comparison, relative to the largest magnitude of the answer."""
        return float(self["rtol"][()])

    @property
    def inputs(self) -> np.ndarray:
        """The input batch ``(N, C, *spatial)`` in float64.

        Stored as ``inputs``, or as an 8-bit ``image`` ``(H, W, 3)`` with ``mean`` and ``std``:
        ``((image / 255 - mean) / std)``, channels first, with a batch axis of 1.
        """
        if "inputs" in self.arrays:
            return self["inputs"]
        image = self["image"].astype(np.float64) / 255.0
        return ((image - self["mean"]) / self["std"]).transpose(2, 0, 1)[None]

    @property
    def heatmap_size(self) -> tuple[int, ...] | None:
        """The size of the stored heatmaps; None: they are at the layer's resolution."""
        return tuple(int(s) for s in self["heatmap_size"]) if "heatmap_size" in self.arrays else None

    @property
    def heatmaps(self) -> dict[str, np.ndarray]:
        """``{convention: heatmap}`` for every ``heatmap.<convention>`` entry."""
        n = len(HEATMAP_PREFIX)
        return {k[n:]: v for k, v in self.arrays.items() if k.startswith(HEATMAP_PREFIX)}

    def oracle(self) -> tuple[list[tuple[np.ndarray, np.ndarray]], str, list[tuple[np.ndarray, np.ndarray]]]:
        """``(convs, head, head_params)`` of an ``"oracle"`` golden: ``[(weight, bias), ...]``."""
        if self.model != "oracle":
            raise ValueError(f"golden {self.name!r} holds a {self.model!r} case, not an oracle network")
        convs = [(self[f"conv{i}.weight"], self[f"conv{i}.bias"]) for i in range(_count(self, "conv"))]
        heads = [(self[f"head{j}.weight"], self[f"head{j}.bias"]) for j in range(_count(self, "head"))]
        return convs, self._text("head"), heads

    def compare(self, key: str, actual: np.ndarray) -> tuple[float, float]:
        """``(max_abs_diff, tolerance)`` of ``actual`` against the entry ``key``, see :func:`difference`."""
        return difference(actual, self[key], self.rtol)


def difference(actual: np.ndarray, expected: np.ndarray, rtol: float) -> tuple[float, float]:
    """``(max|actual - expected|, rtol * max|expected|)``: a check passes when the first is <= the second.

    The tolerance is ``rtol`` itself for an all-zero ``expected``; a shape mismatch or a NaN gives
    an infinite difference, which never passes.
    """
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    scale = float(np.max(np.abs(expected), initial=0.0))
    tolerance = rtol * (scale if scale > 0 else 1.0)
    if actual.shape != expected.shape:
        return float("inf"), tolerance
    diff = float(np.max(np.abs(actual - expected), initial=0.0))
    return (float("inf") if np.isnan(diff) else diff), tolerance


def _count(golden: Golden, prefix: str) -> int:
    count = 0
    while f"{prefix}{count}.weight" in golden.arrays:
        count += 1
    return count


def names(directory: str | Path | None = None) -> list[str]:
    """The goldens in ``directory`` (default: the shipped ones), sorted by name."""
    path = Path(directory or DIRECTORY)
    if not path.is_dir():
        raise FileNotFoundError(f"no directory of goldens at {path}")
    return sorted(p.stem for p in path.glob("*.npz"))


def load(name: str | Path, directory: str | Path | None = None) -> Golden:
    """Read the golden ``name`` (a stem in ``directory``, or a path to an ``.npz``).

    Raises:
      FileNotFoundError: no such golden (the message lists the ones there are).
      ValueError: the file is not an ``.npz`` of plain arrays (an object array would need
        pickle), is not of format :data:`FORMAT`, or lacks an entry of :data:`REQUIRED`.
    """
    path = Path(name)
    if path.suffix != ".npz":
        path = Path(directory or DIRECTORY) / f"{name}.npz"
    if not path.is_file():
        there = names(path.parent) if path.parent.is_dir() else []
        raise FileNotFoundError(f"no golden {str(name)!r} at {path}; goldens there: {there}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as error:  # object arrays need pickle: refused
        raise ValueError(
            f"golden {path} is not an .npz of plain numeric and string arrays (read with "
            f"allow_pickle=False): {error}"
        ) from None
    golden = Golden(path.stem, path, arrays)
    missing = [key for key in REQUIRED if key not in arrays]
    if missing:
        raise ValueError(f"golden {path} lacks the entries {missing} (every golden has {list(REQUIRED)})")
    if golden._text("format") != FORMAT:
        raise ValueError(f"golden {path} has format {golden._text('format')!r}, expected {FORMAT!r}")
    if golden.model not in MODELS:
        raise ValueError(f"golden {path} has model {golden.model!r}, expected one of {MODELS}")
    return golden


def load_all(directory: str | Path | None = None) -> list[Golden]:
    """Every golden in ``directory`` (default: the shipped ones); an error if there is none."""
    found = names(directory)
    if not found:
        raise FileNotFoundError(f"no golden (*.npz) in {Path(directory or DIRECTORY)}")
    return [load(name, directory) for name in found]
