"""Schedules, forward process, posterior and hybrid loss of AdvRAD's diffusion (appendix A, eq. 3, 5-11)."""

import math

import pytest
import torch

from anomalib_robust.models.adv_rad.diffusion import (
    DiffusionSchedule,
    hybrid_loss,
    learned_log_variance,
    linear_betas,
    p_mean_variance,
    q_posterior,
    q_sample,
)


@pytest.fixture
def schedule() -> DiffusionSchedule:
    return DiffusionSchedule.from_name("linear", 1000)


def test_linear_schedule_matches_ho_et_al(schedule: DiffusionSchedule) -> None:
    assert schedule.betas[0].item() == pytest.approx(1e-4)
    assert schedule.betas[-1].item() == pytest.approx(0.02)
    assert schedule.alphas_cumprod[-1].item() < 1e-4  # x_T is (almost) pure noise


def test_cosine_schedule_is_monotone_and_bounded() -> None:
    cosine = DiffusionSchedule.from_name("cosine", 1000)
    assert (cosine.alphas_cumprod.diff() < 0).all()
    assert cosine.betas.max().item() == pytest.approx(0.999)  # clipped as in Nichol & Dhariwal


def test_unknown_schedule_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="beta_schedule"):
        DiffusionSchedule.from_name("quadratic", 1000)


def test_q_sample_statistics_match_eq3(schedule: DiffusionSchedule) -> None:
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    t = torch.full((20000,), 99)
    xt = q_sample(schedule, x0, t, torch.randn_like(x0))
    alpha_bar = schedule.alphas_cumprod[99].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(alpha_bar) * 0.5, abs=0.01)
    assert xt.std().item() == pytest.approx(math.sqrt(1 - alpha_bar), abs=0.01)


def test_posterior_matches_closed_form(schedule: DiffusionSchedule) -> None:
    x0, xt = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([1, 50, 999])
    mean, log_variance = q_posterior(schedule, x0, xt, t)
    betas = linear_betas(1000)  # float64 reference
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    for i, step in enumerate(t.tolist()):
        beta, alpha_bar, alpha_bar_prev = betas[step], alphas_cumprod[step], alphas_cumprod[step - 1]
        expected_mean = (
            alpha_bar_prev.sqrt() * beta * x0[i].double() + (1 - beta).sqrt() * (1 - alpha_bar_prev) * xt[i].double()
        ) / (1 - alpha_bar)
        expected_variance = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
        torch.testing.assert_close(mean[i].double(), expected_mean, rtol=1e-4, atol=1e-5)
        assert log_variance[i].exp().item() == pytest.approx(expected_variance.item(), rel=1e-4)


def test_learned_variance_interpolates_between_beta_and_beta_tilde(schedule: DiffusionSchedule) -> None:
    t = torch.tensor([10])
    high = learned_log_variance(schedule, torch.ones(1, 1, 1, 1), t)
    low = learned_log_variance(schedule, -torch.ones(1, 1, 1, 1), t)
    assert high.exp().item() == pytest.approx(schedule.betas[10].item(), rel=1e-4)
    assert low.exp().item() == pytest.approx(schedule.posterior_variance[10].item(), rel=1e-4)


def test_exact_noise_prediction_recovers_x0(schedule: DiffusionSchedule) -> None:
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([5, 500])
    xt = q_sample(schedule, x0, t, noise)
    prediction = p_mean_variance(schedule, torch.cat([noise, torch.zeros_like(noise)], 1), xt, t)
    torch.testing.assert_close(prediction.x0, x0, rtol=1e-3, atol=1e-3)


def test_respacing_consecutive_steps_is_the_original_schedule(schedule: DiffusionSchedule) -> None:
    respaced = schedule.respaced(list(range(100)))
    torch.testing.assert_close(respaced.betas, schedule.betas[:100])
    sparse = schedule.respaced([9, 49, 99])
    torch.testing.assert_close(sparse.alphas_cumprod, schedule.alphas_cumprod[[9, 49, 99]])


def test_hybrid_loss_stops_mean_gradient_in_vb(schedule: DiffusionSchedule) -> None:
    x0, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 100, 999])
    xt = q_sample(schedule, x0, t, noise)
    output = torch.randn(4, 6, 8, 8, requires_grad=True)
    losses = hybrid_loss(schedule, output, x0, xt, t, noise, vb_weight=1e-3)
    assert all(torch.isfinite(value) for value in losses.values())
    losses["vb"].backward()
    eps_grad, v_grad = output.grad.chunk(2, dim=1)
    assert eps_grad.abs().max().item() == 0  # L_vb only trains the variance (stop-gradient on the mean)
    assert v_grad.abs().max().item() > 0


def test_vb_decreases_when_fitting_the_variance(schedule: DiffusionSchedule) -> None:
    """A toy fit: learning v alone lowers L_vb."""
    x0, noise = torch.rand(8, 1, 4, 4) * 2 - 1, torch.randn(8, 1, 4, 4)
    t = torch.randint(1, 1000, (8,))
    xt = q_sample(schedule, x0, t, noise)
    v = torch.full((8, 1, 4, 4), 0.9, requires_grad=True)
    optimizer = torch.optim.Adam([v], lr=0.05)
    first = None
    for _ in range(60):
        vb = hybrid_loss(schedule, torch.cat([noise + 0.3, v], 1), x0, xt, t, noise)["vb"]
        first = vb.item() if first is None else first
        optimizer.zero_grad()
        vb.backward()
        optimizer.step()
    assert vb.item() < first
