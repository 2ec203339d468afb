"""``lira`` / ``lira_offline``: the likelihood-ratio attack on shadow LoRAs (Carlini et al., "Membership Inference
Attacks From First Principles", IEEE S&P 2022).

A fine-tuned LoRA lowers each image's loss by an image-specific amount that only models trained with and without the
image can predict. Shadow LoRAs — the audited run's settings, each trained on a random half of a candidate pool
(``privlora.shadows``) — give, per example, the statistic (minus the mean denoising loss at the loss attack's fixed,
seeded draws) under models that trained on it (IN) and models that did not (OUT). ``lira`` scores the log
likelihood ratio of the audited model's statistic under Gaussians fitted to both; ``lira_offline`` uses the OUT
Gaussian alone (a one-sided z-score), so its shadows need never have seen the queries. With few shadows a per-example
variance is noise, so the variance is one pooled value (Carlini et al.'s "fixed variance"), fitted on the aux roles
(``fit``): the residuals of the shadows' statistics around each aux example's IN and OUT means.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from privlora.attacks.base import Batch, require_aux
from privlora.attacks.loss import LossAttack


def gaussian_log_pdf(x: np.ndarray, mean: np.ndarray, sd: float) -> np.ndarray:
    return -0.5 * ((x - mean) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)


def lira_scores(target: np.ndarray, shadows: np.ndarray, inside: np.ndarray, sd_in: float, sd_out: float,
                online: bool = True) -> np.ndarray:
    """Per example: log N(x; μ_IN, σ_IN²) − log N(x; μ_OUT, σ_OUT²) (online), or (x − μ_OUT)/σ_OUT (offline).

    ``target``: (B,) statistic of the audited model; ``shadows``: (K, B) the shadows' statistics; ``inside``: (K, B)
    whether shadow k trained on example b. An example without an OUT (or, online, an IN) shadow scores 0."""
    inside = inside.astype(bool)
    n_in, n_out = inside.sum(0), (~inside).sum(0)
    mu_out = np.where(n_out > 0, (shadows * ~inside).sum(0) / np.maximum(n_out, 1), target)
    if not online:
        return (target - mu_out) / sd_out
    mu_in = np.where(n_in > 0, (shadows * inside).sum(0) / np.maximum(n_in, 1), target)
    score = gaussian_log_pdf(target, mu_in, sd_in) - gaussian_log_pdf(target, mu_out, sd_out)
    return np.where((n_in > 0) & (n_out > 0), score, 0.0)


def pooled_sds(shadows: np.ndarray, inside: np.ndarray, floor: float = 1e-6) -> tuple[float, float]:
    """(σ_IN, σ_OUT): the root mean square of every shadow statistic's residual around its example's IN (OUT) mean,
    with the degrees of freedom the means used up."""
    inside = inside.astype(bool)

    def pooled(mask: np.ndarray) -> float:
        n = mask.sum(0)
        mean = (shadows * mask).sum(0) / np.maximum(n, 1)
        squares = (((shadows - mean) * mask) ** 2).sum()
        dof = max(int((n - 1).clip(min=0).sum()), 1)
        return max(float(np.sqrt(squares / dof)), floor)

    return pooled(inside), pooled(~inside)


@dataclass
class LiraAttack(LossAttack):
    name = "lira"
    summary = ("likelihood ratio of the mean denoising loss under IN vs OUT shadow LoRAs (Carlini et al. 2022, "
               "online; pooled variance fitted on the aux roles)")
    fits = True
    online = True

    def __post_init__(self) -> None:
        self._sd: tuple[float, float] | None = None

    def queries_per_sample(self) -> int:  # the model's own queries; each shadow asks the same ones once per audit
        return super().queries_per_sample()

    def prepare(self, model) -> str | None:
        if getattr(model, "shadows", None) is None:
            return ("needs shadow LoRAs (--shadows K) of a LoRA with its run's resolved_config.toml beside it; "
                    "the base model is scored against the first audited LoRA's shadows, as a control")
        return None

    def statistic(self, model, batch: Batch) -> np.ndarray:
        return (-self.mean_loss(model, batch)).double().cpu().numpy()

    def shadow_statistics(self, model, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        shadows = model.shadows
        return np.stack([self.statistic(s, batch) for s in shadows.targets]), shadows.inside(batch.keys)

    def fit(self, model, member: list[Batch], nonmember: list[Batch]) -> dict[str, Any]:
        require_aux(self.name, member + nonmember)
        stats, masks = zip(*(self.shadow_statistics(model, b) for b in member + nonmember))
        self._sd = pooled_sds(np.concatenate(stats, axis=1), np.concatenate(masks, axis=1))
        return {"sd_in": self._sd[0], "sd_out": self._sd[1], "shadows": len(model.shadows.targets)}

    def details(self) -> dict[str, Any]:
        return {"variant": "online" if self.online else "offline"}

    def score(self, model, batch: Batch) -> torch.Tensor:
        if self._sd is None:
            raise RuntimeError(f"attack {self.name}: score() before fit()")
        stats, inside = self.shadow_statistics(model, batch)
        scores = lira_scores(self.statistic(model, batch), stats, inside, *self._sd, online=self.online)
        return torch.from_numpy(scores)


@dataclass
class LiraOfflineAttack(LiraAttack):
    name = "lira_offline"
    summary = ("z-score of the mean denoising loss against OUT shadow LoRAs only (Carlini et al. 2022, offline; "
               "pooled variance fitted on the aux roles)")
    online = False


def rmia_ratio(target: np.ndarray, shadows: np.ndarray) -> np.ndarray:
    """Per example: log Pr(x|θ) − log Pr(x), with Pr(x|θ) = exp(statistic) and Pr(x) the mean likelihood over the
    reference (shadow) models, IN and OUT alike — the log of RMIA's likelihood ratio (Zarifzadeh et al. 2024)."""
    top = shadows.max(0)
    mean_likelihood = top + np.log(np.exp(shadows - top).mean(0))  # log-mean-exp over the K shadows
    return target - mean_likelihood


