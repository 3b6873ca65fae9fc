"""AGDM (the AGDM paper, Lin et al.): the guided chain (Alg. 1) against DiffPure and closed forms in both guidance
modes, the measured guidance-to-noise ratios, the guidance's effect on the purified features (eq. 4) with a trained
denoiser and guidance network, gradients through the guidance, the guidance network's training (eq. 6) on the pairs
Alg. 1 compares, its checkpoints and bad input."""

import copy
import functools
import logging
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from shared_artifacts import TINY_ADVRAD

from anomalib_robust import AdvRAD
from anomalib_robust.data import FashionMNIST
from anomalib_robust.defenses import AGDM, DiffPure
from anomalib_robust.defenses.agdm import GUIDANCE_RATIO
from anomalib_robust.defenses.chains import fixed_scale_shift, guidance_shift, guided_ddpm_purification
from anomalib_robust.models import AGDMGuidance
from anomalib_robust.models.adv_rad.diffusion import DiffusionSchedule, q_sample
from anomalib_robust.models.adv_rad.torch_model import AdvRADModel
from anomalib_robust.models.agdm_guidance.lightning_model import ARCHITECTURE_KEY
from anomalib_robust.models.agdm_guidance.loss import diffuse, trades_perturbation
from anomalib_robust.models.agdm_guidance.torch_model import NORMAL, PSEUDO_ANOMALOUS, consistency_divergence

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


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny AdvRAD (the denoiser) and guidance network, each trained 12 steps on the embedded Fashion-MNIST (the
    pre-processors resize the 32 px images to 16), a checkpoint of the guidance network, and 8 training images."""
    root = tmp_path_factory.mktemp("agdm")
    torch.manual_seed(0)
    datamodule = FashionMNIST(root="embedded", image_size=32, num_train=32, num_test=8, train_batch_size=8,
                              eval_batch_size=8)  # fmt: skip
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader())).image
    denoiser = AdvRAD(**{**TINY_ADVRAD, "image_size": (SIZE, SIZE)}, evaluator=False, visualizer=False)
    guidance = AGDMGuidance(**{**TINY_GUIDANCE, "base_channels": 16})
    torch.manual_seed(1)
    before = guidance.losses(batch)
    for name, model in (("denoiser", denoiser), ("guidance", guidance)):
        engine = Engine(default_root_dir=root / name, max_steps=12, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        engine.fit(model, datamodule=datamodule)
    engine.trainer.save_checkpoint(root / "guidance.ckpt")
    torch.manual_seed(1)
    after = guidance.losses(batch)
    images = guidance.pre_processor(batch)
    return {"denoiser": denoiser, "guidance": guidance, "checkpoint": root / "guidance.ckpt", "images": images,
            "losses": (before, after)}  # fmt: skip


def _seeded(purifier: torch.nn.Module, images: torch.Tensor, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return purifier(images)


def test_ratio_zero_is_diffpure_draw_for_draw(denoiser: AdvRADModel, guidance: AGDMGuidance) -> None:
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        diffpure = _seeded(DiffPure(denoiser, level=10), images)
        unguided = _seeded(AGDM(denoiser, guidance, depth=10, guidance_ratio=0.0), images)
        guided = _seeded(AGDM(denoiser, guidance, depth=10), images)
    torch.testing.assert_close(unguided, diffpure, atol=1e-5, rtol=0)
    assert (guided - diffpure).abs().max() > 1e-2, "the default guidance must move the purified images"


@pytest.mark.parametrize("mode", ["ratio", "fixed_scale"])
def test_one_guided_step_is_the_shifted_mean(mode: str) -> None:
    """Level 1 with an oracle denoiser (true noise, v = 0): x_0 = x + s_1 * Sigma_1 * g, Sigma_1 the learned variance;
    the AGDM paper's fixed s = 0.3, or s_1 such that the shift's norm is 0.3 times the norm of the step's noise,
    sqrt(Sigma_1 * pixels)."""
    schedule = DiffusionSchedule.from_name("linear", 100)
    x, noise, g = torch.rand(1, 3, 4, 4) * 2 - 1, torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    alpha_bar = schedule.alphas_cumprod[0]

    def oracle(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([(xt - alpha_bar.sqrt() * x) / (1 - alpha_bar).sqrt(), torch.zeros_like(xt)], dim=1)

    rule = {"ratio": guidance_shift, "fixed_scale": fixed_scale_shift}[mode]
    shift = functools.partial(rule, **{"ratio" if mode == "ratio" else "scale": 0.3})
    out = guided_ddpm_purification(oracle, schedule, x, 1, lambda xt, t: g, shift, noise=noise)
    variance = (0.5 * schedule.betas[0].log() + 0.5 * schedule.posterior_log_variance[0]).exp()
    expected = 0.3 * (variance * g.numel()).sqrt() * g / g.norm() if mode == "ratio" else 0.3 * variance * g
    torch.testing.assert_close(out, x + expected, atol=1e-5, rtol=1e-5)


def test_each_mode_measures_and_logs_its_guidance_to_noise_ratio(
    trained: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """``guidance_to_noise`` holds every reverse step's shift over the norm of its noise sqrt(Sigma), per image: the
    default ratio gives 0.5 at every step; the paper's fixed s gives whatever the network's gradient makes it, with
    the trained tiny networks under 1e-3 (logged as inert), and doubling s doubles the first step's (same seed: the
    same x_{t*})."""
    denoiser, guidance, images = trained["denoiser"], trained["guidance"], trained["images"][:4]
    purifiers = {"ratio": AGDM(denoiser, guidance, depth=10),
                 "paper": AGDM(denoiser, guidance, depth=10, guidance_mode="fixed_scale"),
                 "double": AGDM(denoiser, guidance, depth=10, guidance_mode="fixed_scale", guidance_scale=2.0)}
    caplog.set_level(logging.INFO)
    with torch.no_grad():
        for purifier in purifiers.values():
            _seeded(purifier, images)
    ratios = {name: purifier.guidance_to_noise for name, purifier in purifiers.items()}
    assert purifiers["ratio"].guidance_ratio == GUIDANCE_RATIO == 0.5 and ratios["ratio"].shape == (10, 4)
    torch.testing.assert_close(ratios["ratio"], torch.full((10, 4), 0.5), atol=1e-4, rtol=0)
    assert 0 < ratios["paper"].max() < 1e-3
    torch.testing.assert_close(ratios["double"][0], 2 * ratios["paper"][0])
    assert "AGDM(depth=10, guidance_ratio=0.5): the guidance moved each reverse step by 0.5 to 0.5" in caplog.text
    assert "AGDM(depth=10, guidance_scale=1.0): the guidance moved each reverse step by" in caplog.text
    assert "(inert: this is DiffPure's chain)" in caplog.text
    unguided = AGDM(denoiser, guidance, depth=10, guidance_mode="fixed_scale", guidance_scale=0.0)
    with torch.no_grad():
        torch.testing.assert_close(_seeded(unguided, images), _seeded(DiffPure(denoiser, level=10), images))
    assert unguided.guidance_to_noise is None


def test_trained_guidance_pulls_the_purified_features_towards_the_inputs(trained: dict) -> None:
    """With a trained denoiser and guidance network, the consistency term (eq. 4) lowers D(f(x', 0), f(purified, 0))
    of every image below its unguided value with the same noise draws (measured: 0.04 against 0.21 on average), and
    the network's D between an image and its own copy diffused to t* is below D between two different images (the
    target the guidance pulls towards is the input); the label term raises log p(normal | purified)."""
    denoiser, guidance, images = trained["denoiser"], trained["guidance"], trained["images"]
    network, clean = guidance.model, torch.zeros(len(images), dtype=torch.long)
    purifiers = {"none": AGDM(denoiser, guidance, depth=10, guidance_ratio=0.0),
                 "consistency": AGDM(denoiser, guidance, depth=10),
                 "label": AGDM(denoiser, guidance, depth=10, label_guidance=True)}  # fmt: skip
    with torch.no_grad():
        reference = network.features(images, clean)
        outputs = {name: _seeded(purifier, images) for name, purifier in purifiers.items()}
        divergence = {name: consistency_divergence(reference, network.features(out, clean))
                      for name, out in outputs.items()}  # fmt: skip
        normal = {name: network.logits(out, clean).log_softmax(dim=1)[:, NORMAL].mean()
                  for name, out in outputs.items()}  # fmt: skip
        steps = torch.full_like(clean, 10)
        diffused = diffuse(guidance.schedule, images, steps, torch.randn_like(images))
        own = consistency_divergence(reference, network.features(diffused, steps))
        others = consistency_divergence(reference, reference.roll(1, dims=0))
    assert (divergence["consistency"] < divergence["none"]).all(), divergence
    assert divergence["consistency"].mean() < 0.5 * divergence["none"].mean(), divergence
    assert own.mean() < 0.5 * others.mean(), (own, others)
    assert normal["label"] > normal["consistency"] + 1e-3


def test_full_gradients_match_finite_differences_through_the_guidance(
    denoiser: AdvRADModel, guidance: AGDMGuidance
) -> None:
    """In float64 with common random numbers, autograd's directional derivative equals the central difference. At the
    default ratio the guidance's own derivative is about half the gradient (46 % of its norm): an attack that took
    the guidance gradient as a constant (no ``create_graph``) fails this check."""
    purifier = AGDM(copy.deepcopy(denoiser), guidance, depth=10).double()
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
    assert purifier.stochastic and purifier.extra_repr() == "depth=7, guidance_ratio=0.5"
    paper = AGDM(denoiser, guidance, depth=7, guidance_mode="fixed_scale")
    assert paper.extra_repr() == "depth=7, guidance_scale=1.0", "the reported name says which guidance it had"


def test_guidance_network_is_step_conditioned_and_scores_patches(guidance: AGDMGuidance) -> None:
    """f_phi's features depend on the diffusion step; as a detector it maps the per-patch log-odds of "pseudo-anomalous"
    at step 0 to the image and scores an image by their maximum."""
    network, images = guidance.model, torch.rand(2, 3, SIZE, SIZE)
    steps = torch.zeros(2, dtype=torch.long)
    assert not torch.allclose(network.features(images, steps), network.features(images, steps + 10))
    logits = network.logits(images, steps)
    assert logits.shape == (2, 2, SIZE // 2, SIZE // 2), "per-patch logits, not two pooled ones"
    prediction = network(images)
    log_odds = logits[:, PSEUDO_ANOMALOUS] - logits[:, NORMAL]
    torch.testing.assert_close(prediction.pred_score, log_odds.flatten(1).amax(dim=1))
    assert prediction.anomaly_map.shape == (2, SIZE, SIZE)


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

    def embed(batch: torch.Tensor) -> torch.Tensor:
        return network.features(batch, steps)

    clean_features = embed(images)
    eps = 8 / 255
    adversarial = trades_perturbation(embed, images, clean_features, eps, steps=5, step_size=2 / 255)
    assert (adversarial - images).abs().max() <= eps + 1e-6 and adversarial.min() >= 0 and adversarial.max() <= 1
    start = consistency_divergence(clean_features, embed(images + 1e-3 * torch.randn_like(images)))
    assert (consistency_divergence(clean_features, embed(adversarial)) > start).all()


def test_guidance_network_trains_and_round_trips(tmp_path: Path, trained: dict, denoiser: AdvRADModel) -> None:
    """eq. (6) on the embedded Fashion-MNIST: the loss fell over the 12 training steps; the checkpoint rebuilds the
    network's architecture and the purifier loads it from the path; a checkpoint of an earlier version (no version
    entry: 1) fails, saying what changed."""
    before, after = trained["losses"]
    assert after["loss"] < before["loss"] and set(after) == {"classification", "consistency", "loss"}
    model, path = trained["guidance"], trained["checkpoint"]
    loaded = AGDMGuidance.load_from_checkpoint(path)
    images, steps = torch.rand(2, 3, SIZE, SIZE), torch.tensor([0, 7])
    torch.testing.assert_close(loaded.model.logits(images, steps), model.model.logits(images, steps))
    purifier = AGDM(denoiser, path, depth=5)
    torch.testing.assert_close(purifier.network.features(images, steps), model.model.features(images, steps))
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint[ARCHITECTURE_KEY]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="architecture 1, this version needs 3: version 2 replaced the two-class"):
        AGDM(denoiser, tmp_path / "old.ckpt")


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"depth": 101}, ValueError, "depth must be an integer diffusion step with 0 <= depth <= T = 100"),
        ({"depth": 0}, ValueError, r"depth \(t\* of Alg. 1\) must be in \[1, T = 100\], got 0"),
        ({"guidance_ratio": -1.0}, ValueError, "guidance_ratio must be a finite number >= 0, got -1.0"),
        ({"guidance_scale": -1.0}, ValueError, "guidance_scale must be a finite number >= 0, got -1.0"),
        ({"guidance_mode": "paper"}, ValueError, "guidance_mode must be 'ratio' .* or 'fixed_scale' .* got 'paper'"),
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
