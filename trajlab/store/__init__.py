"""The versioned Zarr run store: layout, writer, lazy reader, reconstructions."""

from trajlab.store.reader import Run, open_run
from trajlab.store.run_store import RunStoreWriter, StepRecord, StoreError, StoreExistsError
from trajlab.store.schema import FORMAT_VERSION, LayerMeta, RunMeta

__all__ = [
    "FORMAT_VERSION",
    "LayerMeta",
    "Run",
    "RunMeta",
    "RunStoreWriter",
    "StepRecord",
    "StoreError",
    "StoreExistsError",
    "open_run",
]
