"""The options that more than one ``gradcam-ref`` command takes, declared once, and their value types.

:data:`SHARED` holds the options that two or more commands take with one meaning, among them
:data:`MODEL_OPTIONS` (a torch model and its inputs); :func:`add_shared` adds them to a command,
which may change a default. A command's own options stay with the command.
"""

from __future__ import annotations

import argparse
from typing import Any

from gradcam_ref.zoo import efficientnet_lite0


def floats(text: str) -> tuple[float, ...]:
    """``R,G,B``: comma-separated numbers."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


MAX_PIXELS = 8192 * 8192
"""The largest model input ``--size`` takes, H * W: a batch of such inputs alone is gigabytes, and a
size beyond it (a typo such as 100000) would be allocated until the process is killed."""


def size(text: str) -> tuple[int, int]:
    """``N`` or ``HxW``, positive ints with H * W <= :data:`MAX_PIXELS`: ``(H, W)``."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1 or parts[0] * parts[-1] > MAX_PIXELS:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive ints, at most {MAX_PIXELS} pixels "
                                         f"(8192 x 8192), got {text!r}")
    return (parts[0], parts[-1])


def unit(text: str) -> float:
    """A number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def seed(text: str) -> int:
    """An int >= 0 (NumPy's seeds)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def positive(text: str) -> int:
    """An int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """``K[,K...]``: comma-separated positive ints."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    return values


SHARED: dict[str, dict[str, Any]] = {
    # the model and its inputs (MODEL_OPTIONS)
    "--model": {"default": efficientnet_lite0.MODEL_NAME,
                "help": f"{efficientnet_lite0.MODEL_NAME} (default) or module:factory / path/file.py:factory, "
                "a function returning a torch nn.Module"},
    "--weights": {"metavar": "FILE", "help": "a state dict saved with torch.save(model.state_dict(), FILE); "
                  "read with torch.load(weights_only=True)"},
    "--layer": {"metavar": "NAME", "help": "dotted submodule name whose output is A, e.g. layer4 or features.28 "
                f"(default for {efficientnet_lite0.MODEL_NAME}: its last convolutional features)"},
    "--call": {"type": int, "metavar": "I",
               "help": "which call of a layer module that runs more than once per forward pass (-1: last)"},
    "--device": {"default": "cpu", "choices": ("cpu", "cuda"), "help": "where the model runs (default cpu)"},
    "--size": {"type": size, "metavar": "N|HxW", "help": "model input size (default 224; at most 8192 x 8192 pixels)"},
    "--mean": {"type": floats, "metavar": "R,G,B", "help": "per-channel mean (default ImageNet's)"},
    "--std": {"type": floats, "metavar": "R,G,B", "help": "per-channel std (default ImageNet's)"},
    # the rest
    "--target": {"default": "auto", "metavar": "auto|INT|LABEL",
                 "help": "class to explain: auto (each image's top class), an index or a class name"},
    "--batch-size": {"type": positive, "default": 16, "metavar": "N", "help": "images per forward pass (default 16)"},
    "--seed": {"type": seed, "default": 0, "help": "seed of the metrics' baselines and ROAD's noise (default 0)"},
    "--quiet": {"action": "store_true", "help": "no progress bars"},
}
"""The options of more than one command, with one meaning: flag -> ``add_argument``'s keywords."""

MODEL_OPTIONS = ("--model", "--weights", "--layer", "--call", "--device", "--size", "--mean", "--std")
"""The options that load a torch model and prepare its inputs (explain, explain-dataset, evaluate)."""


def add_shared(command: argparse.ArgumentParser, *flags: str, defaults: dict[str, Any] | None = None) -> None:
    """Add the :data:`SHARED` options ``flags`` to ``command``; ``defaults``: flag -> the command's own
    default (its help still names the value the command ends up using)."""
    defaults = defaults or {}
    for flag in flags:
        keywords = SHARED[flag] | ({"default": defaults[flag]} if flag in defaults else {})
        command.add_argument(flag, **keywords)
