"""Studies built on trajlab: multi-run experiments that check the theory (MATH.md §4a) and the
paper's figures. One module per study, each defining ``STUDY``; the registry
(:mod:`trajlab.studies.registry`, ``STUDIES``) finds them and ``trajlab study NAME`` runs them.
"""

from trajlab.studies.validation import run_validation

__all__ = ["run_validation"]
