"""RAP (the RAP paper): the forward process (Alg. 1), the reverse process, its cost and its attack direction (Alg. 2),
the adapter's training attacks and score hinges (Alg. 3), the purifier in front of a detector (gradients, BPDA,
mismatch warning) and bad input."""

import copy
import warnings
from pathlib import Path

import pytest
import torch
from anomalib.data import InferenceBatch
from anomalib.engine import Engine
from anomalib.models import Padim

from anomalib_robust.attacks import BPDA, DetectorScore
from anomalib_robust.attacks.pgd import project
from anomalib_robust.attacks.unmasking import unmasked_gradients
from anomalib_robust.data import FashionMNIST
from anomalib_robust.defenses import RAP, DetectorMismatchWarning, Purified
from anomalib_robust.evaluation.gradient_check import check_gradient
from anomalib_robust.models import RAPAdapter
from anomalib_robust.models.rap_adapter import RAPAdapterModel
from anomalib_robust.models.rap_adapter.process import (
    decision_direction,
    defended_objective,
    detector_score,
    forward_process,
    reverse_process,
    score_hinge,
    timesteps,
    unet_calls,
)

SIZE = 32
TINY = {"image_size": (SIZE, SIZE), "base_channels": 32, "channel_mult": (1,), "steps": 2}


def _padim() -> Padim:
    return Padim(backbone="resnet18", pre_trained=False, layers=["layer1"], n_features=16,
                 pre_processor=Padim.configure_pre_processor((SIZE, SIZE)))  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two tiny Padims fitted on different Fashion-MNIST classes, and a RAP adapter trained 2 steps on the first."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("rap")
    data = {"root": "embedded", "image_size": SIZE, "num_train": 8, "num_test": 8, "train_batch_size": 4,
            "eval_batch_size": 4}  # fmt: skip
    datamodule, other = FashionMNIST(category=0, **data), FashionMNIST(category=1, **data)
    padim, other_padim = _padim(), _padim()
    engine = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    Engine(default_root_dir=root / "padim", **engine).fit(padim, datamodule=datamodule)
    Engine(default_root_dir=root / "other", **engine).fit(other_padim, datamodule=other)
    adapter = RAPAdapter(detector=padim, **TINY)
    trainer = Engine(default_root_dir=root / "rap", max_steps=2, limit_val_batches=0, **engine)
    trainer.fit(adapter, datamodule=datamodule)
    checkpoint = root / "rap.ckpt"
    trainer.trainer.save_checkpoint(checkpoint)
    images = next(iter(datamodule.test_dataloader()))
    return {"padim": padim.eval(), "other": other_padim.eval(), "adapter": adapter, "checkpoint": checkpoint,
            "datamodule": datamodule, "batch": images}  # fmt: skip


class Linear(torch.nn.Module):
    """A toy detector whose raw score is ``<w, x> + offset``: its gradient sign is known everywhere."""

    def __init__(self, weights: torch.Tensor, offset: float = 0.0) -> None:
        super().__init__()
        self.weights, self.offset = weights, offset

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        return InferenceBatch(pred_score=(images * self.weights).flatten(1).sum(dim=1) + self.offset)


def _shifting_adapter(detector: Padim, shift: float, offset: float = 0.0) -> RAPAdapter:
    """A RAPAdapter in front of the mean-brightness detector (plus ``offset``) whose adapter adds ``shift`` to every
    pixel (the U-Net's zero last convolution with bias ``shift``): ``A(f~(x, t)) = mean(clamp(x + shift))``."""
    torch.manual_seed(0)
    adapter = RAPAdapter(detector=detector, **TINY)
    adapter.detector_model = Linear(torch.full((3, SIZE, SIZE), 1 / (3 * SIZE**2)), offset)
    adapter.detector_pre_processor = None
    adapter.model.unet.conv_out.bias.data.fill_(shift)
    return adapter


def _non_identity(adapter: RAPAdapterModel, std: float = 0.3) -> RAPAdapterModel:
    """``adapter`` with a random last convolution, so that the defended and the bare detector differ."""
    torch.nn.init.normal_(adapter.unet.conv_out.weight, std=std)
    return adapter.eval()


def _defended_score(detector: Padim, adapter: RAPAdapterModel, images: torch.Tensor) -> torch.Tensor:
    """``A(f~(x, T))``: the one-step defended detector's raw score."""
    return detector_score(detector.pre_processor, detector.model, adapter(images, adapter.steps).clamp(0.0, 1.0))


