"""Shared test configuration.

Hypothesis: one profile for every property test. ``ci`` (default) keeps the suite fast on 2 cores; set
``STRUCTATTN_HYPOTHESIS=thorough`` for a long search (e.g. before a release or after changing a kernel)::

    STRUCTATTN_HYPOTHESIS=thorough bash scripts/test.sh tests/test_properties.py tests/test_reliability_attention.py

Both profiles disable hypothesis' per-example deadline and the too-slow health check: examples run float64
dynamic programmes whose time varies with the drawn shapes and with the machine's load, which says nothing about
correctness.
"""

from __future__ import annotations

import os

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the library's own tests do not need hypothesis; the property tests import it themselves
    settings = None

HYPOTHESIS_PROFILES = {"ci": 60, "thorough": 2000}  # profile name -> examples per property

if settings is not None:
    for _name, _examples in HYPOTHESIS_PROFILES.items():
        settings.register_profile(_name, max_examples=_examples, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])
    _profile = os.environ.get("STRUCTATTN_HYPOTHESIS", "ci")
    if _profile not in HYPOTHESIS_PROFILES:
        raise ValueError(f"STRUCTATTN_HYPOTHESIS={_profile!r}: choose one of {sorted(HYPOTHESIS_PROFILES)}")
    settings.load_profile(_profile)
