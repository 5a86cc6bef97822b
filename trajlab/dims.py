"""Dimension names shared by every stored and analysed variable (defined once).

Kept outside :mod:`trajlab.store` so that the sketch kinds (:mod:`trajlab.sketches`), which the
store layout builds on, can use them without an import cycle.
"""

STEP = "step"
SAMPLE = "sample"
OUT = "out"
IN = "in"
RANK = "rank"
LAYER = "layer"
#: The channels of every BatchNorm layer of a run, concatenated in module order.
BN_CHANNEL = "bn_channel"
