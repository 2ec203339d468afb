"""DP-LoRA's mechanics: exact per-image gradients, clipping, noise, Poisson sampling, accounting, resume."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from privlora import accounting
from privlora.config import build_config
from privlora.denoiser import Denoiser
from privlora.errors import PrivloraError
from privlora.models.loading import load_base
from privlora.models.lora import LoraSpec, add_lora, unet_lora_config
from privlora.objectives.dp_lora import DPLoraObjective, PoissonBatches, clip_factors
from privlora.objectives.lora import LoraObjective
from privlora.train import train

SMALL = dict(synthetic_images=40, n_member_aux=5, n_nonmember_aux=5, n_nonmember_test=10, resolution=32,
             train_batch_size=8, eval_samples=8, network_dim=4, network_alpha=4, unet_lr=1e-3, method="dp_lora")


def lora_model(model):
    torch.manual_seed(0)
    base = load_base(model)
    params = add_lora(base.unet, unet_lora_config(LoraSpec(4, 4, conv_rank=4, conv_alpha=4), base.unet))
    for p in params:  # peft zero-initialises lora_B; a non-zero B makes every LoRA weight's gradient non-trivial
        torch.nn.init.normal_(p, std=0.05)
    return base, params


def batch(base, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(n, 4, 8, 8, generator=g),
            "text_emb": torch.randn(n, 8, base.unet.config.cross_attention_dim, generator=g)}


def denoiser(base, seed=0):
    return Denoiser(base, device="cpu", generator=torch.Generator().manual_seed(seed))


def dp(n_images=40, batch_size=5, **kw):
    return DPLoraObjective(max_grad_norm=kw.pop("max_grad_norm", 1.0), num_images=n_images, batch_size=batch_size,
                           delta=1e-5, **{"noise_multiplier": 1.0, **kw})


def test_per_sample_gradients_equal_a_loop_of_single_sample_gradients(model):
    base, params = lora_model(model)
    b = batch(base, 4)
    obj = dp(noise_draws=2)
    grads, losses = obj.per_sample_gradients(b, denoiser(base), params)
    draws = denoiser(base)  # the same generator state: the same noise and timesteps as inside per_sample_gradients
    noise, t = draws.draw({"latents": b["latents"].repeat_interleave(2, 0)})
    for i in range(4):
        rows = slice(2 * i, 2 * i + 2)
        one = {k: v[i:i + 1].expand(2, *v.shape[1:]) for k, v in b.items()}
        maps, tt = draws.loss_map(one, noise=noise[rows], timesteps=t[rows])
        loss = draws.adaptation_loss(maps, tt)
        expected = torch.autograd.grad(loss, params)
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-5)
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g[i], e, rtol=1e-4, atol=1e-7)


def test_clipping_bounds_every_per_sample_norm_and_leaves_small_gradients_alone():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.01, 0.1, 0.3, 5, 20, 100])
    grads = [torch.randn(6, 3, 4, generator=g) * scale.view(6, 1, 1), torch.randn(6, 7, generator=g) * scale.view(6, 1)]
    factor, norm = clip_factors(grads, 2.0)
    clipped = [f * x for f, x in zip(factor.view(6, 1, 1), grads[0])], factor.view(6, 1) * grads[1]
    after = torch.sqrt(torch.stack(clipped[0]).flatten(1).pow(2).sum(1) + clipped[1].pow(2).sum(1))
    assert (after <= 2.0 + 1e-5).all()
    small = norm <= 2.0
    assert small.any() and (~small).any()
    assert torch.equal(factor[small], torch.ones(int(small.sum())))
    torch.testing.assert_close(after[~small], torch.full((int((~small).sum()),), 2.0), rtol=1e-5, atol=1e-5)


def test_without_noise_or_clipping_a_dp_step_is_a_plain_lora_step(model):
    base, params = lora_model(model)
    b = batch(base, 5)
    LoraObjective().gradients(b, denoiser(base), params, lambda loss: loss.backward())
    plain = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    obj = dp(n_images=40, batch_size=5, noise_multiplier=0.0, max_grad_norm=math.inf)
    out = obj.gradients(b, denoiser(base), params, lambda loss: pytest.fail("dp_lora must not back-propagate"))
    assert out.logs["batch"] == 5
    for p, e in zip(params, plain):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)


def test_clipping_without_noise_claims_no_guarantee():
    from privlora.objectives.dp_lora import NO_NOISE

    meta = dp(n_images=40, batch_size=5, noise_multiplier=0.0).metadata()
    assert meta["privlora_dp_guarantee"] == NO_NOISE and meta["privlora_dp_guarantee"].startswith("none")
    assert dp(n_images=40, batch_size=5, noise_multiplier=1.0).metadata()["privlora_dp_guarantee"].startswith("holds")


def test_noise_has_the_calibrated_scale(model):
    base, params = lora_model(model)
    obj = dp(n_images=40, batch_size=8, noise_multiplier=2.0, max_grad_norm=0.5)
    obj.gradients({}, denoiser(base), params, None)  # an empty Poisson batch: pure noise, still accounted
    noise = torch.cat([p.grad.flatten() for p in params]) * 8  # undo the division by the expected batch size
    assert noise.std().item() == pytest.approx(2.0 * 0.5, rel=0.02)
    assert obj.accountant.history == [(2.0, 0.2, 1)]


def test_poisson_batches_include_each_image_independently_at_the_rate():
    sampler = PoissonBatches(200, 0.1, 500, torch.Generator().manual_seed(0))
    batches = list(sampler)
    counts = torch.zeros(200)
    for b in batches:
        counts[b] += 1
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float)
    assert len(batches) == 500 and sizes.mean().item() == pytest.approx(20, rel=0.05)
    assert sizes.std().item() == pytest.approx(math.sqrt(200 * 0.1 * 0.9), rel=0.15)  # binomial, not fixed-size
    assert counts.mean().item() == pytest.approx(50, rel=0.05)
    assert list(PoissonBatches(200, 0.1, 3, torch.Generator().manual_seed(0))) == batches[:3]


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_is_opacus_accounting_of_the_steps_taken(model, kind):
    from opacus.accountants import PRVAccountant, RDPAccountant

    base, params = lora_model(model)
    obj = dp(n_images=40, batch_size=4, noise_multiplier=1.3, accountant=kind)
    obj.delta = 1e-3
    for _ in range(7):
        obj.gradients({}, denoiser(base), params, None)
    reference = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for _ in range(7):
        reference.step(noise_multiplier=1.3, sample_rate=0.1)
    assert obj.epsilon() == pytest.approx(reference.get_epsilon(delta=1e-3), rel=1e-9)
    assert obj.epsilon() == pytest.approx(accounting.epsilon_for(1.3, 0.1, 7, 1e-3, kind), rel=1e-6)


def test_rdp_is_more_conservative_than_prv():
    prv = accounting.epsilon_for(1.0, 0.05, 500, 1e-5, "prv")
    rdp = accounting.epsilon_for(1.0, 0.05, 500, 1e-5, "rdp")
    assert 0 < prv < rdp < 2 * prv


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_solving_for_a_target_epsilon_lands_within_one_percent(target):
    sigma = accounting.noise_multiplier_for(target, 1e-5, 16 / 264, 1650, "prv")
    reached = accounting.epsilon_for(sigma, 16 / 264, 1650, 1e-5, "prv")
    assert target * 0.99 <= reached <= target * 1.0001


@pytest.mark.slow  # 8 s measured on the 2-core box
def test_dp_run_records_epsilon_per_epoch_and_in_the_lora_metadata(model, tmp_path):
    cfg = build_config(None, {**SMALL, "pretrained_model_name_or_path": model, "output_dir": str(tmp_path / "r"),
                              "dp_target_epsilon": 4.0, "dp_delta": 1e-3, "max_train_epochs": 2})
    path = train(cfg)
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    eps = [e["epsilon"] for e in history["epochs"]]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 4.0 * 1.0001 and eps[1] >= 4.0 * 0.99
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert float(meta["privlora_dp_epsilon"]) == pytest.approx(eps[1], rel=1e-5)
    assert meta["privlora_dp_delta"] == "0.001" and meta["privlora_dp_steps"] == "8"
    assert float(meta["privlora_dp_sample_rate"]) == pytest.approx(8 / 25)
    assert json.loads(meta["privlora_hyperparameters"])["dp_target_epsilon"] == 4.0
    resolved = (tmp_path / "r" / "resolved_config.toml").read_text()
    assert f"# privlora_dp_noise_multiplier = {meta['privlora_dp_noise_multiplier']}" in resolved
    assert "# privlora_dp_planned_steps = 8" in resolved


@pytest.mark.parametrize("setting,message", [
    ({"dp_noise_multiplier": -1.0}, "dp_noise_multiplier -1.0 is negative"),
    ({"dp_noise_multiplier": 1.0, "dp_delta": 1.0}, "dp_delta 1.0 must be in"),
    ({"dp_noise_multiplier": 1.0, "train_text_encoder": True}, "text-encoder gradients are not handled per image"),
    ({}, "exactly one of dp_noise_multiplier or dp_target_epsilon"),
    ({"dp_noise_multiplier": 1.0, "dp_target_epsilon": 3.0}, "exactly one of"),
    ({"dp_noise_multiplier": 1.0, "gradient_accumulation_steps": 2}, "gradient_accumulation_steps = 1"),
    ({"dp_noise_multiplier": 1.0, "dp_accountant": "gdp"}, "dp_accountant 'gdp'"),
])
def test_wrong_dp_settings_are_one_line_errors_before_any_work(tmp_path, setting, message):
    with pytest.raises(PrivloraError, match=message) as e:
        build_config(None, {**SMALL, "output_dir": str(tmp_path / "r"), "max_train_epochs": 1, **setting})
    assert "\n" not in str(e.value) and str(e.value).startswith("command line: ")
    assert not (tmp_path / "r").exists()


def test_a_target_epsilon_no_noise_can_reach_is_refused_before_the_first_step(model, tmp_path):
    cfg = build_config(None, {**SMALL, "pretrained_model_name_or_path": model, "output_dir": str(tmp_path / "r"),
                              "dp_target_epsilon": 1e-4, "dp_delta": 1e-3, "max_train_epochs": 50})
    with pytest.raises(PrivloraError, match="dp_target_epsilon"):
        train(cfg)
    assert not (tmp_path / "r" / "lora.safetensors").exists()


def run_files(run_dir):
    """Every file of a run folder except the private training state (state-*)."""
    return [p for p in run_dir.rglob("*") if p.is_file() and not any(q.name.startswith("state-") for q in p.parents)]


@pytest.mark.slow
def test_dp_noise_is_secret_different_per_run_and_each_run_resumes_bit_exactly(model, tmp_path, monkeypatch):
    from privlora.objectives import dp_lora

    seeds = []

    def recorded():
        seeds.append(dp_lora.secrets.randbits(63))
        return seeds[-1]

    monkeypatch.setattr(dp_lora, "secret_seed", recorded)
    common = {**SMALL, "pretrained_model_name_or_path": model, "dp_noise_multiplier": 1.0, "network_dropout": 0.1,
              "max_train_epochs": 4}
    first = load_file(train(build_config(None, {**common, "output_dir": str(tmp_path / "a")})))
    saving = {**common, "output_dir": str(tmp_path / "b"), "save_state": True, "save_every_n_steps": 5}
    second_path = train(build_config(None, saving))
    second = load_file(second_path)
    assert len(seeds) == 4  # noise + sampling, per run
    # the same settings and seed, different secret noise and batches: different weights
    assert first.keys() == second.keys() and not all(torch.equal(first[k], second[k]) for k in first)
    # each run resumes bit-exactly from its own private state
    with safe_open(str(second_path), "pt") as f:
        meta = f.metadata()
    second_path.unlink()
    resumed_path = train(build_config(None, {**saving, "resume": str(tmp_path / "b" / "state-step000015")}))
    resumed = load_file(resumed_path)
    assert all(torch.equal(second[k], resumed[k]) for k in second)
    assert len(seeds) == 6  # the resumed run drew fresh seeds, then restored the saved generator states over them
    # nothing outside the private state regenerates the noise: no secret seed in any file or the metadata
    with safe_open(str(resumed_path), "pt") as f:
        meta_text = json.dumps({**meta, **f.metadata()})
    assert meta["privlora_dp_guarantee"].startswith("holds: ")
    checked = 0
    for path in run_files(tmp_path / "a") + run_files(tmp_path / "b"):
        data = path.read_bytes()
        for seed in seeds:
            for text in (str(seed), f"{seed:x}", f"{seed:#x}"):
                assert text.encode() not in data, f"{path} holds a secret seed"
        checked += 1
    assert checked > 5 and not any(str(seed) in meta_text or f"{seed:x}" in meta_text for seed in seeds)


@pytest.mark.slow
def test_reproducible_noise_is_an_opt_in_that_voids_the_guarantee(model, tmp_path, capsys):
    common = {**SMALL, "pretrained_model_name_or_path": model, "dp_noise_multiplier": 1.0, "max_train_epochs": 2,
              "dp_reproducible_noise": True}
    a = train(build_config(None, {**common, "output_dir": str(tmp_path / "a")}))
    b = train(build_config(None, {**common, "output_dir": str(tmp_path / "b")}))
    wa, wb = load_file(a), load_file(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with safe_open(str(a), "pt") as f:
        assert f.metadata()["privlora_dp_guarantee"] == "void: reproducible noise"
    assert "guarantee is VOID" in capsys.readouterr().err


def test_delta_defaults_to_1e_5_and_is_refused_above_one_tenth_over_n(model, tmp_path):
    from privlora.objectives.base import BuildContext

    cfg = build_config(None, {**SMALL, "output_dir": str(tmp_path / "r"), "dp_noise_multiplier": 1.0,
                              "max_train_epochs": 1})
    obj = DPLoraObjective.from_config(cfg, BuildContext(4, num_train_images=25))
    assert obj.delta == 1e-5 and obj.metadata()["privlora_dp_num_images"] == "25"
    assert accounting.max_delta(25) == pytest.approx(1 / 250)
    high = build_config(None, {**SMALL, "output_dir": str(tmp_path / "r"), "dp_noise_multiplier": 1.0,
                               "dp_delta": 0.005, "max_train_epochs": 1})
    with pytest.raises(PrivloraError, match=r"dp_delta 0.005 is above 1/\(10·N\) = 0.004 for N = 25") as e:
        DPLoraObjective.from_config(high, BuildContext(4, num_train_images=25))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_dp_resume_is_bit_identical_with_reproducible_noise(model, tmp_path):
    common = {**SMALL, "pretrained_model_name_or_path": model, "dp_noise_multiplier": 1.0, "network_dropout": 0.1,
              "max_train_epochs": 4, "dp_reproducible_noise": True}
    straight = train(build_config(None, {**common, "output_dir": str(tmp_path / "a")}))
    saving = {**common, "output_dir": str(tmp_path / "b"), "save_state": True, "save_every_n_steps": 5}
    train(build_config(None, saving))
    (tmp_path / "b" / "lora.safetensors").unlink()
    resumed = train(build_config(None, {**saving, "resume": str(tmp_path / "b" / "state-step000015")}))
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(straight), "pt") as fa, safe_open(str(resumed), "pt") as fb:
        assert fa.metadata()["privlora_dp_epsilon"] == fb.metadata()["privlora_dp_epsilon"]
