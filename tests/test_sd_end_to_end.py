"""SD1.5- and SD2-shaped models end to end on the CPU: load as users do, train SMP-LoRA, save, load with
diffusers, audit.

Full-width SD1.5 (860M parameters) is far too slow on 2 CPU cores, so the models have SD1.5's / SD2's real
structure — block types, layers per block, 12 / 23 text-encoder layers, 4-level VAE, SD2's linear projections
and OpenCLIP single-file layout — at reduced channel widths and random weights (tests/fixtures.py
``SD15_SHAPE`` / ``SD2_SHAPE``): every module name is the real model's, so the LoRA files are too.

Training runs at 64 px (8×8 latents): at 512 px (64×64 latents) one fwd+bwd of even this narrow UNet takes
~15 s on one core (4096-token self-attention). The attacker keeps the paper's layout (attacker_pool 64, a
4×64×64 input), so here it gets the pooled — upsampled — 8×8 loss map;
``test_attacker_sees_the_64x64_loss_map_itself_at_64x64_latents`` checks the unpooled path at 64×64 latents.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from privlora.audit import AuditConfig, run_audit
from privlora.config import build_config, make_config
from privlora.models.loading import load_base
from privlora.objectives import build_objective
from privlora.objectives.adversarial import AdversarialSettings
from privlora.train import train
from tests.fixtures import make_sd_folder, make_single_file

DATA = Path(__file__).resolve().parent / "data"
CLIENT_LISTS = {"sd15": "kohya_lora_modules_sd15.txt", "sd2": "kohya_lora_modules_sd2_conv.txt"}
TRAIN = dict(synthetic_images=20, n_member_aux=4, n_nonmember_aux=4, n_nonmember_test=4, resolution=64,
             train_batch_size=2, eval_samples=4, max_train_steps=3, method="smp_lora", network_dim=4,
             network_alpha=4, train_text_encoder=True, unet_lr=1e-3, text_encoder_lr=1e-3, attacker_lr=1e-3)
FAMILY = {  # what A1111 reads from the metadata, and what the family trains with
    "sd15": dict(meta={"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_v_parameterization": "False"},
                 train={}),
    "sd2": dict(meta={"ss_base_model_version": "sd_v2", "ss_v2": "True", "ss_v_parameterization": "True"},
                train=dict(conv_dim=2, conv_alpha=1)),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per family: the diffusers folder and the single-file checkpoint users would have."""
    root = tmp_path_factory.mktemp("sd")
    out = {}
    for family in ("sd15", "sd2"):
        folder = make_sd_folder(root / family, family)  # SD2: v-prediction, as SD2.x 768-v
        out[family] = folder, make_single_file(folder, root / f"{family}.safetensors", open_clip=family == "sd2")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_single_file_and_folder_load_the_same_model(models, family):
    folder, single = models[family]
    a, b = load_base(str(folder)), load_base(str(single), config_dir=str(folder))
    assert a.prediction_type == b.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part


