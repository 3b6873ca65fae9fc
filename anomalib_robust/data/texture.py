"""A texture anomaly data set built from a sample texture that scikit-image ships, read by anomalib's ``Folder``.

Industrial inspection data is mostly of this kind (MVTec AD's carpet, grid, leather, tile and wood): a surface with no
background, and defects that are small changes of it. :func:`write_texture_dataset` crops a 512 x 512 photograph of
brick, grass, gravel or the moon's cratered surface (``skimage.data``, installed with anomalib; nothing is downloaded)
into small images and writes them as an anomalib folder data set:

- training images (``train/good``) from the top three quarters of the photograph, test images (``test/good`` and
  ``test/defect``) from the bottom quarter, so that no test pixel was seen in training;
- every crop is ``crop_size`` pixels, resized to ``image_size`` (the texture's grain survives at 32 x 32);
- half of the test images get one defect made with anomalib's Perlin generator anywhere on the surface
  (:func:`~anomalib_robust.data.defects.add_small_defect` with the Fashion-MNIST ``defect`` protocol's size and
  contrast), its mask in ``ground_truth/defect``.

:func:`texture_datamodule` writes the set when it is missing (atomically: an interrupted write leaves nothing) and
returns the ``Folder`` datamodule, with half of the test images as its validation split, as the Fashion-MNIST
datamodule does.

Example:
    >>> datamodule = texture_datamodule("brick", root=tmp_path)  # doctest: +SKIP
    >>> engine.fit(AdvRAD.cpu_preset(), datamodule=datamodule)  # doctest: +SKIP
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from anomalib.data import Folder
from PIL import Image
from skimage import data as skimage_data

from anomalib_robust.data.defects import add_small_defect

TEXTURES = ("brick", "grass", "gravel", "moon")
"""The 512 x 512 grayscale surface photographs of ``skimage.data``: three textures and the moon's craters (a surface
that set none of the project's defaults)."""

TRAIN_ROWS = 0.75
"""The fraction of the photograph's rows, from the top, that training crops come from; test crops come from the rest."""


def write_texture_dataset(
    root: str | Path,
    texture: str = "brick",
    image_size: int = 32,
    crop_size: int = 64,
    num_train: int = 200,
    num_test: int = 100,
    seed: int = 0,
) -> Path:
    """Write the data set to ``root/<texture>`` (see the module docstring) unless it is there; return that folder.

    Raises:
        ValueError: an unknown ``texture``, or sizes that do not fit the photograph's quarters.
    """
    if texture not in TEXTURES:
        msg = f"texture must be one of {TEXTURES}, got {texture!r}"
        raise ValueError(msg)
    photograph = torch.from_numpy(getattr(skimage_data, texture)())
    test_rows = photograph.shape[0] - int(TRAIN_ROWS * photograph.shape[0])
    if not 32 <= image_size <= crop_size <= test_rows:
        msg = f"need 32 <= image_size <= crop_size <= {test_rows}, got image_size={image_size}, crop_size={crop_size}"
        raise ValueError(msg)
    if num_train < 1 or num_test < 2:
        msg = f"num_train must be >= 1 and num_test >= 2, got {num_train} and {num_test}"
        raise ValueError(msg)
    settings = {"texture": texture, "image_size": image_size, "crop_size": crop_size, "num_train": num_train,
                "num_test": num_test, "seed": seed}  # fmt: skip
    folder = Path(root) / texture
    manifest = folder / "settings.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == settings:
        return folder
    generator = torch.Generator().manual_seed(seed)
    train_part = photograph[: photograph.shape[0] - test_rows]
    test_part = photograph[photograph.shape[0] - test_rows :]
    Path(root).mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=root, prefix=f".{texture}"))
    for index in range(num_train):
        _save(_crop(train_part, crop_size, image_size, generator), partial / "train" / "good" / f"{index:04d}.png")
    defective = set(torch.randperm(num_test, generator=generator)[: num_test // 2].tolist())
    for index in range(num_test):
        image = _crop(test_part, crop_size, image_size, generator)
        if index not in defective:
            _save(image, partial / "test" / "good" / f"{index:04d}.png")
            continue
        surface = torch.ones(image.shape[1:], dtype=torch.bool)
        image, mask = add_small_defect(image, seed=seed * 100_000 + index, region=surface)
        _save(image, partial / "test" / "defect" / f"{index:04d}.png")
        _save(mask[None].to(torch.uint8) * 255, partial / "ground_truth" / "defect" / f"{index:04d}.png")
    (partial / "settings.json").write_text(json.dumps(settings))
    if folder.exists():
        shutil.rmtree(folder)
    partial.replace(folder)
    return folder


def texture_datamodule(
    texture: str = "brick",
    root: str | Path = "datasets/textures",
    image_size: int = 32,
    num_train: int = 200,
    num_test: int = 100,
    batch_size: int = 16,
    seed: int = 0,
) -> Folder:
    """anomalib's ``Folder`` datamodule of the texture data set, written first when it is missing."""
    folder = write_texture_dataset(root, texture, image_size=image_size, num_train=num_train, num_test=num_test,
                                   seed=seed)  # fmt: skip
    return Folder(
        name=texture, root=folder, normal_dir="train/good", abnormal_dir="test/defect", normal_test_dir="test/good",
        mask_dir="ground_truth/defect", train_batch_size=batch_size, eval_batch_size=batch_size, num_workers=0,
        seed=seed,
    )  # fmt: skip


def _crop(photograph: torch.Tensor, crop_size: int, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``crop_size`` square of the photograph, resized (antialiased) to ``image_size``: ``uint8 [1, H, W]``."""
    top = int(torch.randint(photograph.shape[0] - crop_size + 1, (1,), generator=generator))
    left = int(torch.randint(photograph.shape[1] - crop_size + 1, (1,), generator=generator))
    crop = photograph[top : top + crop_size, left : left + crop_size].float()[None, None]
    resized = F.interpolate(crop, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def _save(image: torch.Tensor, path: Path) -> None:
    """Write a ``uint8 [1, H, W]`` image as a grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[0].numpy()).save(path)
