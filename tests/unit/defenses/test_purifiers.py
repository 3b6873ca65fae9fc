"""DiffPure and TMA purifiers: chains against their closed forms, identity at level 0, gradients, bad input."""

import pytest
import torch
from shared_artifacts import TINY_ADVRAD
from torch.utils.checkpoint import checkpoint

from anomalib_robust.attacks import BPDA
from anomalib_robust.defenses import TMA, DiffPure, RespacedPurifier, purifiers
from anomalib_robust.defenses.chains import ddim_purification, ddim_timesteps, ddpm_purification
from anomalib_robust.defenses.memory import activation_bytes
from anomalib_robust.models.adv_rad.diffusion import DiffusionSchedule, predict_x0, q_sample
from anomalib_robust.models.adv_rad.reconstruction import one_shot
from anomalib_robust.models.adv_rad.torch_model import AdvRADModel

SIZE = 16


@pytest.fixture(scope="module")
def denoiser() -> AdvRADModel:
    torch.manual_seed(0)
    return AdvRADModel(**{**TINY_ADVRAD, "image_size": (SIZE, SIZE)}).eval()


def _unet(model: AdvRADModel):
    return lambda x, t: model.unet(x, t).sample


@pytest.mark.parametrize("purifier_class", [DiffPure, TMA])
def test_output_shape_range_and_fresh_noise(denoiser: AdvRADModel, purifier_class: type) -> None:
    purifier = purifier_class(denoiser, **({"level": 20} if purifier_class is DiffPure else {"depth": 20, "stride": 5}))
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        first, second = purifier(images), purifier(images)
    assert first.shape == images.shape
    assert first.min() >= 0 and first.max() <= 1
    assert not torch.equal(first, second), "the purifier must draw fresh noise at every call"


def test_level_zero_is_the_identity(denoiser: AdvRADModel) -> None:
    images = torch.rand(2, 3, SIZE, SIZE)
    assert torch.equal(DiffPure(denoiser, level=0)(images), images)
    assert torch.equal(TMA(denoiser, depth=0)(images), images)


def test_ddpm_chain_of_one_step_is_the_one_shot_reconstruction(denoiser: AdvRADModel) -> None:
    """p = 1: diffuse to step 1 and return the predicted x_0 (Alg. 1 with k = 1)."""
    x, noise = torch.rand(2, 3, SIZE, SIZE) * 2 - 1, torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        chain = ddpm_purification(_unet(denoiser), denoiser.schedule, x, 1, noise)
        expected = one_shot(_unet(denoiser), denoiser.schedule, x, 1, noise)
    torch.testing.assert_close(chain, expected)


def test_ddim_chain_of_one_step_is_the_predicted_x0(denoiser: AdvRADModel) -> None:
    """tau = (T*, 0): x_0 = x0_hat(x_T*), whatever eta (sigma vanishes at the last step)."""
    x, noise = torch.rand(2, 3, SIZE, SIZE) * 2 - 1, torch.randn(2, 3, SIZE, SIZE)
    schedule = denoiser.schedule
    t = torch.full((2,), 29)
    with torch.no_grad():
        chain = ddim_purification(_unet(denoiser), schedule, x, depth=30, stride=30, eta=1.0, noise=noise)
        xt = q_sample(schedule, x, t, noise)
        expected = predict_x0(schedule, xt, t, denoiser.unet(xt, t).sample.chunk(2, dim=1)[0])
    torch.testing.assert_close(chain, expected)


