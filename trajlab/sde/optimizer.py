"""Forward predictions for the optimizer that was used (docs/math.md §8).

A prediction is made from terms evaluated at the measured weights: the expected gradient (the
full-data probe), the gradient-noise covariance (the per-sample information) and the optimizer's
fast state rebuilt by its own recursion from expected gradients. The step's realised batch
gradient and update never enter it (they enter the *pathwise reconstruction*, MATH.md §5).

Every optimizer here moves the weights by ``-eta_t d_t`` with an update ``d_t`` that is linear in
the gradients of the current and past steps (the preconditioner of Adam held fixed, from its
slow second moment). A gradient ``x`` that enters at step ``s`` therefore moves the weights at
every later step ``t >= s`` by ``-eta_t gain_t c_{s,t-s} x`` with

====================  ===============================  ===================  ============
optimizer             c_{s,0}                          c_{s,k}, k >= 1      gain_t
====================  ===============================  ===================  ============
SGD                   1                                0                    1
momentum mu, damp. d  1 - d  (1 at the buffer's 1st)   (1 - d) mu^k         1
Nesterov              1 + mu (1 - d)                   (1 - d) mu^(k+1)     1
Adam / AdamW          1 - beta1                        (1 - beta1) beta1^k  1/(1-beta1^(t+1))
====================  ===============================  ===================  ============

and its total effect up to step ``T`` is ``A_{s,T} x`` with the *transfer weight*
``A_{s,T} = sum_{t=s}^{T-1} eta_t gain_t c_{s,t-s}`` (SGD: ``A = eta_s``). Projected on the
top singular pair (directions frozen over the ~1/(1-mu) steps the buffer remembers):

* mean:     ``E[Z_T] = Z_0 + sum_s [flow_s A_{s,T} + noise_s A_{s,T}^2 / eta_s]
  + sum_{t<T} direct_t eta_t``,
* variance: ``Var[Z_T] = sum_s diff2_s A_{s,T}^2 / eta_s``,

with ``noise_s`` the second-order (Itô) noise rate and ``diff2_s`` the squared diffusion, of
SGD's form at unit coefficient and step ``s``, and ``direct`` a drift applied as is. The
analysis passes ``flow = 0`` and the expected update's drift as ``direct``: the optimizer's
recursion run on expected gradients (:func:`expected_updates`) projected at each step's
measured directions (carrying ``flow_s`` with the directions of step ``s`` missed the
rotation of the top pair while a gradient stays in the buffer), plus AdamW's decoupled
decay ``-lambda``. For SGD this is
the paper's integral form exactly; for momentum it is the stochastic modified equation of Li,
Tai & E (2019), whose small-lr limit is SGD with lr ``eta (1 - d) / (1 - mu)``; for Adam it
follows the SDE of Malladi, Lyu, Panigrahi & Arora (NeurIPS 2022) with the preconditioner
``P = 1 / (sqrt(v_hat) + eps)`` taken from the second moment.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from trajlab.sde.layer import noise_scale
from trajlab.spectral import hessian_quadform_proj

__all__ = [
    "THEORY_ADAM",
    "THEORY_MOMENTUM",
    "THEORY_PATHWISE",
    "THEORY_SGD",
    "OptimizerSpec",
    "adam_preconditioner",
    "expected_clip_factor",
    "forward_prediction",
    "preconditioned_noise_terms",
    "transfer_weights",
]

THEORY_SGD = "SDE for SGD (paper)"
THEORY_MOMENTUM = "SDE for SGD with momentum (trajlab, after Li, Tai & E)"
THEORY_ADAM = "SDE for Adam (trajlab, after Malladi et al. 2022)"
THEORY_PATHWISE = "pathwise reconstruction"

Kind = Literal["sgd", "momentum", "adam", "adamw"]


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer whose SDE a prediction integrates (PyTorch's update rules).

    Attributes
    ----------
    kind : "sgd", "momentum" (``torch.optim.SGD`` with momentum > 0), "adam" or "adamw".
    momentum, dampening, nesterov : ``torch.optim.SGD``'s.
    weight_decay : L2 (SGD, momentum, Adam: ``lambda W`` added to the gradient) or decoupled
        (AdamW: ``W <- W (1 - eta lambda)``).
    betas, eps : Adam's.
    """

    kind: Kind = "sgd"
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.kind not in ("sgd", "momentum", "adam", "adamw"):
            raise ValueError(f"optimizer kind must be sgd, momentum, adam or adamw, got "
                             f"{self.kind!r}")
        if self.kind == "momentum" and not 0 < self.momentum < 1:
            raise ValueError(f"momentum must be in (0, 1), got {self.momentum!r}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    @property
    def theory(self) -> str:
        """The name of the SDE this optimizer's prediction integrates."""
        return {"sgd": THEORY_SGD, "momentum": THEORY_MOMENTUM}.get(self.kind, THEORY_ADAM)

    @property
    def preconditioned(self) -> bool:
        return self.kind in ("adam", "adamw")

    @property
    def l2(self) -> float:
        """lambda of an L2 term added to the gradient (0 for AdamW's decoupled decay)."""
        return 0.0 if self.kind == "adamw" else float(self.weight_decay)

    @property
    def decoupled(self) -> float:
        """lambda of AdamW's decoupled decay (its drift of log K is -lambda)."""
        return float(self.weight_decay) if self.kind == "adamw" else 0.0

    @property
    def memory(self) -> float:
        """The geometric ratio of the fast state (mu, beta1; 0 for SGD)."""
        return {"sgd": 0.0, "momentum": self.momentum}.get(self.kind, self.betas[0])

    def effective_coefficient(self) -> float:
        """``sum_k c_{s,k}`` after the first step: the factor the fast state applies in the end
        to a gradient (momentum: ``(1 - d) / (1 - mu)``; Adam, SGD: 1)."""
        if self.kind == "momentum":
            mu, d = self.momentum, self.dampening
            return (1 + (1 - d) * mu / (1 - mu)) if self.nesterov else (1 - d) / (1 - mu)
        return 1.0

    def transfer(self, step: int, *, first: bool, every: int = 1
                 ) -> tuple[float, float, float]:
        """``(c_{s,0}, c_{s,1} / ratio, gain)`` of a gradient entering at optimizer step
        ``step`` (``first``: the state starts there), with ``c_{s,k} = rest * ratio^k``.

        With ``every > 1`` the recursion cannot be followed between recorded rows: each row
        then applies the effective coefficient at once (the small-lr limit, Li, Tai & E).
        """
        if every > 1 or self.kind == "sgd":
            return (self.effective_coefficient() if every > 1 else 1.0), 0.0, 1.0
        if self.kind == "momentum":
            mu, d = self.momentum, self.dampening
            damp = 1.0 if first else 1 - d  # PyTorch starts the buffer with the gradient
            if self.nesterov:
                return 1 + mu * damp, damp * mu, 1.0
            return damp, damp, 1.0
        b1 = self.betas[0]
        return 1 - b1, 1 - b1, 1.0 / (1 - b1 ** (step + 1))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimizerSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "betas" in known:
            known["betas"] = tuple(known["betas"])
        return cls(**known)

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, group: int = 0) -> OptimizerSpec:
        """The spec of a ``torch.optim`` SGD, Adam or AdamW (param group ``group``).

        Raises
        ------
        ValueError
            For other optimizers, or options whose SDE trajlab does not model (``amsgrad``,
            ``maximize``).
        """
        g = optimizer.param_groups[group]
        name = type(optimizer).__name__
        if g.get("maximize") or g.get("amsgrad"):
            raise ValueError(f"{name} with maximize/amsgrad has no SDE in trajlab")
        if name == "SGD":
            mu = float(g.get("momentum", 0.0))
            if mu == 0:
                return cls("sgd", weight_decay=float(g.get("weight_decay", 0.0)))
            return cls("momentum", momentum=mu, dampening=float(g.get("dampening", 0.0)),
                       nesterov=bool(g.get("nesterov", False)),
                       weight_decay=float(g.get("weight_decay", 0.0)))
        if name in ("Adam", "AdamW"):
            kind = "adamw" if name == "AdamW" or g.get("decoupled_weight_decay") else "adam"
            return cls(kind, weight_decay=float(g.get("weight_decay", 0.0)),
                       betas=tuple(float(b) for b in g["betas"]), eps=float(g["eps"]))
        raise ValueError(f"no SDE is known to trajlab for {name}; supported: SGD (with or "
                         "without momentum/Nesterov), Adam, AdamW")

    @classmethod
    def from_recipe(cls, config: dict[str, Any]) -> OptimizerSpec:
        """The spec of :func:`trajlab.recipes.make_optimizer` for a stored ``TrainConfig``."""
        name, wd = config.get("optimizer", "sgd"), float(config.get("weight_decay", 0.0))
        if name == "momentum":
            return cls("momentum", momentum=0.9, weight_decay=wd)
        return cls(name, weight_decay=wd)


