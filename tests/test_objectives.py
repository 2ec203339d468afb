"""MP-LoRA / SMP-LoRA objectives against their formulas, and who gets which gradient."""

import pytest
import torch

from privlora.objectives.adversarial import AdversarialSettings
from privlora.config import make_config
from privlora.objectives import build_objective
from privlora.objectives.attacker import LossMapAttacker, adversarial_loss
from privlora.objectives.mp_lora import MPLoraObjective
from privlora.objectives.smp_lora import EPS, SMPLoraObjective


class FakeDenoiser:
    """Loss maps = (θ · x)² for a learnable θ, so 'UNet' gradients are visible; fixed noise per call count."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.nn.Parameter(torch.randn(4, 8, 8, generator=g))
        self.calls = self.samples = 0

    def loss_map(self, batch, **_):
        self.calls += 1
        self.samples += batch["x"].shape[0]
        return (self.theta * batch["x"]) ** 2, torch.zeros(batch["x"].shape[0], dtype=torch.long)

    def adaptation_loss(self, maps, t):
        return maps.mean()


def batches(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield {"x": torch.randn(n, 4, 8, 8, generator=g)}


def make(cls, adv_step="fused", alpha=1.0, beta=1.0, k_steps=1):
    torch.manual_seed(0)
    attacker = LossMapAttacker(4, pool=8, hidden=[16, 8], dropout=0.5)
    return cls(attacker, alpha=alpha, beta=beta, k_steps=k_steps, adv_step=adv_step, lr=1e-2, weight_decay=0.0,
               member_aux=batches(1), nonmember_aux=batches(2))


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (2.5, 0.3)])
def test_smp_value_and_gradients_follow_the_ratio_formula(alpha, beta):
    obj = make(SMPLoraObjective, alpha=alpha, beta=beta)
    l_ada = torch.tensor(0.7, requires_grad=True)
    l_adv = torch.tensor(0.4, requires_grad=True)
    loss = obj.combine(l_ada, l_adv)
    loss.backward()
    denom = beta + alpha * 0.4 + EPS
    assert loss.item() == pytest.approx(0.7 / denom, rel=1e-6)
    assert l_ada.grad.item() == pytest.approx(1.0 / denom, rel=1e-6)
    assert l_adv.grad.item() == pytest.approx(-alpha * 0.7 / denom**2, rel=1e-5)


def test_mp_value_and_gradients_follow_the_min_max_formula():
    obj = make(MPLoraObjective, alpha=3.0)
    l_ada = torch.tensor(0.7, requires_grad=True)
    l_adv = torch.tensor(0.4, requires_grad=True)
    loss = obj.combine(l_ada, l_adv)
    loss.backward()
    assert loss.item() == pytest.approx(0.7 - 3.0 * 0.4)
    assert l_ada.grad.item() == pytest.approx(1.0)
    assert l_adv.grad.item() == pytest.approx(-3.0)


@pytest.mark.parametrize("cls", [MPLoraObjective, SMPLoraObjective])
def test_step_loss_is_the_formula_of_the_batch_losses(cls):
    obj, den = make(cls), FakeDenoiser()
    batch = next(batches(5))
    out = obj.lora_loss(batch, den)
    maps, _ = den.loss_map(batch)
    l_ada = maps.mean()
    l_adv = adversarial_loss(obj.attacker, maps)
    assert out.loss.item() == pytest.approx(obj.combine(l_ada, l_adv).item(), rel=1e-6)
    assert out.logs["L_adv"] == pytest.approx(l_adv.item(), rel=1e-6)


@pytest.mark.parametrize("cls", [MPLoraObjective, SMPLoraObjective])
@pytest.mark.parametrize("adv_step", ["fused", "reference"])
def test_lora_step_gives_no_gradient_to_the_attacker(cls, adv_step):
    obj, den = make(cls, adv_step), FakeDenoiser()
    out = obj.lora_loss(next(batches(3)), den)
    out.loss.backward()
    assert den.theta.grad is not None and den.theta.grad.abs().sum() > 0
    assert all(p.grad is None for p in obj.attacker.parameters())


@pytest.mark.parametrize("adv_step", ["fused", "reference"])
def test_attacker_step_gives_no_gradient_to_the_unet_and_trains_the_attacker(adv_step):
    obj, den = make(SMPLoraObjective, adv_step, k_steps=3), FakeDenoiser()
    obj.lora_loss(next(batches(3)), den)
    before = [p.detach().clone() for p in obj.attacker.parameters()]
    logs = obj.after_lora_step(den)
    assert den.theta.grad is None
    assert any(not torch.equal(b, p) for b, p in zip(before, obj.attacker.parameters()))
    assert 0.0 <= logs["attacker_batch_acc"] <= 1.0 and logs["attacker_loss"] > 0


def test_fused_and_reference_steps_agree_on_fixed_noise():
    # With the denoiser deterministic (fixed noise/timestep), the reference step's second forward
    # returns the same map, so both structures must give the same objective value.
    fused, ref = make(SMPLoraObjective, "fused"), make(SMPLoraObjective, "reference")
    ref.attacker.load_state_dict(fused.attacker.state_dict())
    den_f, den_r = FakeDenoiser(), FakeDenoiser()
    batch = next(batches(7))
    lf, lr = fused.lora_loss(batch, den_f).loss, ref.lora_loss(batch, den_r).loss
    assert lf.item() == pytest.approx(lr.item(), rel=1e-6)
    assert (den_f.samples, den_r.samples) == (4, 8)  # the reference pays a second UNet pass over the batch


def test_fused_attacker_update_uses_one_extra_forward_reference_two():
    for adv_step, extra in (("fused", 1), ("reference", 2)):
        obj, den = make(SMPLoraObjective, adv_step), FakeDenoiser()
        obj.lora_loss(next(batches(3)), den)
        calls = den.calls
        obj.after_lora_step(den)
        assert den.calls - calls == extra


def test_attacker_gradient_sync_hook_runs_before_each_attacker_step():
    seen = []
    obj, den = make(SMPLoraObjective, k_steps=3), FakeDenoiser()
    obj.grad_sync = lambda module: seen.append(all(p.grad is not None for p in module.parameters()))
    obj.lora_loss(next(batches(3)), den)
    obj.after_lora_step(den)
    assert seen == [True, True, True]


def test_attacker_input_is_resolution_independent_and_reference_shaped_at_512():
    ref = LossMapAttacker(4, pool=64)
    assert ref.mlp[0].in_features == 4 * 64 * 64 and ref.mlp[3].in_features == 512 and ref.mlp[-1].out_features == 2
    small = LossMapAttacker(4, pool=8, hidden=[16])
    for hw in (8, 16, 40):
        assert small(torch.rand(3, 4, hw, hw)).shape == (3, 2)


def test_build_objective_picks_by_method():
    kinds = {}
    for method in ("lora", "mp_lora", "smp_lora"):
        cfg = make_config(dict(method=method, attacker_pool=8, attacker_hidden=[8]), foreign="drop")
        kinds[method] = type(build_objective(cfg, latent_channels=4, member_aux=batches(0),
                                             nonmember_aux=batches(1))).__name__
    assert kinds == {"lora": "LoraObjective", "mp_lora": "MPLoraObjective", "smp_lora": "SMPLoraObjective"}


class FakeDenoiserWithBase(FakeDenoiser):
    """Adds the base model's map: (0.5·x)², as if the LoRA had moved θ away from 0.5."""

    def draw(self, batch, generator=None):
        return torch.zeros_like(batch["x"]), torch.zeros(batch["x"].shape[0], dtype=torch.long)

    def reference_map(self, batch, noise, timesteps):
        return (0.5 * batch["x"]) ** 2


