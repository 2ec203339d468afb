"""Image quality: FID and KID between a real and a generated image set, computed by torchmetrics.

Two feature extractors:

* ``inception`` — the standard: torch-fidelity's Inception-v3 (2048-d pool features) with weights read from a
  local file (``weights-inception-2015-12-05-6726825d.pth``); nothing is ever downloaded.
* ``tiny`` — a fast proxy for the 32 px tiny model, where Inception statistics mean little: the mean latents of
  the tiny-sd VAE encoder, mapped by a fixed seeded Gaussian projection to 64 dimensions. Its numbers are
  reported under ``*_proxy_tiny`` keys and are not comparable to Inception FID/KID.

Features are extracted once per image set and handed to torchmetrics' FID and KID through an identity
"feature extractor", so both metrics see the same features and torchmetrics does all the statistics.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privlora.errors import PrivloraError
from privlora.models.vae import vae_scale_factor

METRICS = ("fid", "kid")
FEATURE_EXTRACTORS = ("inception", "tiny")
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_NAME}"
INCEPTION_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name ends with its SHA-256 prefix
PROXY_LABEL = "proxy FID/KID (tiny-sd VAE features), not comparable to Inception FID/KID"
PROXY_DIM = 64
PROXY_SEED = 0


# ---------------------------------------------------------------- distances on features


class _Precomputed(nn.Module):
    """Identity 'feature extractor': the metrics receive features that were extracted beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check_features(real: torch.Tensor, fake: torch.Tensor, minimum: int = 2) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise PrivloraError("feature sets must be (N, d) with the same d; "
                            f"got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) < minimum:
        raise PrivloraError(f"FID/KID need at least {minimum} images in each set; "
                            f"got {len(real)} real, {len(fake)} fake")


# FID is ≥ 0; the float64 matrix square root leaves round-off of this order (a set against itself: ~1e-7).
FID_PRECISION = 1e-6
FID_NOTE = f"FID clamped at 0; float64, values under {FID_PRECISION:g} are round-off, not a distance"


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets (N, d): ||μ_r − μ_f||² + Tr(Σ_r + Σ_f − 2(Σ_r Σ_f)^½), in float64.

    Clamped at 0: round-off of the matrix square root can make identical sets come out slightly negative."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_features(real, fake)
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return max(0.0, float(metric.compute()))


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float, int]:
    """KID (mean, std over ``subsets`` random subsets) and the subset size used (capped at the smaller set)."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    _check_features(real, fake)
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


# ---------------------------------------------------------------- feature extractors


class TinyVaeFeatures(nn.Module):
    """Proxy features: tiny-sd VAE encoder mean latents (images resized to the VAE's size), flattened, then a
    fixed Gaussian projection (seeded) to ``dim`` dimensions. Deterministic.

    The projection is scaled by 1/√(latent size), so each feature has about the variance of one scaled latent
    (≈ 1): KID's polynomial kernel assumes features of unit scale."""

    def __init__(self, vae, dim: int = PROXY_DIM, seed: int = PROXY_SEED):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.size = int(cfg.sample_size)
        factor = vae_scale_factor(cfg)
        flat = cfg.latent_channels * (self.size // factor) ** 2
        gen = torch.Generator().manual_seed(seed)
        projection = torch.randn(flat, dim, generator=gen, dtype=torch.float64) / math.sqrt(flat)
        self.register_buffer("projection", projection)
        self.num_features = dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) / 127.5 - 1.0
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                                          align_corners=False)
        x = x.to(self.vae.device, self.vae.dtype)
        latents = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
        return latents.flatten(1).double().cpu() @ self.projection


def tiny_extractor(feature_model: str = "tiny-sd") -> tuple[TinyVaeFeatures, dict[str, str]]:
    """The proxy extractor from a diffusers folder's VAE (default: the embedded tiny-sd) and its provenance."""
    from diffusers import AutoencoderKL

    from privlora.models.loading import sha256_file
    from privlora.models.tiny import TINY_ALIASES, TINY_SD_PATH

    folder = TINY_SD_PATH if feature_model in TINY_ALIASES else Path(feature_model)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise PrivloraError(f"{weights}: missing — the tiny proxy needs a diffusers folder with vae/ weights "
                            "(the embedded tiny-sd: build it with scripts/build_tiny_sd.py)")
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise PrivloraError(f"{folder / 'vae'}: cannot load the VAE ({' '.join(str(e).split())[:300]})") from None
    info = {"feature_model": str(feature_model), "feature_model_vae_sha256": sha256_file(weights),
            "feature_extractor": f"tiny-sd VAE encoder mean latents, fixed Gaussian projection to {PROXY_DIM}-d "
                                 f"(seed {PROXY_SEED})"}
    return TinyVaeFeatures(vae), info


