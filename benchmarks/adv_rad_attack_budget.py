"""How PGD picks its adversarial example against AdvRAD, and how the robust AUROC moves with steps and EOT draws.

For a randomised detector the attack objective is a noisy EOT estimate. ``select="best"`` keeps, per image, the iterate
with the best noisy estimate (starting from the clean image's own noisy value), so the luckiest draw wins (the
winner's curse); ``select="final"`` returns the last iterate of the ascent. This script attacks one trained AdvRAD
checkpoint with EOT-PGD (L_inf 2/255, AdvRAD paper eq. 1) for every combination of ``--selects``, ``--steps`` and
``--eot-samples``, scores the detector as deployed (one noise draw, ``--eval-repeats`` times with fresh noise) and
prints robust image AUROC, mean ± std, with the wall time of each cell. A lower robust AUROC is a stronger attack; more
steps must never help the defender. Cells are cached in ``--output`` (an interrupted run resumes).

Example:
    $ python benchmarks/adv_rad_attack_budget.py --ckpt results/demo/AdvRAD/.../model.ckpt --category trouser
"""

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from anomalib_robust import AdvRAD
from anomalib_robust.data import FashionMNIST
from anomalib_robust.evaluation import RobustEvaluator
from anomalib_robust.evaluation.report import format_auroc, write_atomic


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a trained AdvRAD checkpoint (e.g. from make demo)")
    parser.add_argument("--category", default="trouser")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=100, help="test and validation images together")
    parser.add_argument("--selects", nargs="+", default=["best", "final"])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20])
    parser.add_argument("--eot-samples", nargs="+", type=int, default=[8, 20])
    parser.add_argument("--eval-repeats", type=int, default=4)
    parser.add_argument("--output", type=Path, default=Path("results/benchmarks/adv_rad_attack_budget.json"))
    args = parser.parse_args(argv)

    model = AdvRAD.load_from_checkpoint(args.ckpt, map_location="cpu")
    datamodule = FashionMNIST(
        category=args.category, image_size=args.image_size, num_train=args.num_train, num_test=args.num_test
    )
    datamodule.setup()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    cells = json.loads(args.output.read_text()) if args.output.exists() else {}
    console = Console()
    for eot in args.eot_samples:
        for steps in args.steps:
            for select in args.selects:
                key = f"{args.ckpt}|{args.category}|{select}|{steps}|{eot}|{args.eval_repeats}"
                if key in cells:
                    continue
                started = time.perf_counter()
                evaluator = RobustEvaluator(
                    attacks=["pgd"], eps=2 / 255, steps=steps, select=select, eot_samples=eot,
                    eval_repeats=args.eval_repeats, sanity_checks=False, num_grid_images=0,
                )  # fmt: skip
                report, _ = evaluator.evaluate(model, [datamodule.test_dataloader()])
                (result,) = report.results
                cells[key] = {
                    "select": select, "steps": steps, "eot": eot, "num_samples": report.num_samples,
                    "standard": [report.clean_image_auroc, report.clean_image_auroc_std],
                    "robust": [result.image_auroc, result.image_auroc_std], "seconds": time.perf_counter() - started,
                }  # fmt: skip
                write_atomic(args.output, json.dumps(cells, indent=1))
                console.log(f"select={select} steps={steps} EOT {eot}: {format_auroc(*cells[key]['robust'])}")

    table = Table(
        title=f"AdvRAD ({args.ckpt.name}, Fashion-MNIST {args.category}, defect): EOT-PGD L_inf 2/255, image AUROC "
        f"(%), deployed scoring, mean ± std over {args.eval_repeats} scorings"
    )
    for column in ("select", "steps", "EOT draws", "test images", "standard", "robust", "seconds"):
        table.add_column(column, justify="right")
    for key, cell in cells.items():
        if key.startswith(f"{args.ckpt}|{args.category}|"):
            table.add_row(
                cell["select"], str(cell["steps"]), str(cell["eot"]), str(cell["num_samples"]),
                format_auroc(*cell["standard"]), format_auroc(*cell["robust"]), f"{cell['seconds']:.0f}",
            )  # fmt: skip
    console.print(table)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
