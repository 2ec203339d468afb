"""distill_lora: each image's target comes from the teacher of the other half; halves; prerequisites; the output."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from privlora.config import TrainConfig, build_config, write_resolved_config
from privlora.data.halves import half_assignment, train_subset
from privlora.denoiser import Denoiser
from privlora.diffusion import predict
from privlora.errors import PrivloraError
from privlora.models.loading import load_base
from privlora.models.lora import LoraSpec, add_lora, unet_lora_config
from privlora.objectives.distill_lora import DistillObjective
from privlora.train import run_prerequisites, train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(synthetic_images=40, n_member_aux=5, n_nonmember_aux=5, n_nonmember_test=10, resolution=32,
             train_batch_size=8, eval_samples=8, network_dim=4, network_alpha=4, unet_lr=1e-3, method="distill_lora")


def test_halves_are_disjoint_cover_the_train_role_and_are_stable():
    examples = [f"img{i:02d}" for i in range(25)]
    a, b = train_subset(examples, "half_a", 3), train_subset(examples, "half_b", 3)
    assert (len(a), len(b)) == (13, 12) and not set(a) & set(b) and sorted(a + b) == examples
    assert a == [e for e in examples if e in set(a)]  # the train role's order is kept
    assert train_subset(examples, "half_a", 3) == a and train_subset(examples, "all", 3) == examples
    assert half_assignment(25, 3) == half_assignment(25, 3) != half_assignment(25, 4)
    assert half_assignment(1, 0) == [0]


def lora_unet(model):
    torch.manual_seed(0)
    base = load_base(model)
    params = add_lora(base.unet, unet_lora_config(LoraSpec(4, 4), base.unet))
    return base, params


def random_weights(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) * 0.2 for p in params]


def prediction_with(base, params, weights, z, c, t, noise):
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
        out = predict(base.unet, base.noise_scheduler, z, c, t, noise)
        for p, s in zip(params, saved):
            p.copy_(s)
    return out


def inputs(base, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, 8, 8, generator=g)
    c = torch.randn(n, 8, base.unet.config.cross_attention_dim, generator=g)
    return z, c, torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g)


@pytest.mark.parametrize("w", [0.0, 0.25])
def test_each_images_target_is_the_prediction_of_the_teacher_that_did_not_see_it(model, w):
    base, params = lora_unet(model)
    student = [p.detach().clone() for p in params]
    teachers = [random_weights(params, 1), random_weights(params, 2)]
    halves = torch.tensor([0, 1, 1, 0, 1, 0, 0])  # example index -> the half (teacher) that trained on it
    obj = DistillObjective(params, teachers, halves, true_noise_weight=w)
    z, c, noise, t = inputs(base)
    index = torch.tensor([3, 0, 5, 1, 4, 2])
    target = obj.target(index, base.unet, base.noise_scheduler, z, c, noise, t)
    by_teacher = [prediction_with(base, params, weights, z, c, t, noise) for weights in teachers]
    assert (by_teacher[0] - by_teacher[1]).abs().mean() > 0.05  # the teachers disagree: the choice is visible
    for row, i in enumerate(index.tolist()):
        other = 1 - int(halves[i])
        expected = w * noise[row] + (1 - w) * by_teacher[other][row]
        torch.testing.assert_close(target[row], expected, rtol=1e-4, atol=1e-5)
    for p, s in zip(params, student):  # the student's weights are back after the teachers ran
        assert torch.equal(p, s)


def test_with_true_noise_weight_one_the_target_is_the_true_noise(model):
    base, params = lora_unet(model)
    obj = DistillObjective(params, [random_weights(params, 1), random_weights(params, 2)],
                           torch.tensor([0, 1, 0, 1, 0, 1]), true_noise_weight=1.0)
    z, c, noise, t = inputs(base)
    assert torch.equal(obj.target(torch.arange(6), base.unet, base.noise_scheduler, z, c, noise, t), noise)


def test_the_student_loss_is_the_distance_to_the_teachers_target_and_trains_only_the_student(model):
    base, params = lora_unet(model)
    teachers = [random_weights(params, 1), random_weights(params, 2)]
    copies = [[w.clone() for w in t] for t in teachers]
    obj = DistillObjective(params, teachers, torch.tensor([0, 1, 0, 1, 0, 1]))
    z, c, _, _ = inputs(base)
    batch = {"latents": z, "text_emb": c, "index": torch.arange(6)}
    noise, t = Denoiser(base, device="cpu", generator=torch.Generator().manual_seed(5)).draw(batch)
    target = obj.target(batch["index"], base.unet, base.noise_scheduler, z, c, noise, t)
    with torch.no_grad():
        pred = predict(base.unet, base.noise_scheduler, z, c, t, noise)
    out = obj.lora_loss(batch, Denoiser(base, device="cpu", generator=torch.Generator().manual_seed(5)))
    assert out.loss.item() == pytest.approx((pred - target).pow(2).mean().item(), rel=1e-5)
    assert out.logs["L_ada"] == pytest.approx((pred - noise).pow(2).mean().item(), rel=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in params)
    assert all(torch.equal(a, b) for t, c in zip(teachers, copies) for a, b in zip(t, c))


@pytest.mark.parametrize("override, message", [
    ({"train_text_encoder": True}, "set train_text_encoder = false"),
    ({"distill_true_noise_weight": 1.5}, "distill_true_noise_weight 1.5 is not in [0, 1]"),
    ({"distill_true_noise_weight": -0.1}, "distill_true_noise_weight -0.1 is not in [0, 1]"),
    ({"distill_teacher_epochs": 0}, "distill_teacher_epochs 0 must be ≥ 1"),
    ({"train_subset": "half_a"}, 'set train_subset = "all"'),
    ({"canaries": 8}, "distill_lora does not support canaries"),
    ({"method": "lora", "train_subset": "third"}, "train_subset 'third' is not one of all, half_a, half_b"),
])
def test_bad_settings_are_one_line_errors(override, message):
    with pytest.raises(PrivloraError) as e:
        build_config(None, {**SMALL, "max_train_epochs": 1, **override})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_multi_process_launch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PrivloraError, match="distill_lora runs in one process"):
        build_config(None, {**SMALL, "max_train_epochs": 1})


def test_teachers_are_plain_lora_on_one_half_in_the_run_folder(tmp_path):
    cfg = build_config(None, {**SMALL, "output_dir": str(tmp_path), "max_train_steps": 9, "save_every_n_epochs": 1,
                              "distill_true_noise_weight": 0.5, "distill_teacher_epochs": 3})
    a, b = DistillObjective.prerequisites(cfg)
    assert (a.method, a.train_subset, a.output_name, b.train_subset, b.output_name) == \
        ("lora", "half_a", "teacher_a", "half_b", "teacher_b")
    assert (a.output_dir, b.output_dir) == tuple(str(tmp_path / "teachers" / h) for h in ("half_a", "half_b"))
    assert (a.max_train_epochs, a.max_train_steps, a.save_every_n_epochs) == (3, None, None)
    assert a.method_settings.values() == {} and a.save_format == "kohya"  # plain LoRA's settings: none
    assert (a.network_dim, a.unet_lr, a.seed, a.split_seed) == (cfg.network_dim, cfg.unet_lr, cfg.seed, cfg.split_seed)


def fake_train(calls):
    """Stands in for a teacher's training: writes what a finished run leaves (its LoRA file, resolved config)."""
    def fake(cfg: TrainConfig):
        calls.append(cfg.output_name)
        write_resolved_config(cfg, cfg.output_dir)
        final = Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"
        final.write_bytes(b"")
        return final
    return fake


