"""The CPU preset, trained briefly on the embedded Fashion-MNIST data, localises the defects clearly above chance."""

import torch
from anomalib.engine import Engine

from anomalib_robust import PatchGuard
from anomalib_robust.data import FashionMNIST

STEPS = 60
"""60 iterations at batch 16 (~5 epochs of 200 images); adversarial training off to fit the test budget (the
benchmark measures the preset with it)."""
MIN_PIXEL_AUROC = 0.70
"""Measured pixel AUROC 0.80 for this setting on the development machine (0.82-0.85 after 100-150 steps); chance is
0.5. Image AUROC is printed, not asserted: at 60-150 iterations it measured 0.48-0.63 (0.53 here) and reached 0.87
only after 600 (pixel 0.97), beyond this test's budget; the patch logits localise the small defects first."""


def test_trained_cpu_preset_is_clearly_above_chance(tmp_path) -> None:
    torch.manual_seed(0)
    datamodule = FashionMNIST(category="trouser", root="embedded", image_size=32, num_test=100, train_batch_size=16)
    model = PatchGuard.cpu_preset(adversarial_training=False)
    engine = Engine(max_steps=STEPS, check_val_every_n_epoch=1000, num_sanity_val_steps=0, default_root_dir=tmp_path,
                    logger=False, enable_progress_bar=False)  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    (metrics,) = engine.test(model, datamodule=datamodule, verbose=False)
    print(f"image_AUROC={metrics['image_AUROC']:.3f} pixel_AUROC={metrics['pixel_AUROC']:.3f}")
    assert metrics["pixel_AUROC"] > MIN_PIXEL_AUROC
