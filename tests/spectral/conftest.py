"""Make the repository importable when trajlab is not installed (namespace checkout)."""

import pathlib
import sys

try:
    import trajlab.spectral  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
