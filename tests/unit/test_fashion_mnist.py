"""Tests of the Fashion-MNIST datamodule: samples, masks, determinism, data sources, errors and an anomalib run.

Everything runs on the subset embedded in the package; tests parametrized over ``ROOTS`` also run on Debian's copy
(``apt-get install dataset-fashion-mnist``) when it is installed.
"""

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib import TaskType
from anomalib.data import AnomalibDataModule
from anomalib.data.utils import read_image, read_mask
from torchvision.transforms.v2 import RandomHorizontalFlip

from anomalib_robust.data import CLASS_NAMES, FashionMNIST, FashionMNISTDataset
from anomalib_robust.data import fashion_mnist_source as source_module
from anomalib_robust.data.build_embedded_subset import select_subset
from anomalib_robust.data.defects import FOREGROUND_LEVEL, MAX_AREA, MIN_AREA, MIN_CONTRAST
from anomalib_robust.data.fashion_mnist_dataset import resize_images
from anomalib_robust.data.fashion_mnist_source import (
    DEBIAN_ROOT,
    EMBEDDED,
    IDX_FILES,
    class_index,
    embedded_path,
    load_split,
    read_idx,
    resolve_root,
)

DEBIAN_INSTALLED = all((DEBIAN_ROOT / name).is_file() for names in IDX_FILES.values() for name in names)
ROOTS = [EMBEDDED, *([str(DEBIAN_ROOT)] if DEBIAN_INSTALLED else [])]
SIZE = 32
CONFIG = Path(__file__).parents[2] / "configs" / "data" / "fashion_mnist.yaml"


def _items(datamodule: FashionMNIST, subset: str) -> list:
    dataset = getattr(datamodule, f"{subset}_data")
    return [dataset[i] for i in range(len(dataset))]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(f">HBB{array.ndim}I", 0, 0x08, array.ndim, *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fashion_mnist_cache")


@pytest.fixture(scope="module")
def defect(cache_dir: Path) -> FashionMNIST:
    datamodule = FashionMNIST(
        category="coat", root=EMBEDDED, image_size=SIZE, num_train=20, num_test=40, cache_dir=cache_dir
    )
    datamodule.setup()
    return datamodule


@pytest.fixture(scope="module")
def semantic(cache_dir: Path) -> FashionMNIST:
    datamodule = FashionMNIST(
        category=7, protocol="semantic", root=EMBEDDED, image_size=SIZE, num_train=20, num_test=40, cache_dir=cache_dir
    )
    datamodule.setup()
    return datamodule


def test_category_accepts_index_snake_case_and_official_names() -> None:
    assert [class_index(i) for i in range(10)] == list(range(10))
    assert [class_index(name) for name in CLASS_NAMES] == list(range(10))
    assert class_index("T-shirt/top") == 0
    assert class_index("Ankle boot") == 9
    assert class_index("3") == 3


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"category": 10}, "category"),
        ({"category": "hat"}, "category"),
        ({"category": True}, "category"),
        ({"protocol": "pixel"}, "protocol"),
        ({"image_size": 7, "protocol": "semantic"}, "image_size"),
        ({"image_size": 16}, "image_size"),  # defects need 32
        ({"image_size": 64.0}, "image_size"),
        ({"seed": None}, "seed"),
        ({"num_train": 0}, "num_train"),
        ({"num_train": 201}, "num_train"),  # the embedded subset has 200 per class
        ({"num_test": 1}, "num_test"),
        ({"num_test": 101}, "num_test"),  # defect tests use the 100 held-out images of the class
        ({"num_test": 201, "protocol": "semantic"}, "num_test"),  # at most as many anomalies as normal images
        ({"root": "/nonexistent/fashion-mnist"}, "root"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"^{argument} "):
        FashionMNIST(**{"root": EMBEDDED, **kwargs})


def test_root_without_idx_files_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").touch()
    with pytest.raises(ValueError, match=r"^root .*t10k-images-idx3-ubyte\.gz"):
        FashionMNIST(root=tmp_path)


def test_dataset_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match=r"^split "):
        FashionMNISTDataset("val", root=EMBEDDED)


def test_root_none_falls_back_to_embedded_subset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source_module, "DEBIAN_ROOT", tmp_path / "missing")
    assert resolve_root(None) == EMBEDDED
    assert resolve_root("embedded") == EMBEDDED


