"""RAP (the RAP paper): the forward process (Alg. 1), the reverse process and its cost (Alg. 2), the adapter's
training loss (Alg. 3), the purifier in front of a detector (gradients, BPDA, mismatch warning) and bad input."""

import warnings
from pathlib import Path

import pytest
import torch
from anomalib.data import InferenceBatch
from anomalib.engine import Engine
from anomalib.models import Padim

from anomalib_robust.attacks import BPDA, DetectorScore
from anomalib_robust.attacks.pgd import project
from anomalib_robust.data import FashionMNIST
from anomalib_robust.defenses import RAP, DetectorMismatchWarning, Purified
from anomalib_robust.evaluation.gradient_check import check_gradient
from anomalib_robust.models import RAPAdapter
from anomalib_robust.models.rap_adapter import RAPAdapterModel
from anomalib_robust.models.rap_adapter.process import (
    defended_objective,
    detector_score,
    forward_process,
    reverse_process,
    timesteps,
    unet_calls,
)
from anomalib_robust.models.patch_guard.pseudo_anomaly import PseudoAnomalyGenerator

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
    """A toy detector whose raw score is ``<w, x>``: its gradient sign is known everywhere."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        return InferenceBatch(pred_score=(images * self.weights).flatten(1).sum(dim=1))


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


def test_training_loss_decreases(fitted: dict) -> None:
    """A few Adam steps of Alg. 3 lower the loss on a fixed batch (same t, start noise and pseudo anomalies)."""
    adapter = RAPAdapter(detector=fitted["padim"], learning_rate=1e-4, **TINY)
    images = fitted["batch"].image[:4]
    optimizer = adapter.configure_optimizers()

    def loss() -> torch.Tensor:
        torch.manual_seed(0)
        adapter.pseudo_anomalies = PseudoAnomalyGenerator(patch_size=4, seed=0)
        return adapter.losses(images)["loss"]

    adapter.train()
    first = loss().item()
    for _ in range(6):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.95 * first  # 0.038 -> 0.034 when written: the task term falls first
    assert all(parameter.grad is None for parameter in adapter.detector_model.parameters()), "the detector is frozen"


def test_identity_term_is_switchable(fitted: dict) -> None:
    torch.manual_seed(0)
    images = fitted["batch"].image[:2]
    with_identity = RAPAdapter(detector=fitted["padim"], **TINY).losses(images)
    without = RAPAdapter(detector=fitted["padim"], identity_weight=0, **TINY).losses(images)
    assert "identity" in with_identity and "identity" not in without
    torch.testing.assert_close(
        with_identity["loss"], with_identity["reconstruction"] + 0.1 * with_identity["task"] + with_identity["identity"]
    )


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


def test_full_gradients_reach_the_input_through_alg2(fitted: dict) -> None:
    rap = RAP(fitted["adapter"], inference_steps=2)
    Purified(fitted["padim"], rap)
    images = fitted["batch"].image[:1].clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(rap(images).sum(), images)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


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
