"""Shared pytest configuration."""

import sys
from pathlib import Path

# Make the repository root importable (for ``fxmem`` in a non-installed checkout and for
# the ``bench`` package, which is not installed) regardless of how pytest is started.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)
