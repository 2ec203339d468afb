"""The powered comparison: two-sided leakage, intervals over seeds × images, and paired verdicts that say
"indistinguishable" when the interval covers zero."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from privlora.benchpower import Replicate, folded_auc, paired_verdict, power_table, two_sided_tpr


def test_folded_auc_is_two_sided_and_matches_scikit_learn():
    rng = np.random.default_rng(0)
    m, n = rng.normal(0.3, 1, 50), rng.normal(0, 1, 60)
    auc = roc_auc_score(np.r_[np.ones(50), np.zeros(60)], np.r_[m, n])
    assert folded_auc(m[None], n[None])[0] == pytest.approx(0.5 + abs(auc - 0.5))
    assert folded_auc(-m[None], -n[None])[0] == pytest.approx(folded_auc(m[None], n[None])[0])  # inverted: same
    assert folded_auc(np.ones((1, 4)), np.ones((1, 4)))[0] == 0.5  # ties count one half


def test_two_sided_tpr_counts_an_inverted_attack():
    nonmember = np.arange(200.0)[None]
    high = np.r_[np.full(50, 1000.0), np.full(150, 100.0)][None]  # 50 of 200 members above every non-member
    assert two_sided_tpr(high, nonmember)[0] == 0.25 and two_sided_tpr(-high, -nonmember)[0] == 0.25


def scores(rng, member_mean, nonmember_mean, n=200, sd=0.05):
    """A loss attack's scores (negative losses): the member loss is lower when the model memorised."""
    return {"loss": {"member_test": -rng.normal(member_mean, sd, n),
                     "nonmember_test": -rng.normal(nonmember_mean, sd, n)}}


def replicates(n_seeds=3):
    reps = []
    for seed in range(n_seeds):
        rng = np.random.default_rng(seed)
        models = {"base": scores(rng, 1.0, 1.0), "lora-e0002": scores(rng, 0.9, 0.95),
                  "lora": scores(rng, 0.8, 0.9),
                  "private": scores(rng, 0.95, 0.95),  # as useful as the budget, no leakage
                  "same": scores(rng, 0.9, 0.95)}  # the budget itself, trained again
        reps.append(Replicate(seed, models, ["base", "lora-e0002", "lora"],
                              {"lora": "lora", "private": "private", "same": "same"}))
    return reps


def test_paired_verdicts_say_above_only_with_an_interval_that_excludes_zero():
    power = power_table(replicates(), ["private", "same"], n_boot=300, seed=1)
    private, same = power["private"], power["same"]
    assert private["verdict"] == "above" and private["frontier_distance"]["ci95"][1] < 0
    lo, hi = same["frontier_distance"]["ci95"]
    assert same["verdict"] == "indistinguishable" and lo < 0 < hi
    assert "frontier_distance" not in power["lora"] and power["lora"]["best_auc_two_sided"]["mean"] > 0.9
    assert private["n_seeds"] == 3 and len(private["best_auc_two_sided"]["per_seed"]) == 3
    assert private["heldout_loss"]["mean"] == pytest.approx(0.95, abs=0.01)
    assert private["auc_gap"]["mean"] == pytest.approx(private["best_auc_two_sided"]["mean"] - 0.5)
    assert private["tpr_estimable"]  # 200 non-members resolve 1 % FPR


def test_a_defence_that_helps_on_one_seed_only_is_not_called_above():
    reps = replicates(3)
    rng = np.random.default_rng(9)
    for rep, (m, n) in zip(reps, [(0.95, 0.95), (0.9, 0.95), (0.8, 0.95)]):  # above, on, below the frontier
        rep.scores["lucky"] = scores(rng, m, n)
        rep.runs["lucky"] = "lucky"
    alone = power_table(reps[:1], ["lucky"], n_boot=300, seed=1)["lucky"]
    pooled = power_table(reps, ["lucky"], n_boot=300, seed=1)["lucky"]
    assert alone["verdict"] == "above" and pooled["verdict"] == "indistinguishable"
    assert pooled["frontier_distance"]["per_seed"][0] < 0 < pooled["frontier_distance"]["per_seed"][2]