def test_prerequisites_run_once_and_are_reused(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr("privlora.train.train", fake_train(calls))
    cfg = build_config(None, {**SMALL, "output_dir": str(tmp_path), "max_train_epochs": 2})
    run_prerequisites(cfg)
    run_prerequisites(cfg)
    assert calls == ["teacher_a", "teacher_b"]
    run_prerequisites(build_config(None, {**SMALL, "output_dir": str(tmp_path), "max_train_epochs": 2,
                                          "distill_true_noise_weight": 0.3}))  # a student-only setting: reused
    assert calls == ["teacher_a", "teacher_b"]


def test_a_finished_teacher_with_other_settings_is_an_error_not_reused(tmp_path, monkeypatch):
    monkeypatch.setattr("privlora.train.train", fake_train([]))
    run_prerequisites(build_config(None, {**SMALL, "output_dir": str(tmp_path), "max_train_epochs": 2}))
    with pytest.raises(PrivloraError, match="trained with other settings than this run needs now; delete"):
        run_prerequisites(build_config(None, {**SMALL, "output_dir": str(tmp_path), "max_train_epochs": 2,
                                              "unet_lr": 5e-4}))


def test_an_interrupted_teacher_says_to_run_the_same_command_again(tmp_path, monkeypatch):
    from privlora.errors import Interrupted

    def interrupted(cfg):
        raise Interrupted(f"interrupted at step 3; resume with --resume {cfg.output_dir}/state-step000003")
    monkeypatch.setattr("privlora.train.train", interrupted)
    with pytest.raises(Interrupted, match="half_a; run the same command again") as e:
        run_prerequisites(build_config(None, {**SMALL, "output_dir": str(tmp_path), "max_train_epochs": 2}))
    assert "--resume" not in str(e.value)


@pytest.mark.slow  # ~12 s on the 2-core box: two teachers and a student, then the student again
def test_distill_run_publishes_only_the_student_and_reuses_its_teachers(model, tmp_path):
    out = tmp_path / "r"
    settings = {**SMALL, "pretrained_model_name_or_path": model, "output_dir": str(out), "max_train_epochs": 1}
    path = train(build_config(None, settings))
    teachers = [out / "teachers" / h / f"teacher_{h[-1]}.safetensors" for h in ("half_a", "half_b")]
    assert path == out / "lora.safetensors" and all(t.is_file() for t in teachers)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["lora.safetensors"]
    student = load_file(str(path))
    for t in teachers:
        assert student.keys() == load_file(str(t)).keys()
        assert any(not torch.equal(v, load_file(str(t))[k]) for k, v in student.items() if "lora_up" in k)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["privlora_method"] == "distill_lora"
    assert json.loads(meta["privlora_hyperparameters"])["distill_true_noise_weight"] == 0.0
    history = json.loads((out / "history.json").read_text())
    assert len(history["epochs"]) == 1 and "L_distill_mean" in history["epochs"][-1]
    # 25 training images (4 batches of 8): the teachers take 13 and 12 of them (2 batches each)
    assert meta["ss_steps"] == "4"
    for t in teachers:
        with safe_open(str(t), "pt") as f:
            assert f.metadata()["privlora_method"] == "lora" and f.metadata()["ss_steps"] == "2"
    assert len(json.loads((out / "splits.json").read_text())["roles"]["train"]) == 25
    before = [t.stat().st_mtime_ns for t in teachers]
    train(build_config(None, {**settings, "overwrite": True, "distill_true_noise_weight": 0.5}))
    assert [t.stat().st_mtime_ns for t in teachers] == before


def test_a_v_prediction_student_distils_velocity(tmp_path):
    from tests.fixtures import make_tiny_folder

    base, params = lora_unet(str(make_tiny_folder(tmp_path / "v", prediction_type="v_prediction")))
    scheduler = base.noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    z, c, noise, t = inputs(base)
    halves = torch.tensor([0, 1, 0, 1, 0, 1])
    pure = DistillObjective(params, [random_weights(params, 1), random_weights(params, 2)], halves, 1.0)
    torch.testing.assert_close(pure.target(torch.arange(6), base.unet, scheduler, z, c, noise, t),
                               scheduler.get_velocity(z, noise, t))
    taught = DistillObjective(params, pure.teachers, halves, 0.0).target(torch.arange(6), base.unet, scheduler, z, c,
                                                                          noise, t)
    teacher_b = prediction_with(base, params, pure.teachers[1], z, c, t, noise)  # image 0 is in half a
    torch.testing.assert_close(taught[0], teacher_b[0], rtol=1e-4, atol=1e-5)


def test_a_teacher_file_of_another_lora_layout_is_a_one_line_error_naming_it(model, tmp_path):
    from privlora.models.lora import read_kohya_weights, save_kohya

    base, params = lora_unet(model)
    save_kohya(tmp_path / "teacher_a.safetensors", base.unet)
    assert len(read_kohya_weights(tmp_path / "teacher_a.safetensors", base.unet)) == len(params)
    other = load_base(model)
    add_lora(other.unet, unet_lora_config(LoraSpec(2, 4), other.unet))
    with pytest.raises(PrivloraError, match=r"teacher_a\.safetensors: .*: shape \(4, \d+.*\) is not this run's \(2, "):
        read_kohya_weights(tmp_path / "teacher_a.safetensors", other.unet)