def test_forward_process_is_alg1_step_by_step() -> None:
    """Start noise in (-c, c), then t steps x <- Clamp(x + lambda sign(grad)), per image its own t (Alg. 3 line 4)."""
    torch.manual_seed(0)
    x0 = torch.rand(3, 1, 6, 6)
    weights = torch.randn(1, 1, 6, 6)
    eps, step_size, c = 0.1, 0.03, 0.05
    steps = torch.tensor([0, 1, 4])
    generator = torch.Generator().manual_seed(1)
    xt = forward_process(lambda x: Linear(weights)(x).pred_score, x0, steps, eps, step_size, c, generator)
    zeta = torch.rand(x0.shape, generator=torch.Generator().manual_seed(1)) * 2 * c - c
    expected = project(x0 + zeta, x0, eps, "Linf")
    assert (expected - x0).abs().max() <= c + 1e-7
    for index, count in enumerate(steps.tolist()):
        sample = expected[index]
        for _ in range(count):
            sample = project(sample + step_size * weights[0].sign(), x0[index], eps, "Linf")
        torch.testing.assert_close(xt[index], sample)
    assert not torch.equal(xt[2], xt[1])


def test_forward_process_stays_in_the_ball_and_raises_normal_scores(fitted: dict) -> None:
    """Alg. 1 on the defended detector (an untrained adapter: the identity) raises the score of normal images."""
    padim, batch = fitted["padim"], fitted["batch"]
    normal = batch.image[batch.gt_label == 0]
    adapter = RAPAdapterModel(**TINY).eval()
    eps = 4 / 255
    direction = torch.ones(normal.shape[0])
    objective = defended_objective(adapter, 2, padim.pre_processor, padim.model, direction)
    xt = forward_process(objective, normal, 3, eps=eps, step_size=1 / 255, start_noise=2 / 255)
    assert (xt - normal).abs().max() <= eps + 1e-6
    assert xt.min() >= 0 and xt.max() <= 1
    with torch.no_grad():
        before = detector_score(padim.pre_processor, padim.model, normal)
        after = detector_score(padim.pre_processor, padim.model, xt)
    assert (after > before).all(), (before, after)


def test_inference_cost_in_unet_calls(fitted: dict) -> None:
    """One step: 1 U-Net call per image; Alg. 2 in full: T + T (T - 1) / 2 (each inner attack step calls it once)."""
    assert timesteps(20, 1) == [20, 0]
    assert timesteps(4, 4) == [4, 3, 2, 1, 0]
    assert timesteps(6, 3) == [6, 4, 2, 0]
    assert (unet_calls(20, 1), unet_calls(20, 20), unet_calls(6, 3)) == (1, 210, 3 + 4 + 2)
    calls = []
    for inference_steps in (1, 2):
        rap = RAP(fitted["adapter"], inference_steps=inference_steps)
        Purified(fitted["padim"], rap)
        handle = rap.adapter.unet.register_forward_hook(lambda *_: calls.append(1))
        with torch.no_grad():
            rap(fitted["batch"].image[:2])
        handle.remove()
        assert len(calls) == rap.unet_evaluations == (1 if inference_steps == 1 else 3), inference_steps
        calls.clear()


def test_reverse_process_needs_the_attack_beyond_one_step() -> None:
    adapter = RAPAdapterModel(**TINY)
    x = torch.rand(1, 3, SIZE, SIZE)
    assert torch.equal(reverse_process(adapter, None, x, 2, 1), x.clamp(0, 1))
    with pytest.raises(ValueError, match="needs the attack"):
        reverse_process(adapter, None, x, 2, 2)


