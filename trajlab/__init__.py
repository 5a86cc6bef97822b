"""trajlab: record PyTorch training runs and analyse the Lipschitz dynamics of SGD offline.

Top-level API: :class:`Recorder`, :func:`open_run`, :func:`per_sample_gradients`,
:func:`register_rule`, :func:`estimate` (a cost plan) and, from the analysis layer,
:func:`analyze`, :func:`open_analysis`, :func:`open_analyses`. Every error trajlab raises on
purpose is a :class:`TrajlabError`.
"""

from __future__ import annotations

from trajlab._version import __version__

import trajlab.export  # noqa: F401  (trajlab.export.to_tensorboard; tensorboard loads lazily)
import trajlab.plot.accessor  # noqa: F401  (registers ds.lipschitz)
from trajlab.analysis import analyze, open_analyses, open_analysis
from trajlab.cost import estimate
from trajlab.errors import (
    RecorderError,
    SelfCheckError,
    StoreCorruptError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    TrajlabError,
)
from trajlab.data.indexed import WithIndices
from trajlab.record import FullGradientProbe, Recorder, RecorderOptions
from trajlab.record.rules import register_rule
from trajlab.store import Run, open_run
from trajlab.store.reconstruct import PerSampleGradients, per_sample_gradients

__all__ = [
    "FullGradientProbe",
    "PerSampleGradients",
    "Recorder",
    "RecorderError",
    "RecorderOptions",
    "Run",
    "SelfCheckError",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "TrajlabError",
    "WithIndices",
    "__version__",
    "analyze",
    "estimate",
    "open_analyses",
    "open_analysis",
    "open_run",
    "per_sample_gradients",
    "register_rule",
]
