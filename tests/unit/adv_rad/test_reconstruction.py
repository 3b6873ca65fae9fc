"""Robust reconstruction (Alg. 1-3): one-shot formula, arbitrary-shot with S = [k], full-shot, schedule checks."""

import pytest
import torch

from anomalib_robust.models.adv_rad.diffusion import DiffusionSchedule
from anomalib_robust.models.adv_rad.reconstruction import (
    arbitrary_shot,
    check_step_schedule,
    one_shot,
    uniform_step_schedule,
)


@pytest.fixture
def schedule() -> DiffusionSchedule:
    return DiffusionSchedule.from_name("linear", 1000)


def linear_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the U-Net whose output depends on x and t."""
    eps = 0.3 * x + 0.001 * t.float().reshape(-1, 1, 1, 1)
    return torch.cat([eps, torch.tanh(x)], dim=1)


def test_one_shot_is_algorithm_1(schedule: DiffusionSchedule) -> None:
    x, noise, k = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8), 100
    alpha_bar = schedule.alphas_cumprod[k - 1]
    xk = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * noise
    eps = linear_denoiser(xk, torch.full((2,), k - 1))[:, :3]
    expected = (xk - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    torch.testing.assert_close(one_shot(linear_denoiser, schedule, x, k, noise), expected)


def test_arbitrary_shot_with_single_step_equals_one_shot(schedule: DiffusionSchedule) -> None:
    x, noise = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(
        arbitrary_shot(linear_denoiser, schedule, x, [100], noise),
        one_shot(linear_denoiser, schedule, x, 100, noise),
        rtol=1e-5,
        atol=1e-5,
    )


def test_full_shot_follows_algorithm_2(schedule: DiffusionSchedule) -> None:
    """Algorithm 2 written out step by step with the original (not respaced) constants."""
    x, noise, k = torch.rand(1, 3, 4, 4) * 2 - 1, torch.randn(1, 3, 4, 4), 5
    generator = torch.Generator().manual_seed(3)
    result = arbitrary_shot(linear_denoiser, schedule, x, list(range(k, 0, -1)), noise, generator)

    generator = torch.Generator().manual_seed(3)
    ab, b = schedule.alphas_cumprod.double(), schedule.betas.double()
    xt = ab[k - 1].sqrt() * x.double() + (1 - ab[k - 1]).sqrt() * noise.double()
    for step in range(k, 0, -1):
        i = step - 1
        out = linear_denoiser(xt.float(), torch.tensor([i])).double()
        eps, v = out[:, :3], out[:, 3:]
        x0 = (xt - (1 - ab[i]).sqrt() * eps) / ab[i].sqrt()
        if step > 1:
            z = torch.randn(xt.shape, generator=generator).double()
            log_beta_tilde = (b[i] * (1 - ab[i - 1]) / (1 - ab[i])).log()
            frac = (v + 1) / 2
            sigma2 = torch.exp(frac * b[i].log() + (1 - frac) * log_beta_tilde)
            mean = (
                ab[i - 1].sqrt() * b[i] / (1 - ab[i]) * x0
                + (ab[i] / ab[i - 1]).sqrt() * (1 - ab[i - 1]) / (1 - ab[i]) * xt
            )
            xt = mean + sigma2.sqrt() * z
        else:
            expected = x0
    torch.testing.assert_close(result.double(), expected, rtol=1e-3, atol=1e-3)


def test_step_schedule_must_start_at_k_and_decrease() -> None:
    assert check_step_schedule([100, 50, 1], 100) == [100, 50, 1]
    with pytest.raises(ValueError, match="start at the diffusion step"):
        check_step_schedule([90, 50], 100)
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_step_schedule([100, 50, 50], 100)
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_step_schedule([100, 0], 100)


def test_uniform_step_schedule() -> None:
    assert uniform_step_schedule(100, 1) == [100]
    schedule = uniform_step_schedule(100, 10)
    assert len(schedule) == 10 and schedule[0] == 100 and schedule[-1] == 1
    with pytest.raises(ValueError, match="num_steps"):
        uniform_step_schedule(100, 101)
