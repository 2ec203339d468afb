"""The demo's table logic: the train-less frontier, and a seconds-scale run of the whole protocol."""
import json
import math

import pytest

from privlora.protocol import ProtocolSettings, frontier_auc, frontier_verdict, run_protocol

POINTS = [(0.30, 0.50), (0.25, 0.70), (0.20, 0.90)]  # (held-out loss, best AUC): base, half, full budget


def test_frontier_is_the_best_auc_at_that_utility_or_better():
    assert frontier_auc(POINTS, 0.225) == pytest.approx(0.80)  # between the half and full budgets
    assert frontier_auc(POINTS, 0.40) == 0.50  # less useful than the base model: the base dominates
    assert math.isinf(frontier_auc(POINTS, 0.10))  # more useful than any baseline point
    assert frontier_auc(POINTS, 0.25) == pytest.approx(0.70)


@pytest.mark.slow
def test_miniature_protocol_has_every_method_attack_and_sane_numbers(tmp_path):
    s = ProtocolSettings(train={"n_member_test": 12, "n_nonmember_test": 12, "n_member_aux": 8, "n_nonmember_aux": 8,
                                "max_train_epochs": 8, "train_batch_size": 8, "unet_lr": 3e-3},
                         bench={"budgets": [0.25, 0.5], "n_bootstrap": 20, "quality_samples": 8, "quality_steps": 2},
                         label="test")
    table = run_protocol(s, tmp_path, log=lambda *_: None)
    rows = table["rows"]
    defences = ["mp_lora", "smp_lora", "dp_lora_eps8", "dp_lora_eps1"]
    picks = table["picks"]  # each defence at its aux-chosen checkpoint, its final LoRA beside it for reference
    assert list(rows) == ["base", "lora-e0002", "lora-e0004", "lora",
                          *(n for d in defences for n in dict.fromkeys([picks[d]["model"], d]))]
    # n_bootstrap 20 is too few for select's upper bounds: refused, so the final LoRA is compared; a DP run's
    # checkpoint is chosen on nonmember_aux utility alone, which needs no bound (at toy size often the base model's:
    # then the final LoRA is compared too)
    assert [picks[d]["outcome"] for d in defences[:2]] == ["refused", "refused"]
    assert all(picks[d]["outcome"] in ("chosen", "base") and "DP run" in picks[d]["reason"] for d in defences[2:])
    attacks = table["settings"]["attacks"]
    for row in rows.values():
        assert set(row["auc"]) == set(attacks) == {"loss", "ref_loss", "mlp", "secmi", "pia", "clid"}
        assert all(0.0 <= a <= 1.0 for a in row["auc"].values())
    for name in defences:
        assert {"above_frontier", "frontier_auc_at_same_loss"} <= set(rows[picks[name]["model"]])
    dp = next(m for m in json.loads((tmp_path / "audit" / "report.json").read_text())["models"]
              if m["name"] == "dp_lora_eps1")
    assert dp["dp_bound"]["claimed_epsilon"] <= 1.0 and "consistent" in dp["dp_bound"]
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    lora = next(m for m in report["models"] if m["name"] == "lora")
    members, nonmembers = lora["scores"]["loss"]["member_test"], lora["scores"]["loss"]["nonmember_test"]
    assert sum(members) / len(members) > sum(nonmembers) / len(nonmembers)  # trained members look like members
    for name in ("table.json", "table.md", "curves.png", "frontier.png", "samples_smp_lora.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_frontier_verdict_treats_noise_level_differences_as_a_tie():
    assert frontier_verdict(0.5835, 0.584) == "on"  # a 0.0005 AUC "win" is not beating the baseline
    assert frontier_verdict(0.55, 0.584) == "above"
    assert frontier_verdict(0.62, 0.584) == "below"


def test_model_row_ranks_only_the_held_out_attacks_run_on_that_model():
    from privlora.protocol import model_row

    def result(auc, held_out=None):
        r = {"auc": auc, "tpr_at_1pct_fpr": auc / 10}
        return r if held_out is None else {**r, "details": {"held_out": held_out}}

    base = {"name": "base", "results": {"loss": result(0.5)}, "scores": {"loss": {"nonmember_test": [-0.2, -0.4]}},
            "skipped": {"proxy": "the base model has no co-trained attacker"}}
    assert model_row(base, {})["best_attack"] == "loss" and model_row(base, {})["heldout_loss"] == pytest.approx(0.3)
    mp = {"name": "mp", "results": {"loss": result(0.6), "proxy": result(0.9, held_out=False),
                                    "pia": result(0.7, held_out=True)}, "scores": {}}
    row = model_row(mp, {})
    assert (row["best_attack"], row["best_auc"], row["best_tpr_at_1pct_fpr"]) == ("pia", 0.7, pytest.approx(0.07))
    assert set(row["auc"]) == {"loss", "pia"}
