"""``privlora audit --model_cache DIR``: an audit with one more LoRA scores only that LoRA and reports what a fresh
audit of the whole list reports; a changed setting, LoRA file, file beside it or base-row input is audited again."""
import json
import shutil
from pathlib import Path

import pytest

from privlora.audit import run_audit
from privlora.cli import main
from tests.test_audit import config, make_env, make_lora, quiet, save_attacker_beside

pytestmark = pytest.mark.usefixtures("one_thread")

WORK_DONE = {"seconds", "unet_queries_run"}  # per attack: what the audit that computed an entry spent
N_TEST = 12  # member_test + nonmember_test in the env fixture's manifest


def comparable(models: list[dict]) -> list[dict]:
    """Each model's entry as report.json holds it, without the per-attack work counts."""
    models = json.loads(json.dumps(models))
    for model in models:
        for result in model["results"].values():
            for key in WORK_DONE:
                del result[key]
    return models


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("audit"))


@pytest.fixture(scope="module")
def two_loras(env, tmp_path_factory) -> tuple[str, str]:
    """A LoRA with a text-encoder part and one of the UNet alone, both with the plain text encoding."""
    folder = tmp_path_factory.mktemp("two")
    first = shutil.copy(env["loras"]["te"], folder / "first.safetensors")
    return str(first), str(make_lora(Path(env["model"]), folder / "second.safetensors"))


def cached_audit(env, out: Path, cache: Path, loras: list[str], log=quiet, **kw) -> dict:
    kw.setdefault("attacks", ["loss"])
    return run_audit(config(env, out, loras=loras, include_base=True, model_cache=str(cache), **kw), log=log)


def test_an_added_lora_is_the_only_model_audited_and_the_report_is_a_fresh_audits(env, two_loras, tmp_path):
    first, second = two_loras
    attacks = ["loss", "ref_loss", "mlp"]  # mlp: a fitted attack seeds itself, whichever models are beside it
    cache = tmp_path / "cache"
    earlier = cached_audit(env, tmp_path / "a1", cache, [first], attacks=attacks)
    assert earlier["model_cache"] == {"folder": str(cache), "reused": [], "audited": ["base", "first"]}
    lines: list[str] = []
    now = cached_audit(env, tmp_path / "a2", cache, [first, second], attacks=attacks, log=lines.append)
    assert now["model_cache"] == {"folder": str(cache), "reused": ["base", "first"], "audited": ["second"]}
    assert f"model cache {cache}: 2 of 3 models reused (base, first), 1 audited now" in lines
    assert json.loads(json.dumps(now["models"][:2])) == json.loads(json.dumps(earlier["models"]))
    # the UNet work of this audit is the second LoRA's alone: what auditing it without the base row costs
    alone = run_audit(config(env, tmp_path / "alone", loras=[second], attacks=attacks), log=quiet)
    assert now["unet_queries"]["total_run"] == alone["unet_queries"]["total_run"] > 0
    fresh = run_audit(config(env, tmp_path / "fresh", loras=[first, second], include_base=True, attacks=attacks),
                      log=quiet)
    assert "model_cache" not in fresh
    assert comparable(now["models"]) == comparable(fresh["models"])
    assert comparable(json.loads((tmp_path / "a2" / "report.json").read_text())["models"]) == \
        comparable(fresh["models"])
    untouched = {"privlora_audit", "seed", "base_model", "data", "settings", "attacks"}
    assert {k: now[k] for k in untouched} == {k: fresh[k] for k in untouched}
    assert now["unet_queries"]["per_sample"] == fresh["unet_queries"]["per_sample"]
    assert "2 of 3 models reused from earlier audits (`base`, `first`" in (tmp_path / "a2" / "report.md").read_text()


@pytest.mark.parametrize("change", [{"n_bootstrap": 60}, {"attacks": ["loss", "ref_loss"]}, {"seed": 1},
                                    {"max_samples": 5}, {"batch_size": 4}])
def test_a_changed_setting_reuses_nothing(env, two_loras, tmp_path, change):
    first, _ = two_loras
    cached_audit(env, tmp_path / "a1", tmp_path / "cache", [first])
    again = cached_audit(env, tmp_path / "a2", tmp_path / "cache", [first], **change)
    assert again["model_cache"]["reused"] == [] and again["model_cache"]["audited"] == ["base", "first"]


def test_a_rewritten_lora_file_is_audited_again_and_the_base_row_is_not(env, tmp_path):
    lora = make_lora(Path(env["model"]), tmp_path / "run.safetensors")
    cached_audit(env, tmp_path / "a1", tmp_path / "cache", [str(lora)])
    make_lora(Path(env["model"]), lora, text_encoder=True)  # the run trained again: same path, other weights
    again = cached_audit(env, tmp_path / "a2", tmp_path / "cache", [str(lora)])
    assert again["model_cache"]["reused"] == ["base"] and again["model_cache"]["audited"] == ["run"]


