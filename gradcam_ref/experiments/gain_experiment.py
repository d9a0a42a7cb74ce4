r"""GAIN on SYNTHETIC lesions with a planted cue: does training through Grad-CAM remove the bias?

One small CNN with a single logit (sigmoid: malignant), written in ``jax.lax``, trained with
optax by one jit-compiled step per mode, the same seed, batches and budget for each:

- ``plain``: :math:`L_{cl}`, binary cross-entropy of the logit;
- ``gain``: :math:`L_{self} = L_{cl} + \alpha L_{am}` (Eq. 6), no pixel labels;
- ``gain_ext-K``: :math:`L_{ext}` (Eq. 8) with lesion masks for K training images only; every
  batch carries ``labelled_per_batch`` of them (in place of as many ordinary images).

The map of class c is Grad-CAM at the last convolution, through ``gradcam_ref.explain(...,
params=..., differentiable=mode)``; for the single logit y the two classes are the columns of
``[-y, y]`` (so :math:`s^c = \mathrm{sigmoid}` of the column, the probability of class c). The
GAIN losses start after a warm-up on :math:`L_{cl}` alone. Evaluation: accuracy on the biased,
unbiased and reversed test sets, and, on the unbiased set, the share of Grad-CAM energy (the
upsampled ReLU map of the true class) inside the lesion and on the cue, and the pointing game.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradcam_ref._files import atomic_path
from gradcam_ref.experiments.lesions import SPLITS, SYNTHETIC_NOTE, LesionSet, lesion_splits

__all__ = ["Config", "TrainingDiverged", "evaluate", "modes", "run", "table", "train"]

TEST_SETS = ("biased", "unbiased", "reversed")


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or Inf; the message names the mode and the step."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a run (its hash names the checkpoints)."""

    seed: int = 0
    size: int = 64
    train: int = 640
    test: int = 200
    epochs: int = 10
    batch: int = 32
    learning_rate: float = 1e-2
    masks: tuple[int, ...] = (8, 32)
    labelled_per_batch: int = 8
    alpha: float = 1.0
    w_e: float = 1.0  # the paper's 10 kept L_cl from training at all in our first run (docs/gain.md)
    sigma: float = 0.5
    omega: float = 10.0
    differentiable: str = "stop"
    warmup: float = 0.3

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def modes(config: Config) -> list[str]:
    """The training modes of a run: plain, gain, then one gain_ext per mask count."""
    return ["plain", "gain"] + [f"gain_ext-{k}" for k in config.masks]


# --- the network ----------------------------------------------------------------------------


def init_params(seed: int, widths: Sequence[int] = (8, 16, 32)) -> dict[str, Any]:
    """He-initialised conv weights ``(K_out, K_in, 3, 3)``, zero biases, a ``(K,)`` dense head."""
    rng = np.random.default_rng(seed)
    params, k_in = {}, 3
    for i, k_out in enumerate(widths):
        params[f"c{i}.w"] = rng.standard_normal((k_out, k_in, 3, 3)) * np.sqrt(2.0 / (9 * k_in))
        params[f"c{i}.b"] = np.zeros(k_out)
        k_in = k_out
    params["fc.w"] = rng.standard_normal(k_in) / np.sqrt(k_in)
    params["fc.b"] = np.zeros(())
    return params


