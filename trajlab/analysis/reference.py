"""The per-step reference path of the layer analysis: one step at a time, no batching.

The vectorised :func:`trajlab.analysis.tasks.layer_chunk` must equal this at 1e-10 (tests), and
the analysis benchmark measures its speed-up against it in the same run.
"""

from __future__ import annotations

import numpy as np
import torch

from trajlab.analysis.plan import Plan
from trajlab.analysis.tasks import _forward_terms, _start, _t, read_chunk
from trajlab.analysis.variables import variables
from trajlab.sde import noise_free_terms, sketch_layer_terms


def layer_chunk_per_step(plan: Plan, li: int, rows: tuple[int, int]) -> dict[str, np.ndarray]:
    """Same result as :func:`~trajlab.analysis.tasks.layer_chunk`, computed step by step with
    the SVD-form kernels, from the same inputs (:func:`~trajlab.analysis.tasks.read_chunk`)."""
    c = read_chunk(plan, li, rows)
    kind, vals, opts = c.kind, c.vals, plan.options
    n = rows[1] - rows[0]
    keys = list(variables("layer", operator=opts.operator))
    out, ok = _start(plan, c, n)
    for i in np.flatnonzero(ok):
        b = int(c.batch[i])
        W, U = _t(vals["weight"][i]), _t(vals["update"][i])
        full = _t(vals["probe_grad"][i]) if c.probed is not None and c.probed[i] else None
        t = c.tensors(i, b) if kind.per_sample else None
        G = c.grad(i, t)
        if kind.per_sample and b >= 2:
            terms = sketch_layer_terms(W, G, U, float(out["lr"][i]), c.lm.sketch, t,
                                       grad_full=full, population=opts.population,
                                       gap_tol=opts.gap_tol)
            terms["coverage"] = torch.minimum(terms["coverage_u"], terms["coverage_v"])
            out["noise_proj"][i, :b] = terms["noise_proj"].numpy()
        else:
            terms = noise_free_terms(W, G, U, float(out["lr"][i]), grad_full=full,
                                     gap_tol=opts.gap_tol)
        for k in keys:
            if k in terms and k != "noise_proj":
                out[k][i] = terms[k].item()
    noisy = ok & (c.batch >= 2) if kind.per_sample else np.zeros(n, dtype=bool)
    _forward_terms(plan, c, rows, out, noisy)  # from the terms above (docs/math.md 8)
    return out
