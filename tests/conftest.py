"""Shared test setup: hypothesis profiles, and torchvision imported before TensorFlow.

``HYPOTHESIS_PROFILE=dev`` (default) and ``ci`` keep the suite fast; ``long`` is for a soak run:
``HYPOTHESIS_PROFILE=long make test``.
"""

import importlib.util
import os

from hypothesis import HealthCheck, settings

# Import order: torchvision before TensorFlow. The other order crashes the interpreter (torch
# 2.14.1, torchvision 0.29.1, tensorflow 2.21.0), so that a session collecting a TensorFlow test
# module before a torchvision one would die without a traceback (docs/backends.md).
if importlib.util.find_spec("torchvision") is not None:
    import torchvision  # noqa: F401

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
