"""A tiny dataset in anomalib's MVTecAD folder layout (textured discs with bright-square defects), made on the fly."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

IMAGE_SIZE = 32


def _disc(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    centre = IMAGE_SIZE / 2 + rng.normal(0, 1, 2)
    disc = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) < (IMAGE_SIZE / 3) ** 2
    return np.clip(0.1 + 0.6 * disc + rng.normal(0, 0.03, (IMAGE_SIZE, IMAGE_SIZE)), 0, 1)


def _save(array: np.ndarray, path: Path, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((array * 255).astype(np.uint8)).convert(mode).save(path)


@pytest.fixture(scope="session")
def patch_guard_mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/disc/{train/good, test/good, test/scratch, ground_truth/scratch}`` as in MVTec AD."""
    root = tmp_path_factory.mktemp("mvtec_patch_guard")
    rng = np.random.default_rng(0)
    category = root / "disc"
    for index in range(8):
        _save(_disc(rng), category / "train" / "good" / f"{index:03d}.png")
    for index in range(4):
        _save(_disc(rng), category / "test" / "good" / f"{index:03d}.png")
        image, mask = _disc(rng), np.zeros((IMAGE_SIZE, IMAGE_SIZE))
        top, left = rng.integers(8, IMAGE_SIZE - 14, 2)
        mask[top : top + 6, left : left + 6] = 1
        image[mask > 0] = 1.0
        _save(image, category / "test" / "scratch" / f"{index:03d}.png")
        _save(mask, category / "ground_truth" / "scratch" / f"{index:03d}_mask.png", mode="L")
    return root
