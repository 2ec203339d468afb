import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from privlora.data import synthetic  # noqa: E402
from privlora.diffusion import loss_map  # noqa: E402
from privlora.errors import PrivloraError  # noqa: E402
from privlora.models import tiny  # noqa: E402
from scripts.tokenizer_build import build_clip_tokenizer_files, verify_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = tiny.TINY_SD_PATH


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_clip_tokenizer_files(d, synthetic.CAPTION_WORDS)
    return d


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tok_dir)


def test_tokenizer_files_and_special_ids(tok_dir, tokenizer):
    assert {p.name for p in tok_dir.iterdir()} == {
        "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"
    }
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    assert tokenizer.model_max_length == tiny.MAX_TOKENS
    verify_tokenizer(tokenizer, synthetic.CAPTION_WORDS)


def test_every_caption_word_is_one_token(tokenizer):
    for word in synthetic.CAPTION_WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == [word + "</w>"]


def test_unknown_text_still_encodes_and_round_trips(tokenizer):
    text = "a zebra-like thing, 42 ünïcode"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in ids[1:-1]  # unk == eos in CLIP, so this means nothing was unknown
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.replace(" ", "")


def test_captions_round_trip_and_fit(tokenizer):
    for _, caption in synthetic.generate(100):
        ids = tokenizer(caption).input_ids
        assert len(ids) == len(caption.split()) + 2 <= tiny.MAX_TOKENS
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption


def test_tokenizer_classes_agree(tok_dir, tokenizer):
    import transformers
    from transformers import AutoTokenizer

    captions = [c for _, c in synthetic.generate(30)] + ["", "Odd TEXT 123!"]
    others = [AutoTokenizer.from_pretrained(tok_dir)]
    if hasattr(transformers, "CLIPTokenizerFast"):
        others.append(transformers.CLIPTokenizerFast.from_pretrained(tok_dir))
    ref = tokenizer(captions, padding="max_length", max_length=tiny.MAX_TOKENS).input_ids
    for other in others:
        assert other(captions, padding="max_length", max_length=tiny.MAX_TOKENS).input_ids == ref


def test_non_letter_words_are_rejected(tmp_path):
    with pytest.raises(PrivloraError):
        build_clip_tokenizer_files(tmp_path, ["top-left"])


def test_shipped_tokenizer_is_reproducible(tok_dir):
    for name in ("vocab.json", "merges.txt"):
        assert (TINY / "tokenizer" / name).read_bytes() == (tok_dir / name).read_bytes()


# ---------------------------------------------------------------- shipped tiny-sd


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    assert (TINY / "model_index.json").is_file(), "run scripts/build_tiny_sd.py"
    return StableDiffusionPipeline.from_pretrained(TINY)


def test_folder_layout_and_size():
    index = json.loads((TINY / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    files = [p for p in TINY.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")]
    for sub in ("unet", "vae", "text_encoder"):
        assert list((TINY / sub).glob("*.safetensors"))
    assert sum(p.stat().st_size for p in files) < 8 * 2**20
    build = json.loads((TINY / "BUILD.json").read_text())
    assert build["mode"] == "full"


def test_components_load_with_their_classes():
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(UNet2DConditionModel.from_pretrained(TINY / "unet"), UNet2DConditionModel)
    vae = AutoencoderKL.from_pretrained(TINY / "vae")
    build = json.loads((TINY / "BUILD.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(build["results"]["scaling_factor"])
    te = CLIPTextModel.from_pretrained(TINY / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(TINY / "tokenizer")
    assert te.config.vocab_size == len(tok) and te.dtype == torch.float32
    for cls in (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler):
        sched = cls.from_pretrained(TINY / "scheduler")
        assert sched.config.num_train_timesteps == 1000 and sched.config.prediction_type == "epsilon"
    assert DDIMScheduler.from_pretrained(TINY / "scheduler").config.set_alpha_to_one is False


def _public_batch(pipe, n: int = 8, start: int = 50_000):
    pairs = synthetic.generate(n, namespace="public", start=start)
    pixels = torch.from_numpy(synthetic.to_array([im for im, _ in pairs]))
    ids = pipe.tokenizer([c for _, c in pairs], padding="max_length", max_length=tiny.MAX_TOKENS,
                         return_tensors="pt").input_ids
    return pixels, ids


@torch.no_grad()
def test_latent_shapes_and_scale(pipe):
    pixels, _ = _public_batch(pipe)
    z = pipe.vae.encode(pixels).latent_dist.mean
    assert z.shape == (8, 4, tiny.RESOLUTION // 4, tiny.RESOLUTION // 4)
    assert 0.5 < float((z * pipe.vae.config.scaling_factor).std()) < 2.0
    recon = pipe.vae.decode(z).sample
    assert recon.shape == pixels.shape
    assert float((recon - pixels).abs().mean()) < 0.15  # recognisable: ~5% of the [-1, 1] range


@torch.no_grad()
def test_pretrained_unet_beats_random_init(pipe):
    from diffusers import UNet2DConditionModel

    pixels, ids = _public_batch(pipe)
    z = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    emb = pipe.text_encoder(ids).last_hidden_state
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([50, 150, 250, 350, 450, 550, 650, 750])
    torch.manual_seed(0)
    random_unet = UNet2DConditionModel(**tiny.unet_config()).eval()
    trained = float(loss_map(pipe.unet, pipe.scheduler, z, emb, t, noise).mean())
    baseline = float(loss_map(random_unet, pipe.scheduler, z, emb, t, noise).mean())
    assert trained < 0.5 * baseline


@torch.no_grad()
def test_pipeline_makes_a_32px_image(pipe):
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a large red circle in the center on a blue background", num_inference_steps=3,
               guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (tiny.RESOLUTION, tiny.RESOLUTION)


# ---------------------------------------------------------------- the build script


@pytest.mark.slow
def test_quick_build_runs_and_loads(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "tiny-sd"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny_sd.py"), "--quick", "--out", str(out)],
                   check=True, env=env, capture_output=True, timeout=600)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd"]  # no temp folder left behind
    build = json.loads((out / "BUILD.json").read_text())
    assert build["mode"] == "quick" and build["versions"]["torch"] == torch.__version__
    p = StableDiffusionPipeline.from_pretrained(out)
    assert p.vae.config.scaling_factor == pytest.approx(build["results"]["scaling_factor"])
