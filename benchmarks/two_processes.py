"""Both cores of a CPU for one robust evaluation: one process with one or two threads, against two processes.

A purified detector's evaluation on a CPU is small convolutions (the 32 x 32 U-Net of the purifier, forward and
backward, a few images and EOT draws at a time), which scale poorly over threads. ``RobustEvaluator(processes=2)``
shards the test batches over two spawned processes of one thread each, as DDP shards them over ranks
(:mod:`anomalib_robust.evaluation.processes`). This script times one evaluation of ``Purified(Padim, DiffPure p)``
(Padim on a random-init ResNet-18, fitted, behind DiffPure on the AdvRAD CPU preset's U-Net at its initial weights:
the timing does not depend on training), attacked with L_inf EOT-PGD through the surrogate chain, on Fashion-MNIST
test images at 32 x 32, in three ways:

- (a) one process, one thread;
- (b) one process, two threads;
- (c) two processes of one thread each (the workers' start, which imports torch and anomalib, included).

It prints their wall seconds, the speed-ups, and whether each report (AUROC, per-image scores) equals (a)'s bit for bit.
Run it on otherwise idle cores. Prints a table, never asserts.

Example:
    $ make fashion-mnist
    $ OMP_NUM_THREADS=1 python benchmarks/two_processes.py
    $ OMP_NUM_THREADS=1 python benchmarks/two_processes.py --num-test 8 --steps 1 --eval-repeats 2  # a smoke run
"""

import argparse
import time

import torch
from purifier_setup import SIZE, fitted_padim
from rich.console import Console
from rich.table import Table

from anomalib_robust import AdvRAD
from anomalib_robust.data import FashionMNIST
from anomalib_robust.defenses import DiffPure
from anomalib_robust.evaluation import RobustEvaluator, RobustReport

WAYS = {"(a) 1 process x 1 thread": (1, 1), "(b) 1 process x 2 threads": (1, 2), "(c) 2 processes x 1 thread": (2, 2)}
"""Each way: (processes, threads of the calling process); two processes share the caller's two threads."""


def same_numbers(report: RobustReport, reference: RobustReport) -> bool:
    """Whether two reports hold the same AUROCs and the same per-image scores, bit for bit."""
    scores, expected = report.image_scores, reference.image_scores
    return (
        report.to_dict() == reference.to_dict()
        and torch.equal(scores.clean, expected.clean)
        and scores.attacked.keys() == expected.attacked.keys()
        and all(torch.equal(scores.attacked[key], value) for key, value in expected.attacked.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-test", type=int, default=32, help="test images (half normal, half anomalous)")
    parser.add_argument("--batch-size", type=int, default=8, help="test batch size (the unit the processes share)")
    parser.add_argument("--level", type=int, default=5, help="DiffPure's diffusion step p (its U-Net calls)")
    parser.add_argument("--steps", type=int, default=5, help="PGD steps")
    parser.add_argument("--eot-samples", type=int, default=2)
    parser.add_argument("--surrogate-steps", type=int, default=1, help="U-Net calls of the attacked surrogate chain")
    parser.add_argument("--eval-repeats", type=int, default=4)
    parser.add_argument("--sanity-checks", action="store_true", help="include the sanity checks (off by default)")
    arguments = parser.parse_args()

    torch.manual_seed(0)
    datamodule = FashionMNIST(category=0, image_size=SIZE, num_train=64, num_test=arguments.num_test,
                              train_batch_size=16, eval_batch_size=arguments.batch_size,
                              val_split_mode="same_as_test")  # fmt: skip
    padim = fitted_padim(datamodule, "results/benchmarks/two_processes")
    datamodule.setup()
    loaders = [datamodule.test_dataloader()]
    defense = DiffPure(AdvRAD.cpu_preset(noise_seed=0, evaluator=False, visualizer=False), level=arguments.level)
    settings = {
        "attacks": ["pgd"], "eps": [2 / 255], "steps": arguments.steps, "eot_samples": arguments.eot_samples,
        "eval_repeats": arguments.eval_repeats, "sanity_checks": arguments.sanity_checks, "num_grid_images": 0,
        "defense": defense, "purifier_gradients": ["surrogate"], "surrogate_steps": arguments.surrogate_steps,
    }  # fmt: skip

    seconds, reports = {}, {}
    for way, (processes, threads) in WAYS.items():
        torch.set_num_threads(threads)
        started = time.perf_counter()
        reports[way], _ = RobustEvaluator(**settings, processes=processes).evaluate(padim, loaders)
        seconds[way] = time.perf_counter() - started
    first, threaded, two = seconds.values()

    table = Table(
        title=f"One robust evaluation of Purified(Padim, DiffPure p={arguments.level}): L_inf EOT-PGD-{arguments.steps} "
        f"x {arguments.eot_samples} draws 2/255 through the {arguments.surrogate_steps}-call surrogate chain, "
        f"{reports[next(iter(WAYS))].num_samples} Fashion-MNIST test images at {SIZE} x {SIZE} in batches of "
        f"{arguments.batch_size}, {arguments.eval_repeats} scorings, sanity checks "
        f"{'on' if arguments.sanity_checks else 'off'}"
    )
    for column in ("way", "wall s", "speed-up over (a)", "same numbers as (a)"):
        table.add_column(column, justify="left" if column == "way" else "right")
    reference = reports[next(iter(WAYS))]
    for way in WAYS:
        identical = "yes" if same_numbers(reports[way], reference) else "no"
        table.add_row(way, f"{seconds[way]:.1f}", f"{first / seconds[way]:.2f}x", identical)
    console = Console(width=200)
    console.print(table)
    console.print(f"two processes over one process of two threads: {threaded / two:.2f}x")
    console.print("(c) runs one thread per process, as (a), so its numbers must equal (a)'s; (b) may differ from them in "
                  "the last bits, where a reduction split over two threads rounds differently.")


if __name__ == "__main__":
    main()