def test_root_none_prefers_debian_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    """A directory of idx files written from the embedded subset reads back into the same images."""
    for split, (image_file, label_file) in IDX_FILES.items():
        _write_idx(tmp_path / image_file, load_split(EMBEDDED, split).images)
        _write_idx(tmp_path / label_file, load_split(EMBEDDED, split).labels)
    monkeypatch.setattr(source_module, "DEBIAN_ROOT", tmp_path)
    assert resolve_root(None) == tmp_path
    assert np.array_equal(read_idx(tmp_path / IDX_FILES["test"][0]), load_split(EMBEDDED, "test").images)

    options = {"category": 2, "image_size": SIZE, "num_train": 5, "num_test": 6, "cache_dir": cache_dir}
    from_files, embedded = FashionMNIST(root=None, **options), FashionMNIST(root=EMBEDDED, **options)
    from_files.setup()
    embedded.setup()
    for subset in ("train", "val", "test"):
        # file positions differ (the written files hold only the subset), and so do the seeds of the defects
        first, second = (getattr(dm, f"{subset}_data").samples for dm in (from_files, embedded))
        assert first.label_index.tolist() == second.label_index.tolist()
        clean = first.label_index == 0
        assert clean.any()
        assert all(torch.equal(a, b) for a, b in zip(first.image[clean], second.image[clean], strict=True))


def test_read_idx_rejects_other_formats(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(struct.pack(">HBBI", 0, 0x0D, 1, 2) + bytes(8)))  # float32 idx file
    with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
        read_idx(path)


def test_images_are_three_channel_gray_floats_in_unit_range(defect: FashionMNIST, semantic: FashionMNIST) -> None:
    for datamodule in (defect, semantic):
        for subset in ("train", "val", "test"):
            for item in _items(datamodule, subset):
                assert item.image.shape == (3, SIZE, SIZE)
                assert item.image.dtype == torch.float32
                assert 0 <= item.image.min() <= item.image.max() <= 1
                assert torch.equal(item.image[0], item.image[1])
                assert torch.equal(item.image[0], item.image[2])


def test_batches_are_anomalib_image_batches(defect: FashionMNIST) -> None:
    batch = next(iter(defect.train_dataloader()))
    assert type(batch).__name__ == "ImageBatch"
    assert batch.image.shape == (20, 3, SIZE, SIZE)
    assert not batch.gt_label.any()
    assert not batch.gt_mask.any()


def test_defect_split_sizes_and_balance(defect: FashionMNIST) -> None:
    assert defect.task == TaskType.SEGMENTATION
    assert defect.category == "coat"
    assert len(defect.train_data) == 20
    for subset in ("val", "test"):
        samples = getattr(defect, f"{subset}_data").samples
        assert len(samples) == 20
        assert samples.label_index.sum() == 10
        assert set(samples.class_index) == {4}
    all_test = set(defect.val_data.samples.source_index) | set(defect.test_data.samples.source_index)
    assert all_test == set(load_split(EMBEDDED, "test").indices[load_split(EMBEDDED, "test").of_class(4)[:40]])


def test_defect_masks_are_small_on_object_and_only_on_anomalies(defect: FashionMNIST) -> None:
    test_split = load_split(EMBEDDED, "test")
    for subset in ("val", "test"):
        dataset = getattr(defect, f"{subset}_data")
        for index, item in enumerate(_items(defect, subset)):
            source_index = dataset.samples.source_index[index]
            clean = resize_images(test_split.images[test_split.indices == source_index], SIZE)[0, 0]
            pixels = (item.image[0] * 255).round().to(torch.uint8)
            if not item.gt_label:
                assert not item.gt_mask.any()
                assert torch.equal(pixels, clean)
                continue
            mask = item.gt_mask
            assert MIN_AREA <= mask.float().mean() <= MAX_AREA
            assert (clean[mask] > FOREGROUND_LEVEL).all()
            assert torch.equal(pixels[~mask], clean[~mask])
            assert (pixels[mask].float() - clean[mask].float()).abs().mean() / 255 >= MIN_CONTRAST


