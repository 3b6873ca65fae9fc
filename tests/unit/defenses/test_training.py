"""Adversarial training and Gaussian-noise training callbacks (AdvRAD paper, sec. 5.4 / Table 8 and appendix D.6)."""

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.models import Padim, Patchcore, Stfpm

from anomalib_robust.attacks import DetectorScore
from anomalib_robust.defenses.training import (
    DEFAULT_NOISE_STDS,
    AdversarialTraining,
    GaussianNoiseTraining,
    NotGradientTrainedError,
)
from anomalib_robust.offline import random_init_backbones

SIZE = 32
EPS = 4 / 255


@pytest.fixture(scope="module")
def stfpm() -> Stfpm:
    """Random-init Stfpm at 32 px, in training mode as during ``fit``."""
    torch.manual_seed(0)
    with random_init_backbones():
        model = Stfpm(backbone="resnet18", pre_processor=Stfpm.configure_pre_processor((SIZE, SIZE)))
    return model.train()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def stfpm_on_device(stfpm: Stfpm, device: torch.device) -> Iterator[Stfpm]:
    """The module's Stfpm on ``device`` for one test, back on the CPU afterwards."""
    yield stfpm.to(device)
    stfpm.cpu()


def _batch(images: torch.Tensor) -> ImageBatch:
    return ImageBatch(
        image=images.clone(),
        gt_label=torch.zeros(images.shape[0], dtype=torch.bool),
        gt_mask=torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool),
    )


def _trainer(epoch: int = 0, **fields: object) -> SimpleNamespace:
    return SimpleNamespace(current_epoch=epoch, **fields)


def test_linf_perturbation_stays_in_ball_and_box_and_raises_score(stfpm: Stfpm, images: torch.Tensor) -> None:
    adversarial = AdversarialTraining(eps=EPS, steps=3).perturb(stfpm, images)
    delta = adversarial - images
    assert adversarial.shape == images.shape
    assert delta.abs().max() <= EPS + 1e-6
    assert delta.abs().max() > EPS / 2  # the images did change, by a sizeable part of the budget
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    score = DetectorScore(stfpm)
    with score.prepared():
        clean_scores, adversarial_scores = score(images), score(adversarial)
    assert torch.all(adversarial_scores >= clean_scores - 1e-6)  # PGD keeps the best iterate per sample
    assert adversarial_scores.mean() > clean_scores.mean()  # normal images are pushed towards "anomalous"
    assert stfpm.training  # the attack ran in eval mode and restored training mode
    assert all(parameter.grad is None for parameter in stfpm.parameters())


def test_l2_perturbation_stays_in_ball_and_box(stfpm: Stfpm, images: torch.Tensor) -> None:
    adversarial = AdversarialTraining(eps=0.2, steps=3, norm="l2").perturb(stfpm, images)
    norms = (adversarial - images).flatten(1).norm(dim=1)
    assert torch.all(norms <= 0.2 + 1e-5)
    assert torch.all(norms > 0)
    assert adversarial.min() >= 0 and adversarial.max() <= 1


def test_batch_hook_replaces_images_only_and_keeps_labels(stfpm: Stfpm, images: torch.Tensor) -> None:
    batch = _batch(images)
    labels, masks = batch.gt_label.clone(), batch.gt_mask.clone()
    callback = AdversarialTraining(eps=EPS, steps=2)
    callback.on_train_batch_start(_trainer(), stfpm, batch, 0)
    assert not torch.equal(batch.image, images)
    assert (batch.image - images).abs().max() <= EPS + 1e-6
    assert torch.equal(batch.gt_label, labels) and torch.equal(batch.gt_mask, masks)
    assert callback.batches_changed == 1


def test_fraction_start_epoch_and_seeds(stfpm_on_device: Stfpm, images: torch.Tensor, device: torch.device) -> None:
    stfpm, images = stfpm_on_device, images.to(device)
    half = AdversarialTraining(eps=EPS, steps=1, fraction=0.5).perturb(stfpm, images)
    changed = (half - images).flatten(1).abs().amax(dim=1) > 0
    assert changed.sum() == 2

    batch = _batch(images)
    AdversarialTraining(eps=EPS, steps=1, start_epoch=1).on_train_batch_start(_trainer(epoch=0), stfpm, batch, 0)
    assert torch.equal(batch.image, images)  # warm-up epoch: clean

    callback = AdversarialTraining(eps=EPS, steps=1, random_start=True, seed=5)
    first, second = callback.perturb(stfpm, images), callback.perturb(stfpm, images)
    assert not torch.equal(first, second)  # a new random start per batch
    assert torch.equal(first, AdversarialTraining(eps=EPS, steps=1, seed=5).perturb(stfpm, images))  # reproducible
    restored = AdversarialTraining(eps=EPS, steps=1, seed=5)
    restored.load_state_dict(callback.state_dict())
    assert restored.batches_changed == 2


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"eps": 0}, "eps"),
        ({"eps": -2 / 255}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"alpha": 0.0}, "alpha"),
        ({"norm": "L1"}, "norm"),
        ({"fraction": 0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"start_epoch": -1}, "start_epoch"),
        ({"eot_samples": 0}, "eot_samples"),
    ],
)
def test_adversarial_training_rejects_bad_arguments(arguments: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        AdversarialTraining(**arguments)


def test_images_must_be_pixels_before_the_pre_processor(stfpm: Stfpm, images: torch.Tensor) -> None:
    normalised = (images - 0.45) / 0.225
    with pytest.raises(ValueError, match=r"\[0, 1\] pixel space.*pre-processor"):
        AdversarialTraining().perturb(stfpm, normalised)
    with pytest.raises(TypeError, match="float tensor"):
        GaussianNoiseTraining().perturb((images * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="labels"):
        AdversarialTraining().perturb(stfpm, images, labels=torch.zeros(3))


@pytest.mark.parametrize("model_class", [Padim, Patchcore])
@pytest.mark.parametrize("callback_class", [AdversarialTraining, GaussianNoiseTraining])
def test_detectors_without_gradient_training_are_refused(model_class: type, callback_class: type) -> None:
    model = model_class(backbone="resnet18", pre_trained=False)
    assert model.configure_optimizers() is None
    callback = callback_class()
    with pytest.raises(NotGradientTrainedError, match=rf"does not apply to {model_class.__name__}.*no optimizer"):
        callback.on_fit_start(_trainer(optimizers=[], callbacks=[callback]), model)
    assert issubclass(NotGradientTrainedError, TypeError)


def test_gradient_trained_detector_is_accepted_and_order_is_checked(stfpm: Stfpm) -> None:
    optimizer = stfpm.configure_optimizers()
    callback = AdversarialTraining()
    callback.on_fit_start(_trainer(optimizers=[optimizer], callbacks=[callback, stfpm.pre_processor]), stfpm)
    frozen = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1), requires_grad=False)], lr=0.1)
    with pytest.raises(NotGradientTrainedError, match="Stfpm"):
        callback.on_fit_start(_trainer(optimizers=[frozen], callbacks=[callback]), stfpm)
    with pytest.raises(RuntimeError, match="must run before Stfpm's pre-processor"):
        callback.on_fit_start(_trainer(optimizers=[optimizer], callbacks=[stfpm.pre_processor, callback]), stfpm)


