from __future__ import annotations

# The one place of ge2e_ext's version: setup.py reads this line (without importing
# the package) and ge2e_ext/__init__.py imports it.
__version__ = "0.2.0"
