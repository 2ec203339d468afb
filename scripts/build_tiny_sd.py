"""Pretrain tiny-sd on the public synthetic split and write it as a diffusers StableDiffusionPipeline folder.

    python scripts/build_tiny_sd.py                      # full build into privlora/assets/tiny-sd (~10 min, 2 cores)
    python scripts/build_tiny_sd.py --quick --out /tmp/x # smoke test (~30 s)

Stages: (1) AutoencoderKL trained to reconstruct the public sprites (L1 + MSE + small KL); its ``scaling_factor``
is set to 1/std of the latents as SD does. (2) UNet + CLIP text encoder trained jointly for epsilon prediction on
the scaled latents with 10% caption dropout (for classifier-free guidance), using ``privlora.diffusion.loss_map``
with a capped 1/ᾱ_t timestep weighting.
The folder is built in a temporary sibling and renamed into place, so a crash never leaves a half-written model.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Busy-waiting OpenMP threads collapse (~10x slower) when the cores are shared with other processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from privlora.data import synthetic  # noqa: E402
from privlora.diffusion import loss_map  # noqa: E402
from privlora.io import write_json  # noqa: E402
from privlora.models import tiny  # noqa: E402
from privlora.models.clip_layout import save_text_encoder  # noqa: E402
from scripts.tokenizer_build import build_clip_tokenizer_files, verify_tokenizer  # noqa: E402

SETTINGS = {
    "full": dict(
        n_public=4000, n_holdout=256, vae_steps=700, vae_batch=16, vae_lr=3e-3, kl_weight=1e-4, mse_weight=1.0,
        init_logvar=-6.0, unet_steps=1300, unet_batch=64, unet_lr=8e-3, t_weight_cap=10.0, warmup=100,
        cond_dropout=0.1, ema_decay=0.995, eval_seed=1234, n_samples=16,
    ),
    "quick": dict(
        n_public=128, n_holdout=32, vae_steps=30, vae_batch=16, vae_lr=3e-3, kl_weight=1e-4, mse_weight=1.0,
        init_logvar=-6.0, unet_steps=40, unet_batch=32, unet_lr=8e-3, t_weight_cap=10.0, warmup=5,
        cond_dropout=0.1, ema_decay=0.9, eval_seed=1234, n_samples=4,
    ),
}
FP16_COMPONENTS = ("unet", "vae")  # stored in half precision to keep the shipped folder small


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=tiny.TINY_SD_PATH, help="output pipeline folder")
    p.add_argument("--quick", action="store_true", help="a much smaller run for smoke tests")
    p.add_argument("--seed", type=int, default=0, help="seed of the public split and of training")
    p.add_argument("--samples", type=Path, default=None, help="also save a grid of DDIM samples to this PNG")
    return p.parse_args(argv)


class Log:
    def __init__(self) -> None:
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier: linear warmup, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def load_split(n: int, seed: int, start: int = 0) -> tuple[torch.Tensor, list[str]]:
    pairs = synthetic.generate(n, seed=seed, namespace="public", resolution=tiny.RESOLUTION, start=start)
    pixels = torch.from_numpy(synthetic.to_array([im for im, _ in pairs]))
    return pixels, [c for _, c in pairs]


# ---------------------------------------------------------------- VAE


def vae_loss(vae, x: torch.Tensor, kl_weight: float, mse_weight: float,
             gen: torch.Generator) -> tuple[torch.Tensor, float]:
    post = vae.encode(x).latent_dist
    recon = vae.decode(post.sample(generator=gen)).sample
    err = recon - x
    l1 = err.abs().mean()
    kl = post.kl().mean() / post.mean[0].numel()  # per latent element, so kl_weight is resolution-free
    # MSE next to L1 weighs a wrong shape colour (large error, small area) above a blurred texture
    return l1 + mse_weight * err.pow(2).mean() + kl_weight * kl, l1.item()


def train_vae(pixels: torch.Tensor, s: dict, gen: torch.Generator, log: Log):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**tiny.vae_config())
    with torch.no_grad():
        # start with a narrow posterior: at logvar=0 the sampling noise swamps the tiny initial means
        vae.quant_conv.bias[tiny.vae_config()["latent_channels"]:] = s["init_logvar"]
    opt = torch.optim.AdamW(vae.parameters(), lr=s["vae_lr"], weight_decay=0.0)
    steps = s["vae_steps"]
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = s["vae_lr"] * cosine_lr(step, steps, max(1, steps // 20))
        batch = pixels[torch.randint(0, len(pixels), (s["vae_batch"],), generator=gen)]
        loss, l1 = vae_loss(vae, batch, s["kl_weight"], s["mse_weight"], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step:4d}/{steps}  loss {loss.item():.4f}  l1 {l1:.4f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def vae_posterior(vae, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        post = vae.encode(pixels[i:i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_recon_l1(vae, pixels: torch.Tensor) -> float:
    mean, _ = vae_posterior(vae, pixels)
    return float((vae.decode(mean).sample - pixels).abs().mean())


# ---------------------------------------------------------------- tokenizer / text


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    out = tokenizer(captions, padding="max_length", max_length=tiny.MAX_TOKENS, truncation=True, return_tensors="pt")
    return out.input_ids


# ---------------------------------------------------------------- UNet + text encoder


class Ema:
    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up so early weights fade fast
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def timestep_weights(scheduler, cap: float) -> torch.Tensor:
    """Per-timestep loss weights min(1/ᾱ_t, cap), normalised to mean 1 over t.

    eps-MSE / ᾱ_t equals the v-prediction MSE; plain eps-MSE nearly ignores the high-noise steps where layout and
    colour (what the caption says) are decided, and a short CPU budget cannot afford that. The cap bounds variance.
    """
    w = torch.clamp(1.0 / scheduler.alphas_cumprod.float(), max=cap)
    return w / w.mean()


def unet_step(unet, te, scheduler, z0: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """Weighted loss to optimise, and the plain eps-MSE to report."""
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), generator=gen)
    emb = te(ids).last_hidden_state
    per_sample = loss_map(unet, scheduler, z0, emb, t, noise).mean(dim=(1, 2, 3))
    return (per_sample * weights[t]).mean(), per_sample.mean().item()


def train_unet(unet, te, scheduler, latents: tuple, ids: torch.Tensor, empty: torch.Tensor, s: dict,
               gen: torch.Generator, log: Log) -> list[float]:
    mean, std = latents
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=s["unet_lr"], weight_decay=1e-2)
    ema = Ema([unet, te], s["ema_decay"])
    weights = timestep_weights(scheduler, s["t_weight_cap"])
    steps, losses = s["unet_steps"], []
    unet.train()
    te.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = s["unet_lr"] * cosine_lr(step, steps, s["warmup"])
        idx = torch.randint(0, len(mean), (s["unet_batch"],), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        drop = torch.rand(len(idx), generator=gen) < s["cond_dropout"]
        batch_ids = torch.where(drop[:, None], empty, ids[idx])
        loss, plain = unet_step(unet, te, scheduler, z0, batch_ids, weights, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        losses.append(plain)
        if step % 50 == 0 or step == steps - 1:
            log(f"unet step {step:4d}/{steps}  eps-mse {np.mean(losses[-50:]):.4f}  weighted {loss.item():.4f}")
    ema.copy_to_model()
    unet.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def denoise_loss(unet, te, scheduler, z0: torch.Tensor, ids: torch.Tensor, seed: int) -> float:
    """Mean epsilon-MSE at fixed noise and evenly spread timesteps (a held-out yardstick)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(z0.shape, generator=gen)
    n, T = len(z0), scheduler.config.num_train_timesteps
    t = torch.linspace(0, T - 1, n).round().long()
    emb = te(ids).last_hidden_state
    return float(loss_map(unet, scheduler, z0, emb, t, noise).mean())