def test_semantic_labels_masks_and_balance(semantic: FashionMNIST) -> None:
    assert semantic.task == TaskType.CLASSIFICATION
    assert semantic.category == "sneaker"
    assert not semantic.train_data.samples.label_index.any()
    assert set(semantic.train_data.samples.class_index) == {7}
    test = (semantic.val_data + semantic.test_data).samples
    assert (test.label_index == (test.class_index != 7)).all()
    assert test.label_index.sum() == 20
    counts = test[test.label_index == 1].class_index.value_counts()
    assert set(counts.index) == set(range(10)) - {7}
    assert counts.max() - counts.min() <= 1
    for subset in ("train", "val", "test"):
        assert all(item.gt_mask is None for item in _items(semantic, subset))


def test_semantic_all_of_test_file(cache_dir: Path) -> None:
    dataset = FashionMNISTDataset(
        "test", category=0, protocol="semantic", root=EMBEDDED, image_size=8, cache_dir=cache_dir
    )
    assert len(dataset) == 1000
    assert dataset.samples.label_index.sum() == 900


def test_png_copies_match_the_served_tensors(defect: FashionMNIST) -> None:
    dataset = defect.test_data
    for index, item in enumerate(_items(defect, "test")):
        assert Path(item.image_path).parts[-5:-3] == ("FashionMNIST", "coat")
        assert torch.equal(read_image(item.image_path, as_tensor=True), item.image)
        if item.gt_label:
            assert item.gt_mask.any(), "a defective image has a defect mask"
            assert torch.equal(read_mask(item.mask_path, as_tensor=True).bool(), item.gt_mask)
        else:
            assert dataset.samples.mask_path[index] == ""


@pytest.mark.parametrize("root", ROOTS)
def test_same_samples_from_every_root_and_every_run(root: str, defect: FashionMNIST, cache_dir: Path) -> None:
    """Two instantiations give identical tensors; Debian's full files give what the embedded subset gives."""
    again = FashionMNIST(category="coat", root=root, image_size=SIZE, num_train=20, num_test=40, cache_dir=cache_dir)
    again.setup()
    for subset in ("train", "val", "test"):
        first, second = _items(defect, subset), _items(again, subset)
        assert [item.image_path for item in first] == [item.image_path for item in second]
        assert all(item.gt_mask.any() == item.gt_label for item in first), "masks exactly where defects are"
        for one, other in zip(first, second, strict=True):
            assert torch.equal(one.image, other.image)
            assert torch.equal(one.gt_mask, other.gt_mask)
            assert torch.equal(one.gt_label, other.gt_label)


def test_seed_changes_the_defects(defect: FashionMNIST, cache_dir: Path) -> None:
    other = FashionMNIST(
        category="coat", root=EMBEDDED, image_size=SIZE, num_train=20, num_test=40, seed=1, cache_dir=cache_dir
    )
    other.setup()
    masks = [torch.stack([item.gt_mask for item in _items(dm, "test")]) for dm in (defect, other)]
    assert all(mask.flatten(1).any(dim=1).sum() == 10 for mask in masks)  # 10 defective images each
    assert not torch.equal(*masks)


def test_defects_are_the_same_on_every_machine(cache_dir: Path) -> None:
    """The PNG folder is named after a hash of the pixels: a different hash means different defects.

    A change here (e.g. after a torch or anomalib upgrade changed a random draw) breaks comparability with earlier runs.
    """
    dataset = FashionMNISTDataset(
        "test", category="dress", root=EMBEDDED, image_size=32, num_images=10, cache_dir=cache_dir
    )
    assert dataset.samples.source_index.tolist() == [29, 33, 42, 67, 86, 13, 32, 75, 91, 100]
    assert dataset.samples.label_index.tolist() == [1] * 5 + [0] * 5
    assert Path(dataset.samples.image_path[0]).relative_to(cache_dir).parts[0] == "4b98240f476d62b2"


