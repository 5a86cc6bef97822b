"""Rank-one layers far from square: per-sample statistics in W's singular basis, not the factors.

A Linear layer's per-sample gradient is ``G_i = outer(delta_i, a_i)`` (:class:`Rank1`). When one
side is much larger than the other (``Linear(4096, 64)``: a_i has 4096 numbers, delta_i 64), the
SDE terms of MATH.md §2–3 need the large factor only through a few contractions with W's singular
vectors, so this kind stores those instead of the factor (docs/math.md, "Sufficient statistics of
rank-one layers"). In the oriented frame ``W_o = W`` (m <= n) or ``W^T`` (m > n), with
``W_o = U diag(S) V^T`` (s = min(m, n)), ``x_i`` the small factor and ``y_i`` the large one
(``G_o,i = outer(x_i, y_i)``), the recorder stores per sample

* ``ps_small`` = x_i (s), ``ps_coords`` = V^T y_i (s), ``ps_big_sqnorm`` = ||y_i||^2,
* ``ps_big_sq_basis[j]`` = sum_q V_qj^2 y_iq^2 and ``ps_big_sq_cross[j]`` = sum_q V_q1 V_qj y_iq^2
  (the diagonal of the noise covariance seen by the Hessian diagonal),
* ``ps_big_mean_dot`` = y_i . (gbar_o^T u_1), gbar the batch mean of the G_i (centring),

and per step the basis it used, ``svd_u`` = U (s, s) and ``svd_s`` = S, from a float64 thin SVD
of the stored (pre-update) weight, and three contractions of the batch mean's elementwise
square N = gbar_o * gbar_o (the var/cov split): ``grad_sq_norm[p]`` = sum_q N_pq,
``grad_sq_basis[p, j]`` = sum_q N_pq V_qj^2 and ``grad_sq_cross[p, j]`` = sum_q N_pq V_q1 V_qj.
The analysis computes every term in that same basis (:mod:`trajlab.sde.basis`), so signs and
rotations within degenerate subspaces never mix two bases. The batch gradient itself is not
implied (its part outside W's row space is not held) and not needed: ``grad`` is not stored
(unless ``store_grad=True`` or ``self_check=False``, as for ``rank1``), and a reader has none.

Capture, rescaling, concatenation and the recorder's checks work on the raw factors, as for
:class:`Rank1`; :meth:`Rank1Basis.finalize` projects them when the step's row is emitted.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from trajlab.dims import RANK, SAMPLE
from trajlab.sketches.base import Var
from trajlab.sketches.rank1 import Rank1

#: The variables of the stored statistics, in the order :meth:`Rank1Basis.finalize` makes them.
STATS = ("ps_small", "ps_coords", "ps_big_sqnorm", "ps_big_sq_basis", "ps_big_sq_cross",
         "ps_big_mean_dot", "svd_u", "svd_s", "grad_sq_norm", "grad_sq_basis", "grad_sq_cross")


class Rank1Basis(Rank1):
    """Exact sufficient statistics of rank-one per-sample gradients in W's singular basis.

    ``rank`` (the layer's sketch rank) is ``min(m, n)``. Per sample ``3 s + 2`` float64 numbers
    and s in the per-sample dtype, against ``m + n`` for :class:`Rank1`; per step
    ``3 s^2 + 2 s`` float64 numbers.
    """

    name = "rank1_basis"
    summary = "rank-1 statistics in W's singular basis"
    exact = False  # every SDE term is exact, but the per-sample gradients are not held
    implies_grad = False
    batch_var = ("ps_small", -2)
    projected = True

    def variables(self, rank: int) -> dict[str, Var]:
        return {
            "ps_small": Var((SAMPLE, RANK), "ps", "per-sample factor on W's smaller side "
                            "(output gradient times the batch size if out <= in, else the "
                            "input)", True),
            "ps_coords": Var((SAMPLE, RANK), "float64", "per-sample factor on W's larger side "
                             "in the recorder's singular basis of that side: V^T y_i", True),
            "ps_big_sqnorm": Var((SAMPLE,), "float64", "squared norm of the larger-side "
                                 "factor ||y_i||^2", True),
            "ps_big_sq_basis": Var((SAMPLE, RANK), "float64", "sum_q V_qj^2 y_iq^2 for each "
                                   "singular vector j of the larger side", True),
            "ps_big_sq_cross": Var((SAMPLE, RANK), "float64", "sum_q V_q1 V_qj y_iq^2 for each "
                                   "singular vector j of the larger side", True),
            "ps_big_mean_dot": Var((SAMPLE,), "float64", "y_i . (gbar_o^T u_1): the larger-side "
                                   "factor against the batch-mean gradient seen through u_1",
                                   True),
            "svd_u": Var((RANK, RANK), "float64", "singular vectors of W's smaller side used for "
                         "the statistics (columns, descending singular values)"),
            "svd_s": Var((RANK,), "float64", "singular values of W used for the statistics"),
            "grad_sq_norm": Var((RANK,), "float64", "sum_q N_pq, N the elementwise square of "
                                "the batch-mean gradient (oriented: smaller side first)", True),
            "grad_sq_basis": Var((RANK, RANK), "float64", "sum_q N_pq V_qj^2", True),
            "grad_sq_cross": Var((RANK, RANK), "float64", "sum_q N_pq V_q1 V_qj", True),
        }

    def batch_size(self, tensors: Mapping[str, Tensor]) -> int:
        key = "ps_small" if "ps_small" in tensors else "ps_grad_out"
        return int(tensors[key].shape[-2])

    def finalize(self, tensors: Mapping[str, Tensor], weight: Tensor) -> dict[str, Tensor]:
        """The stored statistics of an assembled step from its raw factors and ``weight``.

        Parameters
        ----------
        tensors : ``ps_grad_out`` (B, m), ``ps_input`` (B, n): the assembled raw factors.
        weight : (m, n) the weight before the update, as stored.
        """
        if "ps_grad_out" not in tensors:
            return dict(tensors)
        return basis_statistics(tensors["ps_grad_out"], tensors["ps_input"], weight)

    def sample_gradient(self, tensors, i):
        return None  # the stored statistics do not hold it (the checks use the dense capture)

    def sample_gradients(self, tensors):
        raise NotImplementedError("the rank1_basis sketch does not hold the per-sample "
                                  "gradients exactly (record with the 'rank1' sketch)")

    def implied_grad(self, arrays, batch):
        raise NotImplementedError("the rank1_basis sketch does not imply the batch gradient "
                                  "(only its terms); record with store_grad=True to keep it")

    def reconstruct(self, arrays, b):
        raise ValueError(
            "the 'rank1_basis' sketch stores only the statistics of each per-sample gradient "
            "that the SDE terms need (its projection onto W's singular basis, norms and "
            "diagonal contractions), not the gradients themselves; record the layer with the "
            "'rank1' sketch (the default Linear rule) to reconstruct them")

    def directions(self, tensors, u1, v1):
        raise NotImplementedError("the rank1_basis sketch holds no per-sample directions G_i^T "
                                  "u_1 of full length; its noise terms come from "
                                  "trajlab.sde.basis.basis_noise_terms")

    def second_moment(self, tensors):
        raise NotImplementedError("the rank1_basis sketch holds no elementwise second moment; "
                                  "its noise terms come from trajlab.sde.basis.basis_noise_terms")


@torch.no_grad()
def basis_statistics(delta: Tensor, act: Tensor, weight: Tensor) -> dict[str, Tensor]:
    """The :class:`Rank1Basis` statistics of ``G_i = outer(delta_i, act_i)`` for ``weight``.

    Parameters
    ----------
    delta : (B, m) per-sample output gradients.  act : (B, n) per-sample inputs.
    weight : (m, n) the layer's weight before the update.

    Returns
    -------
    dict of str to Tensor
        The variables of :class:`Rank1Basis` (``ps_small`` in ``delta``'s or ``act``'s dtype,
        the rest float64).
    """
    m, n = weight.shape
    flip = m > n
    x, y = (act, delta) if flip else (delta, act)
    W = weight.detach().to(torch.float64)
    U, S, Vh = torch.linalg.svd(W.mT if flip else W, full_matrices=False)
    V = Vh.mT                                            # (b, s)
    y64 = y.to(torch.float64)
    y2 = y64 * y64
    beta = x.to(torch.float64) @ U[:, 0]                 # x_i . u_1
    B = max(int(x.shape[0]), 1)
    gtu = (beta @ y64) / B                               # gbar_o^T u_1 (b)
    gbar = x.to(torch.float64).mT @ y64 / B              # (s, b)
    N = gbar * gbar
    return {
        "ps_small": x.clone(),
        "ps_coords": y64 @ V,
        "ps_big_sqnorm": y2.sum(-1),
        "ps_big_sq_basis": y2 @ (V * V),
        "ps_big_sq_cross": y2 @ (V * V[:, :1]),
        "ps_big_mean_dot": y64 @ gtu,
        "svd_u": U,
        "svd_s": S,
        "grad_sq_norm": N.sum(-1),
        "grad_sq_basis": N @ (V * V),
        "grad_sq_cross": N @ (V * V[:, :1]),
    }


def shape_saving(shape: tuple[int, int], itemsize: int = 4) -> float:
    """Bytes per sample of :class:`Rank1` over those of :class:`Rank1Basis` for an (m, n) layer
    whose per-sample dtype has ``itemsize`` bytes (the statistics are float64)."""
    m, n = int(shape[0]), int(shape[1])
    s = min(m, n)
    return (m + n) * itemsize / (s * itemsize + (3 * s + 2) * 8)