@pytest.mark.slow
@pytest.mark.parametrize("family,source,adv_step", [
    ("sd15", "single_file", "reference"), ("sd15", "folder", "fused"),
    ("sd2", "single_file", "fused"), ("sd2", "folder", "reference"),
])
def test_smp_lora_trains_saves_loads_in_diffusers_and_audits(models, tmp_path, family, source, adv_step):
    folder, single = models[family]
    model = {"pretrained_model_name_or_path": str(single), "config_dir": str(folder)} if source == "single_file" \
        else {"pretrained_model_name_or_path": str(folder)}
    cfg = build_config(None, {**TRAIN, **FAMILY[family]["train"], **model, "adv_step": adv_step,
                              "output_dir": str(tmp_path / "run")})
    attacker = cfg.settings(AdversarialSettings)
    assert attacker.attacker_pool == 64 and attacker.attacker_hidden == [512, 256]  # the paper's attacker
    lora = train(cfg)

    with safe_open(str(lora), "pt") as f:
        meta, modules = f.metadata(), {k.split(".")[0] for k in f.keys()}
    assert {k: meta[k] for k in FAMILY[family]["meta"]} == FAMILY[family]["meta"]
    assert modules == set((DATA / CLIENT_LISTS[family]).read_text(encoding="utf-8").split())
    with safe_open(str(tmp_path / "run" / "lora.attacker.safetensors"), "pt") as f:
        assert f.get_slice("mlp.0.weight").get_shape() == [512, 4 * 64 * 64]
    assert diffusers_adapted_modules(folder, lora) == len(modules)

    report = run_audit(AuditConfig(
        splits=str(tmp_path / "run" / "splits.json"), out=str(tmp_path / "audit"), loras=[str(lora)],
        attacks=["loss", "ref_loss"], include_base=True, resolution=64, n_bootstrap=20, max_samples=4,
        config_dir=model.get("config_dir"),
        pretrained_model_name_or_path=model["pretrained_model_name_or_path"],
        attack_params={"loss": {"timesteps": [100, 500]}, "ref_loss": {"timesteps": [100, 500]}},
    ), log=lambda *_: None)
    rows = {m["name"]: m for m in json.loads((tmp_path / "audit" / "report.json").read_text())["models"]}
    assert set(rows) == {"base", "lora"} and not rows["lora"]["warnings"]
    for result in rows["lora"]["results"].values():
        assert 0.0 <= result["auc"] <= 1.0 and result["n_member"] == result["n_nonmember"] == 4
    assert rows["lora"]["scores"]["loss"] != rows["base"]["scores"]["loss"]  # the audit saw the trained LoRA
    version = report["models"][1]["lora_metadata"]["ss_base_model_version"]
    assert version == FAMILY[family]["meta"]["ss_base_model_version"]


def diffusers_adapted_modules(folder: Path, lora: Path) -> int:
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, local_files_only=True)
    pipe.load_lora_weights(str(lora))
    return sum(isinstance(m, LoraLayer) for part in (pipe.unet, pipe.text_encoder) for m in part.modules())


@pytest.mark.parametrize("adv_step", ["reference", "fused"])
def test_attacker_sees_the_64x64_loss_map_itself_at_64x64_latents(adv_step, monkeypatch):
    """SD1.5 at 512 px: 64×64 latents, and the default attacker's first layer gets the 4×64×64 map unpooled."""
    maps = {}

    class LatentMaps:  # a denoiser whose loss maps are 64×64, as the UNet's are for 64×64 latents
        def loss_map(self, batch, **_):
            maps["last"] = batch["x"] ** 2
            return maps["last"], torch.zeros(batch["x"].shape[0], dtype=torch.long)

        def adaptation_loss(self, m, t):
            return m.mean()

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            yield {"x": torch.randn(2, 4, 64, 64, generator=g)}

    objective = build_objective(make_config(method="smp_lora", adv_step=adv_step), latent_channels=4,
                                member_aux=batches(), nonmember_aux=batches())
    from privlora.objectives import attacker as attacker_module

    in_adv = []
    original = attacker_module.detached_forward
    monkeypatch.setattr(attacker_module, "detached_forward",
                        lambda a, m, *rest: (in_adv.append(m.detach()), original(a, m, *rest))[1])
    objective.lora_loss(next(batches()), LatentMaps())
    n = 2
    assert torch.equal(in_adv[0], maps["last"][-n:])  # L_adv sees the LoRA step's 4×64×64 maps themselves
    seen = []  # the attacker's own update: its first layer gets each 4×64×64 map unpooled, element for element
    objective.attacker.mlp[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    objective.after_lora_step(LatentMaps())
    assert seen[0].shape[1] == 4 * 64 * 64
    assert torch.equal(seen[0][-n:], maps["last"].flatten(1))  # the last map drawn: the non-member aux batch
