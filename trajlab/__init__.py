"""trajlab: record PyTorch training runs and analyse the Lipschitz dynamics of SGD offline.

Top-level API: :class:`Recorder`, :func:`open_run`, :func:`per_sample_gradients` (and, from
the analysis layer, :func:`analyze`, :func:`open_analysis`).
"""

from __future__ import annotations

__version__ = "0.1.0"

import trajlab.plot.accessor  # noqa: F401  (registers ds.lipschitz)
from trajlab.analysis import analyze, open_analysis
from trajlab.record import FullGradientProbe, Recorder, RecorderError, SelfCheckError
from trajlab.store import Run, StoreError, StoreExistsError, open_run
from trajlab.store.reconstruct import PerSampleGradients, per_sample_gradients

__all__ = [
    "FullGradientProbe",
    "PerSampleGradients",
    "Recorder",
    "RecorderError",
    "Run",
    "SelfCheckError",
    "StoreError",
    "StoreExistsError",
    "__version__",
    "analyze",
    "open_analysis",
    "open_run",
    "per_sample_gradients",
]
