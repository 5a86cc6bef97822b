"""Itô dynamics of the Lipschitz constant under SGD, from recorded steps (MATH.md §1–§5).

Pure torch kernels (no I/O), float32/float64, any device, batched over leading dimensions.

* :mod:`~trajlab.sde.sketch`: per-sample projections ``G_i v_1``, ``G_i^T u_1`` and
  ``diag(Sigma)`` from a recorded sketch of any per-sample kind (:mod:`trajlab.sketches`).
* :mod:`~trajlab.sde.layer`: per-layer drift, diffusion, variance/covariance split,
  discretisation and pathwise terms of ``K = s_1(W)``.
* :mod:`~trajlab.sde.resolvent`: the same terms for many steps at once without a full SVD
  (resolvent of the smaller Gram matrix; the analysis's kernel).
* :mod:`~trajlab.sde.diagonal`: the same terms of a diagonal matrix in closed form.
* :mod:`~trajlab.sde.epilogue`: the end terms every layer kernel shares (pathwise terms, the
  optimizer's drift, splits, totals), computed once.
* :mod:`~trajlab.sde.network`: drift and diffusion of ``Z = log prod_l K_l``.
* :mod:`~trajlab.sde.integral`: integrals over steps, log-normal prediction, pathwise sums and
  Euler–Maruyama paths.
"""

from trajlab.sde.diagonal import diagonal_layer_terms
from trajlab.sde.epilogue import layer_epilogue
from trajlab.sde.integral import Z95, euler_maruyama, integrate, logK_prediction, pathwise
from trajlab.sde.layer import (
    layer_terms,
    noise_free_terms,
    noise_scale,
    pathwise_increment,
    sketch_layer_terms,
)
from trajlab.sde.network import NETWORK_KEYS, network_terms
from trajlab.sde.resolvent import resolvent_layer_terms
from trajlab.sde.sketch import (
    noise_diag,
    per_sample_directions,
    sketch_batch_size,
    sketch_coverage,
)

__all__ = [
    "NETWORK_KEYS",
    "Z95",
    "diagonal_layer_terms",
    "euler_maruyama",
    "integrate",
    "layer_epilogue",
    "layer_terms",
    "logK_prediction",
    "network_terms",
    "noise_diag",
    "noise_free_terms",
    "noise_scale",
    "pathwise",
    "pathwise_increment",
    "per_sample_directions",
    "resolvent_layer_terms",
    "sketch_batch_size",
    "sketch_coverage",
    "sketch_layer_terms",
]
