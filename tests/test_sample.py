"""`privlora sample`: prompts files, determinism per seed, the LoRA through diffusers' loader, training samples."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from privlora.cli import main
from privlora.errors import PrivloraError
from privlora.models.loading import load_base
from privlora.models.lora import LoraSpec, add_lora, lora_layers, save_kohya, unet_lora_config
from privlora.prompts import parse_prompt_line, read_prompts
from privlora.sample import build_pipeline, sample, sample_during_training

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(n=2, steps=3, guidance=5.0, seed=11)


def _adapted(model):
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    base = load_base(str(model))
    add_lora(base.unet, unet_lora_config(LoraSpec(rank=4, alpha=4.0), base.unet))
    g = torch.Generator().manual_seed(1)
    for layer in lora_layers(base.unet).values():  # B starts at zero: make the LoRA change the output
        w = layer.lora_B["default"].weight
        w.data = torch.randn(w.shape, generator=g) * 0.3
    return base


@pytest.fixture(scope="module")
def lora(model, tmp_path_factory):
    return save_kohya(tmp_path_factory.mktemp("lora") / "lora.safetensors", _adapted(model).unet)


def pixels(folder, name="00000.png"):
    return np.asarray(Image.open(folder / name), dtype=np.int16)


# ---------------------------------------------------------------- prompts files


def test_prompt_line_options():
    p = parse_prompt_line("a red circle --n blurry, dark --w 64 --h 48 --d 5 --s 20 --l 4.5")
    assert (p.prompt, p.negative_prompt, p.width, p.height, p.seed, p.steps, p.guidance) == \
        ("a red circle", "blurry, dark", 64, 48, 5, 20, 4.5)
    plain = parse_prompt_line("a half-lit -- scene")  # dashes inside the prompt are not options
    assert plain.prompt == "a half-lit -- scene" and plain.seed is None


def test_prompts_file_skips_blanks_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\n\na red circle --d 3\n   # indented comment\na blue square\n", encoding="utf-8")
    prompts = read_prompts(f)
    assert [(p.prompt, p.seed, p.line) for p in prompts] == [("a red circle", 3, 3), ("a blue square", None, 5)]


@pytest.mark.parametrize("line,problem", [
    ("x --q 3", "unknown option --q"),
    ("x --w 30", "--w 30 is not a positive multiple of 8"),
    ("x --d", "--d needs a value"),
    ("x --s two", "--s 'two' is not an integer"),
    ("x --l fast", "--l 'fast' is not a number"),
    ("x --s 0", "steps must be ≥ 1"),
    ("x --n a --n b", "--n is given twice"),
])
def test_bad_prompt_option_names_file_and_line(tmp_path, line, problem):
    f = tmp_path / "p.txt"
    f.write_text(f"# ok\na good line\n{line}\n", encoding="utf-8")
    with pytest.raises(PrivloraError, match=rf"^{f}:3: .*{problem}"):
        read_prompts(f)


def test_empty_or_missing_prompts_file(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(PrivloraError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(PrivloraError, match="not found"):
        read_prompts(tmp_path / "nope.txt")


# ---------------------------------------------------------------- sampling


def test_sample_is_deterministic_and_the_lora_changes_it(model, lora, tmp_path):
    a = sample(str(model), tmp_path / "a", prompt="a red circle", lora=lora, **FAST)
    b = sample(str(model), tmp_path / "b", prompt="a red circle", lora=lora, **FAST)
    plain = sample(str(model), tmp_path / "plain", prompt="a red circle", **FAST)
    off = sample(str(model), tmp_path / "off", prompt="a red circle", lora=lora, lora_scale=0.0, **FAST)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert np.abs(pixels(tmp_path / "a") - pixels(tmp_path / "plain")).max() > 5
    np.testing.assert_array_equal(pixels(tmp_path / "off"), pixels(tmp_path / "plain"))  # scale 0 = no LoRA
    assert not np.array_equal(pixels(tmp_path / "a", "00000.png"), pixels(tmp_path / "a", "00001.png"))
    assert len(plain) == len(off) == 2 and (tmp_path / "a" / "grid.png").is_file()

    images = json.loads((tmp_path / "a" / "settings.json").read_text())["images"]
    first = images[0]
    assert [im["seed"] for im in images] == [11, 12]
    assert (first["width"], first["height"], first["steps"], first["guidance"]) == (32, 32, 3, 5.0)
    assert first["lora"] == str(lora) and len(first["lora_sha256"]) == 64 and first["lora_scale"] == 1.0
    assert first["base_model"] == str(model) and first["sampler"] == "ddim"


def test_prompt_line_options_reach_the_images(model, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle --d 40 --w 48 --s 2 --l 1.0 --n blue\na green square\n", encoding="utf-8")
    sample(str(model), tmp_path / "out", prompts_file=f, n=3, steps=3, sampler="dpmpp_2m", seed=7)
    images = json.loads((tmp_path / "out" / "settings.json").read_text())["images"]
    assert [(im["prompt"], im["seed"]) for im in images] == [("a red circle", 40), ("a green square", 8),
                                                             ("a red circle", 41)]
    assert (images[0]["width"], images[0]["height"], images[0]["steps"], images[0]["guidance"]) == (48, 32, 2, 1.0)
    assert images[0]["negative_prompt"] == "blue" and images[1]["steps"] == 3
    assert Image.open(tmp_path / "out" / "00000.png").size == (48, 32)
    assert Image.open(tmp_path / "out" / "00001.png").size == (32, 32)


def test_user_errors_come_before_loading_the_model(tmp_path, lora):
    missing_model = str(tmp_path / "no-model")  # never reached: every error below is found first
    with pytest.raises(PrivloraError, match="LoRA file not found"):
        sample(missing_model, tmp_path / "o", prompt="x", lora=tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PrivloraError, match="not a readable .safetensors"):
        sample(missing_model, tmp_path / "o", prompt="x", lora=tmp_path / "bad.safetensors")
    with pytest.raises(PrivloraError, match="--width 30"):
        sample(missing_model, tmp_path / "o", prompt="x", width=30)
    with pytest.raises(PrivloraError, match="exactly one of"):
        sample(missing_model, tmp_path / "o")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "00000.png").write_bytes(b"")
    with pytest.raises(PrivloraError, match="already holds samples"):
        sample(missing_model, tmp_path / "o", prompt="x")


def test_lora_for_another_model_is_refused(model, tmp_path):
    from safetensors.torch import save_file

    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    f = tmp_path / "sd15.safetensors"  # a 320-wide SD1.5 layer does not fit the 32-wide tiny UNet
    save_file({f"{stem}.lora_down.weight": torch.zeros(4, 320), f"{stem}.lora_up.weight": torch.zeros(320, 4),
               f"{stem}.alpha": torch.tensor(4.0)}, str(f))
    with pytest.raises(PrivloraError, match=rf"^{f}: this LoRA does not fit the base model"):
        sample(str(model), tmp_path / "o", prompt="x", lora=f, steps=1)
    assert not (tmp_path / "o" / "settings.json").exists()


def test_lora_that_only_partly_fits_is_refused(model, lora, tmp_path):
    """One module the base model lacks: diffusers would load the rest silently; privlora refuses the file."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(lora))
    stem = next(k.split(".")[0] for k in tensors if k.startswith("lora_unet_down_blocks_0"))
    other = stem.replace("down_blocks_0", "down_blocks_7")  # the tiny UNet has no such block
    f = tmp_path / "extra.safetensors"
    save_file({k.replace(stem, other) if k.split(".")[0] == stem else k: v for k, v in tensors.items()}, str(f))
    n = len({k.split(".")[0] for k in tensors if k.endswith(".lora_down.weight")})
    with pytest.raises(PrivloraError, match=rf"^{f}: only {n - 1} of its {n} LoRA modules exist in the base model"):
        sample(str(model), tmp_path / "o", prompt="x", lora=f, steps=1)
    assert not (tmp_path / "o" / "settings.json").exists()


