"""The stronger proxy attackers of MP-/SMP-LoRA (attacker_draws, attacker_timestep, attacker_features): who gets
which gradient, shapes for K draws, timesteps reaching the attacker, the scalar attacker learning, evaluation."""

import copy

import pytest
import torch

from privlora.objectives.attacker_eval import fresh_noise_maps
from privlora.config import build_config, make_config
from privlora.errors import PrivloraError
from privlora.models.attacker_net import LossMapAttacker, ScalarAttacker
from privlora.objectives import build_objective
from privlora.objectives.attacker import Seen, attacker_accuracy, attacker_update
from tests.test_objectives import batches

KINDS = {  # name -> config keys
    "calibrated_map": dict(attacker_input="calibrated"),
    "timestep_map": dict(attacker_timestep=True),
    "draws_map": dict(attacker_draws=3, attacker_timestep=True),
    "scalar": dict(attacker_features="scalar"),
    "scalar_calibrated_draws": dict(attacker_features="scalar", attacker_input="calibrated", attacker_draws=3,
                                    attacker_timestep=True),
}


class DrawingDenoiser:
    """Loss maps (θ·x − (t/T)·noise)² with random noise and timesteps from a seeded generator; the base model's
    map is the same with θ = 0.5. One ``loss_map`` call is one 'UNet' call."""

    num_train_timesteps = 1000

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.nn.Parameter(torch.randn(4, 8, 8, generator=g))
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.calls = self.samples = 0

    def draw(self, batch, generator=None):
        g, x = generator or self.gen, batch["x"]
        return torch.randn(x.shape, generator=g), torch.randint(0, 1000, (x.shape[0],), generator=g)

    def loss_map(self, batch, *, generator=None, noise=None, timesteps=None):
        if noise is None or timesteps is None:
            noise, timesteps = self.draw(batch, generator)
        self.calls += 1
        self.samples += batch["x"].shape[0]
        return self._map(self.theta, batch, noise, timesteps), timesteps

    def reference_map(self, batch, noise, timesteps):
        return self._map(torch.tensor(0.5), batch, noise, timesteps)

    @staticmethod
    def _map(theta, batch, noise, t):
        return (theta * batch["x"] - (t.float() / 1000).view(-1, 1, 1, 1) * noise) ** 2

    def adaptation_loss(self, maps, t):
        return maps.mean()


def objective(method="smp_lora", adv_step="fused", **keys):
    torch.manual_seed(0)
    cfg = make_config(method=method, adv_step=adv_step, attacker_pool=4, attacker_hidden=[16], attacker_lr=1e-2,
                      privacy_alpha=5.0, **keys)
    return build_objective(cfg, latent_channels=4, member_aux=batches(1), nonmember_aux=batches(2))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adv_step", ["fused", "reference"])
@pytest.mark.parametrize("method", ["mp_lora", "smp_lora"])
def test_the_lora_step_trains_only_the_lora_and_the_attacker_step_only_the_attacker(kind, adv_step, method):
    obj, den = objective(method, adv_step, **KINDS[kind]), DrawingDenoiser()
    out = obj.lora_loss(next(batches(3)), den)
    out.loss.backward()
    assert den.theta.grad.abs().sum() > 0 and all(p.grad is None for p in obj.attacker.parameters())
    grad = den.theta.grad.clone()
    before = copy.deepcopy(obj.attacker.state_dict())
    logs = obj.after_lora_step(den)
    assert torch.equal(den.theta.grad, grad)  # the attacker step added nothing to θ's gradient …
    assert any(not torch.equal(before[k], v) for k, v in obj.attacker.state_dict().items())  # … and trained it
    assert 0.0 <= logs["attacker_batch_acc"] <= 1.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adv_step", ["fused", "reference"])
