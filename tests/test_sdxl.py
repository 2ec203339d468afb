"""SDXL base on a tiny random-init model (tests/fixtures.py ``make_tiny_sdxl_folder``): loading and refusals, the
two-encoder conditioning, plain LoRA training from the CLI-level config, kohya's SDXL file names (against the
naming rule of tests/fixtures/sdxl/derive.py and its committed lists), diffusers' exact delta, and the audit."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from privlora.errors import PrivloraError
from privlora.models.loading import encode_prompt, load_base
from tests.fixtures import (SDXL_FIXTURES, TINY_SDXL_RESOLUTION, load_sdxl_derive, make_single_file, make_tiny_folder,
                            make_tiny_sdxl_folder)

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = SDXL_FIXTURES
SMALL = dict(synthetic_images=40, n_member_aux=5, n_nonmember_aux=5, n_nonmember_test=10,
             resolution=TINY_SDXL_RESOLUTION, train_batch_size=8, eval_samples=8, network_dim=4, network_alpha=4,
             unet_lr=1e-3, attacker_pool=8, attacker_hidden=[32], max_train_steps=2)


@pytest.fixture(scope="module")
def derive():
    return load_sdxl_derive()


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> str:
    return str(make_tiny_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "model"))


@pytest.fixture(scope="module")
def trained(sdxl, tmp_path_factory) -> Path:
    """2 steps of plain LoRA on both encoders and the UNet; the kohya file."""
    from privlora.config import build_config
    from privlora.train import train

    out = tmp_path_factory.mktemp("sdxl_run") / "run"
    cfg = build_config(None, {**SMALL, "pretrained_model_name_or_path": sdxl, "output_dir": str(out),
                              "train_text_encoder": True, "text_encoder_lr": 1e-3})
    return train(cfg)


# ---------------------------------------------------------------- loading


def test_tiny_sdxl_loads_with_both_encoders(sdxl):
    base = load_base(sdxl)
    assert base.family == "sdxl" and base.text_encoder_2 is not None and base.tokenizer_2 is not None
    assert type(base.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert len(base.modules) == 4 and not any(p.requires_grad for m in base.modules for p in m.parameters())


def test_sd_models_keep_one_encoder(model):
    base = load_base(model)
    assert base.family == "sd" and base.text_encoder_2 is None and base.text_encoders == [base.text_encoder]


def test_refiner_is_refused_in_one_line(tmp_path):
    folder = make_tiny_sdxl_folder(tmp_path / "refiner", refiner=True)
    with pytest.raises(PrivloraError, match="refiner") as e:
        load_base(str(folder))
    assert "\n" not in str(e.value) and str(folder / "model_index.json") in str(e.value)


def test_unknown_layouts_are_refused_naming_the_file(sdxl, tmp_path):
    folder = Path(shutil.copytree(sdxl, tmp_path / "no_text_time"))
    config = folder / "unet" / "config.json"
    spec = json.loads(config.read_text())
    config.write_text(json.dumps({**spec, "addition_embed_type": None}))
    with pytest.raises(PrivloraError, match="unknown layout") as e:
        load_base(str(folder))
    assert str(config) in str(e.value)
    sd = make_tiny_folder(tmp_path / "sd")
    sd_config = sd / "unet" / "config.json"
    sd_config.write_text(json.dumps({**json.loads(sd_config.read_text()), "addition_embed_type": "text_time"}))
    with pytest.raises(PrivloraError, match="text_encoder_2"):
        load_base(str(sd))


# ---------------------------------------------------------------- conditioning


def test_encoding_is_diffusers_sdxl_pipelines(sdxl):
    from privlora.models.pipeline import sd_pipeline

    base = load_base(sdxl)
    captions = ["a red cat, sitting, on a mat", ""]
    packed = encode_prompt(base, captions)
    pipe = sd_pipeline(unet=base.unet, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                       scheduler=base.noise_scheduler, text_encoder_2=base.text_encoder_2,
                       tokenizer_2=base.tokenizer_2)
    hidden, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    assert torch.equal(packed[:, :-1], hidden)
    assert torch.equal(packed[:, -1, :pooled.shape[1]], pooled)
    assert not packed[:, -1, pooled.shape[1]:].any()


def test_long_prompts_window_both_encoders_and_pool_the_first_window(sdxl):
    base = load_base(sdxl)
    captions = ["tag " * 40, "short"]
    long = encode_prompt(base, captions, max_token_length=225)
    window = base.tokenizer.model_max_length - 2
    assert long.shape == (2, 3 * window + 2 + 1, 64)
    plain = encode_prompt(base, captions)
    assert torch.allclose(long[:, -1], plain[:, -1], atol=1e-6)  # pooled: the first window = the plain prompt


def test_clip_skip_is_refused_for_sdxl(sdxl):
    with pytest.raises(PrivloraError, match="clip_skip 2 is not supported for SDXL"):
        encode_prompt(load_base(sdxl), ["x"], clip_skip=2)


def test_unet_gets_pooled_embeds_and_centre_crop_time_ids(sdxl):
    from privlora.diffusion import denoise, sdxl_time_ids

    base = load_base(sdxl)
    cond = encode_prompt(base, ["a cat", "a dog"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    assert sdxl_time_ids(x).tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    hidden, pooled = cond[:, :-1], cond[:, -1, :32]
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    direct = base.unet(x, t, encoder_hidden_states=hidden, return_dict=False,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
    assert torch.equal(denoise(base.unet, x, t, cond), direct[0])


# ---------------------------------------------------------------- kohya's SDXL names


def _names(keys) -> set[str]:
    return {k.split(".")[0] for k in keys}


def _privlora_names(unet, te1, te2, conv: bool = False) -> dict[str, set[str]]:
    """The kohya names privlora gives each part's LoRA targets (without building LoRA layers)."""
    from privlora.models.lora import TEXT_ENCODER, UNET_ATTN_FF, UNET_CONV3x3, kohya_key_of

    pattern = f"{UNET_ATTN_FF}|{UNET_CONV3x3}" if conv else UNET_ATTN_FF
    out = {"unet": {kohya_key_of(unet, "lora_unet", n) for n, _ in unet.named_modules() if re.fullmatch(pattern, n)}}
    for prefix, te in (("lora_te1", te1), ("lora_te2", te2)):
        out[prefix] = {kohya_key_of(te, prefix, n) for n, _ in te.named_modules() if re.fullmatch(TEXT_ENCODER, n)}
    return out


