"""DP-LoRA: DP-SGD on the UNet's LoRA weights (Abadi et al. 2016), accounted with Opacus' accountants.

Per step: a Poisson-sampled batch (each training image independently with rate q = batch size / N); for each
image the gradient of its own loss (averaged over ``dp_noise_draws`` noise/timestep draws, as in DPDM) with
``torch.func`` (``vmap`` over ``grad`` of a ``functional_call``), computed in physical micro-batches; each
per-image gradient clipped to norm C; Gaussian noise of std σ·C added to their sum; the result divided by the
expected batch size q·N.

The Gaussian noise and the Poisson sampling are the mechanism's secret randomness: anyone who can regenerate them
learns the clipped gradient sums from the released weights, and subsampling amplifies nothing once the batches are
known. Both generators are seeded from the operating system's secure source (``secrets``), fresh for every run;
their states live only in the private training state (``state-*``), so a resume continues bit-exactly, and nothing
in the LoRA file, resolved_config.toml, history.json or the logs regenerates them. ``dp_reproducible_noise`` (for
research) seeds them from the run's seed instead and marks the guarantee void in the file's metadata.
"""
from __future__ import annotations

import math
import secrets
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from collections.abc import Callable, Iterator

import torch
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset, default_collate

from privlora import accounting
from privlora.diffusion import loss_map
from privlora.errors import PrivloraError
from privlora.objectives.base import BuildContext, DenoiserLike, Objective, StepOutput
from privlora.settings import MethodSettings

if TYPE_CHECKING:
    from privlora.settings import TrainConfig


VOID = "void: reproducible noise"
NO_NOISE = "none: no noise (σ = 0), per-image clipping only"


def secret_seed() -> int:
    """A 63-bit seed from the operating system's cryptographically secure source, never written anywhere."""
    return secrets.randbits(63)


class PoissonBatches(torch.utils.data.Sampler[list[int]]):
    """``num_batches`` batches per epoch; each index is in a batch independently with probability ``rate``."""

    def __init__(self, n: int, rate: float, num_batches: int, generator: torch.Generator):
        self.n, self.rate, self.num_batches, self.generator = n, rate, num_batches, generator

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            yield torch.nonzero(torch.rand(self.n, generator=self.generator) < self.rate).flatten().tolist()


def collate_or_empty(samples: list[dict]) -> dict:
    return default_collate(samples) if samples else {}


def batch_size_of(batch: dict) -> int:
    for v in batch.values():
        return len(v)
    return 0