def test_cli_sample_and_its_errors(model, lora, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["sample", "--pretrained_model_name_or_path", str(model), "--lora", str(lora), "--prompt", "a circle",
            "--n", "2", "--steps", "2", "--sampler", "euler", "--seed", "3", "--out", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "grid.png", "settings.json"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("privlora: error:") and "--overwrite" in err
    assert main(args + ["--overwrite"]) == 0


# ---------------------------------------------------------------- during training


class _Writer:
    def __init__(self):
        self.images = []

    def add_image(self, tag, image, global_step, dataformats):
        self.images.append((tag, image.shape, global_step, dataformats))


def test_sample_during_training_matches_the_saved_lora(model, lora, tmp_path):
    base = _adapted(model)  # the same LoRA, in memory (peft), as the training loop holds it
    base.unet.train()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square --d 12\n", encoding="utf-8")
    writer = _Writer()
    paths = sample_during_training(base, prompts, 3, tmp_path / "run", writer, steps=3, guidance=5.0, seed=11)
    assert [p.name for p in paths] == ["e0003_0.png", "e0003_1.png"]
    assert all(p.parent == tmp_path / "run" / "samples" for p in paths)
    assert writer.images == [("samples/0", (32, 32, 3), 3, "HWC"), ("samples/1", (32, 32, 3), 3, "HWC")]
    assert base.unet.training and not base.vae.training  # modes restored
    pipe = build_pipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, base.noise_scheduler.config)
    again = sample_during_training(pipe, prompts, 4, tmp_path / "run", steps=3, guidance=5.0, seed=11)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]  # a pipeline works too, same images

    sample(str(model), tmp_path / "file", prompts_file=prompts, lora=lora, steps=3, guidance=5.0, seed=11)
    for i in range(2):  # in-memory peft LoRA and diffusers' load of the saved file agree (up to rounding)
        in_memory = pixels(tmp_path / "run" / "samples", f"e0003_{i}.png")
        assert np.abs(in_memory - pixels(tmp_path / "file", f"{i:05d}.png")).max() <= 2