def test_l_adv_alone_reaches_the_lora_through_the_attackers_input(kind, adv_step):
    obj, den = objective("smp_lora", adv_step, **KINDS[kind]), DrawingDenoiser()
    obj.after_lora_step(den)  # a trained (not initial) attacker and feature scale
    obj.optimizer.zero_grad(set_to_none=True)
    obj.combine = lambda l_ada, l_adv: l_adv
    before = copy.deepcopy(obj.attacker.state_dict())
    obj.lora_loss(next(batches(3)), den).loss.backward()
    assert den.theta.grad.abs().sum() > 0
    assert all(p.grad is None for p in obj.attacker.parameters())
    assert all(torch.equal(before[k], v) for k, v in obj.attacker.state_dict().items())  # scale buffers too


@pytest.mark.parametrize("adv_step,unet_rows", [("fused", 3 * 4), ("reference", 4 * 4)])
def test_k_draws_are_one_unet_call_and_reach_the_attacker_per_image(adv_step, unet_rows):
    obj, den = objective(adv_step=adv_step, attacker_draws=3, attacker_timestep=True), DrawingDenoiser()
    assert obj.attacker.mlp[0].in_features == 3 * (4 * 4 * 4 + 1)
    batch = next(batches(3))
    maps, seen, t = obj.attacker_view(batch, den, 3)
    assert maps.shape == (12, 4, 8, 8) and seen.maps.shape == (4, 3, 4, 8, 8) and seen.t.shape == (4, 3)
    assert torch.equal(seen.maps[1, 2], maps[2 * 4 + 1]) and seen.t[1, 2] == t[2 * 4 + 1].float() / 1000
    den.calls = den.samples = 0
    obj.lora_loss(batch, den)
    assert (den.calls, den.samples) == (1, unet_rows)
    den.samples = 0
    obj.after_lora_step(den)  # K fresh no-grad draws per aux image, member and non-member
    assert den.samples == (2 * 3 * 4 if adv_step == "reference" else 3 * 4)  # fused: the step's member maps


