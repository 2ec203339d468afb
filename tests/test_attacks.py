"""Each attack on hand-built models: one that has memorised its members exactly, and a UNet fine-tuned on two
latents."""
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from privlora.attacks import (ATTACKS, AUX_ROLES, DEFAULT_ATTACKS, Batch, Query, Target, build_attacks,
                              parse_attack_names)
from privlora.attacks.base import require_aux
from privlora.attacks.target import caption_variant, stable_seed
from privlora.errors import PrivloraError
from privlora.models.attacker_net import LossMapAttacker

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (4, 8, 8)
TEXT = (4, 16)  # tokens × width of the fake text embeddings

# Small parameters keep every attack to a handful of UNet queries per sample.
FAST = {
    "loss": dict(timesteps=(100, 400)),
    "ref_loss": dict(timesteps=(100, 400)),
    "mlp": dict(timesteps=(100, 400), steps=60, hidden=(32,)),
    "secmi": dict(t_sec=40, interval=10),
    "pia": dict(timesteps=(100, 200)),
    "clid": dict(timesteps=(450,)),
}


def scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, prediction_type=prediction_type)


def fake_text(captions: list[str]) -> torch.Tensor:
    """Every caption gets its own fixed random embedding (a stand-in for CLIP)."""
    return torch.stack([torch.randn(TEXT, generator=torch.Generator().manual_seed(stable_seed("text", c)))
                        for c in captions])


class MemorisingUNet(torch.nn.Module):
    """Exactly the optimal denoiser of a memorised (caption → latent) pair whenever that caption is the condition;
    a fixed, imperfect, text-dependent network otherwise."""

    def __init__(self, sched: DDPMScheduler, memorised: dict[str, torch.Tensor]):
        super().__init__()
        self.sched = sched
        self.keys = fake_text(list(memorised)) if memorised else torch.zeros(0, *TEXT)
        self.values = torch.stack(list(memorised.values())) if memorised else torch.zeros(0, *SHAPE)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        g = torch.Generator().manual_seed(7)  # every instance is the same network
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g) * 0.1)  # type: ignore[union-attr]

    def fallback(self, x, t, emb):
        return (torch.tanh(self.conv(x)) + 0.2 * torch.sin(t.float() / 40).view(-1, 1, 1, 1)
                + emb.mean((1, 2)).view(-1, 1, 1, 1))

    def forward(self, x, t, encoder_hidden_states, return_dict=False):
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
        pred = self.fallback(x, t, encoder_hidden_states)
        a = self.sched.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        for i in range(x.shape[0]):
            hit = [j for j in range(len(self.keys)) if torch.equal(self.keys[j], encoder_hidden_states[i])]
            if hit:
                z = self.values[hit[0]]
                eps = (x[i] - a[i].sqrt() * z) / (1 - a[i]).sqrt()
                v = a[i].sqrt() * eps - (1 - a[i]).sqrt() * z
                pred[i] = eps if self.sched.config.prediction_type == "epsilon" else v
        return (pred,)


def make_batch(n: int, role: str, start: int = 0) -> Batch:
    g = torch.Generator().manual_seed(1000 + start)
    return Batch(keys=[f"sha{start + i}" for i in range(n)],
                 paths=[Path(f"/data/{role}/{start + i}.png") for i in range(n)],
                 roles=[role] * n, captions=[f"a red circle number {start + i} on blue" for i in range(n)],
                 latents=torch.randn(n, *SHAPE, generator=g))


def memorised_setup(prediction_type="epsilon"):
    members = {"member_test": make_batch(4, "member_test", 0), "member_aux": make_batch(4, "member_aux", 10)}
    others = {"nonmember_test": make_batch(5, "nonmember_test", 20),
              "nonmember_aux": make_batch(4, "nonmember_aux", 30)}
    memo = {c: z for b in members.values() for c, z in zip(b.captions, b.latents)}
    sched = scheduler(prediction_type)
    ref = Target("base", MemorisingUNet(sched, {}), sched, fake_text, batch_size=16)
    target = Target("memo", MemorisingUNet(sched, memo), sched, fake_text, batch_size=16, reference=ref)
    return target, {**members, **others}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", DEFAULT_ATTACKS)  # proxy needs a co-trained attacker file: tested below
