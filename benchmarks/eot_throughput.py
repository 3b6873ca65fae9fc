"""EOT-PGD throughput with batched EOT draws against one draw per forward call, on randomised detectors.

Attacking a randomised detector costs steps x EOT draws forward and backward passes per image (AdvRAD paper, sec. 5.6).
:mod:`anomalib_robust.attacks.eot` runs the draws as stacked copies of the batch (``max_batch=None``: chunks chosen
from the image size); ``max_batch`` equal to the batch size gives one draw per call, the loop of earlier releases.
Both produce the same estimate (tests/unit/attacks/test_eot_batched.py); this script measures the speed, in image-steps
per second (batch x PGD steps / wall time), for AdvRAD's CPU preset (one-shot) and ``Purified(Padim, DiffPure(level=5))``
at n = 8 and n = 20 draws, and prints the ratio of the two measured in the same run. Timing does not depend on
training, so the U-Net keeps its initial weights (Padim is fitted, its Gaussian needs data). Beside the speeds, the
roofline columns of :mod:`roofline`: FLOPs per image-step (n draws of forward + input backward), the GFLOP/s of both
paths and the batched path's share of the fp32 matmul peak timed in the same run. Prints a table, never asserts.

Example:
    $ OMP_NUM_THREADS=2 python benchmarks/eot_throughput.py
    $ python benchmarks/eot_throughput.py --draws 8 --batch-size 4 --steps 2 --repeats 1
"""

import argparse
import os
import time

import torch
from purifier_setup import fitted_padim
from rich.console import Console
from rich.table import Table
from roofline import Roofline, achieved_gflops, attack_flops_per_image, synchronize

from anomalib_robust import AdvRAD
from anomalib_robust.attacks import PGD, DetectorScore
from anomalib_robust.data import FashionMNIST
from anomalib_robust.defenses import DiffPure, Purified

SIZE = 32
"""The AdvRAD CPU preset's image size."""


def detectors(datamodule: FashionMNIST) -> dict[str, torch.nn.Module]:
    """AdvRAD's CPU preset (initial weights, zero normal error map) and Padim behind DiffPure p = 5 on its U-Net."""
    torch.manual_seed(0)
    adv_rad = AdvRAD.cpu_preset(evaluator=False, visualizer=False)
    adv_rad.model.set_normal_error_map(torch.zeros_like(adv_rad.model.normal_error_map))
    padim = fitted_padim(datamodule, "results/benchmarks/eot_throughput")
    return {
        "AdvRAD (CPU preset)": adv_rad,
        "Purified(Padim, DiffPure p=5)": Purified(padim, DiffPure(adv_rad, level=5)),
    }


def max_batch_value(text: str) -> int | None:
    """``--max-batch`` values: ``auto`` (``None``, the default chunking) or a number of images per call."""
    return None if text == "auto" else int(text)


def throughput(model: torch.nn.Module, images: torch.Tensor, draws: int, max_batch: int | None, args) -> float:
    """Best image-steps per second of EOT-PGD over ``args.repeats`` runs (on the images' device, synchronised)."""
    labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    attack = PGD(DetectorScore(model, eot_samples=draws, max_batch=max_batch), eps=2 / 255, steps=args.steps)
    best = float("inf")
    for _ in range(args.repeats):
        synchronize(images.device)
        started = time.perf_counter()
        attack(images, labels)
        synchronize(images.device)
        best = min(best, time.perf_counter() - started)
    return images.shape[0] * args.steps / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", nargs="+", type=int, default=[8, 20])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-batch", nargs="+", type=max_batch_value, default=[None], metavar="auto|N",
                        help="batched columns: max_batch of each (auto: the default chosen from the image size)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    datamodule = FashionMNIST(category="trouser", root="embedded", image_size=SIZE, num_train=64, num_test=16)
    datamodule.setup()
    images = next(iter(datamodule.test_dataloader())).image[: args.batch_size]
    roofline = Roofline.measure()
    table = Table(
        title=f"EOT-PGD throughput, image-steps/s (batch {images.shape[0]}, {args.steps} steps, "
        f"{torch.get_num_threads()} threads, best of {args.repeats})"
    )
    batched_columns = [f"batched ({'auto' if value is None else value})" for value in args.max_batch]
    for column in ("detector", "EOT draws", "one draw per call", *batched_columns, "speed-up", "GFLOP/image-step"):
        table.add_column(column, justify="right")
    for column in ("GFLOP/s loop", "GFLOP/s batched", "% fp32 peak batched"):
        table.add_column(column, justify="right")
    labels = torch.zeros(images.shape[0], dtype=torch.long)
    for name, model in detectors(datamodule).items():
        flops_per_draw = attack_flops_per_image(DetectorScore(model), images, labels)
        for draws in args.draws:
            looped = throughput(model, images, draws, images.shape[0], args)
            batched = [throughput(model, images, draws, value, args) for value in args.max_batch]
            flops = draws * flops_per_draw
            gflops_loop, gflops_batched = achieved_gflops(flops, looped), achieved_gflops(flops, batched[0])
            speeds = (f"{looped:.2f}", *(f"{speed:.2f}" for speed in batched))
            ratios = " / ".join(f"{speed / looped:.2f}x" for speed in batched)
            shares = (f"{gflops_loop:.1f}", f"{gflops_batched:.1f}", f"{100 * roofline.share(gflops_batched):.1f}%")
            table.add_row(name, str(draws), *speeds, ratios, f"{flops / 1e9:.2f}", *shares)
    console = Console(width=200)
    console.print(table)
    console.print(f"speed-up: each batched column over one draw per call; GFLOP/s batched: {batched_columns[0]}")
    console.print(roofline.caption())


if __name__ == "__main__":
    main()
