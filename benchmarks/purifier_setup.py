"""What the purifier benchmarks share: the detector behind the purifiers and the networks RAP and AGDM train.

- :func:`fitted_padim`: Padim on a random-init ResNet-18 (layer1 + layer2) at 32 x 32, the detector that DiffPure, TMA,
  RAP and AGDM defend in ``purifier_table.py``, ``rap_table.py`` and ``eot_throughput.py``.
- :func:`train_rap`: a RAP adapter (the RAP paper, Alg. 3) trained against that Padim, at the CPU size of
  ``configs/model/rap_adapter_cpu.yaml`` (a 2-level 32-channel U-Net, lr 1e-3), with T attack steps of its forward
  process (Alg. 1) and the identity term on pseudo anomalies (weight 1) or without it (0).
- :func:`trained_guidance`: AGDM's robust guidance network (the AGDM paper, eq. 6), ``AGDMGuidance.cpu_preset()``
  trained on the same normal images, kept as a checkpoint so that a second run reuses it.
"""

import json
import math
import time
from pathlib import Path

import torch
from anomalib.engine import Engine
from anomalib.models import Padim

from anomalib_robust.data import FashionMNIST
from anomalib_robust.defenses import RAP
from anomalib_robust.evaluation.report import write_atomic
from anomalib_robust.models import AGDMGuidance, RAPAdapter

SIZE = 32
"""The AdvRAD CPU preset's image size; purifiers, AdvRAD and Padim all see 32 x 32 images."""


def fitted_padim(datamodule: FashionMNIST, root: Path | str) -> Padim:
    """The detector behind the purifiers: Padim on a random-init ResNet-18 (layers 1-2) at ``SIZE`` x ``SIZE``,
    fitted on ``datamodule``'s training images (anomalib's evaluator and visualizer off)."""
    padim = Padim(
        backbone="resnet18",
        pre_trained=False,
        layers=["layer1", "layer2"],
        pre_processor=Padim.configure_pre_processor((SIZE, SIZE)),
        evaluator=False,
        visualizer=False,
    )
    Engine(default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False).fit(
        padim, datamodule=datamodule
    )
    return padim


def train_rap(
    padim: Padim,
    datamodule: FashionMNIST,
    root: Path,
    seed: int,
    steps: int,
    epochs: int,
    identity_weight: float = 1.0,
    task_weight: float = 0.1,
) -> tuple[RAP, float]:
    """One-step RAP (Alg. 2 with one U-Net call) around an adapter trained ``epochs`` epochs against ``padim`` from
    ``seed``; returns the defense and the training seconds."""
    torch.manual_seed(seed)
    adapter = RAPAdapter(detector=padim, image_size=(SIZE, SIZE), base_channels=32, channel_mult=(1, 2), steps=steps,
                         learning_rate=1e-3, identity_weight=identity_weight, task_weight=task_weight, seed=seed,
                         evaluator=False, visualizer=False)  # fmt: skip
    started = time.perf_counter()
    Engine(default_root_dir=root, logger=False, max_epochs=epochs, limit_val_batches=0,
           enable_progress_bar=False).fit(adapter, datamodule=datamodule)  # fmt: skip
    return RAP(adapter), time.perf_counter() - started


def trained_guidance(datamodule: FashionMNIST, path: Path, epochs: int) -> tuple[AGDMGuidance, float]:
    """AGDM's guidance network trained ``epochs`` epochs on ``datamodule`` from seed 0, or the checkpoint at ``path``
    that an earlier call wrote; returns it and its training seconds (kept next to the checkpoint, NaN for a checkpoint
    written without them)."""
    seconds_path = path.with_suffix(".seconds.json")
    if path.exists():
        seconds = json.loads(seconds_path.read_text()) if seconds_path.exists() else math.nan
        return AGDMGuidance.load_from_checkpoint(path, map_location="cpu"), seconds
    torch.manual_seed(0)
    network = AGDMGuidance.cpu_preset(evaluator=False, visualizer=False)
    started = time.perf_counter()
    engine = Engine(default_root_dir=path.parent, logger=False, max_epochs=epochs, limit_val_batches=0,
                    enable_progress_bar=False)  # fmt: skip
    engine.fit(network, datamodule=datamodule)
    seconds = time.perf_counter() - started
    partial = path.with_name(path.name + ".partial")  # an interrupted save leaves no checkpoint that loads
    engine.trainer.save_checkpoint(partial)
    partial.replace(path)
    write_atomic(seconds_path, json.dumps(seconds))
    print(f"AGDM guidance trained in {seconds:.0f} s", flush=True)
    return network, seconds