def take(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


def clip_factors(grads: list[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample scale factors min(1, C/‖g_i‖) over all parameters together, and the norms ‖g_i‖."""
    norm = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads))  # type: ignore[arg-type]  # sum() of tensors: Tensor
    return (max_norm / (norm + 1e-6)).clamp(max=1.0), norm


@dataclass
class DPSettings(MethodSettings):
    """DP-LoRA's keys: give dp_noise_multiplier, or dp_target_epsilon and the multiplier is solved for the run."""

    dp_noise_multiplier: float | None = field(default=None, metadata={"help": "σ: noise std / clipping norm"})
    dp_target_epsilon: float | None = field(default=None, metadata={
        "help": "ε the run must reach at dp_delta (σ is solved for the run's length)"})
    dp_delta: float | None = field(default=None, metadata={
        "help": "δ; default 1e-5, never above 1/(10·N) for N training images"})
    dp_max_grad_norm: float = field(default=1.0, metadata={"help": "per-image clipping norm C"})
    dp_accountant: str = field(default="prv", metadata={"help": "prv | rdp (Opacus' accountants)"})
    dp_micro_batch_size: int = field(default=16, metadata={
        "help": "per-image gradients are formed this many images at a time (memory bound)"})
    dp_noise_draws: int = field(default=1, metadata={
        "help": "noise/timestep draws averaged per image before clipping (DPDM's noise multiplicity)"})
    # research only: noise and Poisson sampling from the run's seed (repeatable), which VOIDS the guarantee for
    # anyone who has the LoRA file (its metadata holds the seed); default: a secret per-run source
    dp_reproducible_noise: bool = field(default=False, metadata={
        "help": "research only: noise from the seed; VOIDS the guarantee of the file"})

    resume_free = ("dp_micro_batch_size",)  # memory only: the same per-image gradients, chunked differently

    def check(self, cfg: TrainConfig) -> str | None:
        if cfg.train_text_encoder:
            return "dp_lora trains the UNet LoRA only (text-encoder gradients are not handled per image); " \
                   "set train_text_encoder = false"
        if cfg.gradient_accumulation_steps != 1:
            return "dp_lora forms each logical batch itself (dp_micro_batch_size bounds memory); " \
                   "set gradient_accumulation_steps = 1"
        for key in ("dp_micro_batch_size", "dp_noise_draws"):
            if getattr(self, key) < 1:
                return f"{key} must be ≥ 1"
        if (self.dp_noise_multiplier is None) == (self.dp_target_epsilon is None):
            return "dp_lora needs exactly one of dp_noise_multiplier or dp_target_epsilon"
        if self.dp_noise_multiplier is not None and self.dp_noise_multiplier < 0:
            return f"dp_noise_multiplier {self.dp_noise_multiplier} is negative"
        if self.dp_target_epsilon is not None and self.dp_target_epsilon <= 0:
            return f"dp_target_epsilon {self.dp_target_epsilon} must be > 0"
        if self.dp_delta is not None and not 0 < self.dp_delta < 1:
            return f"dp_delta {self.dp_delta} must be in (0, 1)"
        if not self.dp_max_grad_norm > 0:
            return f"dp_max_grad_norm {self.dp_max_grad_norm} must be > 0 (inf turns clipping off)"
        if math.isinf(self.dp_max_grad_norm) and (self.dp_noise_multiplier or self.dp_target_epsilon):
            return "dp_max_grad_norm inf (no clipping) has unbounded sensitivity: no noise makes that private"
        if self.dp_accountant not in accounting.ACCOUNTANTS:
            return f"dp_accountant {self.dp_accountant!r} is not one of {', '.join(accounting.ACCOUNTANTS)}"
        return None


class DPLoraObjective(Objective):
    name = "dp_lora"
    summary = "DP-LoRA: DP-SGD on the LoRA weights (per-image clipping, Gaussian noise, Poisson sampling), ε accounted"
    settings_cls = DPSettings

    def __init__(self, *, max_grad_norm: float, num_images: int, batch_size: int, delta: float,
                 noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 accountant: str = "prv", micro_batch_size: int = 16, noise_draws: int = 1,
                 reproducible_seed: int | None = None):
        """``reproducible_seed``: seed the noise (and the sampling) from it — research only, the guarantee is void
        for anyone who knows it; None (the default): a secret seed from the OS's secure source."""
        if batch_size > num_images:
            raise PrivloraError(f"dp_lora: train_batch_size {batch_size} exceeds the {num_images} training images")
        self.max_grad_norm, self.num_images, self.delta = max_grad_norm, num_images, delta
        self.sample_rate = batch_size / num_images
        self.noise_multiplier, self.target_epsilon = noise_multiplier, target_epsilon
        self.accountant_kind = accountant
        self.accountant = accounting.make_accountant(accountant)
        self.micro_batch_size, self.noise_draws = micro_batch_size, noise_draws
        self.reproducible = reproducible_seed is not None
        noise_seed = reproducible_seed + 7 if reproducible_seed is not None else secret_seed()
        self.noise = torch.Generator().manual_seed(noise_seed)
        self._names: dict[int, str] | None = None
        self.planned_steps, self.planned_epsilon = 0, math.nan  # set by plan()

    @classmethod
    def from_config(cls, cfg: TrainConfig, ctx: BuildContext) -> DPLoraObjective:
        if ctx.num_processes > 1:
            raise PrivloraError("dp_lora runs in one process (the noise must be added once per step); "
                                "launch it without torchrun/accelerate multi-process")
        s = cfg.settings(DPSettings)
        delta = s.dp_delta if s.dp_delta is not None else accounting.DEFAULT_DELTA
        ceiling = accounting.max_delta(ctx.num_train_images)
        if delta > ceiling:
            raise PrivloraError(f"dp_delta {delta:g} is above 1/(10·N) = {ceiling:.3g} for N = {ctx.num_train_images} "
                                "training images: a mechanism that leaks one whole image with probability δ would "
                                "be expected to leak some; lower dp_delta")
        if s.dp_reproducible_noise:
            print("dp_lora: dp_reproducible_noise is on: the noise and sampling follow the seed, which the LoRA file "
                  "records, so the DP guarantee is VOID for anyone who has the file (metadata: "
                  f"privlora_dp_guarantee = \"{VOID}\")", file=sys.stderr)
        return cls(max_grad_norm=s.dp_max_grad_norm, num_images=ctx.num_train_images,
                   batch_size=cfg.train_batch_size, delta=delta, noise_multiplier=s.dp_noise_multiplier,
                   target_epsilon=s.dp_target_epsilon, accountant=s.dp_accountant,
                   micro_batch_size=s.dp_micro_batch_size, noise_draws=s.dp_noise_draws,
                   reproducible_seed=cfg.seed if s.dp_reproducible_noise else None)


    def plan(self, max_steps: int) -> None:
        if self.noise_multiplier is None:
            assert self.target_epsilon is not None  # validated: one of the two is set
            self.noise_multiplier = accounting.noise_multiplier_for(
                self.target_epsilon, self.delta, self.sample_rate, max_steps, self.accountant_kind)
        self.planned_steps = max_steps
        self.planned_epsilon = (accounting.epsilon_for(self.noise_multiplier, self.sample_rate, max_steps, self.delta,
                                                       self.accountant_kind) if self.noise_multiplier else math.inf)

    # --- data: Poisson sampling, the accountant's assumption ---
    def data_order_generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed if self.reproducible else secret_seed())

    def make_loader(self, data: Dataset, batch_size: int, generator: torch.Generator) -> DataLoader:
        n = len(data)  # type: ignore[arg-type]  # our datasets are map-style, sized
        if n != self.num_images:
            raise PrivloraError("dp_lora: an image repeated in the training set (kohya repeats > 1) would be "
                                "protected less than the others; use repeats of 1")
        sampler = PoissonBatches(n, self.sample_rate, math.ceil(n / batch_size), generator)
        # the loader's own seed draw must come from the data-order generator too (resume replays it), not the global RNG
        return DataLoader(data, batch_sampler=sampler, collate_fn=collate_or_empty, generator=generator)

    # --- the step: per-image gradients, clipped, summed, noised ---
    def gradients(self, batch: dict, denoiser: DenoiserLike, params: list[torch.nn.Parameter],
                  backward: Callable[[torch.Tensor], None]) -> StepOutput:
        n = batch_size_of(batch)
        summed = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        losses, norms = [], []
        for start in range(0, n, self.micro_batch_size):
            grads, loss = self.per_sample_gradients(take(batch, start, start + self.micro_batch_size), denoiser, params)
            factor, norm = clip_factors(grads, self.max_grad_norm)
            for s, g in zip(summed, grads):
                s.add_(torch.einsum("b,b...->...", factor, g))
            losses.append(loss.detach())
            norms.append(norm)
        for p, s in zip(params, summed):
            if self.noise_multiplier:
                noise = torch.randn(s.shape, generator=self.noise) * (self.noise_multiplier * self.max_grad_norm)
                s += noise.to(s.device)
            p.grad = (s / (self.sample_rate * self.num_images)).to(p.dtype)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        if not n:
            return StepOutput(torch.tensor(0.0), {"batch": 0.0})
        loss, norm = torch.cat(losses), torch.cat(norms)
        return StepOutput(loss.mean(), {"L_ada": loss.mean().item(), "batch": float(n),
                                        "per_sample_grad_norm": norm.mean().item(),
                                        "clipped_frac": (norm > self.max_grad_norm).float().mean().item()})

    def per_sample_gradients(self, batch: dict, denoiser, params: list[torch.nn.Parameter]
                             ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each image's gradient of its own loss (mean over ``noise_draws`` draws), exact, shape (B, *param)."""
        unet = denoiser.base.unet
        if self._names is None:
            self._names = {id(p): n for n, p in unet.named_parameters()}
        names = [self._names[id(p)] for p in params]
        z, c = denoiser.latents(batch), denoiser.text(batch)
        k = self.noise_draws
        noise, t = denoiser.draw({"latents": z.repeat_interleave(k, 0).cpu()})
        noise = noise.to(z.device).view(z.shape[0], k, *z.shape[1:])
        t = t.to(z.device).view(z.shape[0], k)
        scheduler = denoiser.base.noise_scheduler

        def image_loss(lora: dict[str, torch.Tensor], z1, c1, noise1, t1):
            def model(x, tt, **kwargs):  # the UNet's keywords (SDXL adds added_cond_kwargs) pass through
                return functional_call(unet, lora, (x, tt), kwargs)
            model.config = unet.config  # type: ignore[attr-defined]  # diffusion.denoise reads the UNet's kind
            maps = loss_map(model, scheduler, z1.expand(k, *z1.shape), c1.expand(k, *c1.shape), t1, noise1)
            return denoiser.adaptation_loss(maps, t1)

        lora = {n: p.detach() for n, p in zip(names, params)}
        fn = vmap(grad_and_value(image_loss), in_dims=(None, 0, 0, 0, 0), randomness="different")
        # vmap has no batching rule for the fused attention kernels; the math kernel is plain batched matmuls
        with denoiser.autocast(), sdpa_kernel(SDPBackend.MATH):
            grads, loss = fn(lora, z, c, noise, t)
        return [grads[n].float() for n in names], loss

    def clip(self, params, max_norm, clip_fn) -> float | None:
        return None  # each image's gradient is already clipped; clipping the noised sum would change the mechanism

    # --- records ---
    def epsilon(self) -> float:
        if not self.noise_multiplier:
            return math.inf if self.accountant.history else 0.0
        return accounting.epsilon_spent(self.accountant, self.delta)

    def epoch_logs(self) -> dict[str, float]:
        return {"epsilon": self.epsilon()}

    def metadata(self) -> dict[str, str]:
        steps = sum(s for _, _, s in self.accountant.history)
        return {"privlora_dp_epsilon": f"{self.epsilon():.6g}", "privlora_dp_delta": f"{self.delta:.6g}",
                "privlora_dp_noise_multiplier": f"{self.noise_multiplier:.6g}",
                "privlora_dp_max_grad_norm": f"{self.max_grad_norm:.6g}",
                "privlora_dp_sample_rate": f"{self.sample_rate:.6g}", "privlora_dp_steps": str(steps),
                "privlora_dp_accountant": self.accountant_kind,
                "privlora_dp_planned_steps": str(self.planned_steps),
                "privlora_dp_planned_epsilon": f"{self.planned_epsilon:.6g}",
                "privlora_dp_unit": "one training image (with its caption)",
                "privlora_dp_num_images": str(self.num_images),
                "privlora_dp_guarantee": self.guarantee()}

    def guarantee(self) -> str:
        """What the file may claim: void (reproducible noise), none (σ = 0: per-image clipping only), or holds."""
        if self.reproducible:
            return VOID
        if not self.noise_multiplier:
            return NO_NOISE
        return (f"holds: (ε, δ) = ({self.epsilon():.6g}, {self.delta:.3g}) per training image; noise and sampling "
                "from a secret per-run source")

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict(), "noise": self.noise.get_state(),
                "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.noise.set_state(state["noise"])
        self.noise_multiplier = state["noise_multiplier"]