def test_deterministic_ddim_two_steps_matches_the_closed_form() -> None:
    """With eta = 0 and a denoiser that predicts the true noise of a fixed x_0, DDIM returns that x_0 exactly."""
    schedule = DiffusionSchedule.from_name("linear", 100)
    x0 = torch.rand(1, 3, 4, 4) * 2 - 1
    alpha_bar = schedule.alphas_cumprod

    def oracle(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alpha_bar[t].view(-1, 1, 1, 1)
        return torch.cat([(xt - a.sqrt() * x0) / (1 - a).sqrt(), torch.zeros_like(xt)], dim=1)

    out = ddim_purification(oracle, schedule, x0, depth=40, stride=20, eta=0.0, noise=torch.randn_like(x0))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_tma_step_noise_is_the_ddpm_posterior_std_of_the_respaced_schedule(denoiser: AdvRADModel) -> None:
    """With eta = 1, sigma_t of eq. (4) (TMA paper, Alg. 2) is sqrt(beta_tilde) of the schedule respaced to tau
    (Nichol & Dhariwal 2021, sec. 4; DDPM's posterior variance, Ho et al. 2020, eq. 7). Checked by Monte Carlo on
    tau = (T*, s, 0) with a constant noise predictor eps_theta = c and the diffusion noise fixed: the chain returns
    ``x0_hat + ((sqrt(1 - abar_s - sigma^2) - sqrt(1 - abar_s)) c + sigma z) / sqrt(abar_s)``, whose mean tests the
    sigma in the step's eps coefficient and whose variance tests the sigma of its noise."""
    purifier = TMA(denoiser, depth=40, stride=20, eta=1.0)
    schedule, step, following = purifier.schedule, purifier.depth, purifier.depth - purifier.stride
    sigma = schedule.respaced([following - 1, step - 1]).posterior_variance[1].double().sqrt()
    abar_t, abar_s = (schedule.alphas_cumprod[index - 1].double() for index in (step, following))
    c = 2.0

    def constant(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        del t
        return torch.full((xt.shape[0], 2 * xt.shape[1], *xt.shape[2:]), c)  # [eps, v]

    x = torch.rand(64, 3, SIZE, SIZE) * 2 - 1
    noise = torch.randn_like(x)
    out = ddim_purification(constant, schedule, x, purifier.depth, purifier.stride, purifier.eta, noise=noise)
    x0_hat = x.double() + ((1 - abar_t) / abar_t).sqrt() * (noise.double() - c)
    residual = (out.double() - x0_hat) * abar_s.sqrt()
    offset = ((1 - abar_s - sigma**2).sqrt() - (1 - abar_s).sqrt()) * c
    standard_error = sigma / residual.numel() ** 0.5
    assert abs(residual.mean() - offset) < 4 * standard_error, (residual.mean(), offset)
    torch.testing.assert_close(residual.var(), sigma**2, rtol=0.03, atol=0)


@pytest.mark.parametrize(
    ("purifier_class", "arguments", "calls"),
    [(TMA, {"depth": 60, "stride": 10}, 6), (DiffPure, {"level": 25}, 25), (DiffPure, {"level": 0}, 0)],
)
def test_reported_cost_is_the_number_of_unet_calls(
    denoiser: AdvRADModel, purifier_class: type, arguments: dict, calls: int
) -> None:
    purifier = purifier_class(denoiser, **arguments)
    counted = []
    handle = purifier.unet.register_forward_hook(lambda *_: counted.append(1))
    try:
        with torch.no_grad():
            purifier(torch.rand(2, 3, SIZE, SIZE))
    finally:
        handle.remove()
    assert len(counted) == calls == purifier.unet_evaluations


def test_ddim_timesteps() -> None:
    assert ddim_timesteps(140, 10) == list(range(140, -1, -10))
    assert ddim_timesteps(30, 30) == [30, 0]


def test_full_gradients_flow_through_the_chain_with_checkpointing(denoiser: AdvRADModel) -> None:
    images = torch.rand(1, 3, SIZE, SIZE, requires_grad=True)
    for checkpointing in (True, False):
        purifier = DiffPure(denoiser, level=3, gradient_checkpointing=checkpointing)
        torch.manual_seed(1)
        (gradient,) = torch.autograd.grad(purifier(images).sum(), images)
        assert gradient.abs().sum() > 0
        if checkpointing:
            with_checkpointing = gradient
    torch.testing.assert_close(with_checkpointing, gradient)
    assert all(not parameter.requires_grad for parameter in purifier.parameters()), "the purifier is frozen"


def test_bpda_gives_the_identity_jacobian(denoiser: AdvRADModel) -> None:
    images = torch.rand(1, 3, SIZE, SIZE, requires_grad=True)
    weights = torch.randn_like(images)
    (gradient,) = torch.autograd.grad((BPDA(TMA(denoiser, depth=20, stride=10))(images) * weights).sum(), images)
    torch.testing.assert_close(gradient, weights)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"level": 101}, "level must be an integer diffusion step with 0 <= level <= T = 100"),
        ({"level": -1}, "level must be"),
    ],
)
def test_diffpure_bad_level(denoiser: AdvRADModel, arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiffPure(denoiser, **arguments)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"depth": 101}, "depth must be an integer diffusion step"),
        ({"depth": 30, "stride": 7}, "stride must be a positive integer that divides the depth T\\* = 30"),
        ({"depth": 30, "stride": 0}, "stride must be a positive integer"),
        ({"eta": -0.1}, "eta must be a number >= 0"),
    ],
)
def test_tma_bad_arguments(denoiser: AdvRADModel, arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TMA(denoiser, **{"depth": 40, "stride": 10, **arguments})


def test_purifier_rejects_images_of_another_size_or_channel_count(denoiser: AdvRADModel) -> None:
    purifier = DiffPure(denoiser, level=5)
    with pytest.raises(ValueError, match=r"trained on images of shape \(C, H, W\) = \(3, 16, 16\); got .*32, 32"):
        purifier(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(3, 16, 16\); got a batch of shape \(1, 1, 16, 16\)"):
        purifier(torch.rand(1, 1, 16, 16))


def test_denoiser_argument_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="denoiser checkpoint .*missing.ckpt.* does not exist"):
        DiffPure(tmp_path / "missing.ckpt")
    with pytest.raises(TypeError, match="denoiser must be an AdvRAD checkpoint path"):
        DiffPure(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("purifier_class", "arguments", "steps"),
    [(DiffPure, {"level": 4}, 4), (TMA, {"depth": 20, "stride": 5}, 4)],
)
def test_a_chain_respaced_to_its_own_steps_is_the_chain_draw_for_draw(
    denoiser: AdvRADModel, purifier_class: type, arguments: dict, steps: int
) -> None:
    purifier = purifier_class(denoiser, **arguments)
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.manual_seed(3)
        real = purifier(images)
        torch.manual_seed(3)
        respaced = RespacedPurifier(purifier, steps)(images)
    torch.testing.assert_close(respaced, real)


@pytest.mark.parametrize(
    ("purifier_class", "arguments", "steps"),
    [(DiffPure, {"level": 25}, 5), (DiffPure, {"level": 5}, 1), (TMA, {"depth": 60, "stride": 10}, 2)],
)
def test_the_surrogate_chain_makes_its_own_number_of_unet_calls_and_has_a_gradient(
    denoiser: AdvRADModel, purifier_class: type, arguments: dict, steps: int
) -> None:
    surrogate = RespacedPurifier(purifier_class(denoiser, **arguments, gradient_checkpointing=False), steps)
    counted = []
    handle = surrogate.purifier.unet.register_forward_hook(lambda *_: counted.append(1))
    images = torch.rand(2, 3, SIZE, SIZE, requires_grad=True)
    try:
        (gradient,) = torch.autograd.grad(surrogate(images).sum(), images)
    finally:
        handle.remove()
    assert len(counted) == steps == surrogate.unet_evaluations
    assert gradient.abs().sum() > 0


def test_surrogate_arguments(denoiser: AdvRADModel) -> None:
    with pytest.raises(TypeError, match="the surrogate gradient respaces a diffusion chain"):
        RespacedPurifier(torch.nn.Identity(), 2)
    for steps in (0, 26, 2.5):
        with pytest.raises(ValueError, match=r"denoising_steps must be an integer in \[1, 25\]"):
            RespacedPurifier(DiffPure(denoiser, level=25), steps)


def test_automatic_checkpointing_follows_the_memory_the_chain_needs(
    denoiser: AdvRADModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    purifier = DiffPure(denoiser, level=3)
    images = torch.rand(2, 3, SIZE, SIZE, requires_grad=True)
    one_call = activation_bytes(purifier.unet, images)
    assert one_call == 2 * activation_bytes(purifier.unet, images[:1]) > 0
    checkpointed = []
    counting = lambda *args, **kwargs: checkpointed.append(1) or checkpoint(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(purifiers, "checkpoint", counting)
    gradients = []
    for free in (2 * 3 * one_call, 2 * 3 * one_call - 1):  # exactly enough for the chain's 3 calls, then 1 byte less
        monkeypatch.setattr(purifiers, "available_memory", lambda device, free=free: free)
        assert purifier.checkpointing_needed(images, purifier.unet_evaluations) is (free < 2 * 3 * one_call)
        torch.manual_seed(1)
        gradients.append(torch.autograd.grad(purifier(images).sum(), images)[0])
    assert len(checkpointed) == 3, "only the call that did not fit was checkpointed, at every U-Net call"
    torch.testing.assert_close(gradients[0], gradients[1])
    assert DiffPure(denoiser, level=3, gradient_checkpointing=False).checkpointing_needed(images, 10**9) is False
    with pytest.raises(ValueError, match="gradient_checkpointing must be True, False or 'auto'"):
        DiffPure(denoiser, level=3, gradient_checkpointing="always")