def test_training_attacks_follow_the_defended_system(fitted: dict) -> None:
    """With a non-identity adapter, Alg. 3's attacks step along the sign of the *defended* detector's gradient
    (sec. 3.3: adversaries of the full robust classifier): ``y = +1`` on normal images, ``y = -1`` on pseudo
    anomalies, which lowers their defended scores; the detector stays frozen while the adapter learns."""
    padim, images = fitted["padim"], fitted["batch"].image[:4]
    adapter = RAPAdapter(detector=padim, **{**TINY, "start_noise": 0.0})
    model = _non_identity(adapter.model)
    probe = images.clone().requires_grad_(True)
    with unmasked_gradients():
        (defended,) = torch.autograd.grad(_defended_score(padim, model, probe).sum(), probe)
        (bare,) = torch.autograd.grad(detector_score(padim.pre_processor, padim.model, probe).sum(), probe)
    assert (defended.sign() != bare.sign()).float().mean() > 0.2, "the test needs an adapter that changes the gradient"
    one_step = torch.ones(images.shape[0], dtype=torch.long)
    for direction in (1.0, -1.0):
        expected = project(images + direction * model.step_size * defended.sign(), images, model.eps, "Linf")
        torch.testing.assert_close(adapter._attack(images, one_step, direction), expected)

    anomalous = adapter.pseudo_anomalies.on_object(images)
    attacked = adapter._attack(anomalous, torch.full_like(one_step, model.steps), -1.0)
    with torch.no_grad():
        before, after = _defended_score(padim, model, anomalous), _defended_score(padim, model, attacked)
    assert (after < before).all(), (before, after)

    adapter.fit_score_scale([images])
    adapter.losses(images)["loss"].backward()
    assert all(parameter.grad is None for parameter in adapter.detector_model.parameters()), "the detector is frozen"
    assert adapter.model.unet.conv_out.weight.grad.abs().sum() > 0


