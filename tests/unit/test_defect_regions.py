"""Where synthetic defects may go on data other than Fashion-MNIST, and the texture data set from scikit-image."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anomalib_robust.data.defects import MAX_AREA, MIN_AREA, add_small_defect, object_region
from anomalib_robust.data.texture import texture_datamodule, write_texture_dataset


def _object(background: int, value: int) -> torch.Tensor:
    image = torch.full((1, 32, 32), background, dtype=torch.uint8)
    image[:, 8:24, 12:20] = value
    return image


@pytest.mark.parametrize(("background", "value"), [(0, 180), (230, 90)], ids=["dark_background", "light_background"])
def test_object_region_is_the_object_on_a_dark_or_a_light_background(background: int, value: int) -> None:
    region = object_region(_object(background, value))
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[8:24, 12:20] = True
    assert torch.equal(region, expected)


def smooth_texture(channels: int, amplitude: float, mean: float = 128.0, seed: int = 0) -> torch.Tensor:
    """A 32 x 32 ``uint8`` texture: white noise on an 8 x 8 grid upsampled bicubically, ``amplitude`` (of 255) per unit
    of noise around ``mean``, drawn independently per channel (a colour texture for 3 channels)."""
    noise = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(seed))
    smooth = F.interpolate(noise, size=(32, 32), mode="bicubic", align_corners=False)[0]
    return (mean + amplitude * smooth).round().clamp(0, 255).to(torch.uint8)


def test_object_region_of_a_texture_is_the_whole_image() -> None:
    texture = torch.randint(0, 256, (1, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert object_region(texture).all()


@pytest.mark.parametrize(("channels", "amplitude"), [(1, 8.0), (3, 8.0), (3, 40.0)],
                         ids=["low_contrast_gray", "low_contrast_colour", "colour"])  # fmt: skip
def test_object_region_of_a_low_contrast_or_colour_texture_is_the_whole_image(channels: int, amplitude: float) -> None:
    """A texture whose border varies little is not an object on a background: the whole image, never the scattered
    pixels that happen to differ from the border's median (the rule before read them as the object, or found none)."""
    for seed in range(5):
        texture = smooth_texture(channels, amplitude, seed=seed)
        assert object_region(texture).all(), seed


def test_object_region_sees_a_colour_object_of_the_backgrounds_brightness() -> None:
    """Colour counts: a red object on a gray background of the same channel mean is the object."""
    image = torch.full((3, 32, 32), 100, dtype=torch.uint8)
    image[:, 8:24, 12:20] = torch.tensor([200, 50, 50], dtype=torch.uint8)[:, None, None]
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[8:24, 12:20] = True
    assert torch.equal(object_region(image), expected)
    assert not object_region(image.float().mean(0, keepdim=True).round().to(torch.uint8)).equal(expected)
    with pytest.raises(ValueError, match=r"image must be a uint8 tensor \[C, H, W\]"):
        object_region(image.float())


def test_a_defect_stays_in_the_given_region_on_a_light_background() -> None:
    image = _object(230, 90)
    region = object_region(image)
    defective, mask = add_small_defect(image, seed=3, region=region)
    assert mask.any() and not (mask & ~region).any()
    assert MIN_AREA <= mask.float().mean() <= MAX_AREA
    assert torch.equal(defective[0][~mask], image[0][~mask])
    with pytest.raises(ValueError, match="region must be a"):
        add_small_defect(image, seed=3, region=region[:16])
    with pytest.raises(ValueError, match="max_area must be a fraction"):
        add_small_defect(image, seed=3, max_area=0.001)


def test_texture_data_set_is_written_once_with_defects_and_masks(tmp_path) -> None:
    folder = write_texture_dataset(tmp_path, "brick", num_train=6, num_test=6)
    defects = sorted((folder / "test" / "defect").glob("*.png"))
    masks = sorted((folder / "ground_truth" / "defect").glob("*.png"))
    assert len(list((folder / "train" / "good").glob("*.png"))) == 6
    assert len(defects) == 3 and [p.name for p in masks] == [p.name for p in defects]
    for mask_path in masks:
        mask = torch.as_tensor(list(Image.open(mask_path).getdata())).reshape(32, 32) > 0
        assert MIN_AREA <= mask.float().mean() <= MAX_AREA
    assert json.loads((folder / "settings.json").read_text())["texture"] == "brick"
    written = (folder / "settings.json").stat().st_mtime_ns
    assert write_texture_dataset(tmp_path, "brick", num_train=6, num_test=6) == folder
    assert (folder / "settings.json").stat().st_mtime_ns == written  # reused, not rewritten
    with pytest.raises(ValueError, match="texture must be one of"):
        write_texture_dataset(tmp_path, "marble")


def test_texture_datamodule_reads_the_set_with_anomalib(tmp_path) -> None:
    datamodule = texture_datamodule("gravel", root=tmp_path, num_train=4, num_test=8, batch_size=4)
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape[1:] == (3, 32, 32)
    labels = torch.cat([b.gt_label for b in datamodule.test_dataloader()] + [b.gt_label for b in
                       datamodule.val_dataloader()])  # fmt: skip
    assert int(labels.sum()) == 4 and labels.numel() == 8
