"""Shared test setup: hypothesis profiles.

``HYPOTHESIS_PROFILE=dev`` (default) and ``ci`` keep the suite fast; ``long`` is for a soak run:
``HYPOTHESIS_PROFILE=long make test``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