def test_defects_leave_the_global_random_state_alone(cache_dir: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    FashionMNISTDataset("test", root=EMBEDDED, image_size=SIZE, num_images=4, cache_dir=cache_dir)
    assert torch.equal(torch.rand(3), expected)


EMBEDDED_SHA256 = {
    "test_images": "3d7f6d64869a3f2d",
    "test_indices": "da71f82810e2bd21",
    "test_labels": "6b25654537ff83dd",
    "train_images": "6c59094797e4bc9e",
    "train_indices": "945317398f1c4e02",
    "train_labels": "da01741fd7f7b6c4",
}
"""First 16 hex digits of the SHA-256 of each array of the embedded subset, as built from Debian's official files."""


def test_embedded_subset_is_the_recorded_one() -> None:
    """Without the official files (CI): the stored arrays are the ones recorded when the subset was built from them
    (checked against those files in the next test), balanced, in file order."""
    assert embedded_path().stat().st_size < 2_000_000
    with np.load(embedded_path()) as stored:
        digests = {name: hashlib.sha256(np.ascontiguousarray(stored[name]).tobytes()).hexdigest()[:16]
                   for name in stored.files}  # fmt: skip
        assert digests == EMBEDDED_SHA256
        for split, per_class in (("train", 200), ("test", 100)):
            assert np.bincount(stored[f"{split}_labels"]).tolist() == [per_class] * 10
            assert (np.diff(stored[f"{split}_indices"]) > 0).all()


@pytest.mark.skipif(not DEBIAN_INSTALLED, reason="needs Debian's dataset-fashion-mnist (the official files)")
def test_embedded_subset_is_the_first_images_of_each_class_in_the_official_files() -> None:
    expected = select_subset(DEBIAN_ROOT)
    with np.load(embedded_path()) as stored:
        assert sorted(stored.files) == sorted(expected)
        for name, array in expected.items():
            assert np.array_equal(stored[name], array), name


def test_augmentations_move_image_and_mask_together(cache_dir: Path) -> None:
    dataset = FashionMNISTDataset("test", root=EMBEDDED, image_size=SIZE, num_images=4, cache_dir=cache_dir)
    flipped = FashionMNISTDataset(
        "test", root=EMBEDDED, image_size=SIZE, num_images=4, cache_dir=cache_dir, augmentations=RandomHorizontalFlip(1)
    )
    moved = 0
    for index in range(4):
        assert torch.equal(flipped[index].image, dataset[index].image.flip(-1))
        assert torch.equal(flipped[index].gt_mask, dataset[index].gt_mask.flip(-1))
        moved += int(not torch.equal(dataset[index].gt_mask, dataset[index].gt_mask.flip(-1)))
    assert moved > 0, "no mask that the flip changes: the check above would be vacuous"


def test_config_file_builds_the_datamodule() -> None:
    datamodule = AnomalibDataModule.from_config(CONFIG, **{"data.category": "bag", "data.root": "embedded"})
    assert isinstance(datamodule, FashionMNIST)
    assert (datamodule.category, datamodule.protocol, datamodule.image_size) == ("bag", "defect", 64)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["defect", "semantic"])
def test_padim_trains_and_reports_metrics(protocol: str, tmp_path: Path, cache_dir: Path) -> None:
    from anomalib.engine import Engine
    from anomalib.models import Padim

    datamodule = FashionMNIST(
        protocol=protocol, root=EMBEDDED, image_size=SIZE, num_train=16, num_test=16, cache_dir=cache_dir
    )
    model = Padim(backbone="resnet18", pre_trained=False, layers=["layer1"], n_features=64)
    engine = Engine(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    (results,) = engine.test(model, datamodule=datamodule, verbose=False)

    predictions = engine.predict(model, dataloaders=datamodule.test_dataloader())
    scores = torch.cat([batch.pred_score.flatten() for batch in predictions])
    labels = torch.cat([batch.gt_label.flatten() for batch in predictions]).bool()
    assert 0 < labels.sum() < len(labels) and scores.unique().numel() > 1
    pairs = scores[labels][:, None] - scores[~labels][None, :]  # the AUROC by hand: P(anomaly scores higher)
    assert results["image_AUROC"] == pytest.approx(float((pairs > 0).float().mean() + (pairs == 0).float().mean() / 2))
    assert ("pixel_AUROC" in results) == (protocol == "defect")
    images = list(tmp_path.rglob("images/test/*/*.png"))
    assert len(images) == len(datamodule.test_data)
    kinds = {path.parent.name for path in images}
    assert kinds == {"good", "defect"} if protocol == "defect" else "good" in kinds and kinds <= {"good", *CLASS_NAMES}
