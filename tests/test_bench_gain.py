"""benchmarks.bench_gain: the steps it times compute what they claim (small ResNet-18, float64)."""

import pytest
import torch

from benchmarks import bench_gain


@pytest.mark.slow
def test_gain_stop_step_equals_the_hand_written_public_recipe_and_full_differs():
    grads: dict = {}
    for call in bench_gain.calls(batch=2, size=64, dtype=torch.float64, grads=grads).values():
        call()
    assert set(grads) == {"train step", "gain stop", "gain full", "hand-written stop"}
    for ours, hand in zip(grads["gain stop"], grads["hand-written stop"], strict=True):
        torch.testing.assert_close(ours, hand, rtol=1e-9, atol=1e-12)
    # "full" adds the path through alpha: layer4 and fc get other gradients
    assert any(not torch.allclose(f, s) for f, s in zip(grads["gain full"], grads["gain stop"], strict=True))
    assert any(not torch.allclose(g, t) for g, t in zip(grads["gain stop"], grads["train step"], strict=True))
