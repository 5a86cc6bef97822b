"""What an analysis computes: its options and the plan of one run (small, picklable)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from trajlab.store import Run
from trajlab.store.metadata import AnalysisMeta, LayerMeta


@dataclass(frozen=True)
class AnalysisOptions:
    """Choices that change the result; stored in the analysis store's attributes.

    Attributes
    ----------
    gradient : "auto" (full-data probe gradient where recorded, else the batch gradient),
        "batch", or "probe" (same as auto; states intent).
    population : finite-population correction N for batches drawn without replacement.
    gap_tol : relative spectral gap below which a step is flagged ``degenerate``.
    conv_definition : "matrix" or "operator" (adds exact convolution norms, MATH.md §6).
    optimizer : the optimizer whose SDE the default prediction integrates, as a kind name
        ("sgd", "momentum", "adam", "adamw") or the JSON of a
        :class:`trajlab.sde.optimizer.OptimizerSpec`; None: from the run's metadata
        (docs/math.md §8).
    """

    gradient: str = "auto"
    population: int | None = None
    gap_tol: float = 1e-3
    conv_definition: str = "matrix"
    optimizer: str | None = None

    def __post_init__(self) -> None:
        if self.optimizer is not None:
            from trajlab.analysis.assemble import parse_optimizer

            parse_optimizer(self.optimizer)  # a clear error now rather than in a graph node
        if self.gradient not in ("auto", "batch", "probe"):
            raise ValueError(f"gradient must be 'auto', 'batch' or 'probe', got "
                             f"{self.gradient!r}")
        if self.conv_definition not in ("matrix", "operator"):
            raise ValueError(f"conv_definition must be 'matrix' or 'operator', got "
                             f"{self.conv_definition!r}")
        if not (isinstance(self.gap_tol, (int, float)) and 0 <= self.gap_tol < 1):
            raise ValueError(f"gap_tol must be a number in [0, 1), got {self.gap_tol!r}")
        if self.population is not None and (isinstance(self.population, bool) or not
                                            isinstance(self.population, (int, np.integer))
                                            or self.population < 2):
            raise ValueError(f"population must be an integer >= 2 (the data set size N), got "
                             f"{self.population!r}")

    @property
    def operator(self) -> bool:
        return self.conv_definition == "operator"


@dataclass(frozen=True)
class Plan:
    """The analysis of one run: what every graph node of that run needs to know.

    Attributes
    ----------
    store, storage_options : where the run store is.
    run_id : the run's identity (an analysis is keyed to it).
    layers : the analysed layers' metadata, in order.
    rows : (first, stop) committed rows analysed.  steps : (first, last) step indices.
    chunk_rows : rows per graph node.  every : optimizer steps per recorded row.
    sample_capacity : padded length of the per-sample axis.
    options : :class:`AnalysisOptions`.
    """

    store: Any
    storage_options: dict | None
    run_id: str
    layers: tuple[LayerMeta, ...]
    rows: tuple[int, int]
    steps: tuple[int, int]
    chunk_rows: int
    every: int
    sample_capacity: int
    options: AnalysisOptions

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(lm.name for lm in self.layers)

    @property
    def chunks(self) -> list[tuple[int, int]]:
        r0, r1 = self.rows
        return [(a, min(a + self.chunk_rows, r1)) for a in range(r0, r1, self.chunk_rows)]

    @property
    def n_rows(self) -> int:
        return self.rows[1] - self.rows[0]

    def relative(self, rows: tuple[int, int]) -> slice:
        """Rows of the run as rows of the analysis store."""
        return slice(rows[0] - self.rows[0], rows[1] - self.rows[0])

    def meta(self, *, created: str, version: str) -> AnalysisMeta:
        return AnalysisMeta(run=str(self.store), run_id=self.run_id, rows=self.rows,
                            steps=self.steps, layers=self.names, chunk_rows=self.chunk_rows,
                            options=dataclasses.asdict(self.options), created=created,
                            trajlab_version=version)


def make_plan(run: Run, layers, steps, chunk_rows, options: AnalysisOptions) -> Plan:
    """Check the request against the run and fix what will be computed."""
    if run.n_steps == 0:
        raise ValueError(f"{run.store!r} has no committed steps to analyse")
    if isinstance(layers, str):
        layers = [layers]  # one layer's name, not its characters
    names = tuple(run.layers if layers is None else layers)
    if not names:
        raise ValueError("layers=[] selects nothing; pass None to analyse every recorded layer")
    metas = tuple(run.layer_meta(n) for n in names)  # KeyError naming the recorded layers
    all_steps = run.root_rows(["step"])["step"]  # with zarr: no Dask compute while planning
    if steps is None:
        rows = (0, run.n_steps)
    else:
        if isinstance(steps, slice):
            lo = all_steps[0] if steps.start is None else steps.start
            hi = all_steps[-1] + 1 if steps.stop is None else steps.stop
        else:
            lo, hi = steps
        sel = np.flatnonzero((all_steps >= lo) & (all_steps < hi))
        if sel.size == 0:
            raise ValueError(
                f"steps [{lo}, {hi}) select no recorded step; this run holds steps "
                f"{all_steps[0]}..{all_steps[-1]}"
            )
        rows = (int(sel[0]), int(sel[-1]) + 1)
    n = rows[1] - rows[0]
    _check_consecutive(all_steps[rows[0]:rows[1]], run.meta.every)
    bs = run.root_rows(["batch_size"], rows)["batch_size"]
    if (bs < 2).all() and any(_per_sample(lm) for lm in metas):
        raise ValueError(
            "every selected step has batch size 1: the gradient-noise terms need batch size >= 2 "
            "(MATH.md §1); record with larger batches. (Steps with batch size 1 among others are "
            "analysed without noise terms, which are NaN there.)"
        )
    if chunk_rows is None:
        chunk_rows = _default_chunk_rows(run, metas, n)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) \
            or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an integer >= 1, got {chunk_rows!r}")
    return Plan(run.store, run.storage_options, run.meta.identity, metas, rows,
                (int(all_steps[rows[0]]), int(all_steps[rows[1] - 1])), int(chunk_rows),
                int(run.meta.every), run.sample_capacity, options)


def _per_sample(lm: LayerMeta) -> bool:
    from trajlab.sketches import sketch_kind

    return sketch_kind(lm.sketch).per_sample


def _check_consecutive(steps: np.ndarray, every: int) -> None:
    """The SDE is integrated over consecutive recorded steps: a gap (a recording resumed with
    ``start_step``, e.g. from a later checkpoint) would be integrated as one step and the
    measured K would jump, so it is refused with the ranges to analyse instead."""
    jumps = np.flatnonzero(np.diff(steps) != every)
    if jumps.size:
        i = int(jumps[0])
        a, b = int(steps[i]), int(steps[i + 1])
        more = f" (and {jumps.size - 1} more)" if jumps.size > 1 else ""
        raise ValueError(
            f"the recorded steps are not consecutive: step {a} is followed by step {b} "
            f"(every={every}){more}, e.g. a recording resumed with start_step; the SDE cannot be "
            f"integrated across the gap. Analyse each part on its own: steps=({int(steps[0])}, "
            f"{a + 1}) and steps=({b}, {int(steps[-1]) + 1})")


def _default_chunk_rows(run: Run, metas, n: int) -> int:
    """Rows per node: one chunk of the run store (``chunk_steps`` rows), or an even part of
    one where the rows a node reads would exceed ~128 MB, and not more than the run.

    A node that reads part of a stored chunk decodes all of it, and every node pays a fixed
    cost (~10-20 ms: its reads and kernel calls), so nodes aligned with the stored chunks are
    the cheapest; parallelism comes from the layers, the chunks and the runs of a sweep. The
    node computes its rows in blocks whose float64 working set is bounded separately
    (:func:`trajlab.analysis.tasks.block_rows`).
    """
    per_row = max(4 * (3 * lm.shape[0] * lm.shape[1] + run.sample_capacity * sum(lm.shape))
                  for lm in metas)  # weight, grad, update and per-sample factors, float32
    by_memory = max(1, (128 << 20) // max(per_row, 1))
    stored = max(1, int(run.meta.chunk_steps))
    rows = stored // math.ceil(stored / by_memory)  # an even part of a stored chunk
    return int(max(1, min(rows, n)))
