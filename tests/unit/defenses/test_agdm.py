"""AGDM (the AGDM paper, Lin et al.): the guided chain (Alg. 1) against DiffPure and a closed form, the guidance's
effect, gradients through the guidance, the guidance network's training (eq. 6) and bad input."""

import copy
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from shared_artifacts import TINY_ADVRAD

from anomalib_robust.data import FashionMNIST
from anomalib_robust.defenses import AGDM, DiffPure
from anomalib_robust.defenses.chains import guided_ddpm_purification
from anomalib_robust.models import AGDMGuidance
from anomalib_robust.models.adv_rad.diffusion import DiffusionSchedule, q_sample
from anomalib_robust.models.adv_rad.torch_model import AdvRADModel
from anomalib_robust.models.agdm_guidance.loss import diffuse, trades_perturbation
from anomalib_robust.models.agdm_guidance.torch_model import NORMAL, consistency_divergence

SIZE = 16
TINY_GUIDANCE = {"image_size": (SIZE, SIZE), "base_channels": 8, "num_levels": 2, "max_noise_step": 20,
                 "num_timesteps": 100, "attack_steps": 2}  # fmt: skip


@pytest.fixture(scope="module")
def denoiser() -> AdvRADModel:
    torch.manual_seed(0)
    return AdvRADModel(**{**TINY_ADVRAD, "image_size": (SIZE, SIZE)}).eval()


@pytest.fixture(scope="module")
def guidance() -> AGDMGuidance:
    torch.manual_seed(0)
    return AGDMGuidance(**TINY_GUIDANCE)