@pytest.mark.parametrize("adv_step", ["fused", "reference"])
def test_calibrated_attacker_sees_maps_minus_the_base_models_and_only_the_lora_learns(adv_step):
    obj, den = make(SMPLoraObjective, adv_step), FakeDenoiserWithBase()
    obj.attacker_input = "calibrated"
    batch = next(batches(4))
    maps, seen, _ = obj.attacker_view(batch, den)
    torch.testing.assert_close(seen, maps - (0.5 * batch["x"]) ** 2)
    out = obj.lora_loss(batch, den)
    expected_adv = adversarial_loss(obj.attacker, (den.theta * batch["x"]) ** 2 - (0.5 * batch["x"]) ** 2)
    assert out.logs["L_adv"] == pytest.approx(expected_adv.item(), rel=1e-5)
    out.loss.backward()
    assert den.theta.grad.abs().sum() > 0 and all(p.grad is None for p in obj.attacker.parameters())
    grad = den.theta.grad.clone()
    obj.after_lora_step(den)
    assert torch.equal(den.theta.grad, grad)  # the attacker step added nothing to θ's gradient …
    assert all(p.grad is not None for p in obj.attacker.parameters())  # … and trained the attacker


class RecordingDenoiser(FakeDenoiser):
    """Records every batch it sees and whether the caller pinned the noise (unpinned = a fresh draw)."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.seen, self.pinned = [], []

    def loss_map(self, batch, **kw):
        self.seen.append(batch["x"])
        self.pinned.append(kw.get("noise") is not None or kw.get("timesteps") is not None)
        return super().loss_map(batch, **kw)


def test_reference_step_draws_fresh_aux_batches_and_noise_for_every_attacker_step():
    obj, den = make(SMPLoraObjective, "reference", k_steps=3), RecordingDenoiser()
    obj.lora_loss(next(batches(3)), den)
    den.seen, den.pinned = [], []
    obj.after_lora_step(den)
    # the doubled training forward, then one member + one non-member forward per attacker step
    assert den.calls == 1 + 6 and not any(den.pinned)
    members, nonmembers = den.seen[0::2], den.seen[1::2]
    expected_m, expected_n = batches(1), batches(2)  # the aux iterators' own order, one new batch per step
    for m, n in zip(members, nonmembers):
        assert torch.equal(m, next(expected_m)["x"]) and torch.equal(n, next(expected_n)["x"])
    assert len({id(x) for x in den.seen}) == 6


def test_fused_step_reuses_one_pair_of_maps_for_k_attacker_steps():
    obj, den = make(SMPLoraObjective, "fused", k_steps=3), RecordingDenoiser()
    obj.lora_loss(next(batches(3)), den)
    obj.after_lora_step(den)
    assert den.calls == 2  # the training forward + one non-member forward, whatever k


def with_dropout_in_adv(obj, seed=11):
    obj.dropout_generator = torch.Generator().manual_seed(seed)
    return obj


def test_dropout_in_adv_is_active_seeded_and_gives_the_attacker_no_gradient():
    batch, den = next(batches(3)), FakeDenoiser()
    plain = make(SMPLoraObjective, "reference").lora_loss(batch, den).logs["L_adv"]
    a = with_dropout_in_adv(make(SMPLoraObjective, "reference"))
    first, second = (a.lora_loss(batch, den) for _ in range(2))
    assert first.logs["L_adv"] != pytest.approx(plain, rel=1e-6)  # dropout changes the attacker's output …
    assert first.logs["L_adv"] != pytest.approx(second.logs["L_adv"], rel=1e-6)  # … with new masks every step
    b = with_dropout_in_adv(make(SMPLoraObjective, "reference"))
    assert b.lora_loss(batch, den).logs["L_adv"] == pytest.approx(first.logs["L_adv"], rel=1e-6)  # seeded
    first.loss.backward()
    assert den.theta.grad.abs().sum() > 0 and all(p.grad is None for p in a.attacker.parameters())
    assert a.attacker.training  # its own mode is left alone


def test_dropout_generator_state_travels_with_the_objective_state():
    a = with_dropout_in_adv(make(SMPLoraObjective, "reference"))
    den, batch = FakeDenoiser(), next(batches(3))
    a.lora_loss(batch, den)
    state = a.state_dict()
    expected = a.lora_loss(batch, den).logs["L_adv"]
    b = with_dropout_in_adv(make(SMPLoraObjective, "reference"), seed=99)
    b.load_state_dict(state)
    assert b.lora_loss(batch, den).logs["L_adv"] == pytest.approx(expected, rel=1e-6)


def test_build_objective_turns_dropout_in_adv_on_from_the_config():
    cfg = make_config(method="smp_lora", attacker_pool=8, attacker_hidden=[8], attacker_dropout_in_adv=True)
    obj = build_objective(cfg, latent_channels=4, member_aux=batches(0), nonmember_aux=batches(1))
    assert obj.dropout_generator is not None
    cfg.settings(AdversarialSettings).attacker_dropout_in_adv = False
    assert build_objective(cfg, latent_channels=4, member_aux=batches(0),
                           nonmember_aux=batches(1)).dropout_generator is None
