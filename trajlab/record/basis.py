"""Top-k singular subspaces of weight matrices, warm-started from the previous recorded step."""

from __future__ import annotations

import torch
from torch import Tensor

Basis = tuple[Tensor, Tensor, Tensor]


class SubspaceTracker:
    """Keeps each layer's last top-k singular basis and refreshes it from the current weight.

    Small layers (min(m, n) <= ``exact_max``) use an exact SVD. Larger ones start from an exact
    SVD and then track the subspace with a few warm-started block iterations per recorded step
    (:func:`trajlab.spectral.top_singular`, at most ``max_iter``, stopped at relative residual
    ``tol``): weights move little between steps, so this keeps the basis cost near one backward
    pass of the layer. The residual reached is recorded with every step (``basis_residual``)
    and the analysis reports how much of the top singular pair the basis holds (``coverage``).

    A weight holding NaN or Inf gets a NaN basis (its row is then flagged non-finite).

    Bases are computed on the training thread at the layer's first backward of a recorded
    step, from the weight as it is then. (Computing them ahead on a helper thread, overlapping
    the forward pass, was tried and removed: no gain in steady state with
    ``OMP_WAIT_POLICY=PASSIVE``, and +4 ms per recorded step of the demo ConvNet under
    OpenMP's default wait policy, whose spinning threads took the training thread's core;
    benchmarks/README.md.)
    """

    def __init__(self, k: int, *, exact_max: int = 256, tol: float = 1e-5,
                 max_iter: int = 3) -> None:
        self.k = k
        self.exact_max = exact_max
        self.tol = tol
        self.max_iter = max_iter
        self._prev: dict[str, object] = {}

    def rank_for(self, shape: tuple[int, int]) -> int:
        return max(1, min(self.k, shape[0], shape[1]))

    @torch.no_grad()
    def basis(self, name: str, W: Tensor) -> Basis:
        """(U (m, k), V (n, k), residual ()) for the current weight matrix ``W``."""
        k = self.rank_for(tuple(W.shape))
        if not bool(torch.isfinite(W).all()):
            nan = float("nan")
            return (torch.full((W.shape[0], k), nan, dtype=W.dtype, device=W.device),
                    torch.full((W.shape[1], k), nan, dtype=W.dtype, device=W.device),
                    torch.tensor(nan, dtype=torch.float64))
        if min(W.shape) <= self.exact_max:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, V = U[:, :k], S[:k], Vh[:k].transpose(0, 1)
            s1 = S[0].clamp_min(torch.finfo(W.dtype).tiny)
            residual = (torch.linalg.vector_norm(W @ V - U * S, dim=0).amax() / s1)
            return U, V, residual
        from trajlab.spectral import top_singular

        prev = self._prev.get(name)
        res = (top_singular(W, k=k, method="svd") if prev is None else
               top_singular(W, k=k, init=prev, method="iterative", tol=self.tol,
                            max_iter=self.max_iter, warn=False))  # the residual is recorded
        self._prev[name] = res
        return res.U, res.V, res.residual
