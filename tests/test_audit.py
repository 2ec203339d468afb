"""`privlora audit` end to end on a random-init tiny model: report files, fitting isolation, bad inputs."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from privlora.attacks import TEST_ROLES
from privlora.attacks.clid import ClidAttack
from privlora.attacks.mlp import MlpAttack
from privlora.audit import AuditConfig, loaded_loras, run_audit
from privlora.cli import main
from privlora.data import synthetic
from privlora.data.readers import read_examples
from privlora.data.splits import auto_split, write_manifest
from privlora.errors import PrivloraError
from privlora.models.loading import load_base, sha256_file
from privlora.models.lora import LoraSpec, add_lora, lora_layers, save_kohya, text_encoder_lora_config, unet_lora_config
from tests.fixtures import make_tiny_folder

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {
    "loss": dict(timesteps=(100, 500)),
    "ref_loss": dict(timesteps=(100, 500)),
    "mlp": dict(timesteps=(100, 500), steps=30, hidden=(32,)),
    "secmi": dict(t_sec=20, interval=10),
    "pia": dict(timesteps=(200,)),
    "clid": dict(timesteps=(450,)),
}


def make_lora(folder: Path, out: Path, *, text_encoder: bool = False, zero: bool = False,
              hyperparameters: dict | None = None) -> Path:
    base = load_base(str(folder))
    add_lora(base.unet, unet_lora_config(LoraSpec(rank=4, alpha=4.0), base.unet))
    if text_encoder:
        add_lora(base.text_encoder, text_encoder_lora_config(LoraSpec(rank=4, alpha=4.0)))
    g = torch.Generator().manual_seed(11)
    for model in (base.unet, base.text_encoder):
        for layer in lora_layers(model).values():
            w = layer.lora_B["default"].weight
            w.data = torch.zeros_like(w) if zero else torch.randn(w.shape, generator=g) * 0.1  # type: ignore[arg-type]
    metadata = {"sshs_model_hash": base.sha256, "privlora_method": "lora"}
    if hyperparameters is not None:
        metadata["privlora_hyperparameters"] = json.dumps(hyperparameters)
    return save_kohya(out, base.unet, base.text_encoder if text_encoder else None, metadata=metadata)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("audit"))


def make_env(root: Path) -> dict:
    """A tiny model, a 24-image split (6 + 6 test, 4 + 4 aux) and LoRAs for it (te, zero, wide, extra)."""
    model = make_tiny_folder(root / "model")
    data = root / "data"
    synthetic.write_folder(data / "images", 24, seed=5, resolution=32)
    splits = auto_split(read_examples(data / "images"), n_nonmember_aux=4, n_nonmember_test=6, n_member_aux=4,
                        n_member_test=6, seed=0)
    manifest = write_manifest(data / "splits.json", splits)
    wide = make_tiny_folder(root / "wide", unet_overrides=dict(block_out_channels=(64, 64, 64)))
    loras = {
        "te": make_lora(model, root / "te.safetensors", text_encoder=True),
        "zero": make_lora(model, root / "zero.safetensors", zero=True),
        "wide": make_lora(wide, root / "wide.safetensors"),
    }
    keys = load_file(loras["te"])  # a module the base model does not have: a key mismatch with matching shapes
    stem = next(k for k in keys if k.startswith("lora_unet_down_blocks_0")).split(".")[0]
    extra = {k.replace(stem, stem.replace("down_blocks_0", "down_blocks_7")) if k.split(".")[0] == stem else k: v
             for k, v in keys.items()}
    save_file(extra, str(root / "extra.safetensors"))
    loras["extra"] = root / "extra.safetensors"
    return {"root": root, "model": str(model), "manifest": manifest, "data": data, "loras": loras}


def config(env, out, **kw) -> AuditConfig:
    kw.setdefault("attack_params", FAST)
    kw.setdefault("n_bootstrap", 50)
    return AuditConfig(splits=str(kw.pop("splits", env["manifest"])), out=str(out),
                       pretrained_model_name_or_path=env["model"], **kw)


def quiet(*args):
    pass


@pytest.mark.slow
def test_report_files_are_written_and_valid(env, tmp_path):
    out = tmp_path / "report"
    loras = [str(env["loras"]["te"]), str(env["loras"]["zero"])]
    report = run_audit(config(env, out, loras=loras, include_base=True), log=quiet)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "roc.png", "scores.png"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert [m["name"] for m in on_disk["models"]] == ["base", "te", "zero"]
    assert on_disk["models"][1]["sha256"] == sha256_file(Path(loras[0]))
    assert on_disk["base_model"]["sha256"] and on_disk["seed"] == 0
    assert on_disk["attacks"]["secmi"]["params"] == {"t_sec": 20, "interval": 10}
    assert on_disk["unet_queries"]["per_sample"] == {"loss": 2, "ref_loss": 4, "mlp": 2, "secmi": 4, "pia": 2,
                                                     "clid": 3}
    for model in on_disk["models"]:
        assert not model["warnings"]
        for name, result in model["results"].items():
            assert 0 <= result["auc"] <= 1 and len(result["ci95"]["auc"]) == 2
            assert result["n_member"] == 6 and result["n_nonmember"] == 6
            assert len(model["scores"][name]["member_test"]) == 6
        assert model["results"]["mlp"]["fit"]["n_member"] == 4
    md = (out / "report.md").read_text()
    assert "| attack | AUC | ASR | TPR@5%FPR | TPR@1%FPR | TPR@0.1%FPR | fit on aux |" in md
    assert "| attack | queries/sample | `base` | `te` | `zero` |" in md
    for png in ("roc.png", "scores.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.slow  # 5.2 s measured on the 2-core box
def test_a_zero_lora_gets_exactly_the_base_models_queries_and_scores(env, tmp_path):
    report = run_audit(config(env, tmp_path / "r", loras=[str(env["loras"]["zero"])], include_base=True), log=quiet)
    base, zero = report["models"]
    for name in report["attacks"]:
        if name in ("mlp", "clid"):
            continue  # fitted attacks: same inputs, but a fresh fit (equal too, yet not the point here)
        assert base["scores"][name] == zero["scores"][name], name
    assert set(zero["scores"]["ref_loss"]["member_test"]) == {0.0}


def test_captions_are_encoded_as_each_lora_was_trained(env, tmp_path, monkeypatch):
    import privlora.models.loading as loading

    lora = make_lora(Path(env["model"]), tmp_path / "long.safetensors", zero=True,
                     hyperparameters={"max_token_length": 225, "clip_skip": 2})
    calls = []
    encode = loading.encode_prompt

    def spy(base, captions, clip_skip=None, max_token_length=None):
        out = encode(base, captions, clip_skip=clip_skip, max_token_length=max_token_length)
        calls.append((clip_skip, max_token_length, out.shape[1]))
        return out

    monkeypatch.setattr(loading, "encode_prompt", spy)
    long = run_audit(config(env, tmp_path / "a", loras=[str(lora)], include_base=True, attacks=["loss"]), log=quiet)
    assert set(calls) == {(2, 225, 3 * 30 + 2)}  # every caption, base model included: 3 windows of 30 + 2
    calls.clear()
    one = run_audit(config(env, tmp_path / "b", loras=[str(lora)], include_base=True, attacks=["loss"],
                           max_token_length=75), log=quiet)
    assert set(calls) == {(2, None, 32)}
    base, zero = long["models"]
    assert zero["text_encoding"] == {"clip_skip": 2, "max_token_length": 225,
                                     "from": "clip_skip: LoRA metadata; max_token_length: LoRA metadata"}
    assert base["text_encoding"]["max_token_length"] == 225 and base["text_encoding"]["from"].startswith("as every")
    assert base["scores"] == zero["scores"]  # a zero LoRA is the base model under the same encoding
    assert zero["scores"] != one["models"][1]["scores"]


def save_attacker_beside(lora: Path, suffix: str = "attacker") -> Path:
    """A known proxy attacker for 4×4 loss maps, saved as privlora train saves one."""
    from privlora.io import save_safetensors
    from privlora.objectives.attacker import LossMapAttacker

    torch.manual_seed(3)
    net = LossMapAttacker(channels=4, pool=4, hidden=[16], dropout=0.5)
    return save_safetensors(lora.with_name(f"{lora.stem}.{suffix}.safetensors"), net.state_dict(),
                            metadata={"privlora_module": "attacker", "channels": "4", "pool": "4", "hidden": "[16]",
                                      "dropout": "0.5", "attacker_input": "loss_map"})


@pytest.fixture(scope="module")
def mp_lora(env):
    lora = make_lora(Path(env["model"]), env["root"] / "mp.safetensors",
                     hyperparameters={"method": "mp_lora", "adv_step": "reference"})
    save_attacker_beside(lora)
    save_attacker_beside(lora, "attacker_best")
    return lora


def test_proxy_scores_with_the_attacker_beside_the_lora_and_is_skipped_elsewhere(env, mp_lora, tmp_path, monkeypatch):
    from privlora.attacks.proxy import ProxyAttack
    from privlora.objectives.attacker import LossMapAttacker

    seen, fits = [], []
    forward = LossMapAttacker.forward

    def spy(self, maps):
        seen.append((self.training, torch.is_grad_enabled(), any(p.requires_grad for p in self.parameters())))
        return forward(self, maps)

    monkeypatch.setattr(LossMapAttacker, "forward", spy)
    monkeypatch.setattr(ProxyAttack, "fit", lambda self, *a: fits.append(a))
    out = tmp_path / "r"
    report = run_audit(config(env, out, loras=[str(mp_lora), str(env["loras"]["zero"])], include_base=True,
                              attacks=["loss", "proxy"]), log=quiet)
    assert seen and set(seen) == {(False, False, False)} and not fits  # eval mode, no gradient, nothing fitted
    assert report["data"]["used"] == {"member_test": 6, "nonmember_test": 6}  # no aux sample is even encoded
    base, mp, zero = report["models"]
    for m in (base, zero):
        assert set(m["results"]) == set(m["scores"]) == {"loss"} and set(m["dp_bound"]["per_attack"]) == {"loss"}
    assert base["skipped"] == {"proxy": "the base model has no co-trained attacker"}
    assert zero["skipped"]["proxy"].startswith("no zero.attacker.safetensors beside the LoRA")
    proxy = mp["results"]["proxy"]
    members, others = (mp["scores"]["proxy"][r] for r in ("member_test", "nonmember_test"))
    assert all(0 <= p <= 1 for p in members + others) and mp["skipped"] == {}
    assert proxy["decision_accuracy"] == (sum(p > 0.5 for p in members) + sum(p <= 0.5 for p in others)) / 12
    assert proxy["details"]["held_out"] and proxy["details"]["attacker_file"] == "mp.attacker.safetensors"
    assert set(mp["dp_bound"]["per_attack"]) == {"loss", "proxy"}
    md = (out / "report.md").read_text()
    assert "| proxy | 1 | — | " in md
    assert "- proxy: not run on this model — the base model has no co-trained attacker" in md
    assert f"- proxy (`mp.attacker.safetensors`): the paper's ASR: accuracy of the attacker's own decision, " \
           f"P(member) > 0.5: {proxy['decision_accuracy']:.3f}" in md
    assert all((out / png).read_bytes()[:4] == b"\x89PNG" for png in ("roc.png", "scores.png"))


def test_cli_proxy_with_the_best_attacker_is_marked_not_held_out(env, mp_lora, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["audit", "--pretrained_model_name_or_path", env["model"], "--splits", str(env["manifest"]),
                 "--out", str(out), "--lora", str(mp_lora), "--attacks", "loss,proxy", "--proxy_attacker", "best",
                 "--n_bootstrap", "20"])
    assert code == 0 and "mp: proxy AUC" in capsys.readouterr().out
    [mp] = json.loads((out / "report.json").read_text())["models"]
    proxy = mp["results"]["proxy"]
    assert proxy["details"]["attacker_file"] == "mp.attacker_best.safetensors" and not proxy["details"]["held_out"]
    assert any("not a held-out measurement" in n for n in proxy["notes"])
    assert set(mp["dp_bound"]["per_attack"]) == {"loss"}


def test_no_test_sample_ever_reaches_fitting(env, tmp_path, monkeypatch):
    seen = []
    for cls in (MlpAttack, ClidAttack):
        original = cls.fit

        def spy(self, model, member, nonmember, _original=original):
            seen.extend((p, r) for b in member + nonmember for p, r in zip(b.paths, b.roles))
            return _original(self, model, member, nonmember)

        monkeypatch.setattr(cls, "fit", spy)
    run_audit(config(env, tmp_path / "r", loras=[str(env["loras"]["te"])], include_base=True, attacks=["mlp", "clid"]),
              log=quiet)
    manifest = json.loads(Path(env["manifest"]).read_text())
    root = Path(manifest["root"])
    role_of = {}
    for role, entries in manifest["roles"].items():
        for e in entries:
            role_of.setdefault((root / e["path"]).resolve(), set()).add(role)
    assert len(seen) == 2 * 2 * 8  # 2 fitted attacks × 2 models × (4 + 4) aux samples
    for path, role in seen:
        assert role in ("member_aux", "nonmember_aux")
        assert not role_of[Path(path).resolve()] & set(TEST_ROLES), path


def test_cli_audits_the_base_model_alone(env, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["audit", "--pretrained_model_name_or_path", env["model"], "--splits", str(env["manifest"]),
                 "--out", str(out), "--attacks", "loss,pia", "--max_samples", "4", "--n_bootstrap", "20"])
    assert code == 0
    assert "UNet queries per sample: loss 8, pia 2" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base"]
    assert report["data"]["used"] == {"member_test": 4, "nonmember_test": 4}  # no fitted attack: aux unused


def test_loras_are_unloaded_afterwards(env):
    base = load_base(env["model"])
    with loaded_loras(base, [env["loras"]["te"]]) as (_, adapters):
        assert adapters == ["audit_lora_0"] and set(base.unet.peft_config) == {"audit_lora_0"}
    assert not getattr(base.unet, "peft_config", None) and not getattr(base.text_encoder, "peft_config", None)


# ------------------------------------------------------------------------------------------ bad input


def copy_dataset(env, dest: Path) -> Path:
    shutil.copytree(env["data"], dest)
    manifest = json.loads((dest / "splits.json").read_text())
    manifest["root"] = str(dest.resolve())
    (dest / "splits.json").write_text(json.dumps(manifest))
    return dest / "splits.json"


def edit_manifest(path: Path, edit) -> Path:
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return path


def a_test_image(manifest: Path) -> Path:
    m = json.loads(manifest.read_text())
    return Path(m["root"]) / m["roles"]["member_test"][0]["path"]


def bad_hash(env, tmp):
    manifest = copy_dataset(env, tmp / "data")
    image = a_test_image(manifest)
    shutil.copy(next(p for p in image.parent.glob("*.png") if p != image), image)
    return {"splits": manifest}, "content hash does not match"


def missing_image(env, tmp):
    manifest = copy_dataset(env, tmp / "data")
    a_test_image(manifest).unlink()
    return {"splits": manifest}, "file is missing"


def empty_role(env, tmp):
    manifest = copy_dataset(env, tmp / "data")
    edit_manifest(manifest, lambda m: m["roles"].__setitem__("nonmember_test", []))
    return {"splits": manifest}, "nonmember_test .* is empty"


def missing_manifest(env, tmp):
    return {"splits": tmp / "nope.json"}, "cannot read manifest"


def lora_for_wider_base(env, tmp):
    return {"loras": [str(env["loras"]["te"]), str(env["loras"]["wide"])]}, "wide.safetensors: this LoRA does not fit"


def lora_with_unknown_modules(env, tmp):
    return {"loras": [str(env["loras"]["extra"])]}, "extra.safetensors: only 95 of its 96 LoRA modules"


def missing_lora(env, tmp):
    return {"loras": [str(tmp / "gone.safetensors")]}, "gone.safetensors: LoRA file not found"


def pickle_lora(env, tmp):
    (tmp / "l.pt").write_bytes(b"not really")
    return {"loras": [str(tmp / "l.pt")]}, "pickle-based LoRA refused"


def not_a_lora(env, tmp):
    save_file({"foo.weight": torch.zeros(2)}, str(tmp / "foo.safetensors"))
    return {"loras": [str(tmp / "foo.safetensors")]}, "no LoRA weights in this file"


def unknown_attack(env, tmp):
    return {"attacks": ["loss", "gan_leaks"]}, "unknown attack 'gan_leaks'"


def bad_attacker_file(env, tmp):
    lora = Path(shutil.copy(env["loras"]["zero"], tmp / "mp.safetensors"))
    (tmp / "mp.attacker.safetensors").write_bytes(b"not a safetensors file")
    return {"loras": [str(lora)], "attacks": ["loss", "proxy"]}, "mp.attacker.safetensors: not a readable"


def bad_max_token_length(env, tmp):
    return {"max_token_length": 100}, "--max_token_length 100 is not 75, 150 or 225"


@pytest.mark.parametrize("case", [bad_hash, missing_image, empty_role, missing_manifest, lora_for_wider_base,
                                  lora_with_unknown_modules, missing_lora, pickle_lora, not_a_lora, unknown_attack,
                                  bad_attacker_file, bad_max_token_length])
def test_bad_input_is_one_clear_error_and_writes_nothing(env, tmp_path, case):
    overrides, message = case(env, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(PrivloraError, match=message) as info:
        run_audit(config(env, out, **overrides), log=quiet)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_cli_reports_bad_input_and_exits_2(env, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["audit", "--pretrained_model_name_or_path", env["model"], "--splits", str(env["manifest"]),
                 "--out", str(out), "--lora", str(env["loras"]["wide"])])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("privlora: error: ") and "wide.safetensors" in err[-1]
    assert not out.exists()


@pytest.mark.slow
def test_jobs_split_the_models_between_processes_with_the_serial_numbers(env, tmp_path):
    third = make_lora(env["model"], tmp_path / "unet.safetensors")
    loras = [str(env["loras"]["te"]), str(env["loras"]["zero"]), str(third)]
    serial = run_audit(config(env, tmp_path / "serial", loras=loras, include_base=True), log=quiet)
    lines: list[str] = []
    out = tmp_path / "parallel"
    parallel = run_audit(config(env, out, loras=loras, include_base=True, jobs=2, threads_per_job=1),
                         log=lines.append)
    assert "auditing 4 models in 2 processes, 1 torch thread(s) each" in lines
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "roc.png", "scores.png"]
    assert parallel["settings"]["processes"] == 2
    assert [m["name"] for m in parallel["models"]] == ["base", "te", "zero", "unet"]
    timing = {"seconds", "unet_queries_run"}
    for s, p in zip(serial["models"], parallel["models"]):
        assert p["scores"] == s["scores"], s["name"]
        assert p["text_encoding"] == s["text_encoding"] and p["warnings"] == s["warnings"]
        for attack, result in s["results"].items():
            assert {k: v for k, v in p["results"][attack].items() if k not in timing} == \
                   {k: v for k, v in result.items() if k not in timing}, (s["name"], attack)
    # each part runs ref_loss's base half once: more queries in all, never fewer
    assert parallel["unet_queries"]["total_run"] >= serial["unet_queries"]["total_run"]


def test_parts_keep_names_and_the_base_rows_encoding(env, tmp_path):
    from privlora.audit import parts_for

    a = make_lora(env["model"], tmp_path / "a.safetensors", hyperparameters={"clip_skip": 2})
    b = make_lora(env["model"], tmp_path / "b.safetensors")
    c = make_lora(env["model"], tmp_path / "c.safetensors", hyperparameters={"clip_skip": 2})
    cfg = config(env, tmp_path / "o", include_base=False, jobs=2)
    assert parts_for(cfg, [a, b, c]) == [[a, c], [b]]  # round-robin
    assert parts_for(config(env, tmp_path / "o", jobs=5), [a, b]) == [[a], [b]]  # never an empty part
    # with the base row: the whole audit gives it the plain encoding (the LoRAs disagree), part 0 alone would
    # give it clip_skip 2, so the audit runs whole
    assert parts_for(config(env, tmp_path / "o", include_base=True, jobs=2), [a, b, c]) is None
    dup = tmp_path / "other"
    dup.mkdir()
    a2 = shutil.copy(a, dup / "a.safetensors")
    assert parts_for(cfg, [a, b, Path(a2)]) is None  # the serial audit renames the second "a" by position
    assert parts_for(config(env, tmp_path / "o", jobs=2), [a]) is None


def test_parts_lend_the_same_canaries_as_the_whole_audit(env, tmp_path):
    """--canaries auto: a LoRA without a canaries.json (and the base row) borrows the first one found among the
    audited models; a split that would lend a different one, or none, runs whole."""
    from privlora.audit import AUTO, parts_for
    from privlora.data.canaries import CANARY_NAME

    runs = {}
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        runs[name] = make_lora(env["model"], tmp_path / name / f"{name}.safetensors")
    a, b, c = runs["a"], runs["b"], runs["c"]
    (tmp_path / "a" / CANARY_NAME).write_text("{}")
    auto = config(env, tmp_path / "o", include_base=False, jobs=2, canaries=AUTO)
    # parts [a, c] and [b]: b borrows a's file in the whole audit, but its part has none to lend
    assert parts_for(auto, [a, b, c]) is None
    assert parts_for(config(env, tmp_path / "o", include_base=False, jobs=2), [a, b, c]) == [[a, c], [b]]
    (tmp_path / "b" / CANARY_NAME).write_text("{}")
    # c borrows a's in the whole audit and in its part [a, c]; b has its own
    assert parts_for(auto, [a, b, c]) == [[a, c], [b]]
    # [b, a] and [c]: c would borrow nothing in its part, a's (the first found) in the whole audit
    assert parts_for(auto, [b, c, a]) is None


def test_jobs_below_one_is_a_one_line_error(env, tmp_path, capsys):
    code = main(["audit", "--splits", str(env["manifest"]), "--out", str(tmp_path / "o"),
                 "--pretrained_model_name_or_path", env["model"], "--lora", str(env["loras"]["zero"]), "--jobs", "0"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "--jobs must be ≥ 1, got 0" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
