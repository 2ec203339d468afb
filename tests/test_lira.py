"""LiRA on shadow LoRAs: the likelihood-ratio math by hand, the balanced IN/OUT design, shadows that never see their
OUT examples, a calibration case where the raw loss is weak and LiRA is not, and the audit end to end with reuse."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from privlora.attacks import build_attacks
from privlora.attacks.base import Batch
from privlora.attacks.lira import lira_scores, pooled_sds
from privlora.attacks.metrics import evaluate
from privlora.attacks.target import stable_seed
from privlora.shadows import ShadowSet, balanced_masks, pool_entries, shadow_manifest


def test_likelihood_ratio_by_hand():
    shadows = np.array([[-1.0, -2.0], [-1.2, -2.2], [-0.8, -2.6], [-1.4, -2.4]])  # (K=4, B=2)
    inside = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=bool)
    target = np.array([-1.0, -2.0])
    sd_in, sd_out = 0.2, 0.4
    # example 0: μ_IN = (−1.0 − 1.2)/2 = −1.1, μ_OUT = (−0.8 − 1.4)/2 = −1.1 → ratio of two Gaussians at −1.0
    # example 1: μ_IN = (−2.2 − 2.6)/2 = −2.4, μ_OUT = (−2.0 − 2.4)/2 = −2.2
    def log_n(x, mu, sd):
        return -0.5 * ((x - mu) / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)

    expected = [log_n(-1.0, -1.1, 0.2) - log_n(-1.0, -1.1, 0.4), log_n(-2.0, -2.4, 0.2) - log_n(-2.0, -2.2, 0.4)]
    assert lira_scores(target, shadows, inside, sd_in, sd_out) == pytest.approx(expected)
    assert lira_scores(target, shadows, inside, sd_in, sd_out, online=False) == pytest.approx(
        [(-1.0 + 1.1) / 0.4, (-2.0 + 2.2) / 0.4])
    # pooled variances: residuals around each example's IN and OUT means, one degree of freedom used per mean
    sd_in_hat, sd_out_hat = pooled_sds(shadows, inside)
    assert sd_in_hat == pytest.approx(math.sqrt((0.1**2 + 0.1**2 + 0.2**2 + 0.2**2) / 2))
    assert sd_out_hat == pytest.approx(math.sqrt((0.3**2 + 0.3**2 + 0.2**2 + 0.2**2) / 2))


@pytest.mark.parametrize("k", [2, 4, 5, 8])
def test_masks_are_balanced(k):
    masks = balanced_masks(101, k, seed=3)
    per_example = masks.sum(0)
    assert set(per_example.tolist()) <= {k // 2, (k + 1) // 2} and per_example.min() >= 1
    assert abs(masks.sum(1) - 101 / 2).max() <= 101 * 0.2  # each shadow trains on about half the pool
    assert np.array_equal(masks, balanced_masks(101, k, seed=3))
    assert not np.array_equal(masks, balanced_masks(101, k, 4))


def test_a_shadow_trains_on_its_in_examples_only(tmp_path):
    from privlora.data.splits import _load_manifest

    pool = [{"path": f"img{i}.png", "sha256": f"{i:064x}", "caption": f"c{i}"} for i in range(24)]
    manifest = {"roles": {"member_test": pool[:6], "nonmember_test": pool[6:12], "member_aux": pool[12:18],
                          "nonmember_aux": pool[18:], "train": pool[:6] + pool[12:18]}}
    entries = pool_entries(manifest)
    assert [e["sha256"] for e in entries] == [e["sha256"] for e in pool]
    masks = balanced_masks(len(entries), 4, seed=0)
    for k in range(4):
        inside = [e for e, m in zip(entries, masks[k]) if m]
        outside = [e for e, m in zip(entries, masks[k]) if not m]
        roles = _load_manifest(shadow_manifest(tmp_path, inside, outside, tmp_path / f"s{k}.json"))["roles"]
        trained = {e["sha256"] for e in roles["train"]}
        assert trained == {e["sha256"] for e in inside} and not trained & {e["sha256"] for e in outside}
        members = {e["sha256"] for r in ("member_aux", "member_test") for e in roles[r]}
        assert members <= trained and not {e["sha256"] for r in ("nonmember_aux", "nonmember_test")
                                           for e in roles[r]} & trained


class CalibratedToy:
    """A model whose loss on an example is its difficulty d (spread widely over examples), lowered by 0.05 if it
    trained on the example, plus a small per-model noise: the raw loss mostly measures difficulty, while shadows
    that know each example's difficulty expose the 0.05."""

    def __init__(self, name: str, trained: set[str]):
        self.name, self.trained, self.shadows = name, trained, None

    def loss_maps(self, batch: Batch, queries) -> torch.Tensor:
        rows = []
        for key in batch.keys:
            d = 0.5 + np.random.default_rng(stable_seed("difficulty", key)).random()
            noise = np.random.default_rng(stable_seed(self.name, key)).normal(0, 0.01)
            rows.append(d - 0.05 * (key in self.trained) + noise)
        return torch.tensor(rows).view(-1, 1, 1, 1, 1).expand(-1, len(queries), 1, 1, 1)