def test_names_on_real_sdxl_equal_kohyas_lists(derive):
    """privlora's rule on SDXL base itself (meta device, from its config) gives exactly kohya's names."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**derive.SDXL_UNET_CONFIG)
        te1 = CLIPTextModel(CLIPTextConfig(**derive.TE1_CONFIG))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**derive.TE2_CONFIG))
    names = _privlora_names(unet, te1, te2)
    committed = {f: set((FIXTURES / f).read_text().split()) for f in
                 ("kohya_sdxl_unet.txt", "kohya_sdxl_unet_conv.txt", "kohya_sdxl_te1.txt", "kohya_sdxl_te2.txt")}
    assert names["unet"] == committed["kohya_sdxl_unet.txt"]
    assert names["lora_te1"] == committed["kohya_sdxl_te1.txt"]
    assert names["lora_te2"] == committed["kohya_sdxl_te2.txt"]
    conv = _privlora_names(unet, te1, te2, conv=True)["unet"] - names["unet"]
    assert conv and conv <= committed["kohya_sdxl_unet_conv.txt"]  # conv LoRA: the 3×3 convs of kohya's conv set
    for client in ("comfyui_sdxl.txt", "a1111_sdxl.txt", "diffusers_sdxl.txt"):  # every client loads every name
        loads = set((FIXTURES / client).read_text().split())
        assert names["unet"] | names["lora_te1"] | names["lora_te2"] | conv <= loads, client


def _kohya_table(derive, pipe) -> dict[str, tuple[str, str]]:
    """kohya name → (pipeline part, module path) for every Linear of the tiny model, by derive.py's rule."""
    table = {}
    for path, module in pipe.unet.named_modules():
        if type(module).__name__ == "Linear" and ".attentions." in path:
            table["lora_unet_" + derive.ldm_path(path).replace(".", "_")] = ("unet", path)
    for prefix, part in (("lora_te1", "text_encoder"), ("lora_te2", "text_encoder_2")):
        for path, module in getattr(pipe, part).named_modules():
            if type(module).__name__ == "Linear" and re.search(r"\.(self_attn|mlp)\.", path):
                standard = path if path.startswith("text_model.") else "text_model." + path
                table[f"{prefix}_{standard.replace('.', '_')}"] = (part, path)
    return table