def test_a_defence_no_more_useful_than_the_base_model_is_flagged_per_seed():
    """Its low leakage is that of a model that did not learn (MP-LoRA's diverged min-max game did this): the row
    names the seeds, and the Markdown verdict says so."""
    from privlora.benchtable import power_rows

    reps = replicates(3)
    rng = np.random.default_rng(5)
    for rep, held_out in zip(reps, [0.95, 1.05, 0.95]):  # seed 1: worse than the base model (1.0)
        rep.scores["broken"] = scores(rng, held_out, held_out)
        rep.runs["broken"] = "broken"
    power = power_table(reps, ["private", "broken"], n_boot=100, seed=1)
    assert power["broken"]["learned_nothing_on_seeds"] == [1]
    assert power["private"]["learned_nothing_on_seeds"] == []
    assert "learned_nothing_on_seeds" not in power["lora"]  # the baseline has no verdict
    md = power_rows(power)
    broken = next(line for line in md.splitlines() if line.startswith("| broken "))
    assert "learned nothing on seed 1 (held-out loss no better than the base model's)" in broken
    assert "learned nothing" not in next(line for line in md.splitlines() if line.startswith("| private "))


def test_point_estimates_need_no_resampling():
    point = power_table(replicates(), ["private"], n_boot=0)["private"]
    assert point["frontier_distance"]["ci95"] is None and point["verdict"] == "no interval (n_bootstrap 0)"


def test_non_finite_scores_are_cleaned_as_the_audit_does():
    from privlora.benchpower import replicate_from_report

    rng = np.random.default_rng(3)
    s = scores(rng, 0.9, 1.0)["loss"]
    s["member_test"][0] = np.nan
    model = {"name": "m", "results": {"loss": {}}, "scores": {"loss": {r: list(v) for r, v in s.items()}}}
    rep = replicate_from_report(0, {"models": [model, {**model, "name": "base"}]}, ["base"], {"m": "m"})
    assert np.isfinite(rep.scores["m"]["loss"]["member_test"]).all()
    power = power_table([rep], ["m"], n_boot=50)
    assert all(np.isfinite(power["m"]["best_auc_two_sided"]["ci95"]))


def test_verdict_rule():
    assert paired_verdict([-0.1, -0.01]) == "above"
    assert paired_verdict([0.01, 0.2]) == "below"
    assert paired_verdict([-0.05, 0.05]) == "indistinguishable"


def test_a_defence_private_to_single_model_attacks_only_is_called_so_by_each_strength():
    """A 'defence' whose loss scores look like chance but which a shadow attack separates: restricted to the loss
    attack it is above the frontier, with the shadow attack it is below (the bench prints both tables)."""
    from privlora.benchpower import restrict

    reps = replicates(3)
    for rep in reps:
        rng = np.random.default_rng(rep.seed + 100)
        for name, model in rep.scores.items():
            exposed = name in ("lora", "hidden")  # the shadow attack separates the full-length LoRA as well
            model["lira"] = {"member_test": rng.normal(1.0 if exposed else 0.0, 0.3, 200),
                             "nonmember_test": rng.normal(0.0, 0.3, 200)}
        rep.scores["hidden"] = {**scores(rng, 0.95, 0.95), "lira": {"member_test": rng.normal(1.0, 0.3, 200),
                                                                      "nonmember_test": rng.normal(0.0, 0.3, 200)}}
        rep.runs["hidden"] = "hidden"
    both = power_table(reps, ["hidden"], n_boot=300, seed=1)["hidden"]
    single = power_table([restrict(r, ["loss"]) for r in reps], ["hidden"], n_boot=300, seed=1)["hidden"]
    assert single["verdict"] == "above" and both["verdict"] == "below"
    for rep in reps:  # a model no kept attack scored drops out; the loss scores stay as the utility
        del rep.scores["base"]["lira"]
    shadow = power_table([restrict(r, ["lira"]) for r in reps], ["hidden"], n_boot=300, seed=1)["hidden"]
    assert shadow["verdict"] == "below" and shadow["heldout_loss"]["mean"] == pytest.approx(0.95, abs=0.01)
    assert shadow["best_auc_two_sided"]["mean"] > 0.95
    assert both["best_auc_two_sided"]["mean"] > 0.95 > 0.6 > single["best_auc_two_sided"]["mean"]


def test_the_bench_adds_the_single_model_table_only_with_shadow_attacks(tmp_path):
    from privlora.bench import single_model_power
    from privlora.benchspec import BenchSpec
    from privlora.benchtable import format_extras

    reps = replicates(2)
    for rep in reps:
        for model in rep.scores.values():
            model["lira"] = model["loss"]
    with_shadows = BenchSpec(tmp_path, {}, attacks=["loss", "lira"], n_bootstrap=50)
    single = single_model_power(with_shadows, reps, ["private"], 0)
    assert single["private"]["verdict"] and "lira" not in str(single)
    assert single_model_power(BenchSpec(tmp_path, {}, attacks=["loss", "ref_loss"]), reps, ["private"], 0) == {}
    text = format_extras({"power_single_model": single})
    assert "single-model attacks alone" in text and "| private |" in text