def test_noise_changes_images_with_a_std_from_the_list() -> None:
    images = torch.full((8, 3, SIZE, SIZE), 0.5)
    callback = GaussianNoiseTraining(stds=[0.05])
    batch = _batch(images)
    labels = batch.gt_label.clone()
    callback.on_train_batch_start(_trainer(), None, batch, 0)
    noise = batch.image - images
    assert torch.equal(batch.gt_label, labels)
    assert noise.std().item() == pytest.approx(0.05, rel=0.05)
    assert callback.last_stds.tolist() == [0.05]

    clamped = GaussianNoiseTraining(stds=[0.5]).perturb(images)
    assert clamped.min() == 0 and clamped.max() == 1  # clamped to the pixel box


def test_noise_draws_from_the_paper_list(device: torch.device) -> None:
    assert DEFAULT_NOISE_STDS == (0.0, 0.005, 0.01, 0.05, 0.1)
    images = torch.full((64, 3, 8, 8), 0.5, device=device)
    callback = GaussianNoiseTraining(per_sample=True)
    noisy = callback.perturb(images)
    drawn = callback.last_stds
    assert drawn.shape == (64,) and set(drawn.tolist()) <= set(DEFAULT_NOISE_STDS)
    assert len(set(drawn.tolist())) > 1  # one draw per image
    for row, sigma in zip(noisy - images, drawn, strict=True):
        assert (row.abs().max() == 0) == (sigma == 0)
    first = GaussianNoiseTraining(seed=1).perturb(images)
    assert torch.equal(first, GaussianNoiseTraining(seed=1).perturb(images))

    batch = _batch(images)
    GaussianNoiseTraining(start_epoch=2).on_train_batch_start(_trainer(epoch=1), None, batch, 0)
    assert torch.equal(batch.image, images)


def test_batch_generators_draw_on_the_device_of_the_images(
    stfpm: Stfpm, images: torch.Tensor, generator_devices: list
) -> None:
    """The rows to attack and the noise come from generators on the images' device: a CPU generator cannot draw on
    a GPU (``generator_devices`` records the device each generator is made for)."""
    AdversarialTraining(eps=EPS, steps=1, fraction=0.5).perturb(stfpm, images)
    GaussianNoiseTraining(stds=[0.05]).perturb(images)
    assert len(generator_devices) >= 2 and set(generator_devices) == {images.device}


@pytest.mark.parametrize(
    ("stds", "match"),
    [
        ([], "non-empty"),
        ("0.1", "non-empty"),
        ([0.1, -0.01], "finite numbers >= 0"),
        ([float("inf")], "finite numbers >= 0"),
        ([0, 0.0], "at least one standard deviation > 0"),
    ],
)
def test_noise_rejects_bad_std_lists(stds: object, match: str) -> None:
    with pytest.raises(ValueError, match=rf"stds.*{match}|{match}"):
        GaussianNoiseTraining(stds=stds)


def test_noise_rejects_bad_start_epoch() -> None:
    with pytest.raises(ValueError, match="start_epoch"):
        GaussianNoiseTraining(start_epoch=-1)


def test_differently_configured_instances_keep_separate_checkpoint_states() -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.trainer import call

    def callbacks() -> list:
        return [
            AdversarialTraining(eps=EPS),
            AdversarialTraining(eps=2 * EPS),
            GaussianNoiseTraining(),
            GaussianNoiseTraining(seed=1),
        ]

    def trainer(attached: list) -> Trainer:
        return Trainer(callbacks=list(attached), logger=False, enable_checkpointing=False, enable_model_summary=False)

    saved = callbacks()
    assert len({callback.state_key for callback in saved}) == len(saved)
    for count, callback in enumerate(saved, start=1):
        callback.batches_changed = count
    checkpoint = {"callbacks": call._call_callbacks_state_dict(trainer(saved))}
    assert set(checkpoint["callbacks"]) == {callback.state_key for callback in saved}
    restored = callbacks()
    call._call_callbacks_load_state_dict(trainer(restored), checkpoint)
    assert [callback.batches_changed for callback in restored] == [1, 2, 3, 4]
