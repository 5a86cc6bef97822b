"""The paper's studies (Luo et al., arXiv 2506.18588, Figs. 2-5 and the hyper-parameter claims)
in one namespace, for existing code and notebooks. Each study lives in its own module and is
registered in :data:`trajlab.studies.registry.STUDIES` (``trajlab study NAME``):

==============================  ===========================  =============================
function                        module                       what it tests
==============================  ===========================  =============================
:func:`theory_vs_measurement`   :mod:`.theory`               Fig. 2: K vs the SDE prediction
:func:`convergence`             :mod:`.convergence`          Fig. 3: drift terms late in a run
:func:`sampling_orders`         :mod:`.orders`               Fig. 4: several sampling orders
:func:`batch_size_sweep`        :mod:`.batch_size`           Fig. 5: sigma_Z^2 against B
:func:`label_noise_sweep`       :mod:`.label_noise`          label noise and growth of K
:func:`init_scale_sweep`        :mod:`.init_scale`           initialisation scale
:func:`weight_decay_sweep`      :mod:`.weight_decay`         weight decay
==============================  ===========================  =============================

The pure numbers are in :mod:`trajlab.studies.numbers`, the shared wiring in
:mod:`trajlab.studies.common` and :mod:`trajlab.studies.sweep_study`.
"""

from __future__ import annotations

from trajlab.studies.batch_size import batch_size_sweep
from trajlab.studies.common import BASE
from trajlab.studies.convergence import convergence
from trajlab.studies.init_scale import init_scale_sweep
from trajlab.studies.label_noise import label_noise_sweep
from trajlab.studies.numbers import (
    drift_budget,
    drift_parts,
    fig3_checks,
    order_spread,
    realised_variance,
    run_summary,
    theory_numbers,
)
from trajlab.studies.orders import sampling_orders
from trajlab.studies.theory import theory_vs_measurement
from trajlab.studies.weight_decay import decay_check, weight_decay_sweep

__all__ = [
    "BASE",
    "batch_size_sweep",
    "convergence",
    "decay_check",
    "drift_budget",
    "drift_parts",
    "fig3_checks",
    "init_scale_sweep",
    "label_noise_sweep",
    "order_spread",
    "realised_variance",
    "run_summary",
    "sampling_orders",
    "theory_numbers",
    "theory_vs_measurement",
    "weight_decay_sweep",
]
