"""Artefacts built once per test run and shared by the xdist workers (a file lock, a directory of the run)."""

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from filelock import FileLock

if TYPE_CHECKING:
    from anomalib.data import MVTecAD

TINY_ADVRAD = {
    "image_size": (32, 32),
    "base_channels": 32,
    "channel_mult": (1, 2),
    "attention_resolutions": (),
    "layers_per_block": 1,
    "num_timesteps": 100,
    "diffusion_step": 10,
}
"""Init args of an AdvRAD (32 x 32 images) small enough to fit in a few seconds on a CPU."""


def shared_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of this test run that every xdist worker sees (the parent of the workers' base temp dirs)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``<shared>/<name>``, filled by ``build(directory)`` in the first worker that asks, under a file lock.

    A build that fails leaves no completion marker: the next worker to ask builds again (and reports its own error).
    """
    root = shared_directory(tmp_path_factory)
    directory, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            torch.manual_seed(0)
            build(directory)
            done.touch()
    return directory


def mvtec_datamodule(root: Path, eval_batch_size: int = 4) -> "MVTecAD":
    """anomalib's MVTecAD on the ``disc`` category of ``mvtec_root`` (tests/integration/conftest.py)."""
    from anomalib.data import MVTecAD

    return MVTecAD(root=root, category="disc", train_batch_size=4, eval_batch_size=eval_batch_size, num_workers=0)