def missing_inception_weights_message() -> str:
    return (f"Inception FID/KID need the Inception-v3 weights file {INCEPTION_WEIGHTS_NAME} (torch-fidelity's, "
            f"roughly 90 MB; nothing is downloaded): fetch {INCEPTION_WEIGHTS_URL} on a machine with network access "
            f"and pass --inception_weights PATH — or use --feature_extractor tiny for the proxy on the tiny model")


def check_inception_weights(path: str | Path | None) -> Path:
    if path is None:
        raise PrivloraError(missing_inception_weights_message())
    path = Path(path)
    if not path.is_file():
        raise PrivloraError(f"{path}: Inception weights file not found; {missing_inception_weights_message()}")
    return path


def inception_extractor(weights: str | Path | None) -> tuple[nn.Module, dict[str, str]]:
    """torch-fidelity's Inception-v3 (pool3, 2048-d) loaded from ``weights``, and its provenance."""
    from privlora.models.loading import sha256_file

    path = check_inception_weights(weights)
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception is torch-fidelity's)
    except ImportError:
        raise PrivloraError("Inception FID/KID need the torch-fidelity package (pip install torch-fidelity); "
                            "or use --feature_extractor tiny") from None
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=str(path))
    except Exception as e:  # torch.load / load_state_dict errors for a file that is not these weights
        raise PrivloraError(f"{path}: not torch-fidelity's Inception-v3 weights ({' '.join(str(e).split())[:200]}); "
                            f"{missing_inception_weights_message()}") from None
    net.num_features = 2048
    digest = sha256_file(path)
    info = {"feature_extractor": "inception-v3 (torch-fidelity, 2048-d pool3)", "inception_weights": str(path),
            "inception_weights_sha256": digest}
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        info["warning"] = (f"weights SHA-256 does not start with {INCEPTION_SHA256_PREFIX}: not the standard "
                           "file, so FID/KID are not comparable to published numbers")
    return net, info


# ---------------------------------------------------------------- images


ImageSet = str | Path | torch.Tensor | Sequence[Any]


def load_images(source: ImageSet) -> list[torch.Tensor]:
    """uint8 (3, H, W) tensors from a folder, an (N, 3, H, W) tensor (uint8, or float in [0, 1]), PIL images
    or arrays."""
    if isinstance(source, (str, Path)):
        return _folder_images(Path(source))
    if isinstance(source, torch.Tensor):
        return [_as_uint8(t) for t in source]
    return [_as_uint8(item) for item in source]


def _folder_images(folder: Path) -> list[torch.Tensor]:
    from privlora.data.images import is_image_file, open_rgb

    if not folder.is_dir():
        raise PrivloraError(f"{folder}: image folder not found")
    files = sorted(p for p in folder.iterdir() if is_image_file(p) and p.name != "grid.png")
    if not files:
        raise PrivloraError(f"{folder}: no images (.png, .jpg, .jpeg, .webp, .bmp)")
    return [_as_uint8(open_rgb(p)) for p in files]


def _as_uint8(item: Any) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu()
        if t.dtype != torch.uint8:
            t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return t
    array = np.asarray(item.convert("RGB") if hasattr(item, "convert") else item)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)).permute(2, 0, 1)


@torch.no_grad()
def extract(extractor: nn.Module, images: list[torch.Tensor], batch_size: int = 50) -> torch.Tensor:
    """(N, d) float64 features; consecutive images of the same size are batched together."""
    feats: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []
    for img in images:
        if batch and (img.shape != batch[0].shape or len(batch) == batch_size):
            feats.append(extractor(torch.stack(batch)).double().cpu())
            batch = []
        batch.append(img)
    feats.append(extractor(torch.stack(batch)).double().cpu())
    return torch.cat(feats)