def test_memorised_members_score_higher(name, prediction_type):
    target, b = memorised_setup(prediction_type)
    attack = build_attacks([name], FAST)[0]
    if attack.fits:
        attack.fit(target, [b["member_aux"]], [b["nonmember_aux"]])
    members = attack.score(target, b["member_test"])
    others = attack.score(target, b["nonmember_test"])
    assert members.shape == (4,) and others.shape == (5,)
    assert torch.isfinite(members).all() and torch.isfinite(others).all()
    assert members.min() > others.max(), (name, members, others)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_exact_memorisation_gives_the_ideal_value(prediction_type):
    """loss 0, SecMI t-error 0 and PIA distance 0 for an exactly memorised sample (checks the v→ε conversion)."""
    target, b = memorised_setup(prediction_type)
    for name in ("loss", "secmi", "pia"):
        score = build_attacks([name], FAST)[0].score(target, b["member_test"])
        assert score.abs().max() < 1e-3, (name, score)


def test_ref_loss_is_zero_where_the_model_equals_its_reference():
    target, b = memorised_setup()
    attack = build_attacks(["ref_loss"], FAST)[0]
    assert torch.equal(attack.score(target, b["nonmember_test"]), torch.zeros(5))
    assert (attack.score(target, b["member_test"]) > 0).all()


