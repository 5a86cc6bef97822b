"""Top-k singular subspaces of weight matrices, warm-started from the previous recorded step."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

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

    :meth:`prefetch` starts a basis on a helper thread as soon as the weight is known (the
    recorder calls it right after the optimizer step that precedes a recorded step, so the SVD
    overlaps the next forward pass instead of adding to it); :meth:`basis` then takes that result
    if the weight it is given still equals the snapshot the helper worked on, bit for bit, and
    computes afresh otherwise (a weight edited between the optimizer step and the forward).
    """

    def __init__(self, k: int, *, exact_max: int = 256, tol: float = 1e-5,
                 max_iter: int = 3) -> None:
        self.k = k
        self.exact_max = exact_max
        self.tol = tol
        self.max_iter = max_iter
        self._prev: dict[str, object] = {}
        self._pending: dict[str, tuple[Tensor, Future]] = {}
        self._executor: ThreadPoolExecutor | None = None

    def rank_for(self, shape: tuple[int, int]) -> int:
        return max(1, min(self.k, shape[0], shape[1]))

    def prefetch(self, name: str, W: Tensor) -> None:
        """Start ``name``'s basis for the weight ``W`` (a snapshot is taken now) on a helper
        thread; :meth:`basis` collects it."""
        self.discard(name)
        snapshot = W.detach().clone()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trajlab-basis")
        self._pending[name] = (snapshot, self._executor.submit(self._compute, name, snapshot))

    def basis(self, name: str, W: Tensor) -> Basis:
        """(U (m, k), V (n, k), residual ()) for the current weight matrix ``W``."""
        pending = self._pending.pop(name, None)
        if pending is not None:
            snapshot, future = pending
            try:
                result = future.result()
            except Exception:  # noqa: BLE001 - computed again below, where it raises
                result = None
            if result is not None and torch.equal(snapshot, W):
                return result
        return self._compute(name, W)

    def discard(self, name: str | None = None) -> None:
        """Forget the prefetched basis of ``name`` (of every layer when None)."""
        names = list(self._pending) if name is None else [name]
        for n in names:
            pending = self._pending.pop(n, None)
            if pending is not None:
                pending[1].cancel()

    def close(self) -> None:
        """Drop prefetched bases and stop the helper thread."""
        self.discard()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @torch.no_grad()
    def _compute(self, name: str, W: Tensor) -> Basis:
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
