"""The version of trajlab, held once (a leaf module: read by pyproject.toml and by the code that
stamps stores, without importing the package)."""

__version__ = "0.3.0.dev0"
