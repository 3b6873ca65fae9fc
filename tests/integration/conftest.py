"""Shared by the integration tests: a tiny dataset in anomalib's MVTecAD folder layout, generated on the fly, and a
tiny AdvRAD trained on it once per test run."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from anomalib.engine import Engine
from PIL import Image
from shared_artifacts import TINY_ADVRAD, build_once, mvtec_datamodule

from anomalib_robust import AdvRAD

IMAGE_SIZE = 32


def _object(rng: np.random.Generator) -> np.ndarray:
    """A bright disc on a dark background with a little noise: the 'good' product."""
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    centre = IMAGE_SIZE / 2 + rng.normal(0, 1, 2)
    disc = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) < (IMAGE_SIZE / 3) ** 2
    image = 0.2 + 0.6 * disc + rng.normal(0, 0.03, (IMAGE_SIZE, IMAGE_SIZE))
    return np.clip(image, 0, 1)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((array * 255).astype(np.uint8)).convert("RGB").save(path)


def _write_mvtec(root: Path) -> None:
    rng = np.random.default_rng(0)
    category = root / "disc"
    for index in range(12):
        _save(_object(rng), category / "train" / "good" / f"{index:03d}.png")
    for index in range(4):
        _save(_object(rng), category / "test" / "good" / f"{index:03d}.png")
        image, mask = _object(rng), np.zeros((IMAGE_SIZE, IMAGE_SIZE))
        top, left = rng.integers(6, IMAGE_SIZE - 12, 2)
        mask[top : top + 6, left : left + 6] = 1
        image[mask > 0] = 1.0
        _save(image, category / "test" / "scratch" / f"{index:03d}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(
            _mkdir(category / "ground_truth" / "scratch") / f"{index:03d}_mask.png",
        )


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/disc/{train/good, test/good, test/scratch, ground_truth/scratch}`` as in MVTec AD (shared by the
    workers, so that the shared checkpoints below were trained on the very files the tests read)."""
    return build_once(tmp_path_factory, "mvtec", _write_mvtec)


@pytest.fixture(scope="session")
def advrad_checkpoint(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny AdvRAD (``tiny_advrad``) fitted for one epoch (3 steps, then validation: normalised scores are defined)
    on ``mvtec_root``, built once per test run. Tests load it with ``AdvRAD.load_from_checkpoint``."""

    def build(directory: Path) -> None:
        model = AdvRAD(**TINY_ADVRAD)
        engine = Engine(max_epochs=1, default_root_dir=directory, logger=False, enable_progress_bar=False)
        engine.fit(model, datamodule=mvtec_datamodule(mvtec_root))
        shutil.copy(engine.trainer.checkpoint_callback.best_model_path, directory / "model.ckpt")

    return build_once(tmp_path_factory, "advrad_mvtec", build) / "model.ckpt"


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
