"""A PatchGuard torch model small enough for unit tests (16 x 16 images, 4 x 4 patches, 2 blocks of width 32)."""

import pytest

from anomalib_robust.models.patch_guard.torch_model import PatchGuardModel

TINY = {
    "image_size": (16, 16),
    "patch_size": 4,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "discriminator_heads": 2,
    "discriminator_mlp_dim": 64,
    "sigma": 1.0,
    "kernel_size": 5,
}


@pytest.fixture
def tiny_model() -> PatchGuardModel:
    """16 patch tokens, regularised blocks (1, 2): 6/9/12 of 12 scaled to 2 blocks."""
    return PatchGuardModel(**TINY)


@pytest.fixture
def tiny_args() -> dict:
    """Init args of the tiny model."""
    return dict(TINY)
