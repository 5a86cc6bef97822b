"""Small helpers shared by the commands."""

from __future__ import annotations

from pathlib import Path


def human(n: float) -> str:
    """Bytes as B / kB / MB / GB (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def prediction_line(ds, *, missing: str) -> str:
    """One line: the measured change of log K_net over the analysed steps beside the SDE's
    forward prediction with its 95% interval (what ``trajlab analyze`` and ``trajlab demo``
    print last). ``missing``: how to get a prediction, printed when there is none."""
    import numpy as np

    from trajlab.sde import Z95

    with np.errstate(all="ignore"):
        ends = ds[[k for k in ("logK", "logK_pred_mean", "logK_pred_var") if k in ds]]
        ends = ends.isel(step=[0, -1]).compute()
        measured = float(ends.logK[-1] - ends.logK[0])
        pred = (float(ends.logK_pred_mean[-1] - ends.logK[0]) if "logK_pred_mean" in ends
                else float("nan"))
        var = float(ends.logK_pred_var[-1]) if "logK_pred_var" in ends else float("nan")
    what = "log K_net"
    if "K_net_batchnorm" in ds:  # logK covers the weight matrices only (docs/math.md §4b)
        bn = np.asarray(ds.K_net_batchnorm.isel(step=[0, -1]).values, dtype=np.float64)
        if np.any(np.isfinite(bn) & (bn != 1.0)):
            what = "log K_net of the weight matrices (BatchNorm factors left out)"
    head = f"{what}: measured change {measured:+.3f}"
    if not np.isfinite(pred):
        return f"{head}; no forward prediction: it needs the expected gradient, {missing}"
    theory = ds.attrs.get("optimizer_theory", "SDE")
    band = f" (± {Z95 * np.sqrt(var):.3f}, 95%)" if np.isfinite(var) and var >= 0 else ""
    return (f"{head}; the {theory}, a forward prediction (expected gradient from the probe, "
            f"never the realised updates), predicts {pred:+.3f}{band}")
