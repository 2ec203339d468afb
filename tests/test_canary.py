"""The one-run canary audit (Steinke, Nasr & Jagielski 2023): the bound's math, its soundness on a mechanism with a
known ε, its power on a memorising model, and canaries in training (secret coins, private file, resume)."""
import json
import math

import numpy as np
import pytest
from safetensors import safe_open
from scipy.stats import binom

from privlora.attacks import build_attacks, canary
from privlora.attacks.target import Target
from privlora.cli import main
from privlora.config import build_config
from privlora.data.canaries import CANARY_NAME, read_canaries
from privlora.errors import PrivloraError
from tests.fixtures import make_tiny_folder
from tests.test_attacks import FAST, MemorisingUNet, fake_text, make_batch, scheduler


def test_the_bound_is_the_papers_closed_form_on_a_hand_case():
    # δ = 0, every one of r guesses right: P[Bin(r, q) ≥ r] = q^r = β  ⇒  ε = ln(q / (1 − q)) with q = β^(1/r)
    q = 0.05 ** (1 / 10)
    assert canary.epsilon_lower_bound(100, 10, 10) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    # 9 of 10 right at δ = 0: the ε whose binomial tail at 9 is exactly 0.05 (8 of 10 proves nothing: 56/1024)
    eps = canary.epsilon_lower_bound(100, 10, 9)
    p = 1 / (1 + math.exp(-eps))
    assert eps > 0 and binom.sf(8, 10, p) == pytest.approx(0.05, abs=1e-5)
    assert canary.epsilon_lower_bound(100, 10, 8) == 0.0
    # chance-level guessing proves nothing; δ > 0 only adds slack (a smaller bound)
    assert canary.epsilon_lower_bound(100, 10, 5) == 0.0
    assert 0 < canary.epsilon_lower_bound(1000, 100, 90, delta=1e-4) < canary.epsilon_lower_bound(1000, 100, 90)
    # the δ term by hand for v = 1: 2·m·δ·P[Bin(r, q) = 0]
    q1 = 1 / (1 + math.exp(-0.5))
    expected = binom.sf(0, 3, q1) + 2 * 10 * 1e-3 * binom.pmf(0, 3, q1)
    assert canary.p_value(10, 3, 1, 0.5, 1e-3) == pytest.approx(expected)


def test_guess_sizes_are_fixed_in_advance_and_split_the_confidence():
    assert canary.guess_sizes(100) == [(5, 5), (10, 10), (25, 25), (50, 50)]
    result = canary.audit(np.arange(100.0), np.arange(100) >= 50)  # a perfect ranking
    assert result["level_per_size"] == pytest.approx(0.05 / 4)
    assert all(t["correct"] == t["guesses"] for t in result["tried"])
    assert result["epsilon_lower_bound"] == pytest.approx(canary.max_provable_epsilon(100), abs=1e-5)


def test_at_a_true_epsilon_of_one_the_bound_exceeds_one_at_most_at_the_stated_rate():
    """ε = 1 randomized response: each canary's bit is revealed correctly with probability e/(1 + e)."""
    q = math.e / (1 + math.e)
    above, bounds = 0, []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        included = rng.random(400) < 0.5
        reported = np.where(rng.random(400) < q, included, ~included)
        scores = reported + rng.random(400) * 1e-3  # the auditor ranks by the released bit
        bound = canary.audit(scores, included)["epsilon_lower_bound"]
        bounds.append(bound)
        above += bound > 1.0
    assert above <= 200 * 0.05 + 3 * math.sqrt(200 * 0.05 * 0.95)  # at most the 5 % a 95 % bound allows
    assert np.mean(bounds) < 1.0 and max(bounds) > 0.3  # and it is not vacuous: the audit does detect leakage


def test_a_memorising_model_yields_a_bound_clearly_above_zero():
    """A model that memorised exactly the canaries whose coin came up IN; the loss attack ranks them."""
    batch = make_batch(64, "canary", 500)
    included = np.random.default_rng(0).random(64) < 0.5
    memo = {c: z for c, z, i in zip(batch.captions, batch.latents, included) if i}
    sched = scheduler()
    target = Target("memo", MemorisingUNet(sched, memo), sched, fake_text, batch_size=16)
    scores = build_attacks(["loss"], FAST)[0].score(target, batch).numpy()
    result = canary.audit(scores, included)
    assert result["epsilon_lower_bound"] > 1.0
    inside = min(included.sum(), (~included).sum())  # guess sizes that fit both sides are perfect
    assert all(t["correct"] == t["guesses"] for t in result["tried"] if t["k_in"] <= inside)
    base = Target("base", MemorisingUNet(sched, {}), sched, fake_text, batch_size=16)  # trained on nothing
    control = canary.audit(build_attacks(["loss"], FAST)[0].score(base, batch).numpy(), included)
    assert control["epsilon_lower_bound"] < 0.5