def _pipeline(folder: str):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)


def test_trained_file_has_kohyas_sdxl_names_and_metadata(sdxl, trained, derive):
    """The names privlora writes for the tiny model are exactly those derive.py's kohya rule gives it."""
    with safe_open(str(trained), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert _names(keys) == set(_kohya_table(derive, _pipeline(sdxl)))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in _names(keys)
    assert {n.split("_")[1] for n in _names(keys)} == {"unet", "te1", "te2"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)


def test_diffusers_load_lora_weights_reproduces_the_delta_exactly(sdxl, trained, derive):
    """``StableDiffusionXLPipeline.load_lora_weights`` + ``fuse_lora`` = W + up @ down · alpha / rank, every module."""
    pipe = _pipeline(sdxl)
    table = _kohya_table(derive, pipe)
    before = {name: getattr(pipe, part).get_submodule(path).weight.detach().clone()
              for name, (part, path) in table.items()}
    pipe.load_lora_weights(str(trained))
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=1.0)
    lora = load_file(str(trained))
    names = _names(lora)
    moved = 0
    for name in names:
        down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
        delta = up @ down * (lora[f"{name}.alpha"] / down.shape[0])
        part, path = table[name]
        module = getattr(pipe, part).get_submodule(path)
        weight = getattr(module, "base_layer", module).weight
        torch.testing.assert_close(weight, before[name] + delta, rtol=0, atol=1e-6)
        moved += bool(delta.abs().max() > 1e-4)
    assert moved > len(names) // 2  # the deltas are real (te1's last layer has none: SDXL skips its output)
    untouched = [n for n in table if n not in names]
    assert not untouched or all(torch.equal(getattr(pipe, table[n][0]).get_submodule(table[n][1]).weight, before[n])
                                for n in untouched)


# ---------------------------------------------------------------- the audit


def test_audit_loss_and_ref_loss_run_on_an_sdxl_lora(sdxl, trained, tmp_path):
    from privlora.audit import AuditConfig, run_audit

    params = {"loss": dict(timesteps=(100, 500)), "ref_loss": dict(timesteps=(100, 500))}
    cfg = AuditConfig(splits=str(trained.parent / "splits.json"), out=str(tmp_path / "audit"),
                      pretrained_model_name_or_path=sdxl, loras=[str(trained)], attacks=["loss", "ref_loss"],
                      attack_params=params, n_bootstrap=20, max_samples=8)
    report = run_audit(cfg)
    results = report["models"][-1]["results"]
    assert set(results) == {"loss", "ref_loss"} and all(0 <= r["auc"] <= 1 for r in results.values())
    assert report["models"][-1]["lora_metadata"]["ss_base_model_version"] == "sdxl_base_v1-0"
    ref = report["models"][-1]["scores"]["ref_loss"]
    assert any(abs(s) > 0 for s in ref["member_test"])  # the LoRA changed the model: it was loaded and switched on


# ---------------------------------------------------------------- the other methods, resume and sampling


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("mp_lora", {"train_text_encoder": True}),
                                          ("smp_lora", {"train_text_encoder": True}),
                                          ("dp_lora", {"dp_noise_multiplier": 1.0}),
                                          ("distill_lora", {}),
                                          ("shard_merge", {})])
def test_every_method_trains_two_steps_on_sdxl(sdxl, tmp_path, method, extra):
    from privlora.config import build_config
    from privlora.train import train

    cfg = build_config(None, {**SMALL, "method": method, "pretrained_model_name_or_path": sdxl,
                              "output_dir": str(tmp_path / method), **extra})
    with safe_open(str(train(cfg)), "pt") as f:
        names, meta = _names(f.keys()), f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["privlora_method"] == method
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert any(n.startswith("lora_te2_") for n in names) == bool(extra.get("train_text_encoder"))