# ---------------------------------------------------------------------------- integration
def _transfer_rows(spec: OptimizerSpec, steps: np.ndarray, every: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    first = np.empty(steps.size)
    rest = np.empty(steps.size)
    gain = np.empty(steps.size)
    for i, s in enumerate(steps):
        first[i], rest[i], gain[i] = spec.transfer(int(s), first=i == 0, every=every)
    ratio = 0.0 if every > 1 else spec.memory
    return first, rest, gain, ratio


def transfer_weights(dt: np.ndarray, first: np.ndarray, rest: np.ndarray, gain: np.ndarray,
                     ratio: float, *, tol: float = 1e-12) -> tuple[np.ndarray, int]:
    """``P[s, k] = A_{s, s+k+1}`` (module docstring) for ``k = 0 .. K``, and K.

    K is where ``ratio^K < tol`` (0 without memory); entries past the last row are NaN.
    """
    n = dt.size
    K = 0
    if ratio > 0 and np.any(rest != 0):
        K = int(min(max(n - 1, 0), math.ceil(math.log(tol) / math.log(ratio))))
    P = np.full((n, K + 1), np.nan)
    inc = dt * gain
    P[:, 0] = inc * first
    for k in range(1, K + 1):
        P[: n - k, k] = P[: n - k, k - 1] + inc[k:] * rest[: n - k] * ratio**k
    return P, K


def forward_prediction(flow: np.ndarray, noise: np.ndarray, diffusion2: np.ndarray,
                       dt: np.ndarray, *, spec: OptimizerSpec | None = None,
                       steps: np.ndarray | None = None, every: int = 1,
                       direct: np.ndarray | None = None,
                       transfer: tuple[np.ndarray, np.ndarray, np.ndarray, float] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Predicted ``E[X_T] - X_0`` and ``Var[X_T]`` at the start of every row (first 0).

    Parameters
    ----------
    flow, noise, diffusion2 : (T,) or (T, L) rates at unit coefficient (module docstring):
        expected-gradient drift, second-order noise drift, squared diffusion; X is log K_net
        (network rates) or a layer's K.
    dt : (T,) or (T, L) time step of each row (lr x every).
    spec : the optimizer.  steps : (T,) optimizer-step index of each row.
    every : optimizer steps per row.
    transfer : ``(first, rest, gain, ratio)`` per row (:meth:`OptimizerSpec.transfer`) in
        place of ``spec``, ``steps`` and ``every``.
    direct : (T,) or (T, L) drift outside the optimizer's recursion (AdamW's decay).

    A row whose rates are NaN makes the prediction NaN from the next row on.
    """
    flow, noise, diffusion2 = (np.asarray(a, dtype=np.float64) for a in (flow, noise,
                                                                            diffusion2))
    dt = np.broadcast_to(np.asarray(dt, dtype=np.float64), flow.shape)
    if flow.ndim == 2:
        cols = [forward_prediction(flow[:, j], noise[:, j], diffusion2[:, j], dt[:, j],
                                   spec=spec, steps=steps, every=every, transfer=transfer,
                                   direct=None if direct is None else np.asarray(direct)[:, j])
                for j in range(flow.shape[1])]
        return np.stack([c[0] for c in cols], 1), np.stack([c[1] for c in cols], 1)
    n = flow.size
    if transfer is None:
        transfer = _transfer_rows(spec, np.asarray(steps), every)
    first, rest, gain = (np.asarray(a, dtype=np.float64) for a in transfer[:3])
    ratio = float(transfer[3])
    P, K = transfer_weights(dt, first, rest, gain, ratio)
    safe = np.where(dt == 0, 1.0, dt)

    def terms(s: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(invalid="ignore"):
            return (flow[s] * A + noise[s] * A * A / safe[s], diffusion2[s] * A * A / safe[s])

    mean = np.zeros(n)
    var = np.zeros(n)
    idx = np.arange(n)
    # sources s with T - 1 - s > K: their transfer has converged (A_{s,T} = P[s, K])
    if n > K + 1:
        fm, fv = terms(idx, P[:, K])
        cm = np.concatenate([[0.0], np.cumsum(np.nan_to_num(fm[: n - K - 1], nan=np.inf))])
        cv = np.concatenate([[0.0], np.cumsum(np.nan_to_num(fv[: n - K - 1], nan=np.inf))])
        T = idx[K + 1:]
        mean[T] += cm[T - K - 1]
        var[T] += cv[T - K - 1]
    for k in range(K + 1):  # the last K + 1 sources of each row: A_{s,T} = P[s, T-1-s]
        T = idx[k + 1:]
        s = T - 1 - k
        m_, v_ = terms(s, P[s, k])
        mean[T] += np.nan_to_num(m_, nan=np.inf)
        var[T] += np.nan_to_num(v_, nan=np.inf)
    if direct is not None:
        d = np.asarray(direct, dtype=np.float64) * dt
        mean[1:] += np.cumsum(np.nan_to_num(d, nan=np.inf))[:-1]
    for x in (mean, var):  # NaN (not inf) from the first undefined row on
        bad = ~np.isfinite(x)
        if bad.any():
            x[int(np.flatnonzero(bad)[0]):] = np.nan
    return mean, var


# ---------------------------------------------------------------------------- clipping
def expected_clip_factor(grad_sq_norm: np.ndarray | float, noise_trace: np.ndarray | float,
                         max_norm: float) -> np.ndarray:
    """The expected clip factor ``kappa ~ E[min(1, c / ||g_B||)]`` of ``clip_grad_norm_``
    (coefficient ``c / (||g_B|| + 1e-6)``) at a step, without the step's realised batch.

    Plug-in: ``kappa = min(1, c / (sqrt(E||g_B||^2) + 1e-6))`` with ``E||g_B||^2 =
    ||grad L||^2 + tr Cov(g_B)`` (docs/math.md 8b). Exact where ``||g_B||`` concentrates; its
    error is second order in the relative spread of ``||g_B||`` (Jensen), and the correlation
    of the factor with the batch's noise is not modelled.

    Parameters
    ----------
    grad_sq_norm : ``||grad L||^2`` over every clipped parameter (the full-data probe).
    noise_trace : ``tr Cov(g_B)`` over the same parameters (``tr Sigma / B`` for independent
        draws), from the per-sample information.
    max_norm : ``c``, the max-norm passed to ``clip_grad_norm_``.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm!r}")
    m = np.asarray(grad_sq_norm, dtype=np.float64) + np.asarray(noise_trace, dtype=np.float64)
    if np.any(m < 0):
        raise ValueError("grad_sq_norm + noise_trace must be >= 0 (a squared norm)")
    return np.minimum(1.0, max_norm / (np.sqrt(m) + 1e-6))


