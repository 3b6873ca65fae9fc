"""AGDM's two guidance strengths measured on the CPU presets: how far each moves a reverse step, in units of its noise.

The AGDM paper (Alg. 1, sec. 3.3 and 5.1) shifts every reverse mean by ``s Sigma grad log p`` with a fixed ``s = 1``
(``AGDM(guidance_mode="fixed_scale")``); this package's default sets ``s_t`` so that the shift is ``guidance_ratio``
times the step's noise (``guidance_mode="ratio"``, 0.5). On one Fashion-MNIST class this script trains the AdvRAD CPU
preset (the diffusion model) and ``AGDMGuidance.cpu_preset()`` for a few steps each, purifies ``--images`` test images
with AGDM(t*) in both modes and without guidance (same seed: the same noise draws), and prints:

- per mode, the guidance-to-noise ratio ``||shift|| / ||sqrt(Sigma)||`` of every reverse step and image
  (:attr:`AGDM.guidance_to_noise <anomalib_robust.defenses.AGDM>`): minimum, median, maximum;
- per mode, the mean D(f(x', 0), f(purified, 0)) of eq. (4): how close the purified features are to the input's;
- the guidance target: D between an image at step 0 and its own copy diffused to step t, against D between two
  different clean images (the guidance pulls towards the input only where the first is the smaller).

Small and CPU-only (one thread): about 3 minutes with the defaults. Prints a table, never asserts.

Example:
    $ OMP_NUM_THREADS=1 python benchmarks/agdm_guidance_strength.py --category trouser
"""

import argparse
import os
import time

import torch
from anomalib.engine import Engine

from anomalib_robust import AdvRAD
from anomalib_robust.data import CLASS_NAMES, FashionMNIST
from anomalib_robust.defenses import AGDM
from anomalib_robust.models import AGDMGuidance
from anomalib_robust.models.agdm_guidance.loss import diffuse
from anomalib_robust.models.agdm_guidance.torch_model import consistency_divergence

SIZE = 32


def train(model: torch.nn.Module, datamodule: FashionMNIST, steps: int, root: str) -> float:
    """Fit ``model`` for ``steps`` optimiser steps without validation; return the seconds."""
    started = time.perf_counter()
    Engine(default_root_dir=root, max_steps=steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
           enable_model_summary=False).fit(model, datamodule=datamodule)  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="trouser", choices=CLASS_NAMES)
    parser.add_argument("--advrad-steps", type=int, default=300)
    parser.add_argument("--guidance-steps", type=int, default=120)
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--depth", type=int, default=70, help="t* of Alg. 1")
    parser.add_argument("--root", default="results/benchmarks/agdm_guidance_strength")
    arguments = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    torch.manual_seed(0)
    datamodule = FashionMNIST(category=arguments.category, image_size=SIZE, num_train=arguments.num_train,
                              num_test=2 * arguments.images, train_batch_size=16)  # fmt: skip
    denoiser = AdvRAD.cpu_preset(evaluator=False, visualizer=False)
    guidance = AGDMGuidance.cpu_preset(evaluator=False, visualizer=False)
    seconds = {"AdvRAD": train(denoiser, datamodule, arguments.advrad_steps, arguments.root),
               "AGDMGuidance": train(guidance, datamodule, arguments.guidance_steps, arguments.root)}  # fmt: skip
    datamodule.setup()
    images = torch.cat([batch.image for batch in datamodule.test_dataloader()])[: arguments.images]
    network, clean = guidance.model.eval(), torch.zeros(len(images), dtype=torch.long)

    print(f"# AGDM(t* = {arguments.depth}) on {arguments.images} {arguments.category} test images; AdvRAD CPU preset "
          f"trained {arguments.advrad_steps} steps ({seconds['AdvRAD']:.0f} s), AGDMGuidance CPU preset "
          f"{arguments.guidance_steps} steps ({seconds['AGDMGuidance']:.0f} s)\n")  # fmt: skip
    print("| mode | guidance-to-noise ratio per step (min / median / max) | D(f(x'), f(purified)) |")
    print("|---|---|---|")
    modes = {"none (DiffPure)": {"guidance_ratio": 0.0},
             "fixed_scale s = 1 (the AGDM paper)": {"guidance_mode": "fixed_scale"},
             "ratio 0.5 (ours, default)": {"guidance_mode": "ratio"}}  # fmt: skip
    with torch.no_grad():
        reference = network.features(images, clean)
        for name, settings in modes.items():
            purifier = AGDM(denoiser, guidance, depth=arguments.depth, **settings)
            torch.manual_seed(1)
            purified = purifier(images)
            divergence = consistency_divergence(reference, network.features(purified, clean)).mean()
            ratios = purifier.guidance_to_noise
            spread = "-" if ratios is None else (f"{ratios.min():.2g} / {ratios.median():.2g} / {ratios.max():.2g}")
            print(f"| {name} | {spread} | {divergence:.4f} |")

        print("\n| step t | D(image at 0, its copy at t) | D(two different clean images) |")
        print("|---|---|---|")
        others = consistency_divergence(reference, reference.roll(1, dims=0)).mean()
        for step in (10, 35, 50, 70):
            steps = torch.full_like(clean, step)
            diffused = diffuse(guidance.schedule, images, steps, torch.randn_like(images))
            own = consistency_divergence(reference, network.features(diffused, steps)).mean()
            print(f"| {step} | {own:.4f} | {others:.4f} |")


if __name__ == "__main__":
    main()
