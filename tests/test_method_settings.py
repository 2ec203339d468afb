"""A method owns its settings: keys, defaults, validation, resume rules and metadata come from its settings class,
and the registry turns them into flags and preset keys. Old flat presets and flags keep working."""
from dataclasses import dataclass

import pytest
import torch

from privlora.config import build_config, make_config, ran_with, resolved_toml, write_resolved_config
from privlora.errors import PrivloraError
from privlora.objectives import METHODS, register_method
from privlora.objectives.adversarial import AdversarialSettings
from privlora.objectives.dp_lora import DPSettings
from privlora.settings import MethodSettings
from tests.example_method import TimestepFloorObjective, TimestepFloorSettings, loss_of

DATA = {"synthetic_images": 9, "max_train_steps": 1}


@pytest.fixture
def example_method():
    register_method(TimestepFloorObjective)
    yield TimestepFloorObjective
    del METHODS[TimestepFloorObjective.name]


def test_a_method_in_a_test_module_plugs_in_with_one_registry_call(example_method, capsys):
    from privlora.cli import build_parser

    cfg = build_config(None, {**DATA, "method": "timestep_floor", "count_from_timestep": "500"})  # a flag's string
    assert cfg.settings(TimestepFloorSettings).count_from_timestep == 500
    assert "[timestep_floor]" in resolved_toml(cfg) and "count_from_timestep = 500" in resolved_toml(cfg)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "timestep_floor settings" in help_text and "--count_from_timestep" in help_text
    with pytest.raises(PrivloraError, match="count_from_timestep 2000 is not in") as e:
        build_config(None, {**DATA, "method": "timestep_floor", "count_from_timestep": 2000})
    assert "\n" not in str(e.value)
    maps, t = torch.tensor([[1.0], [3.0]]), torch.tensor([100, 900])
    assert loss_of(TimestepFloorObjective(500), maps, t) == 3.0 and loss_of(TimestepFloorObjective(0), maps, t) == 2.0


def test_a_key_belongs_to_one_settings_class():
    @dataclass
    class Clash(MethodSettings):
        privacy_alpha: float = 1.0

    @dataclass
    class Shadowing(MethodSettings):
        seed: int = 0

    for settings in (Clash, Shadowing):
        cls = type("Clashing", (TimestepFloorObjective,), {"name": "clashing", "settings_cls": settings})
        with pytest.raises(PrivloraError, match="is already one of"):
            register_method(cls)
        assert "clashing" not in METHODS


def test_old_flat_keys_map_to_the_methods_settings():
    cfg = build_config(None, {**DATA, "method": "smp_lora", "privacy_alpha": "2", "attacker_hidden": "8,4",
                              "adv_step": "reference"})
    s = cfg.settings(AdversarialSettings)
    assert (s.privacy_alpha, s.attacker_hidden, s.adv_step) == (2.0, [8, 4], "reference")
    assert cfg.flat()["privacy_alpha"] == 2.0 and "dp_delta" not in cfg.flat()
    with pytest.raises(PrivloraError, match="not DPSettings"):
        cfg.settings(DPSettings)


def test_another_methods_key_is_dropped_from_presets_and_refused_on_the_train_command_line(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('method = "lora"\nsynthetic_images = 9\nmax_train_steps = 1\nprivacy_alpha = 3.0\n')
    assert build_config(str(preset), {}).method_settings == MethodSettings()  # a shared base preset's keys
    assert build_config(None, {**DATA, "privacy_alpha": 3}).method_settings == MethodSettings()  # bench-wide flags
    with pytest.raises(PrivloraError) as e:
        build_config(str(preset), {"dp_delta": 1e-6}, foreign_flags="error")
    assert str(e.value) == "command line: dp_delta is a setting of dp_lora, not of lora"
    with pytest.raises(PrivloraError, match="unknown config key 'privacy_alpah'"):
        make_config(privacy_alpah=1.0)


def test_every_method_key_must_match_on_resume_unless_the_method_frees_it():
    from privlora.train_state import RESUME_MUST_MATCH, resume_settings

    for name, cls in METHODS.items():
        cfg = make_config(method=name)
        own = cfg.method_settings.values()
        checked = resume_settings(cfg)
        assert set(RESUME_MUST_MATCH) <= set(checked)
        assert set(own) - set(checked) == set(cls.settings_cls.resume_free), name
    assert AdversarialSettings.resume_free == ("attacker_eval_samples",)
    assert DPSettings.resume_free == ("dp_micro_batch_size",)


def test_a_state_saved_before_the_refactor_hands_the_method_its_counts_and_best_accuracy():
    from privlora.train_state import objective_state
    from tests.fixtures import small_smp_objective

    obj = small_smp_objective()
    saved = obj.state_dict()
    old = {"objective": {k: v for k, v in saved.items() if k not in ("aux_served", "best_test_acc")},
           "aux_served": {"member_aux": 3, "nonmember_aux": 3}, "progress": {"step": 9, "best_attacker_acc": 0.625}}
    merged = objective_state(old)
    assert merged["best_test_acc"] == 0.625 and merged["aux_served"] == {"member_aux": 3, "nonmember_aux": 3}
    obj.load_state_dict(merged)
    assert obj.best_snapshot({"attacker_test_acc_fresh": 0.6, "step": 10}) is None  # not better than the old best
    assert objective_state({"objective": saved, "progress": {}}) == {"aux_served": {}, **saved}


def test_a_run_folder_written_before_methods_owned_their_settings_still_matches(tmp_path):
    cfg = build_config(None, {**DATA, "method": "smp_lora", "privacy_alpha": 2})
    flat_old_style = "\n".join(
        f"{k} = {v!r}".replace("'", '"').replace("True", "true").replace("False", "false")
        for k, v in {**cfg.flat(), **DPSettings().values()}.items() if v is not None)
    (tmp_path / "resolved_config.toml").write_text(flat_old_style + "\n")
    assert ran_with(cfg, tmp_path)  # DP's keys were listed for every run then: they never applied
    other = build_config(None, {**DATA, "method": "smp_lora", "privacy_alpha": 3})
    assert not ran_with(other, tmp_path)
    write_resolved_config(other, tmp_path)
    assert ran_with(other, tmp_path) and not ran_with(cfg, tmp_path)
