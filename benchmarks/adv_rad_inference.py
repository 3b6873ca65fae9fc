"""Inference speed of AdvRAD's reconstruction modes on the same inputs (AdvRAD paper, appendix D.5, Table 18).

One-shot denoising (Alg. 1) costs one U-Net evaluation; arbitrary-shot (Alg. 3) with m steps costs m; full-shot
(Alg. 2) costs k. The table reports images/s and the slowdown relative to one-shot, for the CPU preset and (with
``--paper``) the paper's 256 x 256 configuration, with the roofline columns of :mod:`roofline` (FLOPs per image of the
whole call, achieved GFLOP/s and the share of the fp32 matmul peak timed in the same run). Weights are random: speed
does not depend on them.

    python benchmarks/adv_rad_inference.py [--paper] [--batch 8] [--repeats 2]
"""

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from roofline import COLUMNS, Roofline, count_flops, synchronize

from anomalib_robust.models.adv_rad.reconstruction import uniform_step_schedule
from anomalib_robust.models.adv_rad.torch_model import AdvRADModel

CPU_PRESET = {"image_size": (32, 32), "base_channels": 32, "channel_mult": (1, 2, 2, 2), "layers_per_block": 1}
PAPER = {"image_size": (256, 256)}


def images_per_second(model: AdvRADModel, images: torch.Tensor, repeats: int) -> float:
    """Images per second of ``repeats`` calls on ``images`` after a warm-up call (on their device, synchronised)."""
    with torch.no_grad():
        model(images[:1])  # warm-up
        synchronize(images.device)
        start = time.perf_counter()
        for _ in range(repeats):
            model(images)
        synchronize(images.device)
    return repeats * images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="also time the paper's 256x256 configuration")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    roofline = Roofline.measure()

    table = Table(title="AdvRAD inference: reconstruction modes (k = 100, same inputs)")
    for column in ("config", "mode", "U-Net calls", "images/s", "s/image", "x one-shot", *COLUMNS):
        table.add_column(column, justify="right")
    configs = {"cpu preset 32x32": CPU_PRESET} | ({"paper 256x256": PAPER} if arguments.paper else {})
    for name, config in configs.items():
        model = AdvRADModel(**config).eval()
        model.set_normal_error_map(torch.zeros(1, 1, *model.image_size))
        batch = arguments.batch if name.startswith("cpu") else 1
        images = torch.rand(batch, 3, *model.image_size)
        k = model.diffusion_step
        modes = [
            ("one_shot", None, 1),
            ("arbitrary_shot 0.1k", uniform_step_schedule(k, k // 10), k // 10),
            ("arbitrary_shot 0.25k", uniform_step_schedule(k, k // 4), k // 4),
            ("full_shot", None, k),
        ]
        baseline = None
        for label, schedule, calls in modes:
            model.set_reconstruction(k, label.split()[0], schedule)
            repeats = arguments.repeats if calls == 1 else 1
            speed = images_per_second(model, images, repeats)
            baseline = baseline or speed
            with torch.no_grad():
                flops = count_flops(lambda: model(images[:1]))
            cells = (f"{speed:.2f}", f"{1 / speed:.3f}", f"{baseline / speed:.1f}", *roofline.cells(flops, speed))
            table.add_row(name, label, str(calls), *cells)
    console = Console(width=160)
    console.print(table)
    console.print(roofline.caption())


if __name__ == "__main__":
    main()
