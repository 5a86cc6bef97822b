"""``trajlab info STORE [--verify]``: a run store's layers, shapes, steps, sizes, coverage and
integrity, or an analysis store's run, steps, chunks and integrity."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from trajlab.cli._args import add_storage_options
from trajlab.cli._util import human
from trajlab.errors import StoreCorruptError


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="describe a run store (layers, shapes, steps, sizes, "
                       "coverage, integrity) or an analysis store (run, steps, chunks, "
                       "integrity)")
    p.add_argument("run", help="run store or analysis store (path or URL)")
    p.add_argument("--verify", action="store_true",
                   help="read every committed (written) chunk and check its checksum (slow on "
                   "big runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_storage_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    report = info_report(args.run, verify=args.verify, progress=not args.quiet,
                         storage_options=args.storage_options)
    print(report.text)
    if report.damaged:
        print(f"trajlab info: error: the store is damaged: {report.damaged[0]}",
              file=sys.stderr)
    return 2 if report.damaged else 0


@dataclass(frozen=True)
class InfoReport:
    """What ``trajlab info`` prints, its integrity problems, and those that are damage
    (unreadable or missing data, a broken commit marker) as opposed to notes (truncation, gaps,
    rows past the commit marker)."""

    text: str
    problems: list[str]
    damaged: list[str]


def format_info(path) -> str:
    """Human-readable summary of a run store (metadata-level integrity only)."""
    return info_report(path).text


def info_report(path, *, verify: bool = False, progress: bool = False,
                storage_options: dict | None = None) -> InfoReport:
    """Summary of a run store and its integrity problems (of an analysis store: see
    :func:`analysis_report`).

    Works on any store trajlab can open: a live recording, one killed while being laid out
    (no committed step yet), a truncated one. ``verify`` reads every committed chunk.
    ``storage_options``: fsspec options for a URL.
    """
    import trajlab
    from trajlab.sketches import sketch_kind
    from trajlab.store.target import inspect

    if inspect(path, storage_options=storage_options).state == "analysis":
        return analysis_report(path, verify=verify, progress=progress,
                               storage_options=storage_options)
    run = trajlab.open_run(path, storage_options=storage_options)
    meta = run.meta
    lines = [f"run store   {path}",
             f"format      v{meta.format_version}"
             + (f" ({run.layout.variant})" if run.layout.variant != f"v{meta.format_version}"
                else "") + f", dtype {meta.dtype}"
             + (f", per-sample {meta.ps_dtype}" if meta.ps_dtype != meta.dtype else "")
             + f", created {meta.created}, trajlab {meta.trajlab_version}, torch "
             f"{meta.torch_version}"]
    if meta.run_id:
        lines.append(f"run id      {meta.run_id}")
    damaged: list[str] = []
    if run.n_steps:
        try:
            steps = run.steps
            lines.append(f"steps       {steps.size} recorded (every {meta.every}): "
                         f"{steps[0]} .. {steps[-1]}")
            bs = run.root_rows(["batch_size"])["batch_size"]
            lines.append(f"batch size  {int(bs.min())}..{int(bs.max())}")
        except StoreCorruptError as e:
            lines.append(f"steps       {run.n_steps} committed (unreadable: see integrity)")
            damaged.append(_short(e))
    else:
        lines.append("steps       none committed (a recording that has not committed its first "
                     "rows yet, or one stopped before)")
    lines.append(f"sampler     {meta.sampler}, dataset size {meta.dataset_size}")
    lines.append("layers")
    width = max((len(n) for n in run.layers), default=4)
    nonfinite = {}
    if run.n_steps:
        for name in run.layers:
            try:
                nonfinite[name] = int(run.layer_rows(name, ["nonfinite"])["nonfinite"].sum())
            except StoreCorruptError as e:
                damaged.append(_short(e))
    for name in run.layers:
        lm = run.layer_meta(name)
        kind = sketch_kind(lm.sketch)
        how = kind.summary.replace("top-k", f"top-{lm.rank}")
        extra = f", {nonfinite[name]} steps with NaN/Inf" if nonfinite.get(name) else ""
        size = human(run.layer_nbytes_stored(name)) if run.n_steps else "-"
        lines.append(f"  {name:<{width}}  {lm.module:<9} W {lm.shape[0]}x{lm.shape[1]}  "
                     f"{lm.positions} position(s)  {how}  {size}{extra}")
    lines += _coverage(meta.model)
    if verify:
        damaged += [p for p in _verify(run, progress) if p not in damaged]
    problems = integrity(run) + damaged
    if verify and run.layout.unchecked:
        lines.append(f"not checked {run.layout.unchecked}")
    lines.append(f"stored      {human(run.nbytes_stored())} compressed")
    checked = " (every committed chunk read and checked)" if verify else ""
    if not problems:
        lines.append("integrity   ok" + checked)
    elif not damaged:  # notes only (truncation, gaps, rows past the commit marker)
        lines.append("integrity   committed data ok" + checked + "; " + "; ".join(problems))
    else:
        lines.append("integrity   " + "; ".join(problems))
    return InfoReport("\n".join(lines), problems, damaged)


def analysis_report(path, *, verify: bool = False, progress: bool = False,
                    storage_options: dict | None = None) -> InfoReport:
    """Summary of an analysis store: its run, steps, layers, chunks done, size, and (with
    ``verify``) every written chunk read and checked. Missing or damaged chunks are damage
    (exit status 2); an unfinished analysis is a note."""
    from tqdm import tqdm  # plain text bars: no ipywidgets needed in notebooks

    from trajlab.analysis.pipeline import INTEGRATED
    from trajlab.store.analysis_store import AnalysisStore, repair_hint

    st = AnalysisStore.open(path, storage_options=storage_options)
    m = st.meta
    n_rows = m.rows[1] - m.rows[0]
    layers = ", ".join(m.layers if len(m.layers) <= 6
                       else [*m.layers[:3], "...", *m.layers[-2:]])
    lines = [f"analysis store {path}",
             f"format      analysis v{m.format_version}, created {m.created}, trajlab "
             f"{m.trajlab_version}",
             f"run         {m.run} (run id {m.run_id})",
             f"steps       {n_rows} steps analysed: {m.steps[0]} .. {m.steps[1]} (rows "
             f"{m.rows[0]}..{m.rows[1] - 1} of the run)",
             f"layers      {len(m.layers)}: {layers}"]
    problems: list[str] = []
    damaged: list[str] = []
    if m.state == "layout":
        lines.append("chunks      none (killed while being laid out); rerun trajlab analyze")
        problems.append("unfinished (being laid out)")
    else:
        done = st.done()
        state = "complete" if m.complete else "unfinished (rerun trajlab analyze to resume)"
        lines.append(f"chunks      {int(done.sum())} of {done.size} chunks done ({m.chunk_rows} "
                     f"steps each), {state}")
        if not m.complete:
            problems.append("unfinished")
    lines.append(f"variables   {len(m.variables)}")
    try:
        size = sum(int(a.nbytes_stored()) for _, a in st.group.arrays())
        lines.append(f"stored      {human(size)} compressed")
    except Exception:  # noqa: BLE001 - a damaged array's metadata: reported below
        pass
    if verify:
        with tqdm(total=st.n_checks(), disable=not progress, desc="verifying", unit="chunk",
                  leave=False) as bar:
            found = st.verify(integrals=INTEGRATED, progress=lambda: bar.update(1))
        damaged = [p.message for p in found]
        problems += damaged
        if st.unchecked:
            lines.append(f"not checked {st.unchecked}")
    checked = " (every written chunk read and checked)" if verify else ""
    if not problems:
        lines.append("integrity   ok" + checked)
    elif not damaged:
        lines.append("integrity   written data ok" + checked + "; " + "; ".join(problems))
    else:
        lines.append(f"integrity   {len(damaged)} missing or damaged chunk(s) or array(s):")
        lines += [f"  {p}" for p in damaged[:20]]
        if len(damaged) > 20:
            lines.append(f"  ... and {len(damaged) - 20} more")
        lines += [f"  note: {p}" for p in problems if p not in damaged]
        damaged = [f"{damaged[0]}" + (f" (and {len(damaged) - 1} more)" if len(damaged) > 1
                                      else "") + f"; {repair_hint(str(path))}"]
    return InfoReport("\n".join(lines), problems, damaged)


def _coverage(model: dict) -> list[str]:
    mods = model.get("modules") or []
    if not mods:
        return []
    total = model.get("weight_parameters") or 0
    rec = sum(m.get("recorded_parameters", 0) for m in mods)
    out = [f"coverage    {rec} of {total} weight-matrix parameters recorded"
           + (f" ({100 * rec / total:.0f}%)" if total else "")]
    for m in mods:
        if not m.get("recorded"):
            out.append(f"  not recorded: {m['name'] or '<model>'} ({m['type']}, "
                       f"{m.get('parameters', 0)} parameters): {m.get('why', '')}")
    for why in model.get("not_a_bound", []):
        out.append(f"  K_net is not a Lipschitz bound here: {why}")
    if model.get("batchnorm"):
        n = len(model["batchnorm"])
        out.append(f"  BatchNorm: the eval-mode factor max|gamma|/sqrt(running_var+eps) of {n} "
                   "layers is recorded; the analysis " + ("leaves it out of K_net (not a chain)"
                                                          if model.get("not_a_bound") else
                                                          "includes it in K_net"))
    return out


def _short(e: Exception) -> str:
    return str(e).split(". The stored")[0].split("; the data")[0]


def integrity(run) -> list[str]:
    """Problems visible from metadata alone (truncation, gaps, uncommitted rows)."""
    problems = []
    if run.meta.truncated:
        problems.append(f"truncated ({run.meta.truncated})")
    if run.n_steps > 1:
        try:
            steps = run.steps
        except StoreCorruptError:
            steps = np.arange(run.n_steps) * run.meta.every  # reported by the caller
        gaps = np.flatnonzero(np.diff(steps) != run.meta.every)
        if gaps.size:
            problems.append(f"{gaps.size} gap(s) in the step sequence (first after "
                            f"{steps[gaps[0]]})")
    extra = run.uncommitted_rows()
    if extra:
        problems.append(f"space for {extra} row(s) past the commit marker, ignored (a live "
                        "recording's next rows, or what a killed one wrote or had reserved)")
    return problems


def _verify(run, progress: bool) -> list[str]:
    from tqdm import tqdm  # plain text bars: no ipywidgets needed in notebooks

    with tqdm(total=run.n_chunks(), disable=not progress, desc="verifying", unit="chunk",
              leave=False) as bar:
        return run.verify(progress=lambda: bar.update(1))
