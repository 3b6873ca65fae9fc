"""AdvRAD through anomalib's Engine: fit, statistics in the checkpoint, test, reconstruction modes, bad input."""

from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch.callbacks import ModelCheckpoint

from anomalib_robust import AdvRAD


def _datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="disc", train_batch_size=4, eval_batch_size=4, num_workers=0)


@pytest.fixture(scope="module")
def trained(
    mvtec_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_advrad: dict,
) -> tuple[AdvRAD, Engine, Path]:
    model = AdvRAD(**tiny_advrad)
    engine = Engine(max_steps=6, default_root_dir=tmp_path_factory.mktemp("results"), logger=False)
    engine.fit(model, datamodule=_datamodule(mvtec_root))
    checkpoint = Path(engine.trainer.checkpoint_callback.best_model_path)
    return model, engine, checkpoint


def test_fit_computes_and_checkpoints_normal_error_map(trained: tuple[AdvRAD, Engine, Path]) -> None:
    model, _, checkpoint = trained
    assert bool(model.model.is_fitted)
    assert model.model.normal_error_map.abs().sum() > 0
    assert checkpoint.is_file()
    restored = AdvRAD.load_from_checkpoint(checkpoint)
    torch.testing.assert_close(restored.model.normal_error_map, model.model.normal_error_map)
    assert bool(restored.model.is_fitted)
    for name, parameter in model.model.state_dict().items():
        torch.testing.assert_close(restored.model.state_dict()[name], parameter)


def test_engine_test_reports_image_and_pixel_metrics(trained: tuple[AdvRAD, Engine, Path], mvtec_root: Path) -> None:
    model, engine, _ = trained
    results = engine.test(model, datamodule=_datamodule(mvtec_root))
    assert 0.0 <= results[0]["image_AUROC"] <= 1.0
    assert 0.0 <= results[0]["pixel_AUROC"] <= 1.0


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
    """A checkpoint saved mid-training, with no validation run yet, carries the statistics of its weights."""
    model = AdvRAD(**tiny_advrad)
    every_two_steps = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    engine = Engine(max_steps=2, check_val_every_n_epoch=5, callbacks=[every_two_steps], logger=False)
    engine.fit(model, datamodule=_datamodule(mvtec_root))
    restored = AdvRAD.load_from_checkpoint(every_two_steps.last_model_path or every_two_steps.best_model_path)
    assert bool(restored.model.is_fitted)
    torch.testing.assert_close(restored.model.normal_error_map, model.model.normal_error_map)
