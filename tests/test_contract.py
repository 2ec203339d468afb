"""Contract tests over the registries: every method in ``METHODS`` trains from its tiny preset, saves, resumes
bit-exactly and refuses a resume with changed settings; every attack in ``ATTACKS`` audits a LoRA on 4 vs 4 (or
says why it does not apply). A method or attack added to a registry is covered here without a new test."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from privlora.attacks import ATTACKS
from privlora.config import build_config
from privlora.errors import PrivloraError
from privlora.objectives import METHODS
from privlora.train import train
from tests.fixtures import make_tiny_folder

SMALL = dict(synthetic_images=24, n_member_aux=4, n_member_test=4, n_nonmember_aux=4, n_nonmember_test=4,
             resolution=32, train_batch_size=4, eval_samples=4, network_dim=4, network_alpha=4, max_train_steps=2,
             save_every_n_epochs=None, save_every_n_steps=1, save_state=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_tiny_folder(tmp_path_factory.mktemp("tiny") / "model"))


def config(method: str, model: str, out: Path, **extra):
    return build_config(f"configs/tiny/{method}.toml", {**SMALL, "pretrained_model_name_or_path": model,
                                                        "output_dir": str(out), "output_name": "run", **extra})


def test_every_method_has_a_tiny_preset():
    assert {p.stem for p in Path("configs/tiny").glob("*.toml")} >= set(METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_saves_and_resumes_exactly(method, model, tmp_path):
    straight = tmp_path / "straight"
    final = train(config(method, model, straight))
    with safe_open(final, "pt") as f:
        meta = f.metadata()
    cfg = config(method, model, straight)
    hyper = json.loads(meta["privlora_hyperparameters"])
    assert meta["privlora_method"] == method and cfg.method_settings.values().items() <= hyper.items()
    # a method whose LoRA is complete when built (shard_merge: the merge of its prerequisite runs) says why the loop
    # takes no step on it; its run is evaluated once and its one state is at step 0, which the rest resumes from
    untrained = METHODS[method].built_not_trained
    if untrained:
        assert isinstance(untrained, str) and len(untrained) > 20
        history = json.loads((straight / "history.json").read_text())["epochs"]
        assert [(h["epoch"], h["step"]) for h in history] == [(0, 0)]
    state = next(p for p in straight.glob("state-*")
                 if p.is_dir() and p.name.endswith("000000" if untrained else "000001"))
    saved = torch.load(state / "state.pt", weights_only=True)["config"]
    assert set(cfg.method_settings.resume_keys()) <= set(saved)

    a = {k: v.clone() for k, v in load_file(final).items()}
    again = train(config(method, model, straight, resume=str(state)))  # the same run again from its step-1 state
    b = load_file(again)
    assert again == final and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    key, value = changed_setting(cfg)
    with pytest.raises(PrivloraError, match=f"saved with different {key}"):
        train(config(method, model, straight, resume=str(state), **{key: value}))


def changed_setting(cfg) -> tuple[str, object]:
    """A resume key of the method with another valid value (a shared one for a method without own keys)."""
    for key in cfg.method_settings.resume_keys():
        value = getattr(cfg.method_settings, key)
        if isinstance(value, bool):
            return key, not value
        if isinstance(value, int) and value > 0:
            return key, value * 2
        if isinstance(value, float):
            return key, value * 2 if value > 0 else 0.5
    return "network_dim", cfg.network_dim * 2


@pytest.mark.slow
def test_every_attack_audits_4_vs_4_or_says_why_not(model, tmp_path):
    from privlora.audit import AuditConfig, run_audit

    final = train(config("smp_lora", model, tmp_path / "run", save_state=False, save_every_n_steps=None))
    report = run_audit(AuditConfig(splits=str(tmp_path / "run" / "splits.json"), out=str(tmp_path / "audit"),
                                   pretrained_model_name_or_path=model, loras=[str(final)], attacks=list(ATTACKS),
                                   n_bootstrap=0, shadows=2, shadow_method="lora", batch_size=8))
    row = report["models"][0]
    for attack in ATTACKS:
        if attack in row["skipped"]:
            assert row["skipped"][attack], f"{attack}: skipped without a reason"
            continue
        assert 0.0 <= row["results"][attack]["auc"] <= 1.0, attack
        assert len(row["scores"][attack]["member_test"]) == len(row["scores"][attack]["nonmember_test"]) == 4
    assert not set(row["skipped"]) & {"loss", "ref_loss", "proxy", "lira", "lira_offline"}  # these all apply


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_evaluations_do_not_change_what_a_method_trains(method, model, tmp_path):
    """Shadow LoRAs skip the per-epoch evaluations (privlora.shadows): that is only sound while evaluating draws
    nothing from the training's random streams, so the LoRA comes out the same with or without them."""
    common: dict = dict(max_train_steps=6, save_every_n_steps=None, save_state=False)
    if method == "dp_lora":  # otherwise its sampling and noise are secret draws, different in every run
        common["dp_reproducible_noise"] = True
    often = train(config(method, model, tmp_path / "often", eval_every_n_epochs=1, **common))
    rarely = train(config(method, model, tmp_path / "rarely", eval_every_n_epochs=1000, **common))
    if not METHODS[method].built_not_trained:  # shard_merge's evaluations are its shard runs'
        assert len(json.loads((tmp_path / "often" / "history.json").read_text())["epochs"]) > \
            len(json.loads((tmp_path / "rarely" / "history.json").read_text())["epochs"])
    a, b = load_file(often), load_file(rarely)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