# ---------------------------------------------------------------------------- Adam terms
def adam_preconditioner(v_before: Tensor, expected_sq: Tensor, step: int, spec: OptimizerSpec
                        ) -> Tensor:
    """``P = 1 / (sqrt(v_hat) + eps)`` of step ``step`` without the step's own batch.

    ``v_hat = (beta2 v_before + (1 - beta2) expected_sq) / (1 - beta2^(step+1))``, with
    ``v_before`` Adam's second moment before the step (taken from the run: a slow statistic)
    and ``expected_sq = E[g^2] = grad L^2 + diag(Sigma)`` in place of the step's ``g^2``.
    """
    b2 = spec.betas[1]
    v = b2 * v_before + (1 - b2) * expected_sq
    return 1.0 / (torch.sqrt(v / (1 - b2 ** (step + 1))) + spec.eps)


def preconditioned_noise_terms(W: Tensor, P: Tensor, grad: Tensor, G: Tensor, lr: Tensor, *,
                               population: int | None = None) -> dict[str, Tensor]:
    """Layer terms of an update ``P * x`` (elementwise) driven by the gradient ``x``.

    Parameters
    ----------
    W : (..., m, n) weights.  P : (..., m, n) preconditioner (ones for SGD and momentum).
    grad : (..., m, n) the expected gradient (NaN where unknown), L2 decay included.
    G : (..., B, m, n) per-sample gradients (their batch mean is subtracted here).
    lr : (...) the step's time step.

    Returns
    -------
    dict with ``K``, ``flow`` ``= -u1^T (P*grad) v1``, ``drift_noise``
    ``= lr/2 fpc/(B(B-1)) sum_i d2s1[P*Omega_i]``, ``diffusion2``
    ``= lr fpc/(B(B-1)) sum_i (u1^T (P*Omega_i) v1)^2`` and ``noise_proj`` (..., B), the
    per-sample ``u1^T (P*Omega_i) v1``.
    """
    B = G.shape[-3]
    _, scale = noise_scale(B, population)
    svd = torch.linalg.svd(W, full_matrices=False)
    u, v = svd[0][..., :, 0], svd[2][..., 0, :]
    Om = G - G.mean(-3, keepdim=True)
    D = P[..., None, :, :] * Om                                  # (..., B, m, n)
    p = (D @ v[..., None, :, None])[..., 0]                      # (..., B, m)
    q = (D.mT @ u[..., None, :, None])[..., 0]                   # (..., B, n)
    c = (p * u[..., None, :]).sum(-1)
    second = hessian_quadform_proj(W, p, q, svd=svd)
    eta = torch.as_tensor(lr, dtype=W.dtype)
    flow = -(u[..., None, :] @ (P * grad) @ v[..., :, None])[..., 0, 0]
    return {
        "K": svd[1][..., 0],
        "flow": flow,
        "drift_noise": 0.5 * eta * scale * second.sum(-1),
        "diffusion2": eta * scale * (c * c).sum(-1),
        "noise_proj": c,
    }