def test_score_hinge_is_zero_on_the_right_side_of_the_clean_score() -> None:
    """``relu(y (A(f~) - A(x_0))) / s``: y = +1 penalises a purified score above the clean one, y = -1 one below it."""
    clean, scale = torch.tensor([1.0, 1.0]), 0.5
    below, above = torch.tensor([0.4, 1.0]), torch.tensor([1.5, 3.0])
    assert score_hinge(below, clean, 1.0, scale).eq(0).all() and score_hinge(above, clean, -1.0, scale).eq(0).all()
    torch.testing.assert_close(score_hinge(above, clean, 1.0, scale), torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(score_hinge(below, clean, -1.0, scale), torch.tensor([1.2, 0.0]))


@pytest.mark.parametrize("shift", [0.3, -0.3])
def test_each_loss_hinge_is_zero_on_the_right_side_and_positive_on_the_wrong_side(fitted: dict, shift: float) -> None:
    """An adapter that brightens every image raises the purified scores of the mean-brightness detector above the
    clean ones: the normal hinge is positive and the pseudo-anomaly (mirror) hinge zero; one that darkens them the
    other way round. Each holds whatever the attack did, since the shift exceeds eps."""
    adapter, images = _shifting_adapter(fitted["padim"], shift), fitted["batch"].image[:4]
    adapter.fit_score_scale([images])
    losses = adapter.losses(images)
    wrong, right = ("task_normal", "task_anomalous") if shift > 0 else ("task_anomalous", "task_normal")
    assert losses[right] == 0 and losses[wrong] > 0, losses


def test_loss_is_invariant_to_a_constant_shift_of_the_score(fitted: dict) -> None:
    """The score terms are in units of the clean scores' spread: adding 100 to every score changes no term (float64,
    so that rounding the scores near 100 does not hide the comparison)."""
    images = fitted["batch"].image[:4].double()
    reference, shifted = (_shifting_adapter(fitted["padim"], 0.3, offset=offset).double() for offset in (0.0, 100.0))
    terms = {}
    for name, adapter in (("reference", reference), ("shifted", shifted)):
        adapter.fit_score_scale([images[:1], images[1:]])
        torch.manual_seed(0)
        terms[name] = {key: value.detach() for key, value in adapter.losses(images).items()}
    assert terms["reference"]["task_normal"] > 0
    torch.testing.assert_close(terms["shifted"], terms["reference"])
    torch.testing.assert_close(shifted.score_scale, reference.score_scale)


def test_score_scale_is_the_spread_of_all_training_scores_from_a_single_image_first_batch(
    fitted: dict, tmp_path: Path
) -> None:
    """Training with one image per batch: the task term's unit is the standard deviation of the detector's raw scores
    of all 8 training images, measured when training starts (the first batch alone has no spread); batches of
    uneven sizes give the same running estimate."""
    padim = fitted["padim"]
    datamodule = FashionMNIST(category=0, root="embedded", image_size=SIZE, num_train=8, num_test=8,
                              train_batch_size=1, eval_batch_size=4)  # fmt: skip
    datamodule.setup()
    images = torch.cat([batch.image for batch in datamodule.train_dataloader()])
    with torch.no_grad():
        expected = detector_score(padim.pre_processor, padim.model, images).double().std()
    adapter = RAPAdapter(detector=padim, **TINY)
    Engine(default_root_dir=tmp_path, max_steps=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
           enable_model_summary=False).fit(adapter, datamodule=datamodule)  # fmt: skip
    assert len(images) == 8 and expected > 0
    torch.testing.assert_close(adapter.score_scale.double(), expected, rtol=1e-5, atol=0)
    uneven = RAPAdapter(detector=padim, **TINY)
    assert uneven.fit_score_scale([images[:1], images[1:6], images[6:]]) == pytest.approx(float(expected), rel=1e-6)


def test_a_degenerate_score_scale_is_refused(fitted: dict) -> None:
    adapter, image = RAPAdapter(detector=fitted["padim"], **TINY), fitted["batch"].image[:1]
    with pytest.raises(RuntimeError, match="needs the task term's unit: train with Engine.fit"):
        adapter.losses(image)
    with pytest.raises(ValueError, match=r"but 1 training image\(s\) gave a spread of 0: train on at least two"):
        adapter.fit_score_scale([image])
    with pytest.raises(ValueError, match=r"but 3 training image\(s\) gave a spread of 0"):
        adapter.fit_score_scale([image.expand(3, -1, -1, -1)])
    assert adapter.score_scale == 0


def test_full_gradients_match_finite_differences_and_bpda_is_the_identity(fitted: dict) -> None:
    """Through Purified(detector, RAP): autograd reaches the input through the adapter and matches finite differences
    (one step); BPDA replaces the adapter's Jacobian by the identity."""
    padim, batch = fitted["padim"], fitted["batch"]
    purified = Purified(padim, RAP(fitted["checkpoint"]), visualizer=False)
    detector = DetectorScore(purified)
    assert not detector.stochastic and detector.eot_samples == 1, "one-step RAP is deterministic"
    with detector.prepared():
        check = check_gradient(detector, batch.image[:2], batch.gt_label[:2], eps=2 / 255)
    assert check.finite_difference.passed, check.finite_difference.detail
    images = batch.image[:1].clone().requires_grad_(True)
    weights = torch.randn_like(images)
    rap = purified.model.purifier
    (gradient,) = torch.autograd.grad((BPDA(rap)(images) * weights).sum(), images)
    torch.testing.assert_close(gradient, weights)
    (full,) = torch.autograd.grad((rap(images) * weights).sum(), images)
    assert full.abs().sum() > 0 and not torch.allclose(full, weights)


def test_alg2_attacks_in_the_direction_of_the_detectors_decision(fitted: dict) -> None:
    """The inner Alg. 1 runs of Alg. 2 lower the defended score of images the detector calls anomalous (score above
    its threshold) and raise it for the others; without a threshold they refuse to guess."""
    padim = copy.deepcopy(fitted["padim"])
    adapter = _non_identity(RAPAdapterModel(**TINY))
    adapter.trained_steps.fill_(1)
    rap = RAP(adapter, inference_steps=2)
    Purified(padim, rap)
    estimate = fitted["batch"].image
    with torch.no_grad():
        scores = detector_score(padim.pre_processor, padim.model, estimate)
    padim.post_processor._image_threshold.fill_(scores.median())
    direction = decision_direction(scores, float(scores.median()))
    assert (direction == 1).any() and (direction == -1).any()
    attacked = rap._attack(estimate, 1)
    with torch.no_grad():
        change = _defended_score(padim, rap.adapter, attacked) - _defended_score(padim, rap.adapter, estimate)
    assert (change * direction > 0).all(), (change, direction)
    padim.post_processor._image_threshold.fill_(float("nan"))
    padim.post_processor._pixel_threshold.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="the detector has no image threshold"):
        rap._attack(estimate, 1)


