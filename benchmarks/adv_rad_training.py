"""Training cost of AdvRAD: a full training step (hybrid loss, eq. 10) vs the bare U-Net forward + backward.

The hybrid loss adds the forward process, the posterior and the variational-bound term on top of the U-Net; the
target is an overhead below 15 %. Also reports the peak resident memory of the process. Both timings use the same
batch, the same model and the same optimizer step, interleaved so that machine load affects them alike.

    python benchmarks/adv_rad_training.py [--image-size 32] [--batch 16] [--steps 10]
"""

import argparse
import resource
import time

import torch
from rich.console import Console
from rich.table import Table

from anomalib_robust.models.adv_rad.torch_model import AdvRADModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    size = (arguments.image_size, arguments.image_size)
    model = AdvRADModel(image_size=size, base_channels=32, channel_mult=(1, 2, 2, 2), layers_per_block=1).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.rand(arguments.batch, 3, *size)
    timesteps = torch.randint(0, model.schedule.num_timesteps, (arguments.batch,))

    def advrad_step() -> None:
        model(images)["loss"].backward()

    def bare_unet_step() -> None:
        model.denoise(images * 2 - 1, timesteps).square().mean().backward()

    timings = {"AdvRAD hybrid-loss step": 0.0, "bare U-Net forward+backward": 0.0}
    steps = dict(zip(timings, (advrad_step, bare_unet_step), strict=True))
    for step in steps.values():  # warm-up
        step()
    for _ in range(arguments.steps):
        for name, step in steps.items():
            optimizer.zero_grad()
            start = time.perf_counter()
            step()
            optimizer.step()
            timings[name] += time.perf_counter() - start

    table = Table(title=f"AdvRAD training step, {size[0]}x{size[1]}, batch {arguments.batch}")
    for column in ("step", "s/step", "images/s", "ratio"):
        table.add_column(column, justify="right")
    bare = timings["bare U-Net forward+backward"]
    for name, total in timings.items():
        per_step = total / arguments.steps
        table.add_row(name, f"{per_step:.3f}", f"{arguments.batch / per_step:.1f}", f"{total / bare:.3f}")
    console = Console(width=120)
    console.print(table)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    console.print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M, peak RSS: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
