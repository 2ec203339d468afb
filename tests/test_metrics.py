"""Audit metrics against scikit-learn, brute force and hand-computed ROCs."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from privlora.attacks import metrics


def brute_force_asr(member, nonmember):
    """Best accuracy over every threshold 'score ≥ τ is a member', τ ranging over the scores and +∞."""
    best = 0.0
    for tau in list(np.concatenate([member, nonmember])) + [np.inf]:
        correct = (member >= tau).sum() + (nonmember < tau).sum()
        best = max(best, correct / (len(member) + len(nonmember)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_asr_match_sklearn_and_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    member = rng.integers(0, 6, 37).astype(float)  # few distinct values: many ties
    nonmember = rng.integers(0, 5, 23).astype(float)
    got = metrics.point_metrics(member, nonmember)
    labels = np.r_[np.ones(37), np.zeros(23)]
    assert got["auc"] == pytest.approx(roc_auc_score(labels, np.r_[member, nonmember]), abs=1e-12)
    assert got["asr"] == pytest.approx(brute_force_asr(member, nonmember), abs=1e-12)
    assert metrics.point_metrics(member, nonmember, fast_auc=True)["auc"] == pytest.approx(got["auc"], abs=1e-12)


def test_all_equal_scores_are_chance():
    got = metrics.point_metrics(np.full(10, 0.3), np.full(30, 0.3))
    assert got["auc"] == 0.5
    assert got["asr"] == 0.75  # calling everything a non-member
    assert got["tpr_at_1pct_fpr"] == pytest.approx(0.01)  # on the diagonal
    assert got["tpr_at_0.1pct_fpr"] == pytest.approx(0.001)


def test_perfect_and_inverted_separation():
    good = metrics.point_metrics(np.array([3.0, 4.0]), np.array([1.0, 2.0]))
    assert good == {"auc": 1.0, "asr": 1.0, "tpr_at_5pct_fpr": 1.0, "tpr_at_1pct_fpr": 1.0, "tpr_at_0.1pct_fpr": 1.0}
    bad = metrics.point_metrics(np.array([1.0, 2.0]), np.array([3.0, 4.0]))
    assert bad["auc"] == 0.0 and bad["asr"] == 0.5 and bad["tpr_at_1pct_fpr"] == 0.0


def test_tpr_at_fpr_interpolates_a_hand_computed_roc():
    # members {0.9, 0.5}, non-members {0.5, 0.1}: ROC (0,0) → (0,.5) at τ=.9 → (.5,1) at τ=.5 (a tie: diagonal
    # segment) → (1,1). At FPR 0.1: 0.5 + 0.1 · (0.5 / 0.5) = 0.6.
    fpr, tpr, _ = metrics.roc(np.array([0.9, 0.5]), np.array([0.5, 0.1]))
    assert metrics.tpr_at_fpr(fpr, tpr, 0.1) == pytest.approx(0.6)
    assert metrics.tpr_at_fpr(fpr, tpr, 0.0) == pytest.approx(0.5)
    assert metrics.tpr_at_fpr(fpr, tpr, 0.5) == pytest.approx(1.0)
    # A vertical ROC segment at exactly the target FPR: the highest TPR reached there.
    fpr, tpr, _ = metrics.roc(np.array([0.9, 0.8, 0.3]), np.array([0.85, 0.2, 0.1, 0.05]))
    # points: (0,0) (0,1/3) (.25,1/3) (.25,2/3) (.25,1) (.5,1) ...: vertical from 1/3 to 1 at FPR .25
    assert metrics.tpr_at_fpr(fpr, tpr, 0.25) == pytest.approx(1.0)
    assert metrics.tpr_at_fpr(fpr, tpr, 0.125) == pytest.approx(1 / 3)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    member, nonmember = rng.normal(1, 1, 200), rng.normal(0, 1, 200)
    a = metrics.bootstrap(member, nonmember, 200, seed=5)
    assert a == metrics.bootstrap(member, nonmember, 200, seed=5)
    assert a != metrics.bootstrap(member, nonmember, 200, seed=6)
    point = metrics.point_metrics(member, nonmember)
    for name in metrics.METRICS:
        lo, hi = a[name]
        assert lo <= point[name] <= hi, name
    assert 0.69 < a["auc"][0] < a["auc"][1] < 0.83


def test_small_sets_are_flagged():
    result = metrics.evaluate(np.arange(200.0), np.arange(200.0) - 5, seed=0, n_bootstrap=20)
    assert result["reliable"] == {"tpr_at_5pct_fpr": True, "tpr_at_1pct_fpr": True, "tpr_at_0.1pct_fpr": False}
    assert len(result["notes"]) == 1 and "fewer" not in result["notes"][0] and "200 non-members" in result["notes"][0]
    big = metrics.evaluate(np.zeros(50), np.zeros(1000), seed=0, n_bootstrap=0)
    assert big["reliable"] == {"tpr_at_5pct_fpr": True, "tpr_at_1pct_fpr": True, "tpr_at_0.1pct_fpr": True}
    assert big["notes"] == []
    assert "ci95" not in big


def test_non_finite_scores_count_as_least_member_like():
    result = metrics.evaluate(np.array([np.nan, 2.0, 3.0]), np.array([1.0, -np.inf]), seed=0, n_bootstrap=10)
    assert result["auc"] == pytest.approx(roc_auc_score([1, 1, 1, 0, 0], [-2, 2, 3, 1, -2]))
    assert any("non-finite" in n for n in result["notes"])


def test_tpr_at_5pct_fpr_matches_a_hand_computed_roc():
    # 20 non-members 0..19 and 4 members {18.5, 17.5, 10.5, 3}: one non-member (19) scores above every member.
    # ROC: (0,0) → (.05,0) at τ=19 → (.05,.25) at 18.5 → (.10,.25) at 18 → (.10,.5) at 17.5 → … At FPR 0.05
    # the ROC is vertical from 0 to 0.25: TPR@5%FPR = 0.25. (TPR@1%FPR is on the flat start: 0.)
    member, nonmember = np.array([18.5, 17.5, 10.5, 3.0]), np.arange(20.0)
    got = metrics.point_metrics(member, nonmember)
    assert got["tpr_at_5pct_fpr"] == pytest.approx(0.25)
    assert got["tpr_at_1pct_fpr"] == pytest.approx(0.0)
    # Between ROC points: FPR 0.075 lies halfway from (.05,.25) to (.10,.25) — flat, still 0.25.
    fpr, tpr, _ = metrics.roc(member, nonmember)
    assert metrics.tpr_at_fpr(fpr, tpr, 0.075) == pytest.approx(0.25)


def test_decision_accuracy_is_the_fixed_rule_score_above_threshold():
    member, nonmember = np.array([0.9, 0.5, 0.7]), np.array([0.5, 0.2, 0.6, 0.1])
    assert metrics.decision_accuracy(member, nonmember, 0.5) == pytest.approx((2 + 3) / 7)  # 0.5 is not > 0.5
    result = metrics.evaluate(member, nonmember, seed=0, n_bootstrap=0, threshold=0.5)
    assert result["decision_accuracy"] == pytest.approx(5 / 7) and result["asr"] >= result["decision_accuracy"]
    assert "decision_accuracy" not in metrics.evaluate(member, nonmember, seed=0, n_bootstrap=0)


def test_tpr_at_low_fpr_carries_an_exact_clopper_pearson_interval():
    from scipy.stats import binomtest

    nonmember = np.arange(200, dtype=float)  # at FPR 1 % the threshold may pass the two highest: 198 and 199
    member = np.concatenate([np.full(10, 300.0), np.full(5, 198.5), np.full(85, -1.0)])
    result = metrics.evaluate(member, nonmember, seed=0, n_bootstrap=0)
    assert result["tpr_at_1pct_fpr"] == pytest.approx(0.15)  # 15 of 100 members caught
    expected = binomtest(15, 100).proportion_ci(confidence_level=0.95, method="exact")
    assert result["tpr_cp95"]["tpr_at_1pct_fpr"] == pytest.approx([expected.low, expected.high])
    assert result["tpr_cp95"]["tpr_at_0.1pct_fpr"] is None  # 200 non-members cannot resolve 0.1 %
    assert result["estimable"] == {"tpr_at_5pct_fpr": True, "tpr_at_1pct_fpr": True, "tpr_at_0.1pct_fpr": False}
    assert result["nonmembers_needed"] == {"tpr_at_5pct_fpr": 20, "tpr_at_1pct_fpr": 100, "tpr_at_0.1pct_fpr": 1000}
    # 1000 non-members resolve 0.1 %: one false positive (199) is allowed, so the 198.5 members count too
    wide = metrics.evaluate(member, np.arange(1000, dtype=float) - 800, seed=0, n_bootstrap=0)
    assert wide["tpr_cp95"]["tpr_at_0.1pct_fpr"] == pytest.approx([expected.low, expected.high])
    none_caught = metrics.evaluate(np.zeros(50), np.arange(100.0) + 1, seed=0, n_bootstrap=0)
    assert none_caught["tpr_cp95"]["tpr_at_1pct_fpr"] == pytest.approx([0.0, 1 - 0.025 ** (1 / 50)])


def test_leakage_is_measured_both_ways():
    member, nonmember = np.arange(100.0), np.arange(100.0) + 100  # members score LOW: an inverted attack
    result = metrics.evaluate(member, nonmember, seed=0, n_bootstrap=0)
    assert result["auc"] == 0.0 and result["abs_auc_gap"] == 0.5
    assert result["tpr_at_1pct_fpr"] == 0.0 and result["inverted"]["tpr_at_1pct_fpr"] == 1.0


def test_is_held_out_is_false_only_when_the_attack_says_so():
    from privlora.attacks.metrics import is_held_out

    assert is_held_out({"auc": 0.5}) and is_held_out({"details": None}) and is_held_out({"details": {}})
    assert is_held_out({"details": {"held_out": True}})
    assert not is_held_out({"details": {"held_out": False}})
