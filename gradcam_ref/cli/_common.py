"""Pieces shared by the ``gradcam-ref`` commands: inputs, labels, pictures, staged output.

Nothing here imports a framework; an error the user can cause is a :class:`UsageError`.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import importlib
import importlib.resources
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

IMAGENET_CLASSES = "data/imagenet_classes.txt"
"""The 1000 ImageNet class names in the standard index order (package data)."""


class UsageError(Exception):
    """A problem with what the command was given: exit status 2, a one-line message, no traceback."""


def model_inputs(args: Any) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...]]:
    """``--size``, ``--mean``, ``--std`` of the shared model options (ImageNet's by default), checked.

    The inputs are float32 ``(x - mean) / std`` for pixels x in [0, 1]: every value must be finite in float32,
    std at least float32's smallest normal number (a subnormal std loses its precision), and the
    standardised range must fit float32 (else the model sees Inf, reported as NaN activations).

    Raises:
      UsageError: a mean or std that is not 1 or 3 finite numbers, a std below float32's smallest
        normal number, or standardised values beyond float32's largest.
    """
    from gradcam_ref import zoo

    size = args.size or (zoo.IMAGENET_SIZE, zoo.IMAGENET_SIZE)
    mean, std = args.mean or zoo.IMAGENET_MEAN, args.std or zoo.IMAGENET_STD
    smallest, biggest = float(np.finfo(np.float32).smallest_normal), float(np.finfo(np.float32).max)
    for option, values in (("--mean", mean), ("--std", std)):
        if len(values) not in (1, 3) or not all(math.isfinite(v) and abs(v) <= biggest for v in values) \
                or (option == "--std" and min(values) < smallest):
            raise UsageError(
                f"{option} must be 1 or 3 comma-separated finite numbers (std >= {smallest:.3g}, "
                f"float32's smallest normal number), got {_numbers(values)}"
            )
    m, s = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    largest = float(np.max(np.maximum(np.abs(m), np.abs(1 - m)) / s))
    if largest > biggest:
        raise UsageError(
            f"--mean {_numbers(mean)} and --std {_numbers(std)} standardise pixels in [0, 1] to up to "
            f"{largest:.3g}, beyond float32's largest number {biggest:.2g}"
        )
    return size, mean, std


def _numbers(values: Sequence[float]) -> str:
    return ",".join(repr(v).removesuffix(".0") for v in values)


def class_names() -> list[str]:
    """The 1000 ImageNet class names, index order (``names[285] == "Egyptian cat"``).

    Source: ``_IMAGENET_CATEGORIES`` of torchvision 0.29.1 (``torchvision/models/_meta.py``,
    BSD-3-Clause), the Keras/Caffe synset order with readable names; the two duplicated
    WordNet names are told apart there as "crane bird" (134) / "crane" (517) and "maillot" (638) /
    "maillot tank suit" (639).
    """
    text = importlib.resources.files("gradcam_ref").joinpath(IMAGENET_CLASSES).read_text(encoding="utf-8")
    return text.splitlines()


def read_labels(path: str | None) -> list[str]:
    """Class names from a file (one per line), or the ImageNet names when ``path`` is None."""
    if path is None:
        return class_names()
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--labels {path}: cannot read it ({error})") from None


def parse_target(text: str, names: Sequence[str]) -> int | None:
    """``--target``: "auto" (None, each image's top class), a class index, or a class name.

    Names match case-insensitively, with "_" read as a space ("tiger_cat" is "tiger cat").

    Raises:
      UsageError: a name that is not in ``names``, with the closest names.
    """
    if text == "auto":
        return None
    try:
        index = int(text)
    except ValueError:
        pass
    else:
        if index < 0:
            raise UsageError(f"--target must be auto, a class index >= 0 or a class name, got {text}")
        return index
    key = " ".join(text.replace("_", " ").split()).casefold()
    folded = [name.casefold() for name in names]
    if key in folded:
        return folded.index(key)
    close = difflib.get_close_matches(key, folded, n=4, cutoff=0.6)
    hint = f"; did you mean {[names[folded.index(c)] for c in close]}?" if close else ""
    raise UsageError(f"--target: unknown label {text!r} (not one of the {len(names)} class names){hint}")


def preprocess(
    images: Sequence[np.ndarray], size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """RGB images -> a model batch ``(N, 3, H, W)`` float32: resize, scale to [0, 1], standardise.

    Each image is resized to ``size = (H, W)`` as a whole (Pillow bicubic, aspect not kept), so a
    map upsampled back to the image's own shape lies over all of it.
    """
    from gradcam_ref import viz

    scaled = np.stack([viz.resize_image(image, size) for image in images]).astype(np.float32) / np.float32(255)
    standard = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(standard.transpose(0, 3, 1, 2))


def heat_on(map_: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A layer-resolution map as a picture of ``shape``: upsampled (half-pixel), min-max normalised."""
    import gradcam_ref

    return np.asarray(gradcam_ref.normalize(gradcam_ref.upsample(map_[None], tuple(shape)))[0])


def peak_of(heat: np.ndarray) -> tuple[int, int]:
    """``(row, column)`` of the map's maximum (the first one, in row-major order)."""
    row, column = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(row), int(column)


def in_words(row: int, column: int, shape: tuple[int, ...]) -> str:
    """Where ``(row, column)`` lies in an image of ``shape``, by thirds: "upper left", "centre", ..."""
    vertical = ("upper ", "middle ", "lower ")[min(2, 3 * row // shape[0])]
    horizontal = ("left", "centre", "right")[min(2, 3 * column // shape[1])]
    return "centre" if vertical + horizontal == "middle centre" else vertical + horizontal


def guided_panel(explanation: Any, index: int, shape: tuple[int, int]) -> np.ndarray | None:
    """Example ``index``'s guided Grad-CAM ``(C, H, W)`` resized to the photo's ``shape``, or None.

    None when the explanation carries no guided Grad-CAM (``explanation.guided_grad_cam``,
    ``(N, C, h, w)`` at the input's resolution, from ``explain(..., guided=True)``); the figure
    then has no fourth panel.
    """
    guided = getattr(explanation, "guided_grad_cam", None)
    if guided is None:
        return None
    import gradcam_ref
    from gradcam_ref._arrays import to_numpy

    return gradcam_ref.upsample(np.asarray(to_numpy(guided[index]), dtype=np.float64), tuple(shape))


def load_image(path: Path) -> np.ndarray:
    """``viz.load_image`` with its error as a :class:`UsageError`."""
    from gradcam_ref import viz

    try:
        return viz.load_image(path)
    except ValueError as error:
        raise UsageError(str(error)) from None


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(N, C)`` logits, computed stably."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def check_output(option: str, value: str | os.PathLike[str], *, folder: bool) -> Path:
    """``option``'s path, refused before any work if it cannot be written; the one check of every command.

    ``folder``: the output is a folder (created with its missing parents, or an existing one
    written into); otherwise a file, written atomically (a temporary file beside it, renamed).
    Refused: a file (or anything but a folder) where a folder must be or above the path, a
    folder where the file must be, a missing name too long for the file system, and a place
    that takes no new entry (a read-only or virtual file system: an empty temporary folder is
    made in the nearest existing folder and removed at once, since no permission bit tells
    that, nor anything to root).

    Raises:
      UsageError: ``"{option} {value}: {why}"``, one line.
    """
    path = Path(value)
    problem = _output_problem(path, folder)
    if problem is not None:
        raise UsageError(f"{option} {path}: {problem}")
    return path


def _output_problem(path: Path, folder: bool) -> str | None:
    """Why ``path`` cannot be written (see :func:`check_output`), or None."""
    chain = [path, *path.parents]
    found = next((p for p in chain if os.path.lexists(p)), None)
    if found is None:
        return "cannot create it (no folder above it exists)"
    if found == path:
        if folder and not path.is_dir():
            return "exists and is not a directory"
        if not folder and path.is_dir():
            return "is a directory, not a file"
        base, missing = (path if folder else path.parent), []
    else:
        if not found.is_dir():
            return f"{found} is a file, not a directory" if found.is_file() else f"{found} is not a directory"
        base, missing = found, list(path.relative_to(found).parts)
    try:
        longest = os.pathconf(base, "PC_NAME_MAX")
    except (OSError, ValueError):  # not known here
        longest = None
    if longest is not None and longest > 0 and any(len(os.fsencode(name)) > longest for name in missing):
        return f"cannot create it ({os.strerror(errno.ENAMETOOLONG)})"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".gradcam-ref-probe-", dir=base))
    except OSError as error:
        where = "cannot write into it" if base == path else "cannot create it"
        return f"{where} ({error.strerror or error})"
    return None


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A staging folder inside ``out``; its files move into ``out`` only if the block succeeds.

    ``out`` is checked by :func:`check_output` first (the commands check it before any work as
    well). On failure the staging folder is removed, and so are ``out`` and the parents of it
    that this call created: nothing is left behind.
    """
    check_output("--out", out, folder=True)
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # since the check, something else got in the way
        raise UsageError(f"--out {out}: cannot create it ({error.strerror or error})") from None
    stage = Path(tempfile.mkdtemp(prefix=".gradcam-ref-", dir=out))
    try:
        with terminate_as_exit():
            yield stage
        for path in sorted(stage.iterdir()):
            os.replace(path, out / path.name)
    except BaseException:
        shutil.rmtree(created if created is not None else stage, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


TERMINATED = 128 + signal.SIGTERM
"""Exit status after SIGTERM (the shell's convention, 143)."""


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` in the block, so that it unwinds like Ctrl-C (SIGINT).

    Python's default for SIGTERM is to die at once, with no ``finally`` run: a staging folder
    would stay behind, half-written. The previous handler is put back afterwards. Outside the
    main thread (where handlers cannot be set) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(TERMINATED)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line(error: BaseException) -> str:
    """``Type: message`` of an exception raised by the user's code, on one line."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def import_torch_cli() -> Any:
    return importlib.import_module("gradcam_ref.cli._torch")
