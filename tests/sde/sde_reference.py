"""Dense references for the SDE terms, written straight from MATH.md with full G_i (tests only).

Nothing here uses trajlab: singular values come from torch.linalg, derivatives from autograd or
finite differences, the covariance from the dense per-sample deviations.
"""

from __future__ import annotations

import torch
from torch import Tensor

F64 = torch.float64


def sigma1(W: Tensor) -> Tensor:
    return torch.linalg.matrix_norm(W, ord=2)


def jacobian(W: Tensor) -> Tensor:
    """d s_1 / dW = u_1 v_1^T (sign-free)."""
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    return torch.outer(U[:, 0], Vh[0])


def dense_hessian(W: Tensor, *, method: str = "autograd", h: float = 1e-3) -> Tensor:
    """(mn, mn) Hessian of s_1: autograd through svdvals, or 4th-order central differences
    of the Jacobian (works for rank-deficient W, where SVD backward divides by 0)."""
    m, n = W.shape
    if method == "autograd":
        H = torch.autograd.functional.hessian(lambda w: torch.linalg.svdvals(w)[0], W)
        return H.reshape(m * n, m * n)
    cols = []
    for k in range(m * n):
        E = torch.zeros(m * n, dtype=W.dtype)
        E[k] = h
        E = E.reshape(m, n)
        d = (-jacobian(W + 2 * E) + 8 * jacobian(W + E) - 8 * jacobian(W - E)
             + jacobian(W - 2 * E)) / (12 * h)
        cols.append(d.reshape(-1))
    H = torch.stack(cols, 1)
    return 0.5 * (H + H.T)


def fd_second(W: Tensor, D: Tensor, h: float | None = None) -> Tensor:
    """d^2 s_1[D] by 4th-order central differences of s_1(W + e D) (D of any Frobenius norm)."""
    if h is None:
        h = 2e-3 * float(sigma1(W)) / float(torch.linalg.matrix_norm(D))
    f = [sigma1(W + k * h * D) for k in (-2, -1, 0, 1, 2)]
    return (-f[0] + 16 * f[1] - 30 * f[2] + 16 * f[3] - f[4]) / (12 * h * h)


def dense_terms(W: Tensor, G: Tensor, lr: float, *, update: Tensor | None = None,
                grad_full: Tensor | None = None, population: int | None = None,
                H: Tensor | None = None) -> dict[str, Tensor]:
    """Every layer term from the dense per-sample gradients G (B, m, n), straight from MATH."""
    B, _, _ = G.shape
    fpc = 1.0 if population is None else (population - B) / population
    g = G.mean(0)
    grad = g if grad_full is None else grad_full
    Om = (G - g).reshape(B, -1)
    Sigma = fpc * Om.T @ Om / (B * (B - 1))          # (mn, mn)
    if H is None:
        H = dense_hessian(W)
    J = jacobian(W).reshape(-1)
    out = {
        "K": sigma1(W),
        "drift_flow": -(J @ grad.reshape(-1)),
        "drift_noise": 0.5 * lr * torch.trace(H @ Sigma),
        "diffusion2": lr * J @ Sigma @ J,
        "drift_noise_var": 0.5 * lr * (H.diagonal() * Sigma.diagonal()).sum(),
        "diffusion2_var": lr * (J * J * Sigma.diagonal()).sum(),
        "drift_discretization": 0.5 * lr * grad.reshape(-1) @ H @ grad.reshape(-1),
        "noise_proj": Om @ J,
    }
    if grad_full is None:
        # Unbiased estimate of (lr/2) d2s1[grad L] from the batch gradient (MATH.md §4a).
        out["drift_discretization"] = out["drift_discretization"] - out["drift_noise"]
    out["drift_noise_cov"] = out["drift_noise"] - out["drift_noise_var"]
    out["diffusion2_cov"] = out["diffusion2"] - out["diffusion2_var"]
    out["drift"] = out["drift_flow"] + out["drift_noise"]
    if update is not None:
        du = update.reshape(-1)
        out["pathwise_first_order"] = J @ du
        out["pathwise_increment"] = J @ du + 0.5 * du @ H @ du
    return out


def matrix_with_spectrum(m: int, n: int, s: list[float], gen: torch.Generator) -> Tensor:
    """Random m x n matrix with the given singular values (padded with zeros)."""
    r = min(m, n)
    s = torch.tensor(list(s) + [0.0] * (r - len(s)), dtype=F64)[:r]
    U = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=F64)).Q
    return U @ torch.diag(s) @ V.T


def rank1_sketch(gen: torch.Generator, B: int, m: int, n: int) -> tuple[dict, Tensor]:
    """Random rank-one per-sample gradients: factors and the dense G (B, m, n)."""
    d = torch.randn(B, m, generator=gen, dtype=F64)
    a = torch.randn(B, n, generator=gen, dtype=F64)
    return {"ps_grad_out": d, "ps_input": a}, torch.einsum("bm,bn->bmn", d, a)


def subspace_sketch(G: Tensor, U: Tensor, V: Tensor) -> dict:
    """The recorder's subspace sketch of dense G (B, m, n) on bases U (m, k), V (n, k)."""
    return {
        "basis_u": U, "basis_v": V,
        "ps_proj_out": G @ V, "ps_proj_in": G.mT @ U,
        "ps_sqnorm": G.square().sum((1, 2)), "grad_sq_sum": G.square().sum(0),
    }


def err_to(a: Tensor, b: Tensor, scale: float | Tensor) -> float:
    """max |a - b| measured against the scale of the operands that produced b (for quantities
    that may cancel to much less than their parts)."""
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    return float((a - b).abs().max() / torch.as_tensor(scale, dtype=F64).clamp_min(1e-300))


def rel(a: Tensor, b: Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
