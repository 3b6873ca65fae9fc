"""Shared test settings: one torch thread per process (2-core CI), deterministic seeds, a tiny AdvRAD."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_advrad() -> dict:
    """Init args of an AdvRAD (32 x 32 images) small enough to fit in a few seconds on a CPU."""
    return {
        "image_size": (32, 32),
        "base_channels": 32,
        "channel_mult": (1, 2),
        "attention_resolutions": (),
        "layers_per_block": 1,
        "num_timesteps": 100,
        "diffusion_step": 10,
    }