def rmia_scores(ratio: np.ndarray, population: np.ndarray, gamma: float = 1.0, break_ties: bool = False) -> np.ndarray:
    """Pr_z[ LR(x) / LR(z) ≥ γ ] over the population z: the share of population ratios at most log γ below x's.

    A population of n resolves the score to 1/n, so many examples tie (at 1.0 above all of it, where the low-FPR
    operating points are); ``break_ties`` orders examples within a step by their own ratio — the order a larger
    population would give — without moving any across a step."""
    n = max(len(population), 1)
    share = np.searchsorted(np.sort(population), ratio - np.log(gamma), side="right") / n
    if not break_ties:
        return share
    return share + (0.5 + np.arctan(ratio) / np.pi) / (2 * n + 1)


@dataclass
class RmiaAttack(LiraAttack):
    """RMIA, the relative membership attack of ML Privacy Meter (Zarifzadeh et al., "Low-Cost High-Power Membership
    Inference Attacks", ICML 2024), on the same shadow LoRAs as ``lira``: an example's likelihood under the audited
    LoRA over its mean likelihood under the shadows (the reference models), compared pairwise with population
    examples z (the nonmember_aux images, scored the same way): the score is the share of z that x beats by a factor
    γ. The likelihood of an image is taken as exp(−mean denoising loss) at the loss attack's fixed draws (a diffusion
    model has no class probability; this is the adaptation). The score is monotone in the ratio for a fixed
    population, so γ changes the scores' scale, not their ranking; ties within the population's resolution are
    broken by the ratio (``rmia_scores``)."""

    name = "rmia"
    summary = ("likelihood under the LoRA over the mean under shadow LoRAs, compared pairwise with population "
               "images (Zarifzadeh et al. 2024; population: nonmember_aux)")
    gamma: float = 1.0

    def fit(self, model, member: list[Batch], nonmember: list[Batch]) -> dict[str, Any]:
        require_aux(self.name, nonmember)
        ratios = [rmia_ratio(self.statistic(model, b), self.shadow_statistics(model, b)[0]) for b in nonmember]
        self._population = np.concatenate(ratios)
        self._sd = (1.0, 1.0)  # unused; marks the attack as fitted
        return {"population": int(len(self._population)), "gamma": self.gamma, "shadows": len(model.shadows.targets)}

    def details(self) -> dict[str, Any]:
        return {"variant": "online (IN and OUT shadows as references)"}

    def score(self, model, batch: Batch) -> torch.Tensor:
        if self._sd is None:
            raise RuntimeError(f"attack {self.name}: score() before fit()")
        ratio = rmia_ratio(self.statistic(model, batch), self.shadow_statistics(model, batch)[0])
        return torch.from_numpy(rmia_scores(ratio, self._population, self.gamma, break_ties=True))
