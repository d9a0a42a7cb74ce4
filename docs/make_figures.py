"""Make every figure of the docs: ``python docs/make_figures.py [OUT_DIR]`` (default docs/figures).

Run by ``make docs`` and by tests/test_docs.py before ``mkdocs build --strict``; the figures are
build outputs, not committed. Each one is computed by gradcam_ref on the NumPy oracle, so a
change in the library shows up in the pictures. The worked example's network is not redefined
here: it is taken from the ``python`` blocks of docs/worked-example.md, so page and picture
cannot drift apart.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from gradcam_ref.backends.numpy_backend import Oracle  # noqa: E402
from matplotlib import patheffects  # noqa: E402

import gradcam_ref  # noqa: E402

DOCS = Path(__file__).resolve().parent
PYTHON_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def page_namespace(page: str) -> dict:
    """Run the ``python`` blocks of a docs page and return the names they define."""
    namespace: dict = {}
    for code in PYTHON_BLOCK.findall((DOCS / page).read_text()):
        exec(compile(code, page, "exec"), namespace)
    return namespace


def show_grid(ax: plt.Axes, values: np.ndarray, title: str, vmin: float, vmax: float, cmap: str) -> None:
    """A small matrix as coloured cells with its numbers written in."""
    ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax)
    outline = [patheffects.withStroke(linewidth=2.5, foreground="white")]
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=10, path_effects=outline)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def worked_example(out: Path) -> None:
    ns = page_namespace("worked-example.md")
    e = gradcam_ref.explain(ns["model"], ns["x"], target=[[0, 1]])
    signed = gradcam_ref.cam(e.activations, e.weights)[0]
    up = gradcam_ref.upsample(e.maps, (3, 3))[0]
    rows = [
        [(ns["x"][0, 0], "input x", "gray"),
         (e.activations[0, 0], "$A^1$", "viridis"),
         (e.activations[0, 1], "$A^2$", "viridis")],
    ] + [
        [(signed[c], rf"class {c}: $\sum_k \alpha_k^{c} A^k$", "RdBu_r"),
         (e.maps[0, c], f"$L^{c}$ = ReLU of it", "inferno"),
         (up[c], f"$L^{c}$ upsampled to 3x3", "inferno")]
        for c in (0, 1)
    ]
    fig, axes = plt.subplots(3, 3, figsize=(6.6, 6.6))
    for ax_row, row in zip(axes, rows, strict=True):
        for ax, (values, title, cmap) in zip(ax_row, row, strict=True):
            bound = max(abs(values.min()), abs(values.max()), 1e-12)
            vmin, vmax = (-bound, bound) if cmap == "RdBu_r" else (min(values.min(), 0), bound)
            show_grid(ax, values, title, vmin, vmax, cmap)
    fig.tight_layout()
    fig.savefig(out / "worked-example.png", dpi=120)
    plt.close(fig)


def bars_model() -> tuple[Oracle, np.ndarray]:
    """A two-filter network that tells vertical strokes (class 0) from horizontal ones (class 1)."""
    line = np.array([[-1.0, 2.0, -1.0]] * 3) / 3  # responds to a vertical line of width 1
    convs = [(np.stack([line, line.T])[:, None], np.array([-0.5, -0.5]))]
    head = [(np.array([[1.0, -1.0], [-1.0, 1.0]]), np.zeros(2))]
    x = np.zeros((1, 1, 24, 24))
    x[0, 0, 3:19, 6] = 1.0  # a vertical stroke on the left
    x[0, 0, 16, 10:21] = 1.0  # a shorter horizontal stroke at the bottom right
    return Oracle(convs, "gap", head), x


def relu_and_counterfactual(out: Path) -> None:
    model, x = bars_model()
    e = gradcam_ref.explain(model, x, target=0)
    size = x.shape[2:]
    signed = gradcam_ref.upsample(gradcam_ref.cam(e.activations, e.weights), size)[0]
    relu = gradcam_ref.upsample(e.maps, size)[0]
    counter = gradcam_ref.upsample(gradcam_ref.grad_cam(e.activations, -e.gradients), size)[0]
    bound = np.abs(signed).max()
    fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
    axes[0].imshow(x[0, 0], cmap="gray")
    axes[0].set_title("input: scored 'vertical'", fontsize=9)
    axes[1].imshow(signed, cmap="RdBu_r", vmin=-bound, vmax=bound)
    axes[1].set_title(r"no ReLU: $\sum_k \alpha_k^c A^k$", fontsize=9)
    axes[2].imshow(relu, cmap="inferno", vmin=0, vmax=bound)
    axes[2].set_title("Grad-CAM: ReLU of it", fontsize=9)
    axes[3].imshow(counter, cmap="inferno", vmin=0, vmax=bound)
    axes[3].set_title("counterfactual: negated gradients", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "relu-and-counterfactual.png", dpi=110)
    plt.close(fig)


def upsampling(out: Path) -> None:
    """Half-pixel linear (ours, torch align_corners=False, cv2) vs corner-aligned vs nearest."""
    coarse = np.array([0.0, 1.0, 0.25])
    n_out = 12
    half_pixel = gradcam_ref.upsample(coarse[None], (n_out,))[0]
    corner = np.interp(np.linspace(0, len(coarse) - 1, n_out), np.arange(len(coarse)), coarse)
    nearest = coarse[np.floor((np.arange(n_out) + 0.5) * len(coarse) / n_out).astype(int)]
    centres = (np.arange(n_out) + 0.5) / n_out * len(coarse)  # output pixel centres, input units
    fig, ax = plt.subplots(figsize=(9, 2.8))
    ax.plot((np.arange(3) + 0.5), coarse, "ks", markersize=8, label="map at the layer (3 cells)")
    ax.plot(centres, half_pixel, "o-", label="half-pixel linear (gradcam_ref, torch, cv2)")
    ax.plot(centres, corner, "^--", label="corner-aligned linear (align_corners=True)")
    ax.plot(centres, nearest, "x:", label="nearest (captum's default)")
    ax.set_xlabel("position along the image, in layer cells")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "upsampling.png", dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else DOCS / "figures"
    out.mkdir(parents=True, exist_ok=True)
    worked_example(out)
    relu_and_counterfactual(out)
    upsampling(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