def _seeded(purifier: torch.nn.Module, images: torch.Tensor, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return purifier(images)


def test_scale_zero_is_diffpure_draw_for_draw(denoiser: AdvRADModel, guidance: AGDMGuidance) -> None:
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        diffpure = _seeded(DiffPure(denoiser, level=10), images)
        unguided = _seeded(AGDM(denoiser, guidance, depth=10, scale=0.0), images)
        guided = _seeded(AGDM(denoiser, guidance, depth=10, scale=1e4), images)
    torch.testing.assert_close(unguided, diffpure, atol=1e-5, rtol=0)
    assert (guided - diffpure).abs().max() > 1e-3, "a large scale must move the purified images"


def test_one_guided_step_is_the_shifted_mean() -> None:
    """Level 1 with an oracle denoiser (true noise, v = 0): x_0 = x + s * Sigma_1 * g, Sigma_1 the learned variance."""
    schedule = DiffusionSchedule.from_name("linear", 100)
    x, noise, g = torch.rand(1, 3, 4, 4) * 2 - 1, torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    alpha_bar = schedule.alphas_cumprod[0]

    def oracle(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([(xt - alpha_bar.sqrt() * x) / (1 - alpha_bar).sqrt(), torch.zeros_like(xt)], dim=1)

    out = guided_ddpm_purification(oracle, schedule, x, 1, lambda xt, t: g, scale=3.0, noise=noise)
    variance = (0.5 * schedule.betas[0].log() + 0.5 * schedule.posterior_log_variance[0]).exp()
    torch.testing.assert_close(out, x + 3.0 * variance * g, atol=1e-5, rtol=1e-5)


def test_guidance_pulls_the_output_towards_the_inputs_guidance_output(
    denoiser: AdvRADModel, guidance: AGDMGuidance
) -> None:
    """The consistency term lowers D(f(x'), f(purified)); the label term raises log p(normal | purified)."""
    images = torch.rand(8, 3, SIZE, SIZE)
    network = guidance.model
    with torch.no_grad():
        reference = network.logits(images)
        outputs = {name: _seeded(AGDM(denoiser, guidance, depth=10, **arguments), images)
                   for name, arguments in {"none": {"scale": 0.0}, "consistency": {"scale": 1e4},
                                           "label": {"scale": 1e4, "label_guidance": True}}.items()}  # fmt: skip
        divergence = {name: consistency_divergence(reference, network.logits(out)).mean()
                      for name, out in outputs.items()}  # fmt: skip
        normal = {name: network.logits(out).log_softmax(dim=1)[:, NORMAL].mean() for name, out in outputs.items()}
    assert divergence["consistency"] < 0.7 * divergence["none"]
    assert normal["label"] > normal["consistency"] + 1e-3


def test_full_gradients_match_finite_differences_through_the_guidance(
    denoiser: AdvRADModel, guidance: AGDMGuidance
) -> None:
    """In float64 with common random numbers, autograd's directional derivative equals the central difference. At this
    scale the guidance's own derivative is ~8 % of the gradient: an attack that took the guidance gradient as a
    constant (no ``create_graph``) fails this check."""
    purifier = AGDM(copy.deepcopy(denoiser), guidance, depth=10, scale=1e4).double()
    images = torch.rand(1, 3, SIZE, SIZE, dtype=torch.float64) * 0.8 + 0.1
    direction = torch.randn_like(images)
    direction /= direction.norm()
    weights = torch.randn_like(images)

    def objective(x: torch.Tensor) -> torch.Tensor:
        return (_seeded(purifier, x, seed=3) * weights).sum()

    probe = images.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(objective(probe), probe)
    step = 1e-5
    with torch.no_grad():
        finite = (objective(images + step * direction) - objective(images - step * direction)) / (2 * step)
    assert (gradient * direction).sum().item() == pytest.approx(finite.item(), rel=1e-3)


def test_purifies_in_inference_mode_at_its_stated_cost(denoiser: AdvRADModel, guidance: AGDMGuidance) -> None:
    """anomalib tests under ``torch.inference_mode``: the guidance gradients must still be computed there."""
    purifier = AGDM(denoiser, guidance, depth=7)
    images = torch.rand(2, 3, SIZE, SIZE)
    calls = []
    hook = purifier.unet.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        first, second = purifier(images), purifier(images)
    hook.remove()
    assert first.shape == images.shape and 0 <= first.min() and first.max() <= 1
    assert not torch.equal(first, second), "fresh diffusion noise at every call"
    assert len(calls) == 2 * purifier.unet_evaluations == 14
    assert purifier.stochastic and purifier.extra_repr() == "depth=7, scale=1.0"


def test_diffuse_and_the_trades_perturbation() -> None:
    schedule = DiffusionSchedule.from_name("linear", 100)
    images, noise = torch.rand(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    steps = torch.tensor([0, 1, 50])
    diffused = diffuse(schedule, images, steps, noise)
    torch.testing.assert_close(diffused[0], images[0])
    expected = (q_sample(schedule, images[1:] * 2 - 1, steps[1:] - 1, noise[1:]) + 1) / 2
    torch.testing.assert_close(diffused[1:], expected)
    torch.manual_seed(0)
    network = AGDMGuidance(image_size=(8, 8), in_channels=1, base_channels=8, num_levels=2).model
    clean_logits = network.logits(images)
    eps = 8 / 255
    adversarial = trades_perturbation(network.logits, images, clean_logits, eps, steps=5, step_size=2 / 255)
    assert (adversarial - images).abs().max() <= eps + 1e-6 and adversarial.min() >= 0 and adversarial.max() <= 1
    start = consistency_divergence(clean_logits, network.logits(images + 1e-3 * torch.randn_like(images)))
    assert (consistency_divergence(clean_logits, network.logits(adversarial)) > start).all()


def test_guidance_network_trains_and_round_trips(tmp_path: Path, denoiser: AdvRADModel) -> None:
    """eq. (6) on the embedded Fashion-MNIST: the loss falls over 12 steps; the checkpoint rebuilds the network's
    architecture and the purifier loads it from the path."""
    torch.manual_seed(0)
    datamodule = FashionMNIST(root="embedded", image_size=32, num_train=32, num_test=8, train_batch_size=8,
                              eval_batch_size=8)  # fmt: skip
    model = AGDMGuidance(**{**TINY_GUIDANCE, "base_channels": 16})  # the pre-processor resizes the 32 px images
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader())).image
    torch.manual_seed(1)
    before = model.losses(batch)
    engine = Engine(default_root_dir=tmp_path, max_steps=12, limit_val_batches=0, logger=False,
                    enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    torch.manual_seed(1)
    after = model.losses(batch)
    assert after["loss"] < before["loss"] and set(after) == {"classification", "consistency", "loss"}
    engine.trainer.save_checkpoint(tmp_path / "guidance.ckpt")
    loaded = AGDMGuidance.load_from_checkpoint(tmp_path / "guidance.ckpt")
    images = torch.rand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(loaded.model.logits(images), model.model.logits(images))
    purifier = AGDM(denoiser, tmp_path / "guidance.ckpt", depth=5)
    torch.testing.assert_close(purifier.network.logits(images), model.model.logits(images))


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"depth": 101}, ValueError, "depth must be an integer diffusion step with 0 <= depth <= T = 100"),
        ({"depth": 0}, ValueError, r"depth \(t\* of Alg. 1\) must be in \[1, T = 100\], got 0"),
        ({"scale": -1.0}, ValueError, "scale must be a finite number >= 0, got -1.0"),
        ({"guidance": "missing.ckpt"}, FileNotFoundError, "guidance checkpoint 'missing.ckpt' does not exist"),
        ({"guidance": torch.nn.Linear(2, 2)}, TypeError, "guidance must be an AGDMGuidance checkpoint path"),
    ],
)
def test_bad_input(denoiser: AdvRADModel, guidance: AGDMGuidance, arguments: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        AGDM(denoiser, **{"guidance": guidance, **arguments})


def test_guidance_must_match_the_denoisers_channels_and_settings(
    denoiser: AdvRADModel, guidance: AGDMGuidance, caplog: pytest.LogCaptureFixture
) -> None:
    AGDM(denoiser, guidance, depth=20)
    assert "noise level" not in caplog.text, "trained to step 20 of the same schedule"
    AGDM(denoiser, guidance, depth=21)
    assert "depth t* = 21 diffuses to noise level 0.602, beyond the 0.57" in caplog.text
    with pytest.raises(ValueError, match="guidance network takes 1-channel images, the denoiser 3-channel ones"):
        AGDM(denoiser, AGDMGuidance(**{**TINY_GUIDANCE, "in_channels": 1}))
    with pytest.raises(ValueError, match=r"trained on \(32, 32\) images, the denoiser on \(16, 16\).*size \[16, 16\]"):
        AGDM(denoiser, AGDMGuidance(**{**TINY_GUIDANCE, "image_size": (32, 32)}))
    for arguments, message in [({"max_noise_step": 101}, "max_noise_step must be an integer diffusion step"),
                               ({"robust_weight": -1}, "robust_weight"), ({"attack_steps": 0}, "attack_steps")]:
        with pytest.raises(ValueError, match=message):
            AGDMGuidance(**{**TINY_GUIDANCE, **arguments})