def test_the_base_row_is_audited_again_when_the_loras_beside_it_change_its_text_encoding(env, two_loras, tmp_path):
    first, second = two_loras
    other = make_lora(Path(env["model"]), tmp_path / "skip2.safetensors", hyperparameters={"clip_skip": 2})
    earlier = cached_audit(env, tmp_path / "a1", tmp_path / "cache", [first])
    assert earlier["models"][0]["text_encoding"]["from"].startswith("as every audited LoRA")
    same = cached_audit(env, tmp_path / "a2", tmp_path / "cache", [first, second])  # the same encoding: kept
    assert same["model_cache"]["reused"] == ["base", "first"]
    mixed = cached_audit(env, tmp_path / "a3", tmp_path / "cache", [first, str(other)])
    assert mixed["model_cache"]["reused"] == ["first"] and mixed["model_cache"]["audited"] == ["base", "skip2"]
    assert mixed["models"][0]["text_encoding"]["from"] == "clip_skip: default; max_token_length: default"


def test_an_attacker_file_added_beside_the_lora_is_read_by_a_new_audit(env, tmp_path):
    lora = make_lora(Path(env["model"]), tmp_path / "mp.safetensors",
                     hyperparameters={"method": "mp_lora", "adv_step": "reference"})
    earlier = cached_audit(env, tmp_path / "a1", tmp_path / "cache", [str(lora)], attacks=["loss", "proxy"])
    assert "proxy" in earlier["models"][1]["skipped"]
    save_attacker_beside(lora)
    again = cached_audit(env, tmp_path / "a2", tmp_path / "cache", [str(lora)], attacks=["loss", "proxy"])
    assert again["model_cache"]["audited"] == ["mp"] and "proxy" in again["models"][1]["results"]


def test_cli_model_cache_and_a_plain_audit_without_it(env, two_loras, tmp_path, capsys):
    first, _ = two_loras
    common = ["audit", "--pretrained_model_name_or_path", env["model"], "--splits", str(env["manifest"]),
              "--lora", first, "--attacks", "loss", "--n_bootstrap", "20"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert "model_cache" not in json.loads((tmp_path / "plain" / "report.json").read_text())
    for out in ("c1", "c2"):
        assert main([*common, "--out", str(tmp_path / out), "--model_cache", str(tmp_path / "cache")]) == 0
    assert "1 of 1 models reused (first), 0 audited now" in capsys.readouterr().out
    reports = [json.loads((tmp_path / out / "report.json").read_text()) for out in ("plain", "c2")]
    assert comparable(reports[1]["models"]) == comparable(reports[0]["models"])
    assert reports[1]["unet_queries"]["total_run"] == 0  # nothing to score: not even the images were encoded


@pytest.mark.slow
def test_parts_of_a_split_audit_share_the_cache(env, two_loras, tmp_path):
    first, second = two_loras
    third = str(make_lora(Path(env["model"]), tmp_path / "third.safetensors", zero=True))
    cached_audit(env, tmp_path / "a1", tmp_path / "cache", [first, second])
    lines: list[str] = []
    split = cached_audit(env, tmp_path / "a2", tmp_path / "cache", [first, second, third], jobs=2,
                         threads_per_job=1, log=lines.append)
    assert split["settings"]["processes"] == 2
    assert split["model_cache"]["reused"] == ["base", "first", "second"]
    assert split["model_cache"]["audited"] == ["third"]
    assert any("3 of 4 models reused" in line for line in lines)
    fresh = run_audit(config(env, tmp_path / "fresh", loras=[first, second, third], include_base=True,
                             attacks=["loss"]), log=quiet)
    assert comparable(split["models"]) == comparable(fresh["models"])


@pytest.mark.slow
def test_with_shadow_attacks_an_added_checkpoint_is_scored_alone_and_the_base_keeps_its_control(tmp_path):
    """The base row's shadow-attack control is the first LoRA's shadows: a checkpoint added after it leaves the base
    row's inputs as they were, so only the checkpoint is scored (against its own shadows)."""
    from privlora.audit import AuditConfig
    from tests.test_lira import tiny_run

    model, run, lora = tiny_run(tmp_path)
    early = run / "lora-e0001.safetensors"
    settings = dict(splits=str(run / "splits.json"), pretrained_model_name_or_path=str(model), include_base=True,
                    attacks=["loss", "lira", "rmia"], shadows=2, shadow_dir=str(tmp_path / "shadows"),
                    n_bootstrap=20)
    cache = str(tmp_path / "cache")
    run_audit(AuditConfig(out=str(tmp_path / "a1"), loras=[str(lora)], model_cache=cache, **settings), log=quiet)
    now = run_audit(AuditConfig(out=str(tmp_path / "a2"), loras=[str(lora), str(early)], model_cache=cache,
                                **settings), log=quiet)
    assert now["model_cache"]["reused"] == ["base", "lora"] and now["model_cache"]["audited"] == ["lora-e0001"]
    fresh = run_audit(AuditConfig(out=str(tmp_path / "fresh"), loras=[str(lora), str(early)], **settings),
                      log=quiet)
    assert comparable(now["models"]) == comparable(fresh["models"])  # most_exposed included
    assert now["models"][0]["results"]["lira"]["fit"]["shadows"] == 2 and "lira" in now["models"][0]["most_exposed"]
