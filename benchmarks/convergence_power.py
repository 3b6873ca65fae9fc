"""Power of the convergence check: how often its default verdict flags a planted drop of the robust AUROC.

The convergence check (:mod:`anomalib_robust.evaluation.convergence`) compares the configured attack with one of twice
the steps on the same images and seeds, by the paired bootstrap interval of the AUROC difference
(:func:`~anomalib_robust.evaluation.metrics.paired_auroc_difference`). This script plants a known drop and counts the
verdicts, through the same functions the evaluator calls:

- the configured (under-stepped) attack leaves normal scores ``N(0, 1)`` and anomalous ones ``N(mu, 1)``, ``mu`` set
  for the robust AUROC ``--robust-auroc``;
- the stronger attack pushes each image further in the attack's direction (normal scores up, anomalous ones down) by
  ``c * e_i``: ``e_i ~ Exp(1)`` on every image (``spread``: an under-stepped attack that stops short everywhere), or
  on a fifth of the images only (``concentrated``: a few images with headroom left, the harder case), and every
  score moves by ``N(0, jitter^2)`` besides (the longer attack takes another path; ``--jitter``, 0.1 by default), so
  that a planted drop of 0 is a healthy, converged attack whose scores still differ;
- ``c`` is set by bisection so that the expected AUROC drop (over 20,000 simulated images) is the planted drop.

Each run draws a fresh test set of ``--images`` images (half anomalous) and a fresh bootstrap seed, and reads the
verdict at the default tolerance (2 points): "flagged" is a failure (the whole interval below -2 points), "inconclusive"
an interval too wide to exclude a drop beyond 2 points, "passed" reads converged. The old rule (fail only when the
interval lies below -2 points, pass otherwise) on the old default's subset (``--old-images``, about one batch) is
printed beside it. Prints a table, never asserts.

Example:
    $ python benchmarks/convergence_power.py --runs 200
"""

import argparse
import math

import torch
from rich.console import Console
from rich.table import Table

from anomalib_robust.evaluation.convergence import Convergence
from anomalib_robust.evaluation.metrics import paired_auroc_difference, rank_auroc
from anomalib_robust.evaluation.report import AttackResult

TOLERANCE = 0.02
"""The evaluator's default ``tolerance``."""

MODELS = {"spread": 1.0, "concentrated": 0.2}
"""Share of the images the stronger attack still moves."""


def paired_scores(
    images: int, separation: float, push: float, share: float, jitter: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores of ``images`` images under the configured attack and under the stronger one, and their labels."""
    labels = (torch.arange(images) % 2).long()
    fewer = torch.randn(images, generator=generator, dtype=torch.float64) + separation * labels
    moved = torch.rand(images, generator=generator, dtype=torch.float64) < share
    extra = push * moved * torch.empty(images, dtype=torch.float64).exponential_(generator=generator)
    more = fewer + torch.where(labels.bool(), -extra, extra)
    more += jitter * torch.randn(images, generator=generator, dtype=torch.float64)
    return fewer, more, labels


def calibrate(drop: float, separation: float, share: float, jitter: float) -> float:
    """The push ``c`` whose expected AUROC drop (20,000 images) is ``drop``."""
    low, high = 0.0, 10.0
    for _ in range(40):
        middle = (low + high) / 2
        fewer, more, labels = paired_scores(20_000, separation, middle, share, jitter, torch.Generator().manual_seed(1))
        if rank_auroc(fewer, labels) - rank_auroc(more, labels) < drop:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def verdicts(images: int, runs: int, scores: dict, seed: int) -> dict[str, float]:
    """Shares of runs that the default verdict flags (fails), calls inconclusive, or passes."""
    counts = {"flagged": 0, "inconclusive": 0, "passed": 0}
    generator = torch.Generator().manual_seed(seed)
    results = (AttackResult("PGD", "Linf", 2 / 255, steps=10), AttackResult("PGD", "Linf", 2 / 255, steps=20))
    for run in range(runs):
        fewer, more, labels = paired_scores(images, **scores, generator=generator)
        difference = paired_auroc_difference(fewer, more, labels, seed=run)
        verdict = Convergence(*results, difference).verdict(TOLERANCE)
        counts[{False: "flagged", None: "inconclusive", True: "passed"}[verdict]] += 1
    return {name: count / runs for name, count in counts.items()}


def old_flag_rate(images: int, runs: int, scores: dict, seed: int) -> float:
    """The former rule (fail when the interval lies below the tolerance, pass otherwise) on ``images`` images."""
    generator, flagged = torch.Generator().manual_seed(seed), 0
    for run in range(runs):
        fewer, more, labels = paired_scores(images, **scores, generator=generator)
        flagged += paired_auroc_difference(fewer, more, labels, seed=run).high < -TOLERANCE
    return flagged / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="test images of each run (half anomalous)")
    parser.add_argument("--old-images", type=int, default=16, help="the old default's subset (about one batch)")
    parser.add_argument("--runs", type=int, default=200, help="simulated evaluations per cell")
    parser.add_argument("--drops", type=float, nargs="+", default=[0.0, 0.03, 0.05, 0.10], help="planted drops")
    parser.add_argument("--jitter", type=float, default=0.1, help="score change of the longer attack besides the drop")
    parser.add_argument("--robust-auroc", type=float, default=0.5, help="AUROC under the configured attack")
    args = parser.parse_args()
    separation = math.sqrt(2) * torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(args.robust_auroc)).item()
    table = Table(title=f"Convergence check at its default (tolerance 2 points, 95% paired bootstrap), "
                        f"{args.images} test images, {args.runs} runs per row")  # fmt: skip
    for column in ("model", "planted drop", "flagged", "inconclusive", "passed", f"old rule on {args.old_images}"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model, share in MODELS.items():
        for drop in args.drops:
            push = calibrate(drop, separation, share, args.jitter) if drop else 0.0
            scores = {"separation": separation, "push": push, "share": share, "jitter": args.jitter}
            shares = verdicts(args.images, args.runs, scores, seed=1000)
            old = old_flag_rate(args.old_images, args.runs, scores, seed=1000)
            table.add_row(model, f"{100 * drop:.0f} points", *(f"{100 * value:.0f} %" for value in shares.values()),
                          f"{100 * old:.0f} %")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
