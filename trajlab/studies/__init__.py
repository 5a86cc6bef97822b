"""Studies built on trajlab: multi-run experiments that check the theory (MATH.md §4a)."""

from trajlab.studies.validation import run_validation

__all__ = ["run_validation"]
