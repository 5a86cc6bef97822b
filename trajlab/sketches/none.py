"""No per-sample information: weights, batch gradient and updates only (``per_sample=False``)."""

from __future__ import annotations

from trajlab.sketches.base import SketchKind


class NoSketch(SketchKind):
    """For models whose layers mix samples (BatchNorm in train mode) or when per-sample data is
    not wanted: the analysis gives K, the flow drift and the pathwise terms; noise terms are
    absent (NaN, with the reason in the dataset's attributes)."""

    name = "none"
    summary = "weights only (no per-sample information)"
    per_sample = False

    def needs(self) -> tuple[str, ...]:
        return ()
