"""Tiny images and a tiny model for the data set tests (importable by subprocesses and engine workers)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from gradcam_ref.dataset import Preprocess

SIZE = 16
KW = {"layer": "2", "batch_size": 4, "size": SIZE, "num_workers": 0, "threads": 1, "progress": False}
"""explain_dataset's arguments in the data set tests (with the tiny model and images)."""
N = 22  # images: 6 units of 4, the last one of 2


def make_images(folder: Path, n: int = 24, seed: int = 0) -> list[Path]:
    """``n`` random RGB PNGs of a few shapes, named 000.png, 001.png, ..."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (12 + i % 7, 14 + i % 5, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def tiny_model(seed: int = 0):
    """Conv -> ReLU -> strided conv (layer "2", 8 x 8 maps at SIZE 16) -> ReLU -> GAP -> linear (5 classes)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


class SlowPreprocess(Preprocess):
    """:class:`Preprocess` that sleeps ``delay`` seconds per image (to stop a run part-way).

    Same pixels, same ``describe()``: a run with it resumes with the plain pipeline.
    """

    def __init__(self, delay: float) -> None:
        super().__init__((SIZE, SIZE))
        object.__setattr__(self, "delay", delay)

    def __call__(self, path: str) -> np.ndarray:
        time.sleep(self.delay)
        return super().__call__(path)


def box_of(path: str) -> list[int]:
    """A box ``(x0, y0, x1, y1)`` inside SIZE x SIZE, drawn from the image's file name (picklable)."""
    rng = np.random.default_rng(int(Path(path).stem))
    x0, y0 = rng.integers(0, SIZE - 4, 2)
    return [int(x0), int(y0), int(x0 + rng.integers(1, SIZE - x0 + 1)), int(y0 + rng.integers(1, SIZE - y0 + 1))]


def mask_of(path: str) -> np.ndarray:
    """A ring-shaped boolean mask of SIZE x SIZE from the image's file name (not a box)."""
    i = int(Path(path).stem)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    r = np.hypot(y - (4 + i % 8), x - (3 + i % 9))
    return (r >= 2) & (r < 4 + i % 3)
