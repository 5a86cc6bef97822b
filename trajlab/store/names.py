"""Names shared by every reader and writer of trajlab stores: dimensions and attribute keys.

Defined once here; the layouts (:mod:`trajlab.store.layout`) and sketch kinds
(:mod:`trajlab.sketches`) build on them.
"""

from __future__ import annotations

from trajlab.dims import IN, LAYER, OUT, RANK, SAMPLE, STEP  # noqa: F401  (re-exported)

#: Root attribute holding the run's metadata (:class:`trajlab.store.metadata.RunMeta`).
ATTR_KEY = "trajlab"
#: Root attribute holding the number of committed rows (the commit marker).
COMMIT_KEY = "trajlab_committed"
#: Root attribute holding the committed length of the sample axis (set after every array grew).
SAMPLES_KEY = "trajlab_samples"
#: Attribute of a layer group holding its :class:`trajlab.store.metadata.LayerMeta`.
LAYER_ATTR_KEY = "trajlab_layer"
#: Group holding one group per recorded layer.
LAYERS_GROUP = "layers"
#: Root array (uint8 bytes of a JSON document, one uncompressed chunk) allocated at creation, so
#: that a truncation reason can be written in place even when the disk is full (no new blocks).
TRUNCATION_ARRAY = "truncation"
TRUNCATION_RESERVE = 4096
#: Root array (format 3) holding, for every chunk of every run-store array, the CRC32C
#: checksums its file may carry at that position (:mod:`trajlab.store.manifest`).
CHUNKS_ARRAY = "trajlab_chunks"
