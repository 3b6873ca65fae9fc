"""Where synthetic defects may go on data other than Fashion-MNIST, and the texture data set from scikit-image."""

import json

import pytest
import torch
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


def test_object_region_of_a_texture_is_the_whole_image() -> None:
    texture = torch.randint(0, 256, (1, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert object_region(texture).all()


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