@pytest.mark.slow
def test_resume_restores_both_text_encoders_loras(sdxl, tmp_path):
    from privlora.config import build_config
    from privlora.train import train

    settings = {**SMALL, "pretrained_model_name_or_path": sdxl, "train_text_encoder": True, "text_encoder_lr": 1e-3,
                "save_state": True, "save_every_n_steps": 2, "max_train_steps": 4}
    straight = train(build_config(None, {**settings, "output_dir": str(tmp_path / "a")}))
    copy = Path(shutil.copytree(tmp_path / "a", tmp_path / "b"))
    (copy / straight.name).unlink()  # as if killed after the step-2 state
    resumed = train(build_config(None, {**settings, "output_dir": str(copy),
                                        "resume": str(copy / "state-step000002")}))
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and any(k.startswith("lora_te2_") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_sample_with_an_sdxl_lora_and_long_prompts(sdxl, trained, tmp_path):
    from privlora.sample import sample

    paths = sample(sdxl, tmp_path / "s", prompt="a red cat, " * 30, n=1, steps=2, lora=trained, lora_scale=0.5,
                   max_token_length=225)
    assert len(paths) == 1 and paths[0].stat().st_size > 0


# ---------------------------------------------------------------- single files (A1111 / ComfyUI layout)


@pytest.fixture(scope="module")
def single_file(sdxl, tmp_path_factory) -> Path:
    """The tiny SDXL as one SGM-layout .safetensors, as Stability ships sd_xl_base_1.0.safetensors."""
    from tests.fixtures import make_sdxl_single_file

    return make_sdxl_single_file(sdxl, tmp_path_factory.mktemp("sdxl_single") / "sd_xl_tiny.safetensors")


def test_sgm_single_file_has_stabilitys_layout(single_file):
    keys = set(load_file(str(single_file)))
    for key in ("model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.weight",
                "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight",  # 2 layers deep
                "model.diffusion_model.output_blocks.2.2.conv.weight",  # the upsampler after the attention
                "first_stage_model.decoder.up.3.block.1.conv2.weight",
                "conditioner.embedders.0.transformer.text_model.encoder.layers.2.self_attn.q_proj.weight",
                "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.positional_embedding"):
        assert key in keys, key
    assert not any(k.startswith(("cond_stage_model.", "conditioner.embedders.1.model.text_model")) for k in keys)


def test_sdxl_single_file_loads_the_same_weights_as_its_folder(sdxl, single_file):
    """diffusers' single-file converters (configs from the folder, offline) give exactly the folder's weights."""
    import hashlib

    ref, got = load_base(sdxl), load_base(str(single_file), config_dir=sdxl)
    assert (got.family, got.source_kind) == ("sdxl", "single_file")
    assert got.sha256 == hashlib.sha256(single_file.read_bytes()).hexdigest()
    assert type(got.text_encoder_2).__name__ == "CLIPTextModelWithProjection" and got.tokenizer_2 is not None
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ref, part).state_dict(), getattr(got, part).state_dict()
        assert a.keys() == b.keys(), part
        for k in a:
            assert torch.equal(a[k], b[k]), f"{part}.{k}"
    captions = ["a red cat", ""]
    assert torch.equal(encode_prompt(ref, captions), encode_prompt(got, captions))
    assert not any(p.requires_grad for m in got.modules for p in m.parameters())


def test_a_lora_trained_on_the_single_file_applies_to_the_folder(sdxl, single_file, trained, tmp_path):
    """2 steps on the single file write the same kohya modules as on the folder, and the LoRA gives identical
    images on either base (loaded by diffusers' load_lora_weights in both)."""
    from privlora.config import build_config
    from privlora.sample import sample
    from privlora.train import train

    cfg = build_config(None, {**SMALL, "pretrained_model_name_or_path": str(single_file), "config_dir": sdxl,
                              "output_dir": str(tmp_path / "run"), "train_text_encoder": True,
                              "text_encoder_lr": 1e-3})
    lora = train(cfg)
    with safe_open(str(lora), "pt") as f, safe_open(str(trained), "pt") as g:
        assert set(f.keys()) == set(g.keys()) and f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    kw = dict(prompt="a red cat", n=1, steps=2, lora=lora, seed=3)
    on_folder = sample(sdxl, tmp_path / "folder", **kw)[0]
    on_file = sample(str(single_file), tmp_path / "file", config_dir=sdxl, **kw)[0]
    without = sample(sdxl, tmp_path / "base", **{**kw, "lora": None})[0]
    pixels = [np.asarray(Image.open(f)) for f in (on_folder, on_file, without)]
    assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])