def test_alg2_gradient_is_bpda_through_the_inner_attack(fitted: dict) -> None:
    """With more than one reverse step, the full gradient goes exactly through the adapter calls and through each inner
    Alg. 1 run as through the identity (its steps are constants of the backward pass): away from the [0, 1] box it
    equals the gradient of ``f~(x0_hat + stop_gradient(x_t - x0_hat), t)``."""
    rap = RAP(fitted["adapter"], inference_steps=2)
    Purified(fitted["padim"], rap)
    rap.adapter = _non_identity(rap.adapter, std=0.003)
    torch.manual_seed(0)
    images = (0.3 + 0.4 * torch.rand(2, 3, SIZE, SIZE)).requires_grad_(True)
    weights = torch.randn_like(images)
    (full,) = torch.autograd.grad((rap(images) * weights).sum(), images)
    estimate = rap.adapter(images, 2)
    assert 0 < estimate.min() and estimate.max() < 1, "the identity holds away from the box"
    attacked = rap._attack(estimate, 1)
    assert 0 < attacked.min() and attacked.max() < 1
    surrogate = rap.adapter(estimate + (attacked - estimate).detach(), 1).clamp(0.0, 1.0)
    (expected,) = torch.autograd.grad((surrogate * weights).sum(), images)
    torch.testing.assert_close(full, expected)


def test_checkpoint_round_trip(fitted: dict, tmp_path: Path) -> None:
    """The saved adapter purifies as the trained one; training resumes from the checkpoint."""
    adapter, path = fitted["adapter"], fitted["checkpoint"]
    images = fitted["batch"].image[:2]
    with torch.no_grad():
        torch.testing.assert_close(RAP(path)(images), RAP(adapter)(images))
    restored = RAPAdapter.load_from_checkpoint(path, detector=fitted["padim"])
    assert int(restored.model.trained_steps) == 2
    torch.testing.assert_close(restored.score_scale, adapter.score_scale)
    assert restored.score_scale > 0
    engine = Engine(default_root_dir=tmp_path, max_steps=3, limit_val_batches=0, logger=False,
                    enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    engine.fit(restored, datamodule=fitted["datamodule"], ckpt_path=path)
    assert int(restored.model.trained_steps) == 3 and engine.trainer.global_step == 3


def test_detector_mismatch_warns_and_names_both(fitted: dict) -> None:
    rap = RAP(fitted["checkpoint"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DetectorMismatchWarning)
        Purified(fitted["padim"], rap)
    with pytest.warns(DetectorMismatchWarning, match=r"trained against Padim \(weights [0-9a-f]{16}\) now defends "
                      r"Padim \(weights [0-9a-f]{16}\)"):  # fmt: skip
        Purified(fitted["other"], rap)


def test_bad_input(fitted: dict, tmp_path: Path) -> None:
    adapter = fitted["adapter"]
    for arguments, message in [
        ({"steps": 0}, r"steps \(T, the attack process length of Alg. 1\) must be an integer >= 1, got 0"),
        ({"eps": -0.1}, r"eps \(the radius .*\) must be a finite number > 0, got -0.1"),
        ({"step_size": 0}, r"step_size \(lambda of Alg. 1\) must be a finite number > 0, got 0"),
        ({"start_noise": 0.5}, r"start_noise \(c of Alg. 1.*\) must be a number in \[0, eps\]"),
        ({"inference_steps": 0}, r"inference_steps must be an integer in \[1, T\] = \[1, 2\]"),
        ({"inference_steps": 3}, r"inference_steps must be an integer in \[1, T\] = \[1, 2\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            RAP(adapter, **arguments)
    with pytest.raises(ValueError, match="the RAP adapter is untrained"):
        RAP(RAPAdapterModel(**TINY))
    with pytest.raises(FileNotFoundError, match="expected a RAPAdapter checkpoint"):
        RAP(tmp_path / "missing.ckpt")
    with pytest.raises(TypeError, match="denoiser must be a RAPAdapter checkpoint path"):
        RAP(torch.nn.Identity())
    with pytest.raises(ValueError, match="RAPAdapter needs the fitted detector"):
        RAPAdapter()
    with pytest.raises(ValueError, match="also pass detector_model"):
        RAPAdapter(detector=str(fitted["checkpoint"]))
    with pytest.raises(ValueError, match=r"steps \(T, the attack process length of Alg. 1\) must be an integer"):
        RAPAdapter(detector=fitted["padim"], **{**TINY, "steps": 0})
    with pytest.raises(ValueError, match="identity_weight must be a finite number >= 0"):
        RAPAdapter(detector=fitted["padim"], identity_weight=-1, **TINY)
    with pytest.raises(RuntimeError, match="re-runs Alg. 1 against the defended detector: put it in front of one"):
        RAP(adapter, inference_steps=2)(torch.rand(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"trained on images of shape \(C, H, W\) = \(3, 32, 32\)"):
        RAP(adapter)(torch.rand(1, 3, 16, 16))
