"""AdvRAD's normal error map (AdvRAD paper, Alg. 4 line 9) is computed from the training images as test images arrive."""

from types import SimpleNamespace

import torch
from torchvision.transforms.v2 import Compose, RandomAffine, RandomInvert

from anomalib_robust import AdvRAD
from anomalib_robust.data import FashionMNIST


def _datamodule(train_augmentations: Compose | None = None) -> FashionMNIST:
    datamodule = FashionMNIST(
        category="trouser",
        protocol="semantic",
        root="embedded",
        image_size=32,
        num_train=8,
        num_test=4,
        train_augmentations=train_augmentations,
    )
    datamodule.setup()
    return datamodule


def _normal_error_map(model: AdvRAD, datamodule: FashionMNIST) -> torch.Tensor:
    model._trainer = SimpleNamespace(datamodule=datamodule, global_step=0)
    model.fit_normal_statistics()
    return model.model.normal_error_map.clone()


def test_training_augmentations_do_not_enter_the_normal_error_map(tiny_advrad: dict) -> None:
    shift_and_invert = Compose([RandomAffine(degrees=0, translate=(0.4, 0.4)), RandomInvert(p=1.0)])
    augmented, plain = _datamodule(shift_and_invert), _datamodule()
    augmented_batch, plain_batch = next(iter(augmented.train_dataloader())), next(iter(plain.train_dataloader()))
    assert not torch.allclose(augmented_batch.image.mean(), plain_batch.image.mean())  # the augmentation is strong

    model = AdvRAD(**tiny_advrad)
    expected = _normal_error_map(model, plain)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(_normal_error_map(model, augmented), expected)