def test_sdxl_single_file_refusals_are_one_line(sdxl, single_file, tmp_path):
    from safetensors.torch import save_file

    state = load_file(str(single_file))

    def refused(name: str, tensors: dict, match: str, config_dir: str | None = sdxl) -> str:
        path = tmp_path / name
        save_file(tensors, str(path))
        with pytest.raises(PrivloraError, match=match) as e:
            load_base(str(path), config_dir=config_dir)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        return str(e.value)

    no_te2 = {k: v for k, v in state.items() if not k.startswith("conditioner.embedders.1.")}
    assert "OpenCLIP-bigG" in refused("no_te2.safetensors", no_te2, "not an SDXL base")
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in state.items()
               if not k.startswith("conditioner.embedders.0.")}
    refused("refiner.safetensors", refiner, "refiner")
    refused("no_config.safetensors", state, "--config_dir", config_dir=None)
    sd = make_tiny_folder(tmp_path / "sd")
    refused("wrong_config.safetensors", state, "an SDXL base checkpoint, but --config_dir", config_dir=str(sd))
    sd_file = load_file(str(make_single_file(sd, tmp_path / "sd.safetensors")))
    refused("sd_file.safetensors", sd_file, "an SD1.x/SD2.x checkpoint, but --config_dir")


# ---------------------------------------------------------------- the SDXL presets, from the CLI


@pytest.mark.slow
def test_sdxl_smp_preset_trains_audits_and_samples_from_the_cli(sdxl, tmp_path, capsys):
    """Issue 25's done-when: configs/sdxl/smp_lora.toml on the tiny SDXL, 2 steps, then audit and sample. The
    overrides only shrink the run to the tiny model on CPU: its 64² images (8×8 latents, so attacker_pool 8), a
    20-image kohya folder with small split roles, fp32 (CPU) and a small attacker; gradient checkpointing stays on."""
    from privlora.cli import main
    from privlora.data.synthetic import write_folder

    data = write_folder(tmp_path / "data", 20, resolution=TINY_SDXL_RESOLUTION, layout="kohya", repeats=2)
    out = tmp_path / "run"
    assert main(["train", "--config", "configs/sdxl/smp_lora.toml", "--pretrained_model_name_or_path", sdxl,
                 "--max_train_steps", "2", "--train_data_dir", str(data), "--resolution", str(TINY_SDXL_RESOLUTION),
                 "--n_member_aux", "4", "--n_nonmember_aux", "4", "--n_nonmember_test", "4", "--eval_samples", "4",
                 "--attacker_pool", "8", "--attacker_hidden", "16", "--mixed_precision", "no",
                 "--output_dir", str(out)]) == 0
    lora = out / "sdxl-smp_lora.safetensors"
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    assert meta["privlora_method"] == "smp_lora" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert (out / "sdxl-smp_lora.attacker.safetensors").is_file()  # what the proxy attack reads
    audit = tmp_path / "audit"
    assert main(["audit", "--pretrained_model_name_or_path", sdxl, "--lora", str(lora), "--splits",
                 str(out / "splits.json"), "--out", str(audit), "--attacks", "loss,ref_loss,proxy",
                 "--max_samples", "4", "--n_bootstrap", "10"]) == 0
    results = json.loads((audit / "report.json").read_text())["models"][-1]["results"]
    assert set(results) == {"loss", "ref_loss", "proxy"} and all(0 <= r["auc"] <= 1 for r in results.values())
    assert main(["sample", "--pretrained_model_name_or_path", sdxl, "--lora", str(lora), "--prompt", "a red cat",
                 "--n", "1", "--steps", "2", "--out", str(tmp_path / "samples")]) == 0
    assert (tmp_path / "samples" / "00000.png").stat().st_size > 0