def toy_batch(keys: list[str], role: str) -> Batch:
    return Batch(keys=keys, paths=[Path(k) for k in keys], roles=[role] * len(keys), captions=keys,
                 latents=torch.zeros(len(keys), 1, 1, 1))


def test_shadows_turn_a_weak_loss_attack_into_a_strong_one():
    members, others = [f"m{i}" for i in range(200)], [f"n{i}" for i in range(200)]
    aux_m, aux_n = [f"am{i}" for i in range(40)], [f"an{i}" for i in range(40)]
    pool = members + others + aux_m + aux_n
    masks = balanced_masks(len(pool), 8, seed=1)
    target = CalibratedToy("target", set(members + aux_m))
    shadow_set = ShadowSet(Path("."), [Path(f"s{k}") for k in range(8)], pool, masks)
    shadow_set.targets = [CalibratedToy(f"shadow{k}", {p for p, m in zip(pool, masks[k]) if m}) for k in range(8)]
    target.shadows = shadow_set
    results = {}
    for name in ("loss", "lira", "lira_offline", "rmia"):
        attack = build_attacks([name])[0]
        assert attack.prepare(target) is None
        if attack.fits:
            fit = attack.fit(target, [toy_batch(aux_m, "member_aux")], [toy_batch(aux_n, "nonmember_aux")])
            if name != "rmia":
                assert 0.005 < fit["sd_out"] < 0.03  # the pooled noise, not the spread of difficulties
        m = attack.score(target, toy_batch(members, "member_test")).numpy()
        n = attack.score(target, toy_batch(others, "nonmember_test")).numpy()
        results[name] = evaluate(m, n, seed=0, n_bootstrap=0)
    assert results["loss"]["auc"] < 0.65 and results["loss"]["tpr_at_1pct_fpr"] < 0.1  # the raw loss is weak
    for name in ("lira", "lira_offline", "rmia"):
        assert results[name]["auc"] > 0.95 and results[name]["tpr_at_1pct_fpr"] > 0.5
        assert results[name]["tpr_at_1pct_fpr"] >= results["loss"]["tpr_at_1pct_fpr"]


def test_rmia_by_hand():
    from privlora.attacks.lira import rmia_ratio, rmia_scores

    shadows = np.log(np.array([[0.2, 0.5], [0.6, 0.5]]))  # two references, two examples: mean likelihoods 0.4, 0.5
    ratio = rmia_ratio(np.log(np.array([0.8, 0.25])), shadows)
    assert ratio == pytest.approx(np.log([2.0, 0.5]))
    population = np.log(np.array([0.5, 1.0, 1.5, 3.0]))
    assert rmia_scores(ratio, population).tolist() == [0.75, 0.25]  # x beats 3 of 4 z; the second beats 1
    assert rmia_scores(ratio, population, gamma=2.0).tolist() == [0.5, 0.0]
    tied = rmia_scores(np.array([5.0, 9.0, -9.0]), population, break_ties=True)
    assert tied[1] > tied[0] > 0.75 > 1 / 8 > tied[2] >= 0.0  # beyond every z: ordered by ratio, still in their step


def test_lira_does_not_apply_without_shadows_and_says_why():
    reason = build_attacks(["lira"])[0].prepare(CalibratedToy("base", set()))
    assert reason is not None and "--shadows K" in reason


