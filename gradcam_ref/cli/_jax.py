"""The JAX side of ``gradcam-ref demo``: the same EfficientNet-Lite0 maps, computed in JAX.

``gradcam_ref.cli`` never imports JAX; it imports this module only when JAX is installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import gradcam_ref
from gradcam_ref.zoo import efficientnet_lite0 as zoo

__all__ = ["efficientnet_explain"]


def efficientnet_explain(state_dict: Mapping[str, Any], batch: np.ndarray, target: Any) -> gradcam_ref.Explanation:
    """Grad-CAM of the JAX port of EfficientNet-Lite0 on ``batch``, as NumPy float64.

    Args:
      state_dict: the torch model's weights (``model.state_dict()``), so that both frameworks
        run the very same float32 numbers.
      batch: the ``(N, 3, H, W)`` float32 array the torch model got.
      target: as in :func:`gradcam_ref.explain`, e.g. the torch explanation's ``targets``.

    The layer is the torch demo's: the split ``(features, head)`` at the last ReLU6,
    ``(N, 1280, H/32, W/32)``; the whole explanation is one ``jax.jit`` program.
    """
    params = zoo.jax_params("float32", state_dict)

    def features(x: jax.Array) -> jax.Array:
        return zoo.jax_features(params, x)

    def head(a: jax.Array) -> jax.Array:
        return zoo.jax_head(params, a)

    return gradcam_ref.explain((features, head), jnp.asarray(batch, dtype=jnp.float32), target).numpy()
