"""Wall time of the default robust evaluation (sanity checks on, within their budget) against the main PGD alone.

``RobustEvaluator()`` with its defaults attacks with PGD L_inf 2/255, 10 steps (EOT over 8 draws on a randomised
detector), and runs the sanity checks of Carlini et al. (2019) within ``sanity_budget=1.5`` (1.5 times the configured
runs' planned cost, :mod:`anomalib_robust.evaluation.budget`). This script times, in one run and on the same test
images,

- the main PGD alone: the same evaluator with ``sanity_checks=False`` (clean scoring, the attack, its scoring);
- the default evaluation (sanity checks within the budget), and other budgets (``--budgets``);
- for the detectors named by ``--full``, the full sanity runs of earlier releases (``sanity_budget=None``: every
  image, Square with 500 queries x the attacker's EOT draws, the very large eps with all steps),

and prints each one's ratio to the main PGD alone, next to the planned ratio (forward-pass equivalents), and the
Square sanity run: its images and queries, its planned cost over the configured runs', and its verdict. Detectors:
AdvRAD's CPU preset (one-shot, initial weights with a zero normal error map: timing does not depend on training),
PatchGuard's CPU preset (briefly trained) and Padim (random-init ResNet-18, fitted on the training images), at 32 x 32
on the embedded Fashion-MNIST. Prints a table, never asserts.

Example:
    $ nice -n 10 python benchmarks/sanity_budget.py --test-images 24 --budgets 2 --full Padim
"""

import argparse
import os
import time

import torch
from anomalib.engine import Engine
from anomalib.models import Padim
from rich.console import Console
from rich.table import Table

from anomalib_robust import AdvRAD, PatchGuard
from anomalib_robust.data import FashionMNIST
from anomalib_robust.evaluation import RobustEvaluator, RobustReport
from anomalib_robust.evaluation.budget import run_cost

SIZE = 32
"""The AdvRAD CPU preset's image size."""


def build(name: str, datamodule: FashionMNIST) -> torch.nn.Module:
    """AdvRAD's CPU preset (initial weights, zero normal error map), PatchGuard's CPU preset trained for 20 steps, or
    Padim fitted on the training images."""
    torch.manual_seed(0)
    if name == "AdvRAD":
        model = AdvRAD.cpu_preset(evaluator=False, visualizer=False)
        model.model.set_normal_error_map(torch.zeros_like(model.model.normal_error_map))
        return model
    if name == "PatchGuard":
        model = PatchGuard.cpu_preset(image_size=(SIZE, SIZE), evaluator=False, visualizer=False)
    else:
        model = Padim(backbone="resnet18", pre_trained=False, evaluator=False, visualizer=False,
                      pre_processor=Padim.configure_pre_processor((SIZE, SIZE)))  # fmt: skip
    engine = Engine(logger=False, enable_progress_bar=False, enable_model_summary=False, max_steps=20,
                    default_root_dir="results/benchmarks/sanity_budget")  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    return model


def timed(model: torch.nn.Module, datamodule: FashionMNIST, **settings: object) -> tuple[float, RobustReport]:
    """Wall time and report of one evaluation with ``settings`` (defaults otherwise)."""
    started = time.perf_counter()
    report, _ = RobustEvaluator(num_grid_images=0, **settings).evaluate(model, [datamodule.test_dataloader()])
    return time.perf_counter() - started, report


def planned(report: RobustReport) -> float:
    """Planned cost of the whole evaluation in forward-pass equivalents (clean scoring, configured, sanity)."""
    return report.num_samples * report.eval_repeats + report.configured_cost + report.sanity_cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["AdvRAD", "Padim"], choices=["AdvRAD", "PatchGuard", "Padim"])
    parser.add_argument("--test-images", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--budgets", nargs="*", type=float, default=[], help="more sanity budgets to time")
    parser.add_argument("--full", nargs="*", default=[], help="detectors to time with full sanity runs too")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    datamodule = FashionMNIST(category="trouser", root="embedded", image_size=SIZE, num_train=64,
                              num_test=2 * args.test_images, eval_batch_size=args.batch_size)  # fmt: skip
    datamodule.setup()
    table = Table(
        title=f"Default RobustEvaluator vs the main PGD alone ({args.test_images} test images, {SIZE} px, batch "
        f"{args.batch_size}, {torch.get_num_threads()} thread(s))",
        caption_justify="left",
    )
    for column in ("detector", "run", "wall time (s)", "ratio", "planned ratio", "sanity images", "sanity budgets",
                   "Square (planned / configured)", "checks passed"):  # fmt: skip
        table.add_column(column, justify="left" if column in {"detector", "run", "sanity budgets"} else "right")
    runs = {"main PGD alone": {"sanity_checks": False}, "default (sanity_budget=1.5)": {}}
    runs |= {f"sanity_budget={budget:g}": {"sanity_budget": budget} for budget in args.budgets}
    for name in args.models:
        model = build(name, datamodule)
        base_seconds = base_cost = None
        full = {"full sanity runs (sanity_budget=None)": {"sanity_budget": None}} if name in args.full else {}
        for label, settings in (runs | full).items():
            seconds, report = timed(model, datamodule, **settings)
            base_seconds, base_cost = base_seconds or seconds, base_cost or planned(report)
            sanity = [result for result in report.results if result.role == "sanity"]
            passed = sum(check.passed is True for check in report.checks)
            square = next((result for result in sanity if result.attack.endswith("Square")), None)
            verdict = next((check.passed for check in report.checks if check.name.startswith("black-box")), None)
            square_cell = "-" if square is None else (
                f"{square.num_images} images x {square.queries} queries: "
                f"{run_cost(square, report.eval_repeats) / report.configured_cost:.2f}x, "
                f"{ {True: 'pass', False: 'FAIL', None: 'n/a'}[verdict]}"
            )
            table.add_row(
                name, label, f"{seconds:.1f}", f"{seconds / base_seconds:.2f}x", f"{planned(report) / base_cost:.2f}x",
                "-" if report.sanity_images is None else f"{report.sanity_images}/{report.num_samples}",
                "; ".join(f"{result.attack}: {result.budget}" for result in sanity) or "-", square_cell,
                f"{passed}/{len(report.checks)}" if report.checks else "-",
            )  # fmt: skip
    table.caption = (
        "ratio: wall time over the main PGD alone, measured in this run; planned ratio: the same for the planned "
        "forward-pass equivalents (a backward pass counting 2). AdvRAD untrained (timing only), Padim fitted."
    )
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