def tiny_run(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(model folder, run folder, final LoRA) of a two-epoch plain-LoRA run with a checkpoint after epoch 1."""
    from privlora.config import build_config
    from privlora.train import train
    from tests.fixtures import make_tiny_folder

    model = make_tiny_folder(tmp_path / "model")
    run = tmp_path / "run"
    lora = train(build_config(None, dict(
        synthetic_images=40, n_member_aux=6, n_member_test=8, n_nonmember_aux=6, n_nonmember_test=8, resolution=32,
        train_batch_size=8, eval_samples=4, network_dim=4, network_alpha=4, unet_lr=3e-3, max_train_epochs=2,
        seed=5, pretrained_model_name_or_path=str(model), output_dir=str(run), save_every_n_epochs=1)))
    return model, run, lora


@pytest.mark.slow
def test_audit_with_lira_trains_shadows_once_and_a_second_audit_reuses_them(tmp_path, capsys):
    from privlora.cli import main

    model, run, lora = tiny_run(tmp_path)
    shadow_dir = tmp_path / "shadows"
    common = ["--splits", str(run / "splits.json"), "--pretrained_model_name_or_path", str(model), "--attacks",
              "loss,lira,lira_offline", "--shadows", "2", "--shadow_dir", str(shadow_dir), "--n_bootstrap", "0"]
    assert main(["audit", "--lora", str(lora), "--out", str(tmp_path / "a1"), *common]) == 0
    first = capsys.readouterr().out
    assert "training 2 of 2 shadow LoRAs" in first
    report = json.loads((tmp_path / "a1" / "report.json").read_text())
    result = report["models"][0]["results"]
    assert {"loss", "lira", "lira_offline"} <= set(result) and 0 <= result["lira"]["auc"] <= 1
    assert result["lira"]["fit"]["shadows"] == 2
    assert report["shadows"]["trained_now"] == 2 and report["models"][0]["most_exposed"]["lira"]
    # the shadows' queries are paid for: lira runs (at least) each shadow on every test image, on top of what the
    # loss attack already ran on the model itself, and the audit's total counts every query an attack ran
    n_test = sum(len(report["models"][0]["scores"]["loss"][role]) for role in ("member_test", "nonmember_test"))
    per_sample = report["unet_queries"]["per_sample"]["lira"]
    assert result["lira"]["unet_queries_run"] >= 2 * n_test * per_sample
    ran = [report["models"][m]["results"][a]["unet_queries_run"] for m in range(len(report["models"]))
           for a in report["models"][m]["results"]]
    assert report["unet_queries"]["total_run"] == sum(ran)
    masks = json.loads(next(shadow_dir.glob("*/masks.json")).read_text())
    assert np.array(masks["masks"]).sum(0).tolist() == [1] * len(masks["pool"])  # K = 2: each IN exactly one
    # another audit of the same LoRA (the same settings and steps): the shadows are reused
    assert main(["audit", "--lora", str(lora), "--out", str(tmp_path / "a2"), *common]) == 0
    second = capsys.readouterr().out
    assert "reusing 2 shadows from" in second and "training" not in second.split("reusing")[0][-200:]
    again = json.loads((tmp_path / "a2" / "report.json").read_text())
    assert again["shadows"]["trained_now"] == 0
    assert again["models"][0]["scores"]["lira"] == report["models"][0]["scores"]["lira"]


@pytest.mark.slow
def test_checkpoints_of_one_run_share_one_family_and_resplits_of_the_same_images_share_it(tmp_path, capsys):
    """A run's intermediate checkpoint and its final LoRA get shadows from one family of K trainings as long as the
    run, each file saved at the checkpoint's own step (the base model is scored against the first's); an audit on a
    re-drawn split of the same images with the same shadow seed reuses them, another shadow seed does not."""
    from privlora.cli import main
    from privlora.shadows import lora_steps

    model, run, lora = tiny_run(tmp_path)
    early = run / "lora-e0001.safetensors"
    total, step = lora_steps(lora), lora_steps(early)
    assert total is not None and step is not None and step < total
    shadow_dir = tmp_path / "shadows"
    common = ["--pretrained_model_name_or_path", str(model), "--attacks", "loss,lira", "--shadows", "2",
              "--shadow_dir", str(shadow_dir), "--n_bootstrap", "0", "--shadow_seed", "7"]
    assert main(["audit", "--lora", str(lora), str(early), "--splits", str(run / "splits.json"), "--include_base",
                 "--out", str(tmp_path / "a1"), *common]) == 0
    first = capsys.readouterr().out
    assert first.count("training 2 of 2 shadow LoRAs") == 1 and f"({total} steps each, saved at steps {step}, " \
        f"{total})" in first
    report = json.loads((tmp_path / "a1" / "report.json").read_text())
    assert report["shadows"]["families"] == 1 and report["shadows"]["trained_now"] == 2
    base = next(m for m in report["models"] if m["kind"] == "base")  # the control: the first LoRA's shadows
    assert base["results"]["lira"]["fit"]["shadows"] == 2 and "lira" not in base["skipped"]
    per_lora = report["shadows"]["per_lora"]
    assert per_lora[str(early)]["steps"] == step and per_lora[str(lora)]["steps"] == total
    family = next(shadow_dir.iterdir())
    for i in range(2):
        assert lora_steps(family / f"shadow_{i:02d}" / f"shadow-step{step:06d}.safetensors") == step
        assert lora_steps(family / f"shadow_{i:02d}" / "shadow.safetensors") == total
        history = json.loads((family / f"shadow_{i:02d}" / "history.json").read_text())["epochs"]
        assert [h["step"] for h in history] == [total]  # evaluated once, at its end (the run: every epoch)

    manifest = json.loads((run / "splits.json").read_text())  # the same images, member and non-member roles swapped
    roles = manifest["roles"]
    roles["member_test"], roles["nonmember_test"] = roles["nonmember_test"], roles["member_test"]
    roles["member_aux"], roles["nonmember_aux"] = roles["nonmember_aux"], roles["member_aux"]
    roles["train"] = roles["member_aux"] + roles["member_test"]
    resplit = tmp_path / "resplit.json"
    resplit.write_text(json.dumps(manifest))
    assert main(["audit", "--lora", str(lora), "--splits", str(resplit), "--out", str(tmp_path / "a2"), *common]) == 0
    assert "reusing 2 shadows from" in capsys.readouterr().out
    other_seed = [*common[:-1], "8"]
    assert main(["audit", "--lora", str(lora), "--splits", str(resplit), "--out", str(tmp_path / "a3"),
                 *other_seed]) == 0
    assert "training 2 of 2 shadow LoRAs" in capsys.readouterr().out
    # the family saved the run's other checkpoint too, though only the final LoRA was audited: auditing it reuses
    assert main(["audit", "--lora", str(early), "--splits", str(resplit), "--out", str(tmp_path / "a4"),
                 *other_seed]) == 0
    assert "reusing 2 shadows from" in capsys.readouterr().out


def test_a_setting_at_its_default_does_not_change_the_family_and_legacy_folders_are_still_found(tmp_path):
    """A key privlora adds later is absent from older runs' resolved configs and at its default in newer ones: both
    give one family. A non-default value or another method gives another; a family cached under the former key
    (every setting in) is still found."""
    from privlora.shadows import family_folder, shadow_key

    pool = [{"sha256": "a"}, {"sha256": "b"}]
    old = {"method": "lora", "unet_lr": 1e-3, "network_dim": 16}
    new = {**old, "caption_swap_rate": 0.0, "text_noise_scale": 0.0}
    key = shadow_key(old, 270, pool, 8, 1, None)
    assert shadow_key(new, 270, pool, 8, 1, None) == key
    assert shadow_key({**new, "caption_swap_rate": 0.25}, 270, pool, 8, 1, None) != key
    assert shadow_key({**old, "method": "loss_floor"}, 270, pool, 8, 1, None) != key  # the method always counts
    assert shadow_key(new, 270, pool, 8, 1, None, legacy=True) != shadow_key(old, 270, pool, 8, 1, None, legacy=True)
    assert family_folder(tmp_path, new, 270, pool, 8, 1, None) == tmp_path / key  # nothing cached: the new key
    legacy = tmp_path / shadow_key(new, 270, pool, 8, 1, None, legacy=True)
    legacy.mkdir()
    assert family_folder(tmp_path, new, 270, pool, 8, 1, None) == legacy
    (tmp_path / key).mkdir()  # once a family exists under the new key, it wins
    assert family_folder(tmp_path, new, 270, pool, 8, 1, None) == tmp_path / key
