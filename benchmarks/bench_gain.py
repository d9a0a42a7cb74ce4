"""The cost of training through the map: one GAIN step against one plain training step (torch).

ResNet-18 (random weights, train mode), batch 8 at 224 px, layer ``layer4``, Adam-free: each
call computes a loss and its gradients w.r.t. every parameter (``loss.backward()``), then
clears them. Methods, each a ratio to ``train step`` (forward + backward of the cross-entropy):

- ``gain stop``: ``explain(differentiable="stop")`` (one forward with grad, a backward to the
  layer, graph kept), the erased image's forward (Eq. 3-4), and the backward of L_self (Eq. 6);
- ``gain full``: the same with ``differentiable="full"`` (``create_graph=True``: the second
  order backward through alpha);
- ``hand-written stop``: what public GAIN implementations do, written out (a forward hook keeps
  A, ``torch.autograd.grad(y, A, retain_graph=True)``, alpha = mean of the gradient, detached),
  the same losses: the reference for our "stop". No peer library computes differentiable maps
  (pytorch-grad-cam #266/#488, torchcam #195), so there is no peer row.

    python -m benchmarks.bench_gain [--rounds N]
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.timing import paired_ratios


def _setup(batch: int, size: int, dtype: Any = None) -> tuple[Any, Any, Any]:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).train()
    if dtype is not None:
        model = model.to(dtype)
    x = torch.rand(batch, 3, size, size, dtype=dtype)
    labels = torch.randint(0, 10, (batch,))
    return model, x, labels


def calls(batch: int = 8, size: int = 224, *, dtype: Any = None, grads: dict | None = None) -> dict[str, Any]:
    """The four steps; with ``grads`` (a dict), each step stores its parameter gradients there."""
    import torch
    import torch.nn.functional as F

    import gradcam_ref
    from gradcam_ref import gain

    model, x, labels = _setup(batch, size, dtype)
    current: list[str] = []

    def finish(loss: Any) -> None:
        loss.backward()
        if grads is not None:
            grads[current[-1]] = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)

    def train_step() -> None:
        finish(F.cross_entropy(model(x), labels))

    def gain_losses(maps: Any, scores: Any) -> Any:
        erased = gain.masked_image(x, gain.normalize_maps(maps))
        l_am = gain.attention_mining_loss(gain.sigmoid(model(erased)), labels)
        return gain.self_guided_loss(F.cross_entropy(scores, labels), l_am)

    def ours(mode: str) -> Any:
        def step() -> None:
            e = gradcam_ref.explain(model, x, labels, layer="layer4", differentiable=mode)
            finish(gain_losses(e.maps, e.scores))

        return step

    def hand_written() -> None:
        kept: dict[str, Any] = {}
        handle = model.layer4.register_forward_hook(lambda m, i, o: kept.update(a=o))
        try:
            scores = model(x)
        finally:
            handle.remove()
        a = kept["a"]
        y = scores.gather(1, labels[:, None]).sum()
        (g,) = torch.autograd.grad(y, a, retain_graph=True)
        alpha = g.mean(dim=(2, 3), keepdim=True)
        maps = torch.relu((alpha * a).sum(dim=1))
        finish(gain_losses(maps, scores))

    steps = {"train step": train_step, "gain stop": ours("stop"), "gain full": ours("full"),
             "hand-written stop": hand_written}

    def named(name: str) -> Any:
        def call() -> None:
            current.append(name)
            steps[name]()

        return call

    return {name: named(name) for name in steps}


def run(rounds: int = 10, batch: int = 8) -> list[dict]:
    results = paired_ratios(calls(batch), "train step", rounds=rounds, warmup=1)
    return [{"suite": "gain", "model": "resnet18", "batch": batch, "targets": 1, "method": name,
             "library": "hand-written" if name.startswith("hand") else "gradcam_ref", **r}
            for name, r in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    for row in run(args.rounds, args.batch):
        print(f"{row['method']:>18}: {row['ratio']:.2f}x the training step "
              f"(q1 {row['q1']:.2f}, q3 {row['q3']:.2f}; {row['seconds']:.2f} s)")


if __name__ == "__main__":
    main()