def test_prompts_are_encoded_as_the_lora_was_trained(model, tmp_path):
    meta = {"privlora_hyperparameters": json.dumps({"max_token_length": 225, "clip_skip": 2})}
    long_lora = save_kohya(tmp_path / "long.safetensors", _adapted(model).unet, metadata=meta)
    prompt = "a red circle " * 12  # past the tiny tokenizer's 30-token window
    sample(str(model), tmp_path / "meta", prompt=prompt, lora=long_lora, **FAST)
    sample(str(model), tmp_path / "one", prompt=prompt, lora=long_lora, max_token_length=75, **FAST)
    sample(str(model), tmp_path / "plain", prompt=prompt, lora=long_lora, max_token_length=75, clip_skip=1, **FAST)
    jobs = {d: json.loads((tmp_path / d / "settings.json").read_text())["images"][0] for d in ("meta", "one", "plain")}
    assert (jobs["meta"]["max_token_length"], jobs["meta"]["clip_skip"]) == (225, 2)
    assert (jobs["one"]["max_token_length"], jobs["one"]["clip_skip"]) == (None, 2)
    assert (jobs["plain"]["max_token_length"], jobs["plain"]["clip_skip"]) == (None, None)
    assert np.abs(pixels(tmp_path / "meta") - pixels(tmp_path / "one")).max() > 0
    with pytest.raises(PrivloraError, match="--max_token_length 100"):
        sample(str(model), tmp_path / "bad", prompt=prompt, max_token_length=100)


@torch.no_grad()
def test_long_prompt_embeddings_are_the_training_encoding(model):
    from privlora.captions import TextEncoding
    from privlora.models.loading import encode_prompt
    from privlora.sample import plan_jobs, prompt_embeds

    base = load_base(str(model))
    pipe = build_pipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, base.noise_scheduler.config)
    [job] = plan_jobs([parse_prompt_line("a red circle " * 12)], 1, seed=0, steps=1, guidance=5.0, sampler="ddim",
                      width=32, height=32, negative_prompt="blue", encoding=TextEncoding(2, 225))
    got = prompt_embeds(pipe, job)
    want = encode_prompt(base, [job.prompt, "blue"], clip_skip=2, max_token_length=225)
    torch.testing.assert_close(got["prompt_embeds"], want[:1])
    torch.testing.assert_close(got["negative_prompt_embeds"], want[1:])
    assert want.shape[1] == 3 * 30 + 2
