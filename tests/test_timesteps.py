"""Timestep shaping (issue 26 item 3): kohya's min_timestep / max_timestep restrict the training noise levels."""
import pytest
import torch

from privlora.config import build_config
from privlora.diffusion import sample_timesteps
from privlora.errors import PrivloraError

DATA = {"synthetic_images": 9, "max_train_steps": 1}


def test_sample_timesteps_stays_in_the_range_and_is_unchanged_by_default():
    t = sample_timesteps(4000, 1000, torch.Generator().manual_seed(0), "cpu", 300, 800)
    assert t.min().item() >= 300 and t.max().item() < 800 and len(set(t.tolist())) > 400
    default = sample_timesteps(50, 1000, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(default, torch.randint(0, 1000, (50,), generator=torch.Generator().manual_seed(1)))
    assert sample_timesteps(10, 1000, None, "cpu", 990, 5000).min().item() >= 990  # high clipped to the schedule


def test_the_denoiser_draws_training_timesteps_from_the_configured_range():
    from privlora.denoiser import Denoiser
    from privlora.models.loading import load_base

    base = load_base("tiny-sd")
    den = Denoiser(base, device="cpu", generator=torch.Generator().manual_seed(0), timestep_range=(300, None))
    _, t = den.draw({"latents": torch.zeros(256, 4, 4, 4)})
    assert t.min().item() >= 300 and t.max().item() < base.noise_scheduler.config.num_train_timesteps


def test_an_empty_range_is_a_one_line_error_and_the_range_is_recorded():
    with pytest.raises(PrivloraError, match=r"timestep range \[500, 400\) is empty"):
        build_config(None, {**DATA, "min_timestep": 500, "max_timestep": 400})
    from privlora.train_state import RESUME_MUST_MATCH

    assert {"min_timestep", "max_timestep"} <= set(RESUME_MUST_MATCH)
