"""Cost of one PGD step relative to a bare forward + backward pass of the same detector on the same batch.

A PGD step (AdvRAD paper, eq. 1) is one forward and one backward pass of the raw score plus the ascent, projection and
worst-case bookkeeping; the target is a ratio below 1.3. The bare pass also lifts anomalib's ``no_grad`` blocks
(otherwise there is no input gradient to compare with). The per-step time is measured as the difference between
attacks with ``2n`` and ``n`` steps, so the fixed cost of an attack call (checks, state, final scoring) cancels out.
Beside it, the roofline columns of :mod:`roofline`: the FLOPs of one forward + backward per image (the whole detector,
pre-processor and backbone included), the image-steps per second of PGD, the GFLOP/s they reach and the share of the
fp32 matmul peak timed in the same run. Prints a table, never asserts.

Example:
    $ python benchmarks/attack_overhead.py --models Padim Patchcore Stfpm --batch-size 8 --image-size 64
"""

import argparse
import time
from collections.abc import Callable

import torch
from anomalib.engine import Engine
from rich.console import Console
from rich.table import Table
from robust_auroc_table import build
from roofline import COLUMNS, Roofline, attack_flops_per_image

from anomalib_robust.attacks import PGD, DetectorScore
from anomalib_robust.data import FashionMNIST


def timed(function: Callable, *arguments: object, repeats: int) -> float:
    """Best wall time of ``repeats`` calls ``function(*arguments)``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function(*arguments)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["Padim", "Patchcore", "Stfpm", "Fastflow", "Cfa", "AdvRAD"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="n: attacks with n and 2n steps are timed")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    datamodule = FashionMNIST(
        category="trouser", image_size=args.image_size, num_train=32, num_test=2 * args.batch_size
    )
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    images, labels = batch.image[: args.batch_size], batch.gt_label[: args.batch_size]
    roofline = Roofline.measure()

    table = Table(title=f"PGD step vs forward + backward ({args.batch_size} images, {args.image_size} px, CPU)")
    for column in ("Model", "forward+backward (ms)", "PGD step (ms)", "ratio", "PGD image-steps/s", *COLUMNS):
        table.add_column(column, justify="right")
    for name in args.models:
        torch.manual_seed(0)
        model = build(name, args.image_size)
        Engine(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
               default_root_dir="results/benchmarks/attack_overhead").fit(model, datamodule=datamodule)  # fmt: skip
        detector = DetectorScore(model, eot_samples=1)
        with detector.prepared():
            bare = timed(detector.objective_and_gradient, images, labels, repeats=args.repeats)
        flops = attack_flops_per_image(detector, images, labels)
        attack = {n: PGD(model, eps=2 / 255, steps=n, eot_samples=1) for n in (args.steps, 2 * args.steps)}
        short = timed(attack[args.steps], images, labels, repeats=args.repeats)
        long = timed(attack[2 * args.steps], images, labels, repeats=args.repeats)
        step = (long - short) / args.steps
        speed = len(images) / step
        cells = (f"{1000 * bare:.1f}", f"{1000 * step:.1f}", f"{step / bare:.2f}", f"{speed:.1f}")
        table.add_row(name, *cells, *roofline.cells(flops, speed))
    console = Console(width=160)
    console.print(table)
    console.print(roofline.caption())


if __name__ == "__main__":
    main()