def expected_updates(grads: Tensor, steps: np.ndarray, spec: OptimizerSpec, *,
                     P: Tensor | None = None) -> Tensor:
    """The expected updates ``E[d_t]`` (T, m, n) of the optimizer's recursion run on expected
    gradients ``grads`` (T, m, n; L2 decay included), rows ``steps`` consecutive.

    The fast state starts empty at the first row (PyTorch's momentum buffer takes the first
    gradient as is; Adam's first moment starts at 0 with its bias correction from ``steps``).
    ``P`` (T, m, n): Adam's preconditioner per row (required for Adam/AdamW).
    """
    out = torch.empty_like(grads)
    if spec.kind == "sgd":
        return grads.clone()
    state = None
    for i in range(grads.shape[0]):
        g = grads[i]
        if spec.kind == "momentum":
            mu, d = spec.momentum, spec.dampening
            state = g.clone() if state is None else mu * state + (1 - d) * g
            out[i] = g + mu * state if spec.nesterov else state
        else:
            b1 = spec.betas[0]
            state = (1 - b1) * g if state is None else b1 * state + (1 - b1) * g
            out[i] = P[i] * state / (1 - b1 ** (int(steps[i]) + 1))
    return out


def memory_rows(spec: OptimizerSpec, tol: float = 1e-12) -> int:
    """Rows of history after which the fast state has forgotten a gradient to ``tol``."""
    r = spec.memory
    return 0 if r <= 0 else math.ceil(math.log(tol) / math.log(r))
