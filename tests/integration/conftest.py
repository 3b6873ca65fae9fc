"""Shared by the integration tests: a tiny dataset in anomalib's MVTecAD folder layout, generated on the fly."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/disc/{train/good, test/good, test/scratch, ground_truth/scratch}`` as in MVTec AD."""
    root = tmp_path_factory.mktemp("mvtec")
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
    return root


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