def round_to_fp16(module: torch.nn.Module) -> None:
    """Make the in-memory fp32 weights exactly what the fp16 files will hold, so reported numbers are honest."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


# ---------------------------------------------------------------- writing


def model_index() -> dict:
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_components(folder: Path, vae, unet, te, scheduler) -> None:
    for name, model in (("vae", vae), ("unet", unet)):
        copy.deepcopy(model).half().save_pretrained(folder / name, safe_serialization=True)
    save_text_encoder(te, folder / "text_encoder")  # standard text_model.* keys: every transformers 5.x reads them
    scheduler.save_pretrained(folder / "scheduler")
    write_json(folder / "model_index.json", model_index())


def replace_folder(tmp: Path, out: Path) -> None:
    """Swap the finished temp folder into place; the old model stays intact until the new one is complete."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


@torch.no_grad()
def sample_grid(folder: Path, captions: list[str], path: Path, seed: int) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    images = pipe(captions, num_inference_steps=25, guidance_scale=3.0, generator=gen).images
    side = int(math.ceil(math.sqrt(len(images))))
    cell = 4 * tiny.RESOLUTION
    grid = Image.new("RGB", (side * cell, side * cell), "white")
    for k, im in enumerate(images):
        grid.paste(im.resize((cell, cell), Image.Resampling.NEAREST), ((k % side) * cell, (k // side) * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


# ---------------------------------------------------------------- main


def versions() -> dict:
    import diffusers
    import transformers

    return dict(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                numpy=np.__version__, python=sys.version.split()[0])


def pretrain(tmp: Path, s: dict, seed: int, log: Log) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)  # model initialisation draws from the global RNG
    pixels, captions = load_split(s["n_public"], seed)
    hold_px, hold_caps = load_split(s["n_holdout"], seed, start=s["n_public"])
    log(f"public split: {len(pixels)} train + {len(hold_px)} held-out images")

    gen = torch.Generator().manual_seed(seed)
    vae = train_vae(pixels, s, gen, log)
    round_to_fp16(vae)
    mean, std = vae_posterior(vae, pixels)
    sf = float(1.0 / (mean + std * torch.randn(mean.shape, generator=gen)).std())
    vae.register_to_config(scaling_factor=sf)
    vae_l1 = vae_recon_l1(vae, hold_px)
    log(f"vae held-out L1 {vae_l1:.4f}  scaling_factor {sf:.4f}  mean posterior std {float(std.mean()):.4f}")

    build_clip_tokenizer_files(tmp / "tokenizer", synthetic.CAPTION_WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
    verify_tokenizer(tokenizer, synthetic.CAPTION_WORDS)
    ids, empty = tokenize(tokenizer, captions), tokenize(tokenizer, [""])

    unet = UNet2DConditionModel(**tiny.unet_config())
    te = CLIPTextModel(CLIPTextConfig(**tiny.text_encoder_config(len(tokenizer))))
    random_unet = copy.deepcopy(unet).eval()
    scheduler = DDPMScheduler.from_config(tiny.scheduler_config())
    losses = train_unet(unet, te, scheduler, (mean * sf, std * sf), ids, empty, s, gen, log)
    round_to_fp16(unet)

    hold_z = vae_posterior(vae, hold_px)[0] * sf
    hold_ids = tokenize(tokenizer, hold_caps)
    trained = denoise_loss(unet, te, scheduler, hold_z, hold_ids, s["eval_seed"])
    random = denoise_loss(random_unet, te, scheduler, hold_z, hold_ids, s["eval_seed"])
    log(f"held-out denoising loss: pretrained {trained:.4f}  random-init {random:.4f}")

    save_components(tmp, vae, unet, te, scheduler)
    return dict(
        scaling_factor=sf, vae_heldout_l1=vae_l1, vae_mean_posterior_std=float(std.mean()),
        unet_final_train_loss=float(np.mean(losses[-50:])), unet_heldout_loss=trained,
        random_unet_heldout_loss=random, vocab_size=len(tokenizer), sample_captions=hold_caps[: s["n_samples"]],
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM becomes SystemExit so the temp folder below is removed, as on any other failure
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=True)
    s = SETTINGS["quick" if args.quick else "full"]
    log = Log()
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is meant to be shared
    try:
        results = pretrain(tmp, s, args.seed, log)
        build = dict(script="scripts/build_tiny_sd.py", mode="quick" if args.quick else "full", seed=args.seed,
                     settings=s, fp16_components=list(FP16_COMPONENTS), results=results, versions=versions(),
                     wall_time_s=round(time.time() - log.t0, 1))
        write_json(tmp / "BUILD.json", build)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}")
    if args.samples is not None:
        sample_grid(out, results["sample_captions"], args.samples, args.seed)
        log(f"wrote sample grid {args.samples}")
    log(json.dumps({k: v for k, v in results.items() if k != "sample_captions"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
