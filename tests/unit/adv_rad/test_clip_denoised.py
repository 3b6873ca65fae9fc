"""``clip_denoised``: multi-step samplers clamp the predicted x_0 to [-1, 1] (as ``improved-diffusion``)."""

from collections.abc import Callable

import pytest
import torch
from shared_artifacts import TINY_ADVRAD

from anomalib_robust.defenses import TMA, DiffPure
from anomalib_robust.defenses.chains import ddim_purification, ddpm_purification
from anomalib_robust.models.adv_rad.diffusion import (
    DiffusionSchedule,
    p_mean_variance,
    predict_x0,
    q_posterior,
    q_sample,
)
from anomalib_robust.models.adv_rad.reconstruction import arbitrary_shot
from anomalib_robust.models.adv_rad.torch_model import AdvRADModel

SCHEDULE = DiffusionSchedule.from_name("linear", 100)


def _huge_noise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A U-Net predicting eps = -50 x_t (so x0_hat is far outside [-1, 1]) and v = 0."""
    del t
    return torch.cat([-50 * x, torch.zeros_like(x)], dim=1)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1, torch.randn(2, 3, 8, 8, generator=generator)


def test_clipping_bounds_the_x0_of_the_posterior_mean() -> None:
    x, noise = _inputs()
    t = torch.tensor([40, 40])
    xt = q_sample(SCHEDULE, x, t, noise)
    unclipped = p_mean_variance(SCHEDULE, _huge_noise(xt, t), xt, t)
    clipped = p_mean_variance(SCHEDULE, _huge_noise(xt, t), xt, t, clip_denoised=True)
    assert unclipped.x0.abs().max() > 10
    assert clipped.x0.min() >= -1 and clipped.x0.max() <= 1
    torch.testing.assert_close(clipped.x0, unclipped.x0.clamp(-1, 1))
    torch.testing.assert_close(clipped.mean, q_posterior(SCHEDULE, clipped.x0, xt, t)[0])
    torch.testing.assert_close(clipped.log_variance, unclipped.log_variance)


def test_arbitrary_shot_without_clipping_is_the_unclipped_ancestral_chain() -> None:
    """S = (30, 10): one ancestral step with the respaced schedule, then the predicted x_0, nothing clamped."""
    x, noise = _inputs()
    respaced = SCHEDULE.respaced([9, 29])
    xt = q_sample(SCHEDULE, x, torch.tensor([29, 29]), noise)
    prediction = p_mean_variance(respaced, _huge_noise(xt, None), xt, torch.tensor([1, 1]))
    z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(1))
    xt = prediction.mean + torch.exp(0.5 * prediction.log_variance) * z
    expected = predict_x0(respaced, xt, torch.tensor([0, 0]), _huge_noise(xt, None).chunk(2, dim=1)[0])
    result = arbitrary_shot(
        _huge_noise, SCHEDULE, x, [30, 10], noise, torch.Generator().manual_seed(1), clip_denoised=False
    )
    torch.testing.assert_close(result, expected)
    assert result.abs().max() > 1


@pytest.mark.parametrize(
    "chain",
    [
        lambda x, noise, clip: arbitrary_shot(_huge_noise, SCHEDULE, x, [30, 20, 10], noise, clip_denoised=clip),
        lambda x, noise, clip: ddpm_purification(_huge_noise, SCHEDULE, x, 10, noise, clip_denoised=clip),
        lambda x, noise, clip: ddim_purification(_huge_noise, SCHEDULE, x, 20, 5, 1.0, noise, clip_denoised=clip),
    ],
    ids=["arbitrary_shot", "diffpure", "tma"],
)
def test_clipped_chains_return_images_in_range(
    chain: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor],
) -> None:
    x, noise = _inputs()
    torch.manual_seed(0)
    assert chain(x, noise, False).abs().max() > 1
    clipped = chain(x, noise, True)
    assert torch.isfinite(clipped).all()
    assert clipped.min() >= -1 and clipped.max() <= 1


def test_ddim_clipping_rederives_eps_from_the_clamped_x0() -> None:
    """Deterministic DDIM (eta = 0) over tau = (20, 10, 0): x_10 = sqrt(abar_10) x0c + sqrt(1 - abar_10) eps(x0c)."""
    x, noise = _inputs()
    xt = q_sample(SCHEDULE, x, torch.tensor([19, 19]), noise)
    now, then = SCHEDULE.alphas_cumprod[19], SCHEDULE.alphas_cumprod[9]
    x0 = predict_x0(SCHEDULE, xt, torch.tensor([19, 19]), _huge_noise(xt, None).chunk(2, dim=1)[0]).clamp(-1, 1)
    eps = (xt - now.sqrt() * x0) / (1 - now).sqrt()
    x10 = then.sqrt() * x0 + (1 - then).sqrt() * eps
    x0_last = predict_x0(SCHEDULE, x10, torch.tensor([9, 9]), _huge_noise(x10, None).chunk(2, dim=1)[0])
    result = ddim_purification(_huge_noise, SCHEDULE, x, 20, 10, 0.0, noise, clip_denoised=True)
    torch.testing.assert_close(result, x0_last.clamp(-1, 1))


@pytest.mark.parametrize("clip", [False, True])
def test_purifiers_pass_the_option_to_their_chains(clip: bool) -> None:
    torch.manual_seed(0)
    model = AdvRADModel(**{**TINY_ADVRAD, "image_size": (8, 8)}).eval()

    def unet(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.unet(x, t).sample

    x = torch.rand(2, 3, 8, 8) * 2 - 1
    cases = [
        (
            DiffPure(model, level=10, clip_denoised=clip),
            lambda: ddpm_purification(unet, model.schedule, x, 10, clip_denoised=clip),
        ),
        (
            TMA(model, depth=20, stride=5, clip_denoised=clip),
            lambda: ddim_purification(unet, model.schedule, x, 20, 5, 1.0, clip_denoised=clip),
        ),
    ]
    with torch.no_grad():
        for purifier, chain in cases:
            torch.manual_seed(1)
            purified = purifier.chain(x)
            torch.manual_seed(1)
            torch.testing.assert_close(purified, chain())
            assert ("clip_denoised=True" in repr(purifier)) == clip  # report names show the option only when on


@pytest.mark.parametrize("reconstruction", ["arbitrary_shot", "full_shot"])
def test_advrad_clamps_its_multi_step_reconstruction_when_asked(
    reconstruction: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``AdvRAD(clip_denoised=...)`` reaches the chain of Alg. 2 and 3 (an init arg, so also ``--model.clip_denoised``)."""
    schedule = [10, 5] if reconstruction == "arbitrary_shot" else None
    settings = {**TINY_ADVRAD, "image_size": (8, 8), "reconstruction": reconstruction, "step_schedule": schedule}
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    reconstructions = {}
    for clip in (False, True):
        model = AdvRADModel(**settings, clip_denoised=clip).eval()
        monkeypatch.setattr(model, "denoise", _huge_noise)
        reconstructions[clip] = model.reconstruct(images, generator=torch.Generator().manual_seed(1))
    assert reconstructions[False].min() < 0 or reconstructions[False].max() > 1
    assert reconstructions[True].min() >= 0 and reconstructions[True].max() <= 1
