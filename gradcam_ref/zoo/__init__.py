"""Real pretrained networks that ship offline inside pip wheels, for demos and cross-checks.

Each module imports its framework only when a function that needs it is called. The ImageNet
input statistics live here, once: every model, command, test and benchmark reads them from here.
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""torchvision's ImageNet channel statistics for inputs in [0, 1] (RGB)."""

IMAGENET_SIZE = 224
"""The usual ImageNet input side, in pixels."""