SMALL = dict(synthetic_images=30, n_member_aux=6, n_member_test=6, n_nonmember_aux=6, n_nonmember_test=6,
             resolution=32, train_batch_size=8, eval_samples=6, network_dim=4, network_alpha=4, unet_lr=3e-3,
             max_train_epochs=2, seed=5, canaries=16)


@pytest.mark.slow
def test_canaries_train_only_their_included_half_resume_with_the_same_coins_and_audit(tmp_path, monkeypatch):
    from privlora import train as train_module
    from privlora.models.cache import Cache

    model = make_tiny_folder(tmp_path / "model")
    seen = []
    original = Cache.role

    def spy(self, examples, expand_repeats=False, augment=None):
        if expand_repeats:
            seen.append({str(e.path) for e in examples})
        return original(self, examples, expand_repeats, augment)

    monkeypatch.setattr(Cache, "role", spy)
    settings = {**SMALL, "pretrained_model_name_or_path": str(model), "output_dir": str(tmp_path / "run"),
                "method": "dp_lora", "dp_target_epsilon": 1.0, "train_batch_size": 8, "save_state": True,
                "save_every_n_steps": 2}
    lora = train_module.train(build_config(None, settings))
    record = read_canaries(tmp_path / "run" / CANARY_NAME)
    rows = record["canaries"]
    assert len(rows) == 16 and record["warning"].startswith("PRIVATE")
    trained = seen[-1]
    assert {r["path"] for r in rows if r["included"]} <= trained
    assert not {r["path"] for r in rows if not r["included"]} & trained  # an OUT canary is never trained on
    with safe_open(str(lora), "pt") as f:
        metadata = f.metadata()
    assert "canar" not in json.dumps(metadata).lower() and int(metadata["privlora_dp_num_images"]) == len(trained)
    # a resume reads the coins back instead of flipping new ones
    before = (tmp_path / "run" / CANARY_NAME).read_bytes()
    lora.unlink()
    states = sorted((tmp_path / "run").glob("state-step*"))
    train_module.train(build_config(None, {**settings, "resume": str(states[-1])}))
    assert (tmp_path / "run" / CANARY_NAME).read_bytes() == before and seen[-1] == trained
    # the audit: one sound bound per LoRA, never above the DP claim here (ε = 1)
    out = tmp_path / "audit"
    assert main(["audit", "--lora", str(lora), "--splits", str(tmp_path / "run" / "splits.json"), "--out", str(out),
                 "--pretrained_model_name_or_path", str(model), "--attacks", "loss", "--n_bootstrap", "0",
                 "--canaries", str(tmp_path / "run" / CANARY_NAME)]) == 0
    report = json.loads((out / "report.json").read_text())
    audit = report["models"][0]["canary_audit"]
    assert audit["canaries"] == 16 and audit["included"] == sum(r["included"] for r in rows)
    assert audit["claimed_epsilon"] == pytest.approx(1.0, rel=0.01) and audit["epsilon_lower_bound"] <= 1.0
    assert "one-run canary audit" in (out / "report.md").read_text()
    heuristic = report["models"][0]["dp_bound"]
    assert heuristic["kind"].startswith("heuristic")
    # the bench's form: each LoRA's own canaries.json, the base model audited as a control
    assert main(["audit", "--lora", str(lora), "--splits", str(tmp_path / "run" / "splits.json"), "--out",
                 str(tmp_path / "auto"), "--pretrained_model_name_or_path", str(model), "--attacks", "loss",
                 "--n_bootstrap", "0", "--canaries", "auto", "--include_base"]) == 0
    models = {m["name"]: m for m in json.loads((tmp_path / "auto" / "report.json").read_text())["models"]}
    assert models["base"]["canary_audit"]["control"] and not models[lora.stem]["canary_audit"]["control"]
    assert models[lora.stem]["canary_audit"]["file"] == str(tmp_path / "run" / CANARY_NAME)
    assert models[lora.stem]["canary_audit"]["tried"] == audit["tried"]  # the same scores as with the file named


def test_canary_settings_and_files_fail_with_one_line(tmp_path):
    with pytest.raises(PrivloraError, match="canaries 1: give 0"):
        build_config(None, {**SMALL, "canaries": 1, "output_dir": str(tmp_path / "r")})
    with pytest.raises(PrivloraError, match="canary_source .*no such folder"):
        build_config(None, {**SMALL, "canary_source": str(tmp_path / "nope"), "output_dir": str(tmp_path / "r")})
    bad = tmp_path / "canaries.json"
    bad.write_text('{"version": 1, "canaries": [{"path": "x"}]}')
    with pytest.raises(PrivloraError, match="malformed canary entry") as e:
        read_canaries(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