def features(params: dict[str, Any], x: Any) -> Any:
    """conv-ReLU-pool, conv-ReLU-pool, conv-ReLU: :math:`A` at 1/4 of the input's side."""
    import jax

    def conv(v: Any, i: int) -> Any:
        out = jax.lax.conv_general_dilated(v, params[f"c{i}.w"], (1, 1), "SAME",
                                           dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return jax.nn.relu(out + params[f"c{i}.b"][:, None, None])

    def pool(v: Any) -> Any:
        return jax.lax.reduce_window(v, -np.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    return conv(pool(conv(pool(conv(x - 0.5, 0)), 1)), 2)  # pixels in [0, 1], centred


def logit(params: dict[str, Any], a: Any) -> Any:
    """The single logit ``(N,)``: global average pooling, then a dense layer."""
    return a.mean(axis=(2, 3)) @ params["fc.w"] + params["fc.b"]


def two_classes(params: dict[str, Any], a: Any) -> Any:
    """``[-y, y]`` ``(N, 2)``: column c is the logit of class c (0 benign, 1 malignant)."""
    import jax.numpy as jnp

    y = logit(params, a)
    return jnp.stack([-y, y], axis=1)


# --- training -------------------------------------------------------------------------------


def _loss(params: Any, x: Any, labels: Any, masks: Any, present: Any, on: Any, *, mode: str, config: Config) -> Any:
    import jax.numpy as jnp
    import optax

    import gradcam_ref
    from gradcam_ref import gain

    if mode == "plain":
        y = logit(params, features(params, x))
        return jnp.mean(optax.sigmoid_binary_cross_entropy(y, labels.astype(y.dtype)))
    e = gradcam_ref.explain((features, two_classes), x, labels, params=params, differentiable=config.differentiable)
    scores = e.scores
    l_cl = jnp.mean(optax.sigmoid_binary_cross_entropy(scores[:, 1], labels.astype(scores.dtype)))
    maps = gain.normalize_maps(e.maps)
    erased = gain.masked_image(x, maps, sigma=config.sigma, omega=config.omega)
    l_am = gain.attention_mining_loss(gain.sigmoid(two_classes(params, features(params, erased))), labels)
    if mode == "gain":
        return gain.self_guided_loss(l_cl, on * l_am, alpha=config.alpha)
    l_e = gain.external_supervision_loss(maps, masks, present)
    return gain.gain_ext_loss(l_cl, on * l_am, on * l_e, alpha=config.alpha, w_e=config.w_e)


def _step_function(mode: str, config: Config, tx: Any) -> Callable:
    import functools

    import jax
    import optax

    loss = functools.partial(_loss, mode=mode, config=config)

    @jax.jit
    def step(params: Any, state: Any, x: Any, labels: Any, masks: Any, present: Any, on: Any) -> Any:
        value, grads = jax.value_and_grad(loss)(params, x, labels, masks, present, on)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    return step


def train(mode: str, data: LesionSet, config: Config, *, progress: bool = True) -> dict[str, np.ndarray]:
    """Train one model; returns its parameters (NumPy float32). Raises :class:`TrainingDiverged`."""
    import jax.numpy as jnp
    import optax
    from tqdm.auto import tqdm

    n = len(data)
    rng = np.random.default_rng(config.seed)
    labelled_pool = rng.permutation(n)[: int(mode.split("-")[1])] if mode.startswith("gain_ext") else None
    tx = optax.adam(config.learning_rate)
    params = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in init_params(config.seed).items()}
    state = tx.init(params)
    step = _step_function(mode, config, tx)
    images = data.images.astype(np.float32)
    lesion = data.lesion_masks.astype(np.float32)
    per_epoch = n // config.batch
    total = per_epoch * config.epochs
    order_rng = np.random.default_rng(config.seed + 1)  # the same batches for every mode
    with tqdm(total=total, desc=f"{mode:>12}", disable=not progress, leave=False) as bar:
        for epoch in range(config.epochs):
            order = order_rng.permutation(n)
            for b in range(per_epoch):
                index = order[b * config.batch:(b + 1) * config.batch].copy()
                present = np.zeros(config.batch, dtype=np.float32)
                if labelled_pool is not None:
                    k = config.labelled_per_batch
                    index[-k:] = labelled_pool[order_rng.integers(0, len(labelled_pool), k)]
                    present[-k:] = 1.0
                else:
                    order_rng.integers(0, 1, config.labelled_per_batch)  # keep the stream in step
                number = epoch * per_epoch + b
                on = np.float32(number >= config.warmup * total)
                params, state, value = step(params, state, images[index], data.labels[index].astype(np.int32),
                                            lesion[index], present, on)
                value = float(value)
                if not np.isfinite(value):
                    raise TrainingDiverged(f"{mode}: the loss is {value} at step {number} of {total}; "
                                           "lower the learning rate or alpha / w_e")
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}")
    return {k: np.asarray(v) for k, v in params.items()}


# --- evaluation -----------------------------------------------------------------------------


def evaluate(params: dict[str, np.ndarray], sets: dict[str, LesionSet]) -> dict[str, float]:
    """Accuracies on the test sets; Grad-CAM energy in the lesion, on the cue, pointing game (unbiased set)."""
    import jax
    import jax.numpy as jnp

    import gradcam_ref

    p = {k: jnp.asarray(v) for k, v in params.items()}
    predict = jax.jit(lambda x: logit(p, features(p, x)))
    out = {}
    for name in TEST_SETS:
        y = np.asarray(predict(jnp.asarray(sets[name].images, dtype=jnp.float32)))
        out[f"acc_{name}"] = float(np.mean((y > 0) == (sets[name].labels == 1)))
    data = sets["unbiased"]
    e = gradcam_ref.explain((features, two_classes), jnp.asarray(data.images, dtype=jnp.float32), data.labels,
                            params=p)
    heat = np.asarray(gradcam_ref.upsample(np.asarray(e.maps, dtype=np.float64), data.images.shape[2:]))
    energy = heat.reshape(len(data), -1).sum(axis=1)
    safe = np.where(energy > 0, energy, 1.0)
    in_lesion = np.where(energy > 0, (heat * data.lesion_masks).reshape(len(data), -1).sum(axis=1) / safe, 0.0)
    on_cue = np.where(energy > 0, (heat * data.cue_masks).reshape(len(data), -1).sum(axis=1) / safe, 0.0)
    peak = heat.reshape(len(data), -1).argmax(axis=1)
    hit = data.lesion_masks.reshape(len(data), -1)[np.arange(len(data)), peak] & (energy > 0)
    out["energy_lesion"] = float(in_lesion.mean())
    out["energy_cue"] = float(on_cue[data.has_cue].mean()) if data.has_cue.any() else 0.0
    out["pointing"] = float(hit.mean())
    out["zero_maps"] = int((energy == 0).sum())
    return out