@pytest.mark.slow
def test_a_unet_fine_tuned_on_two_latents_gives_them_the_highest_loss_score():
    from diffusers import UNet2DConditionModel

    from privlora.diffusion import loss_map
    from privlora.models import tiny

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**tiny.unet_config(), "cross_attention_dim": TEXT[1]})
    sched = scheduler()
    batch = make_batch(8, "member_test")
    emb = fake_text(batch.captions)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    for _ in range(40):  # memorise samples 0 and 1
        idx = torch.tensor([0, 1] * 4)
        z = batch.latents[idx]
        loss = loss_map(unet, sched, z, emb[idx], torch.randint(0, 1000, (8,), generator=g),
                        torch.randn(z.shape, generator=g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    scores = build_attacks(["loss"])[0].score(Target("ft", unet, sched, fake_text, batch_size=64), batch)
    assert scores[:2].min() > scores[2:].max(), scores


# ------------------------------------------------------------------------------------------ shared queries


def test_noise_depends_on_seed_and_sample_only():
    sched = scheduler()
    a = Target("a", MemorisingUNet(sched, {}), sched, fake_text, seed=3)
    b = Target("b", MemorisingUNet(sched, {}), sched, fake_text, seed=3, batch_size=2)
    assert torch.equal(a.noise("sha1", 0, SHAPE), b.noise("sha1", 0, SHAPE))
    assert not torch.equal(a.noise("sha1", 0, SHAPE), a.noise("sha2", 0, SHAPE))
    assert not torch.equal(a.noise("sha1", 0, SHAPE), a.noise("sha1", 1, SHAPE))
    c = Target("c", MemorisingUNet(sched, {}), sched, fake_text, seed=4)
    assert not torch.equal(a.noise("sha1", 0, SHAPE), c.noise("sha1", 0, SHAPE))


def test_loss_maps_do_not_depend_on_batching_and_are_cached():
    sched = scheduler()
    batch = make_batch(6, "member_test")
    queries = [Query(100, 0), Query(500, 1), Query(500, 1, "empty")]
    whole = Target("w", MemorisingUNet(sched, {}), sched, fake_text, batch_size=64)
    pieces = Target("p", MemorisingUNet(sched, {}), sched, fake_text, batch_size=4)
    full = whole.loss_maps(batch, queries)
    assert full.shape == (6, 3, *SHAPE)
    assert whole.unet_queries == 18
    whole.loss_maps(batch, queries)
    assert whole.unet_queries == 18  # cached
    half = Batch(batch.keys[3:], batch.paths[3:], batch.roles[3:], batch.captions[3:], batch.latents[3:])
    torch.testing.assert_close(pieces.loss_maps(half, queries), full[3:])


def test_caption_variants_are_seeded_and_drop_the_requested_share():
    caption = "a big red circle at the top on a striped blue background"
    assert caption_variant(caption, "full", "k", 0) == caption
    assert caption_variant(caption, "empty", "k", 0) == ""
    half = caption_variant(caption, "partial:0.5", "k", 0)
    assert half == caption_variant(caption, "partial:0.5", "k", 0)
    assert len(half.split()) == len(caption.split()) - 6
    assert set(half.split()) <= set(caption.split())


# ------------------------------------------------------------------------------------------ interface


def test_fitting_refuses_test_role_samples():
    target, b = memorised_setup()
    for name in ("mlp", "clid"):
        with pytest.raises(RuntimeError, match="non-auxiliary"):
            build_attacks([name], FAST)[0].fit(target, [b["member_test"]], [b["nonmember_aux"]])
    require_aux("x", [b["member_aux"], b["nonmember_aux"]])
    assert set(AUX_ROLES) == {"member_aux", "nonmember_aux"}


def test_attack_names_and_parameters_are_validated():
    assert parse_attack_names("loss, pia,loss") == ["loss", "pia"]
    with pytest.raises(PrivloraError, match="unknown attack 'gan_leaks'"):
        parse_attack_names("loss,gan_leaks")
    with pytest.raises(PrivloraError, match="bad parameters"):
        build_attacks(["secmi"], {"secmi": {"t_sek": 3}})
    with pytest.raises(PrivloraError, match="multiple of interval"):
        build_attacks(["secmi"], {"secmi": {"t_sec": 25, "interval": 10}})[0].check(1000)
    with pytest.raises(PrivloraError, match="outside 0..999"):
        build_attacks(["loss"], {"loss": {"timesteps": (10, 1000)}})[0].check(1000)


def test_queries_per_sample():
    counts = {a.name: a.queries_per_sample() for a in build_attacks(list(ATTACKS))}
    assert counts == {"loss": 8, "ref_loss": 16, "mlp": 8, "secmi": 12, "pia": 2, "clid": 9, "proxy": 1, "lira": 8,
                      "lira_offline": 8, "rmia": 8}  # shadow attacks: the model's own; each shadow asks once per audit


# ------------------------------------------------------------------------------------------ proxy


def save_attacker(folder: Path, stem: str = "mp", suffix: str = "attacker", attacker_input: str = "loss_map",
                  adv_step: str = "reference") -> tuple[Path, LossMapAttacker]:
    """A LoRA file (only its metadata matters here) and a known attacker beside it, saved as training saves one."""
    import json

    from safetensors.torch import save_file

    from privlora.io import save_safetensors

    lora = folder / f"{stem}.safetensors"
    save_file({"x.lora_down.weight": torch.zeros(1)}, str(lora),
              metadata={"privlora_hyperparameters": json.dumps({"adv_step": adv_step})})
    torch.manual_seed(3)
    net = LossMapAttacker(channels=4, pool=4, hidden=[8], dropout=0.5)
    save_safetensors(folder / f"{stem}.{suffix}.safetensors", net.state_dict(),
                     metadata={"privlora_module": "attacker", "channels": "4", "pool": "4", "hidden": "[8]",
                               "dropout": "0.5", "attacker_input": attacker_input})
    return lora, net


def by_hand(net, unet, sched, batch: Batch, t: list[int], noise: torch.Tensor, ref_unet=None) -> torch.Tensor:
    """P(member) of each sample: its squared-error map, 2×2 block means, the MLP's weights applied by hand."""
    a = sched.alphas_cumprod[torch.tensor(t)].view(-1, 1, 1, 1).float()
    x_t = a.sqrt() * batch.latents + (1 - a).sqrt() * noise
    emb, tt = fake_text(batch.captions), torch.tensor(t)
    maps = (unet(x_t, tt, emb)[0] - noise) ** 2
    if ref_unet is not None:
        maps = maps - (ref_unet(x_t, tt, emb)[0] - noise) ** 2
    x = maps.reshape(len(batch), 4, 4, 2, 4, 2).mean(dim=(3, 5)).flatten(1)
    w1, b1, w2, b2 = net.mlp[0].weight, net.mlp[0].bias, net.mlp[3].weight, net.mlp[3].bias
    logits = (x @ w1.T + b1).clamp_min(0) @ w2.T + b2
    return torch.softmax(logits.double(), -1)[:, 1].float()


@pytest.mark.parametrize("attacker_input,noises", [("loss_map", 1), ("calibrated", 2)])
def test_proxy_scores_are_the_saved_attackers_p_member_by_hand(tmp_path, attacker_input, noises):
    from privlora.attacks.proxy import FIRST_DRAW

    target, b = memorised_setup()
    lora, net = save_attacker(tmp_path, attacker_input=attacker_input)
    target.source = lora
    attack = build_attacks(["proxy"], {"proxy": {"noises": noises}})[0]
    assert not attack.fits and attack.prepare(target) is None
    batch = b["member_test"]
    got = attack.score(target, batch)
    want = torch.zeros(len(batch))
    for draw in range(FIRST_DRAW, FIRST_DRAW + noises):
        t = [attack.timestep(target, k, draw) for k in batch.keys]
        noise = torch.stack([target.noise(k, draw, SHAPE) for k in batch.keys])
        ref = target.reference.unet if attacker_input == "calibrated" else None
        want += by_hand(net, target.unet, target.scheduler, batch, t, noise, ref) / noises
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert attack.details()["attacker_input"] == attacker_input


@pytest.mark.parametrize("features", ["map", "scalar"])
def test_proxy_replays_a_stronger_attacker_on_k_draws_with_their_timesteps(tmp_path, features):
    from privlora.attacks.proxy import FIRST_DRAW
    from privlora.io import save_safetensors
    from privlora.models.attacker_net import ScalarAttacker

    target, b = memorised_setup()
    target.source, _ = save_attacker(tmp_path)
    torch.manual_seed(4)
    net = ScalarAttacker(2, True, [8]) if features == "scalar" else LossMapAttacker(4, 4, [8], 0.5, 2, True)
    if features == "scalar":
        net.observe(torch.rand(6, 2, *SHAPE), torch.rand(6, 2))  # a non-trivial feature scale
    save_safetensors(tmp_path / "mp.attacker.safetensors", net.state_dict(),
                     metadata={"channels": "4", "pool": "4", "hidden": "[8]", "dropout": "0.5", "draws": "2",
                               "timestep": "true", "features": features, "attacker_input": "calibrated"})
    attack = build_attacks(["proxy"], {"proxy": {"noises": 2}})[0]
    assert attack.prepare(target) is None and attack.queries_per_sample() == 4
    batch = b["member_test"]
    got, want = attack.score(target, batch), torch.zeros(len(batch))
    net.eval()
    for n in range(2):  # score n sees draws 2n, 2n + 1 together, each at its own timestep
        draws = (FIRST_DRAW + 2 * n, FIRST_DRAW + 2 * n + 1)
        queries = [[Query(attack.timestep(target, k, d), draw=d) for d in draws] for k in batch.keys]
        maps = target.sample_loss_maps(batch, queries) - target.reference.sample_loss_maps(batch, queries)
        t = torch.tensor([[q.t for q in qs] for qs in queries], dtype=torch.float32) / 1000
        want += net.member_probability(maps, t).detach() / 2
    torch.testing.assert_close(got, want)
    assert attack.details()["attacker_features"] == features and attack.details()["attacker_draws"] == "2"


def test_proxy_timesteps_are_random_per_sample_seeded_and_in_range():
    target, b = memorised_setup()
    attack = build_attacks(["proxy"])[0]
    keys = [f"sha{i}" for i in range(200)]
    ts = [attack.timestep(target, k, 10_000) for k in keys]
    assert min(ts) >= 0 and max(ts) < 1000 and len(set(ts)) > 150
    assert ts == [attack.timestep(target, k, 10_000) for k in keys]
    target.seed = 1
    assert ts != [attack.timestep(target, k, 10_000) for k in keys]


def test_proxy_does_not_apply_without_an_attacker_file_and_says_why(tmp_path):
    target, _ = memorised_setup()
    attack = build_attacks(["proxy"])[0]
    assert "base model" in attack.prepare(target)  # source None: the base model
    lora, _ = save_attacker(tmp_path, suffix="attacker_best")
    target.source = lora
    assert attack.prepare(target) == \
        "no mp.attacker.safetensors beside the LoRA (only MP-LoRA / SMP-LoRA training saves one)"
    best = build_attacks(["proxy"], {"proxy": {"attacker": "best"}})[0]
    assert best.prepare(target) is None
    assert best.details()["held_out"] is False  # chosen by its test accuracy


@pytest.mark.parametrize("adv_step,held_out", [("reference", True), ("fused", False)])
def test_proxy_is_held_out_only_for_the_reference_step(tmp_path, adv_step, held_out):
    target, _ = memorised_setup()
    target.source, _ = save_attacker(tmp_path, adv_step=adv_step)
    attack = build_attacks(["proxy"])[0]
    attack.prepare(target)
    assert attack.details()["held_out"] is held_out and attack.details()["adv_step"] == adv_step


def test_a_bad_attacker_file_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    target, _ = memorised_setup()
    target.source, net = save_attacker(tmp_path)
    path = tmp_path / "mp.attacker.safetensors"
    attack = build_attacks(["proxy"])[0]
    cases = [(b"garbage", "not a readable .safetensors"),
             ({"w": torch.zeros(2)}, "no attacker metadata"),
             ({**net.state_dict(), "mlp.0.weight": torch.zeros(8, 3)}, "weights do not fit")]
    for content, message in cases:
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            meta = {"channels": "4", "pool": "4", "hidden": "[8]", "dropout": "0.5"} if "mlp.0.bias" in content else {}
            save_file(content, str(path), metadata=meta)
        with pytest.raises(PrivloraError, match=message) as info:
            attack.prepare(target)
        assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
