"""AdvRAD through anomalib's Engine: fit, statistics in the checkpoint, test, reconstruction modes, bad input."""

from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch.callbacks import ModelCheckpoint
from shared_artifacts import mvtec_datamodule
from torchmetrics.functional.classification import binary_auroc

from anomalib_robust import AdvRAD


def _datamodule(root: Path) -> MVTecAD:
    return mvtec_datamodule(root)


@pytest.fixture(scope="module")
def trained(advrad_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[AdvRAD, Engine, Path]:
    """The shared tiny AdvRAD (fitted once per run on ``mvtec_root``), loaded from its checkpoint."""
    model = AdvRAD.load_from_checkpoint(advrad_checkpoint)
    engine = Engine(default_root_dir=tmp_path_factory.mktemp("results"), logger=False, enable_progress_bar=False)
    return model, engine, advrad_checkpoint


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of an anomaly > score of a normal sample), ties counting half: the AUROC, computed by hand."""
    anomalous, normal = scores[labels.bool()], scores[~labels.bool()]
    greater = (anomalous[:, None] > normal[None, :]).float().mean()
    ties = (anomalous[:, None] == normal[None, :]).float().mean()
    return float(greater + ties / 2)


def test_engine_test_reports_the_auroc_of_its_predictions(
    advrad_checkpoint: Path, mvtec_root: Path, tmp_path: Path, device: torch.device
) -> None:
    """The image and pixel AUROC that ``Engine.test`` reports are those of the scores and maps the model predicts
    (the same seeded noise in both runs), computed independently here."""
    model = AdvRAD.load_from_checkpoint(advrad_checkpoint, noise_seed=0)
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator=device.type)
    datamodule = _datamodule(mvtec_root)
    (metrics,) = engine.test(model, datamodule=datamodule, verbose=False)
    predictions = engine.predict(model, dataloaders=datamodule.test_dataloader())
    scores = torch.cat([batch.pred_score.flatten() for batch in predictions])
    labels = torch.cat([batch.gt_label.flatten() for batch in predictions])
    assert labels.sum() == 4 and len(labels) == 8
    assert scores.unique().numel() > 1, "constant scores would make the comparison vacuous"
    assert metrics["image_AUROC"] == pytest.approx(_auroc(scores, labels), abs=1e-6)
    maps = torch.cat([batch.anomaly_map.flatten() for batch in predictions])
    masks = torch.cat([batch.gt_mask.flatten() for batch in predictions])
    assert masks.sum() == 4 * 36  # the 6 x 6 scratches
    pixel = binary_auroc(maps, masks.long())
    assert metrics["pixel_AUROC"] == pytest.approx(float(pixel), abs=1e-4)


def test_checkpoint_architecture_wins_over_constructor(trained: tuple[AdvRAD, Engine, Path], mvtec_root: Path) -> None:
    """`anomalib test --model AdvRAD --ckpt_path ...` builds the default (paper) model, then loads the weights."""
    _, engine, checkpoint = trained
    model = AdvRAD(image_size=(32, 32), base_channels=32, channel_mult=(1, 2, 2), diffusion_step=5, num_timesteps=100)
    results = engine.test(model, datamodule=_datamodule(mvtec_root), ckpt_path=checkpoint)
    assert model.model.unet.config.block_out_channels == (32, 64)
    assert model.model.diffusion_step == 5  # inference-time args stay as given
    assert "image_AUROC" in results[0]


@pytest.mark.parametrize(
    ("mode", "schedule"),
    [("one_shot", None), ("arbitrary_shot", [10, 5, 1]), ("full_shot", None)],
)
def test_reconstruction_modes_switch_without_retraining(
    trained: tuple[AdvRAD, Engine, Path],
    mode: str,
    schedule: list[int] | None,
) -> None:
    model, _, _ = trained
    model.eval()
    model.set_reconstruction(reconstruction=mode, step_schedule=schedule)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        output = model.model(images)
    assert output.pred_score.shape == (2,)
    assert output.anomaly_map.shape == (2, 1, 32, 32)
    assert torch.isfinite(output.pred_score).all()
    model.set_reconstruction(reconstruction="one_shot")


def test_seeded_noise_is_reproducible_and_fresh_noise_is_not(trained: tuple[AdvRAD, Engine, Path]) -> None:
    model, _, _ = trained
    model.eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        first = model.model(images, generator=torch.Generator().manual_seed(1)).pred_score
        again = model.model(images, generator=torch.Generator().manual_seed(1)).pred_score
        fresh = model.model(images).pred_score
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, fresh)


def test_test_before_fit_is_a_clear_error(mvtec_root: Path, tmp_path: Path, tiny_advrad: dict) -> None:
    engine = Engine(default_root_dir=tmp_path, logger=False)
    with pytest.raises(RuntimeError, match="no training error statistics"):
        engine.test(AdvRAD(**tiny_advrad), datamodule=_datamodule(mvtec_root))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_size": (36, 36)}, "divisible"),
        ({"diffusion_step": 0}, "1 <= k"),
        ({"diffusion_step": 101}, "1 <= k"),
        ({"reconstruction": "arbitrary_shot", "step_schedule": [10, 10, 1]}, "strictly decreasing"),
        ({"reconstruction": "arbitrary_shot", "step_schedule": [9, 5]}, "start at the diffusion step"),
        ({"reconstruction": "two_shot"}, "reconstruction must be one of"),
    ],
)
def test_bad_configuration_is_a_clear_error(overrides: dict, message: str, tiny_advrad: dict) -> None:
    with pytest.raises(ValueError, match=message):
        AdvRAD(**{**tiny_advrad, **overrides})


def test_bad_images_are_a_clear_error(trained: tuple[AdvRAD, Engine, Path]) -> None:
    model, _, _ = trained
    model.eval()
    with pytest.raises(ValueError, match="in_channels"):
        model.model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="NaN or inf"):
        model.model(torch.full((1, 3, 32, 32), float("nan")))


def test_checkpoint_without_validation_still_has_statistics(
    mvtec_root: Path,
    tmp_path: Path,
    tiny_advrad: dict,
) -> None:
    """``Engine.fit`` computes the normal error map; a checkpoint saved mid-training, with no validation run yet,
    carries it and the weights it belongs to."""
    model = AdvRAD(**tiny_advrad)
    assert not bool(model.model.is_fitted)
    every_two_steps = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    engine = Engine(max_steps=2, check_val_every_n_epoch=5, callbacks=[every_two_steps], logger=False,
                    enable_progress_bar=False)  # fmt: skip
    engine.fit(model, datamodule=_datamodule(mvtec_root))
    assert bool(model.model.is_fitted)
    assert model.model.normal_error_map.abs().sum() > 0
    restored = AdvRAD.load_from_checkpoint(every_two_steps.last_model_path or every_two_steps.best_model_path)
    assert bool(restored.model.is_fitted)
    torch.testing.assert_close(restored.model.normal_error_map, model.model.normal_error_map)
    for name, parameter in model.model.state_dict().items():
        torch.testing.assert_close(restored.model.state_dict()[name], parameter)
