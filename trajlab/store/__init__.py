"""The versioned Zarr stores: one package owns the format.

* :mod:`~trajlab.store.names` – dimension names and attribute keys;
* :mod:`~trajlab.store.metadata` – frozen, versioned metadata (runs, layers, geometry, analyses);
* :mod:`~trajlab.store.layout` – every variable of a run store, derived from its metadata;
* :mod:`~trajlab.store.codecs` – compression and checksums;
* :mod:`~trajlab.store.target` – what is at a location; the only code that removes a store;
* :mod:`~trajlab.store.lock` – one writer per store;
* :mod:`~trajlab.store.run_store` – the writer;
* :mod:`~trajlab.store.rows` – checked reads and the one decoder of derived variables;
* :mod:`~trajlab.store.reader` – :func:`open_run` (lazy xarray);
* :mod:`~trajlab.store.analysis_store` – the analysis store's layout;
* :mod:`~trajlab.store.reconstruct` – per-sample gradients implied by a run store.
"""

from trajlab.errors import StoreCorruptError, StoreError, StoreExistsError, StoreLockedError
from trajlab.store.layout import RunLayout
from trajlab.store.metadata import (
    FORMAT_VERSION,
    AnalysisMeta,
    ConvGeometry,
    Geometry,
    LayerMeta,
    RunMeta,
    register_geometry,
)
from trajlab.store.reader import Run, open_run
from trajlab.store.run_store import RunStoreWriter, StepRecord

__all__ = [
    "FORMAT_VERSION",
    "AnalysisMeta",
    "ConvGeometry",
    "Geometry",
    "LayerMeta",
    "Run",
    "RunLayout",
    "RunMeta",
    "RunStoreWriter",
    "StepRecord",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "open_run",
    "register_geometry",
]