# ---------------------------------------------------------------- the API


def score(real_images: ImageSet, fake_images: ImageSet, metrics: Sequence[str] = METRICS,
          feature_extractor: str = "inception", *, inception_weights: str | Path | None = None,
          feature_model: str = "tiny-sd", kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
          batch_size: int = 50) -> dict[str, Any]:
    """FID and/or KID of ``fake_images`` against ``real_images`` (folders, tensors or lists of PIL images).

    Inception keys: ``fid``, ``kid_mean``, ``kid_std``. Tiny proxy keys: ``fid_proxy_tiny``,
    ``kid_proxy_tiny_mean``, ``kid_proxy_tiny_std`` plus ``label`` saying they are proxies.
    """
    metrics = _check_metrics(metrics, feature_extractor)
    if feature_extractor == "inception":
        check_inception_weights(inception_weights)  # before any image is read: a clear error and no output
    real, fake = load_images(real_images), load_images(fake_images)
    if min(len(real), len(fake)) < 2:
        raise PrivloraError(f"FID/KID need at least 2 images in each set; got {len(real)} real, {len(fake)} fake")
    if feature_extractor == "inception":
        net, info = inception_extractor(inception_weights)
    else:
        net, info = tiny_extractor(feature_model)
    f_real, f_fake = extract(net, real, batch_size), extract(net, fake, batch_size)
    return {**_distances(f_real, f_fake, metrics, feature_extractor, kid_subsets, kid_subset_size, seed), **info,
            "n_real": len(real), "n_fake": len(fake)}


def _check_metrics(metrics: Sequence[str] | str, feature_extractor: str) -> list[str]:
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise PrivloraError(f"metrics {','.join(metrics) or '(none)'}: choose from {', '.join(METRICS)}")
    if feature_extractor not in FEATURE_EXTRACTORS:
        raise PrivloraError(f"feature extractor {feature_extractor!r} is not one of {', '.join(FEATURE_EXTRACTORS)}")
    return list(dict.fromkeys(metrics))


def _distances(real: torch.Tensor, fake: torch.Tensor, metrics: list[str], feature_extractor: str, kid_subsets: int,
               kid_subset_size: int, seed: int) -> dict[str, Any]:
    suffix = "_proxy_tiny" if feature_extractor == "tiny" else ""
    out: dict[str, Any] = {"label": PROXY_LABEL} if suffix else {}
    if "fid" in metrics:
        out[f"fid{suffix}"] = frechet_distance(real, fake)
        out["fid_note"] = FID_NOTE
    if "kid" in metrics:
        mean, std, size = kernel_distance(real, fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
        out.update({f"kid{suffix}_mean": mean, f"kid{suffix}_std": std, "kid_subsets": kid_subsets,
                    "kid_subset_size": size})
    return out


# --- samples of one model for the bench's proxy FID ---------------------------------------------------

def quality_name(lora: Path | None) -> str:
    """A model's name in the bench's quality results: "base" or the LoRA file's stem."""
    return "base" if lora is None else lora.stem


@dataclass
class QualityJob:
    """Samples of one model (the base model for ``lora=None``) from the held-out captions, scored against the
    held-out images; picklable, so a worker process can run it."""

    model: str
    config_dir: str | None
    real: list  # PIL images
    prompts: list[str]
    steps: int
    guidance: float
    seed: int

    def run(self, lora: Path | None) -> tuple[dict, bytes]:
        from privlora.models.loading import load_base
        from privlora.sample import build_pipeline, load_lora

        base = load_base(self.model, config_dir=self.config_dir)
        pipe = build_pipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, base.noise_scheduler.config)
        if lora is not None:
            load_lora(pipe, lora)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(self.seed)
        images = pipe(self.prompts, num_inference_steps=self.steps, guidance_scale=self.guidance,
                      generator=generator).images
        result = score(self.real, images, metrics=["fid"], feature_extractor="tiny", seed=self.seed)
        return result, sheet_png(images[:16])


def sheet_png(images: list) -> bytes:
    """A contact sheet of ``images`` (8 per row) as PNG bytes."""
    import io

    from privlora.sample import contact_sheet

    buf = io.BytesIO()
    contact_sheet(images, columns=8).save(buf, format="PNG")
    return buf.getvalue()
