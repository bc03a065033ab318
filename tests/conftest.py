"""pytest configuration shared by every test module.

Hypothesis: CI (the environment variable CI set to true, as .ci/run and CI
services do) runs the "ci" profile, derandomized (the examples are a function
of each test's source, the same on every clean clone) and without the example
database, so a CI run is reproducible; a failure found there is kept as an
@example. Elsewhere the default profile draws new examples each run.
HYPOTHESIS_PROFILE names a profile explicitly.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev")

_profile = os.environ.get("HYPOTHESIS_PROFILE")
if _profile is None and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    _profile = "ci"
if _profile is not None:
    settings.load_profile(_profile)
