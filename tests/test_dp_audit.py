"""Empirical ε lower bounds from an attack's ROC, and the check of a DP-LoRA's claim."""
import math

import numpy as np
import pytest

from privlora.attacks.dp_audit import dp_check, empirical_epsilon


def test_a_perfect_attack_certifies_about_ln_n_and_the_point_estimate_is_unbounded_by_zero_fpr():
    member, nonmember = np.arange(100, 200.0), np.arange(0, 100.0)
    b = empirical_epsilon(member, nonmember)
    # perfect separation: TPR lower limit ≈ (α')^(1/n) … close to 1, FPR upper limit = 1 − (α')^(1/n) ≈ 0.1
    alpha = 0.05 / (2 * 201)  # Bonferroni over the ROC's 201 thresholds (200 distinct scores and the (0, 0) start)
    expected = math.log((alpha ** (1 / 100)) / (1 - alpha ** (1 / 100)))
    assert b["epsilon_lower_bound"] == pytest.approx(expected, rel=1e-6)
    assert 1.5 < b["epsilon_lower_bound"] < math.log(100)


def test_chance_scores_certify_nothing():
    rng = np.random.default_rng(0)
    b = empirical_epsilon(rng.normal(size=300), rng.normal(size=300))
    assert b["epsilon_lower_bound"] == 0.0
    assert b["epsilon_point"] > 0.5  # the plug-in maximum over 600 thresholds finds noise: why a bound is needed


def test_point_estimate_matches_a_hand_computed_roc():
    # members 3,4,5,6; non-members 1,2,3.5,7. Calling "member" at score ≥ 4: TPR 3/4, FPR 1/4 → ln 3, and
    # TNR 3/4, FNR 1/4 → ln 3; every other threshold gives at most ln 2 (thresholds with FPR or FNR 0 are skipped)
    b = empirical_epsilon([3, 4, 5, 6], [1, 2, 3.5, 7])
    assert b["epsilon_point"] == pytest.approx(math.log(3))


def test_delta_lowers_the_bound():
    member, nonmember = np.arange(100, 200.0), np.arange(0, 100.0)
    assert empirical_epsilon(member, nonmember, 0.05)["epsilon_lower_bound"] < \
        empirical_epsilon(member, nonmember, 0.0)["epsilon_lower_bound"]


def test_dp_check_flags_a_claim_the_attacks_refute_and_accepts_one_they_do_not():
    scores = {"loss": {"member_test": np.arange(100, 200.0), "nonmember_test": np.arange(0, 100.0)},
              "pia": {"member_test": np.zeros(100), "nonmember_test": np.zeros(100)}}
    meta = {"privlora_dp_epsilon": "0.5", "privlora_dp_delta": "1e-5"}
    refuted = dp_check(scores, meta, {"loss": 1.0, "pia": 0.0})
    assert refuted["attack"] == "loss" and not refuted["consistent"] and not refuted["tpr_at_1pct_fpr_within_limit"]
    assert refuted["tpr_at_1pct_fpr_limit"] == pytest.approx(math.exp(0.5) * 0.01 + 1e-5)
    fine = dp_check(scores, {**meta, "privlora_dp_epsilon": "8"}, {"loss": 1.0, "pia": 0.0})
    assert fine["consistent"] and fine["claimed_epsilon"] == 8.0
    assert "consistent" not in dp_check(scores, {}, {"loss": 1.0})