def table(results: dict[str, dict[str, float]], config: Config) -> str:
    """A Markdown table like GAIN's Table 3: one row per mode."""
    head = ("| mode | acc biased | acc unbiased | acc reversed | energy in lesion | energy on cue | pointing game |\n"
            "|---|---|---|---|---|---|---|\n")
    rows = "".join(
        f"| {mode} | {r['acc_biased']:.3f} | {r['acc_unbiased']:.3f} | {r['acc_reversed']:.3f} | "
        f"{r['energy_lesion']:.3f} | {r['energy_cue']:.3f} | {r['pointing']:.3f} |\n"
        for mode, r in results.items())
    p_benign, p_malignant = SPLITS["train"]
    note = (f"\n{SYNTHETIC_NOTE}; train {config.train} images (cue in {100 * p_malignant:.0f}% of malignant, "
            f"{100 * p_benign:.0f}% of benign), {config.test} per test set, seed {config.seed}, "
            f"{config.epochs} epochs; "
            "energy and pointing game on the unbiased set (map of the true class).\n")
    return head + rows + note


# --- the whole run ------------------------------------------------------------------------


def run(config: Config, out: Path, *, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Data, training of every mode (resumed from ``out/checkpoints``), evaluation, table, figures.

    Each trained model is saved atomically to ``out/checkpoints/<mode>-<config key>.npz``; a rerun
    with the same config loads it instead of training again (an interrupted run resumes there).
    The table, ``results.json`` and the figures are written to ``out`` only when all is done.
    """
    import jax

    sets = lesion_splits(config.seed, {"train": config.train, "biased": config.test, "unbiased": config.test,
                                       "reversed": config.test}, size=config.size)
    log(f"data: {SYNTHETIC_NOTE}; " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    results, trained = {}, {}
    with jax.default_device(jax.devices("cpu")[0]):
        for mode in modes(config):
            path = checkpoints / f"{mode}-{config.key()}.npz"
            if path.exists():
                with np.load(path) as f:
                    params = {k: f[k] for k in f.files}
                log(f"{mode}: loaded {path}")
            else:
                params = train(mode, sets["train"], config, progress=progress)
                _save_atomically(path, params)
            trained[mode] = params
            results[mode] = evaluate(params, sets)
    text = table(results, config)
    staged = out / f".staging-{os.getpid()}"
    staged.mkdir(exist_ok=True)
    try:
        (staged / "table.md").write_text(text)
        (staged / "results.json").write_text(json.dumps({"config": dataclasses.asdict(config), "note": SYNTHETIC_NOTE,
                                                         "results": results}, indent=2))
        best = modes(config)[-1]
        for label, name in ((0, "benign"), (1, "malignant")):
            _figure(sets["unbiased"], label, {"plain": trained["plain"], best: trained[best]},
                    staged / f"gain_{name}.png")
        for path in staged.iterdir():
            os.replace(path, out / path.name)
    finally:
        for path in staged.glob("*"):
            path.unlink()
        staged.rmdir()
    return {"results": results, "table": text}


def _save_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as f:  # a file: savez adds no ".npz"
        np.savez(f, **arrays)  # type: ignore[arg-type]


def _figure(data: LesionSet, label: int, models: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """Seed-style panels (image | heatmap | blend) for each model, on one cue-bearing example of ``label``."""
    import jax.numpy as jnp
    from matplotlib.figure import Figure

    import gradcam_ref
    from gradcam_ref import viz

    candidates = np.flatnonzero((data.labels == label) & data.has_cue)
    if candidates.size == 0:
        candidates = np.flatnonzero(data.labels == label)
    i = int(candidates[0])
    image = np.moveaxis(data.images[i], 0, -1)
    fig = Figure(figsize=(3 * len(models) * 1.6, 2.1), dpi=100)
    name = "malignant" if label else "benign"
    fig.suptitle(f"SYNTHETIC {name} lesion (cue: {'yes' if data.has_cue[i] else 'no'}), Grad-CAM of the true class",
                 fontsize=9)
    for m, (mode, params) in enumerate(models.items()):
        p = {k: jnp.asarray(v) for k, v in params.items()}
        e = gradcam_ref.explain((features, two_classes), jnp.asarray(data.images[i:i + 1], dtype=jnp.float32),
                                [label], params=p)
        heat = np.asarray(e.heatmap(size=image.shape[:2]), dtype=np.float64)[0]
        for j, (title, picture) in enumerate((("image", image), (f"{mode}: heatmap", viz.colorize(heat)),
                                             (f"{mode}: blend", viz.overlay(image, heat)))):
            axes = fig.add_axes((((3 * m) + j) / (3 * len(models)), 0.0, 1 / (3 * len(models)), 0.82))
            axes.imshow(picture, interpolation="nearest")
            axes.set_title(title, fontsize=7)
            axes.set_axis_off()
    fig.savefig(path, format="png")
