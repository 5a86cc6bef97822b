"""Study 2 tests paper Fig. 3's findings (i)-(iii) as PAPER.md states them."""

from trajlab.studies.numbers import fig3_checks


def _num(flow, kappa, ito, late_kappa, late_dz, var_k, var_s):
    return {"integrated": {"whole": {"flow": flow, "kappa": kappa, "ito": ito},
                           "late": {"kappa": late_kappa, "measured_delta_Z": late_dz}},
            "noise_split_var_share": {"network": {"kappa_Z_var_share": var_k,
                                                  "sigma_Z2_blockdiag_var_share": var_s}}}


def test_each_finding_alone():
    assert all(fig3_checks(_num(1.0, 0.2, -0.1, 0.05, 0.5, 0.4, 0.3)).values())
    c = fig3_checks(_num(0.2, 0.2, -0.1, 0.05, 0.5, 0.4, 0.3))
    assert not c["i_flow_primary"] and c["ii_covariances_dominate"]
    c = fig3_checks(_num(1.0, 0.2, -0.1, 0.05, 0.5, 0.6, 0.3))
    assert not c["ii_covariances_dominate"] and c["iii_kappa_significant_late"]
    c = fig3_checks(_num(1.0, 0.2, -0.1, 0.01, 0.5, 0.4, 0.3))  # 2% of the late change
    assert not c["iii_kappa_significant_late"]