@pytest.mark.parametrize("features", ["map", "scalar"])
def test_the_timestep_reaches_the_attacker(features):
    obj = objective(attacker_features=features, attacker_timestep=True, attacker_draws=2)
    obj.after_lora_step(DrawingDenoiser())
    maps = torch.rand(4, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    obj.attacker.eval()
    early, late = (obj.attacker(maps, torch.full((4, 2), f)) for f in (0.1, 0.9))
    assert not torch.allclose(early, late)


def test_without_timestep_the_attacker_ignores_it_and_draw_order_does_not_matter():
    net = ScalarAttacker(draws=3, timestep=False, hidden=[8]).eval()
    maps = torch.rand(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(net(maps, torch.rand(2, 3)), net(maps.flip(1), None))
    timed = ScalarAttacker(draws=3, timestep=True, hidden=[8]).eval()
    t = torch.rand(2, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(timed(maps, t), timed(maps.flip(1), t.flip(1)))


def separable(n, gen, draws=4):
    """Members' maps have a lower mean loss (0.7 vs 1), hidden under a timestep factor 1 + 4·t/T."""
    level = torch.cat([torch.full((n,), 0.7), torch.ones(n)]).view(-1, 1, 1, 1, 1)
    t = torch.rand(2 * n, draws, generator=gen)
    e = torch.empty(2 * n, draws, 4, 8, 8).exponential_(generator=gen)
    return Seen(level * (1 + 4 * t).view(2 * n, draws, 1, 1, 1) * e, t)


def train_on_separable(draws, timestep, steps=150):
    torch.manual_seed(0)
    net = ScalarAttacker(draws=draws, timestep=timestep, hidden=[32, 32], dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        maps, t = separable(16, gen, draws)
        attacker_update(net, opt, Seen(maps[:16], t[:16]), Seen(maps[16:], t[16:]), 1)
    maps, t = separable(200, gen, draws)
    return attacker_accuracy(net, Seen(maps[:200], t[:200]), Seen(maps[200:], t[200:]))


def test_the_scalar_attacker_learns_a_separable_case_that_one_draw_without_timestep_does_not():
    assert train_on_separable(draws=4, timestep=True) > 0.9
    assert train_on_separable(draws=1, timestep=False) < 0.8  # the paper's view: one draw, timestep unknown


def test_evaluation_feeds_k_draws_with_timesteps_and_skips_other_input_kinds():
    obj, den = objective(attacker_draws=3, attacker_timestep=True, attacker_input="calibrated"), DrawingDenoiser()
    obj.after_lora_step(den)
    roles = {r: [{"x": x} for x in next(batches(i, 5))["x"]] for i, r in enumerate(
        ("member_aux", "nonmember_aux", "member_test", "nonmember_test"))}
    maps, refs, steps = fresh_noise_maps(roles, den, seed=7, calibrated=True, draws=3)
    assert maps["member_test"].shape == (5, 3, 4, 8, 8) and steps["member_test"].shape == (5, 3)
    assert set(obj.evaluate(maps, refs, steps)) == {"attacker_train_acc", "attacker_test_acc"}
    one, one_refs, one_steps = fresh_noise_maps(roles, den, seed=7, calibrated=True)
    assert obj.evaluate(one, one_refs, one_steps) == {}  # one draw per sample: not this attacker's input
    assert obj.evaluate(maps, refs) == {}  # no timesteps for a timestep-aware attacker


def test_scalar_attacker_state_round_trips_exactly():
    a, den = objective(attacker_features="scalar", attacker_draws=2), DrawingDenoiser()
    for _ in range(2):
        a.lora_loss(next(batches(3)), den)
        a.after_lora_step(den)
    b = objective(attacker_features="scalar", attacker_draws=2)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert int(b.attacker.seen) == 2
    members, nonmembers = torch.rand(2, 4, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for obj in (a, b):
        torch.manual_seed(5)  # the same dropout masks
        attacker_update(obj.attacker, obj.optimizer, members, nonmembers, 2)
    for (k, va), vb in zip(a.attacker.state_dict().items(), b.attacker.state_dict().values()):
        assert torch.equal(va, vb), k


def test_default_attacker_is_the_papers():
    obj = objective()
    assert type(obj.attacker) is LossMapAttacker and (obj.draws, obj.timestep) == (1, False)
    assert obj.attacker.mlp[0].in_features == 4 * 4 * 4


@pytest.mark.parametrize("keys,named", [(dict(attacker_draws=0), "attacker_draws"),
                                        (dict(attacker_features="pixels"), "attacker_features")])
def test_bad_settings_are_one_line_errors_naming_the_key(keys, named):
    with pytest.raises(PrivloraError) as e:
        build_config(None, {"method": "smp_lora", "max_train_steps": 1, "synthetic_images": 8, **keys})
    assert named in str(e.value) and "\n" not in str(e.value)


def test_a_saved_stronger_attacker_loads_back_exactly_from_its_metadata(tmp_path):
    from privlora.attacks.proxy import load_attacker
    from privlora.io import save_safetensors
    from privlora.objectives.adversarial import AdversarialSettings

    assert AdversarialSettings().kind() == {}  # the paper's attacker file is written as before
    obj = objective(attacker_features="scalar", attacker_draws=4, attacker_timestep=True)
    obj.after_lora_step(DrawingDenoiser())
    meta = obj.module_metadata()
    assert {"channels": "4", "pool": "4", "hidden": "[16]", "dropout": "0.5", "draws": "4", "features": "scalar",
            "timestep": "true"}.items() <= meta.items()
    path = save_safetensors(tmp_path / "a.attacker.safetensors", obj.attacker.state_dict(), metadata=meta)
    net, _ = load_attacker(path)
    assert type(net) is ScalarAttacker and (net.draws, net.timestep) == (4, True)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in obj.attacker.state_dict().items())
