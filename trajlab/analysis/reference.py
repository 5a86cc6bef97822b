"""The per-step reference path of the layer analysis: one step at a time, no batching.

The vectorised :func:`trajlab.analysis.tasks.layer_chunk` must equal this at 1e-10 (tests), and
the analysis benchmark measures its speed-up against it in the same run.
"""

from __future__ import annotations

import numpy as np
import torch

from trajlab.analysis.plan import Plan
from trajlab.analysis.tasks import _empty, _t
from trajlab.analysis.variables import variables
from trajlab.sde import noise_free_terms, sketch_layer_terms
from trajlab.sketches import sketch_kind
from trajlab.store import open_run


def layer_chunk_per_step(plan: Plan, li: int, rows: tuple[int, int]) -> dict[str, np.ndarray]:
    """Same result as :func:`~trajlab.analysis.tasks.layer_chunk`, computed step by step."""
    run = open_run(plan.store, storage_options=plan.storage_options)
    lm = plan.layers[li]
    kind = sketch_kind(lm.sketch)
    opts = plan.options
    n = rows[1] - rows[0]
    root = run.root_rows(["batch_size", "probe"], rows)
    use_probe = opts.gradient in ("auto", "probe") and run.meta.probe and bool(root["probe"].any())
    names = ["lr", "weight", "grad", "update", "nonfinite", "grad_scale",
             *(kind.needs() if kind.per_sample else ())] + (["probe_grad"] if use_probe else [])
    vals = run.layer_rows(lm.name, names, rows)
    keys = list(variables("layer", operator=opts.operator))
    out = _empty(keys, n, plan.sample_capacity)
    out["lr"] = vals["lr"].astype(np.float64)
    out["dt"] = out["lr"] * plan.every
    out["grad_scale"] = vals["grad_scale"].astype(np.float64)
    for i in range(n):
        W, G, U = vals["weight"][i], vals["grad"][i], vals["update"][i]
        b = int(root["batch_size"][i])
        if vals["nonfinite"][i] or not (np.isfinite(W).all() and np.isfinite(G).all()):
            continue
        full = None
        if use_probe and root["probe"][i]:
            full = _t(vals["probe_grad"][i])
        if kind.per_sample and b >= 2:
            t = {k: _t(vals[k][i][:b] if kind.variables(lm.rank)[k].per_sample else vals[k][i])
                 for k in kind.needs()}
            terms = sketch_layer_terms(_t(W), _t(G), _t(U), float(out["lr"][i]), lm.sketch, t,
                                       grad_full=full, population=opts.population,
                                       gap_tol=opts.gap_tol)
            terms["coverage"] = torch.minimum(terms["coverage_u"], terms["coverage_v"])
            out["noise_proj"][i, :b] = terms["noise_proj"].numpy()
        else:
            terms = noise_free_terms(_t(W), _t(G), _t(U), float(out["lr"][i]), grad_full=full,
                                     gap_tol=opts.gap_tol)
        for k in keys:
            if k in terms and k != "noise_proj":
                out[k][i] = terms[k].item()
    return out
