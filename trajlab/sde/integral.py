"""Integral form over recorded steps: predictions, pathwise sums, Euler–Maruyama (MATH.md §4–§5).

Time is ``t = sum eta``: step s (s = 0 .. T-1) runs from ``t_s`` to ``t_{s+1} = t_s + eta_s``
with the coefficients recorded at its start (Itô). Functions returning a path give ``T + 1``
values at ``t_0 = 0, t_1, ..., t_T``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["Z95", "euler_maruyama", "integrate", "logK_prediction", "pathwise"]

#: The 95% two-sided normal quantile used by every predicted band.
Z95 = 1.959963984540054


def _steps(rates: Tensor, lr: Tensor | float) -> Tensor:
    """``rates * eta`` with ``lr`` (T,) broadcast against ``rates`` (T, ...), or of ``rates``'
    own shape (a time step per entry, e.g. per layer)."""
    eta = torch.as_tensor(lr, dtype=rates.dtype, device=rates.device)
    if eta.dim() == 1 and eta.shape != rates.shape:
        if eta.shape[0] != rates.shape[0]:
            raise ValueError(f"lr has {eta.shape[0]} steps, rates {rates.shape[0]}")
        eta = eta.reshape(-1, *([1] * (rates.dim() - 1)))
    elif eta.dim() > 1 and eta.shape != rates.shape:
        raise ValueError(f"lr of shape {tuple(eta.shape)} does not match rates "
                         f"{tuple(rates.shape)}")
    return rates * eta


def integrate(rates: Tensor, lr: Tensor | float, *,
              at: Literal["start", "end", "grid"] = "grid", skip_nan: bool = False) -> Tensor:
    """Left-point (Itô) integral ``int rate dt`` over steps, ``dt = eta``.

    Parameters
    ----------
    rates : Tensor (T, ...)
        Rate recorded at the start of each step.
    lr : float or Tensor (T,) or of ``rates``' shape
    at : {"grid", "start", "end"}
        ``"grid"``: (T + 1, ...) values at ``t_0 .. t_T`` (first 0). ``"start"``: (T, ...) the value
        at the start of each step (first 0). ``"end"``: (T, ...) at the end of each step.
    skip_nan : non-finite increments (steps whose terms are undefined) count as 0.

    Examples
    --------
    >>> integrate(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]))
    tensor([0.0000, 0.5000, 1.5000])
    """
    inc = _steps(rates, lr)
    if skip_nan:
        inc = torch.where(torch.isfinite(inc), inc, torch.zeros_like(inc))
    end = torch.cumsum(inc, dim=0)
    if at == "end":
        return end
    grid = torch.cat([torch.zeros_like(inc[:1]), end], dim=0)
    if at == "grid":
        return grid
    if at == "start":
        return grid[:-1]
    raise ValueError(f"at must be 'grid', 'start' or 'end', got {at!r}")


def logK_prediction(Z0: Tensor | float, mu_Z: Tensor, sigma2_Z: Tensor,
                    lr: Tensor | float) -> dict[str, Tensor]:
    """Log-normal prediction of ``K_net`` with the coefficients treated as given (MATH.md §4).

    ``E[Z(t)] = Z(0) + int mu_Z ds``, ``Var[Z(t)] = int sigma_Z^2 ds``.

    Parameters
    ----------
    Z0 : float or Tensor ()
        ``log K_net`` at ``t_0``.
    mu_Z, sigma2_Z : Tensor (T,)
        Drift and squared diffusion of Z at each step.
    lr : float or Tensor (T,)

    Returns
    -------
    dict of str to Tensor (T + 1,)
        time, logK_pred_mean, logK_pred_var, K_pred_median (``exp(mean)``), K_pred_lower,
        K_pred_upper (95% band ``exp(mean -+ 1.96 sqrt(var))``).
    """
    mean = integrate(mu_Z, lr) + torch.as_tensor(Z0, dtype=mu_Z.dtype, device=mu_Z.device)
    var = integrate(sigma2_Z, lr)
    half = Z95 * var.clamp_min(0).sqrt()
    return {
        "time": integrate(torch.ones_like(mu_Z), lr),
        "logK_pred_mean": mean,
        "logK_pred_var": var,
        "K_pred_median": mean.exp(),
        "K_pred_lower": (mean - half).exp(),
        "K_pred_upper": (mean + half).exp(),
    }


def pathwise(K0: Tensor | float, increments: Tensor) -> Tensor:
    """``K_pathwise`` (T + 1, ...): ``K0`` plus the running sum of per-step increments (§5)."""
    K0 = torch.as_tensor(K0, dtype=increments.dtype, device=increments.device)
    return K0 + integrate(increments, 1.0)


def euler_maruyama(
    Z0: Tensor | float,
    mu_Z: Tensor,
    sigma2_Z: Tensor,
    lr: Tensor | float,
    *,
    n_paths: int,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler–Maruyama paths of ``dZ = mu_Z dt + sigma_Z dB`` on the step grid.

    ``Z_{s+1} = Z_s + mu_s eta_s + sqrt(sigma2_s eta_s) xi_s``, ``xi_s ~ N(0, 1)`` i.i.d.

    Parameters
    ----------
    Z0 : float or Tensor ()
    mu_Z, sigma2_Z : Tensor (T,)
    lr : float or Tensor (T,)
    n_paths : int
    seed : int, optional
        Seed of a fresh local ``torch.Generator``.
    generator : torch.Generator, optional
        Used instead of ``seed``; exactly one of the two must be given. The global RNG is
        never touched.

    Returns
    -------
    Tensor (n_paths, T + 1)
    """
    if (seed is None) == (generator is None):
        raise ValueError("pass exactly one of seed= or generator=")
    if generator is None:
        generator = torch.Generator(device=mu_Z.device).manual_seed(int(seed))
    if bool((sigma2_Z < 0).any()):
        raise ValueError("sigma2_Z must be non-negative")
    drift = _steps(mu_Z, lr)
    sd = _steps(sigma2_Z, lr).sqrt()
    xi = torch.randn(n_paths, mu_Z.shape[0], generator=generator, dtype=mu_Z.dtype,
                     device=mu_Z.device)
    inc = drift + sd * xi
    Z0 = torch.as_tensor(Z0, dtype=mu_Z.dtype, device=mu_Z.device)
    return Z0 + torch.cat([torch.zeros_like(inc[:, :1]), torch.cumsum(inc, dim=1)], dim=1)
