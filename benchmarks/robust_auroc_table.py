"""Standard and robust AUROC of anomalib detectors and AdvRAD on Fashion-MNIST, in the shape of the AdvRAD paper's Table 3.

For every class and protocol (``defect``: small synthetic defects; ``semantic``: the other classes are anomalies) of
the Fashion-MNIST datamodule, each detector is trained from random init, then attacked with the unified score-direction
attacks (AdvRAD paper, sec. 3) at L_inf 2/255 and L_2 0.2: PGD, APGD and the score-based Square Attack; AdvRAD, a
randomised detector, with EOT-PGD and EOT-APGD (sec. 5.6; random search cannot rank candidates from noisy scores, as
in the AdvRAD paper's random AutoAttack version, so no Square). Every detector is scored as deployed; AdvRAD with one
noise draw, ``--eval-repeats`` times: cells are mean ± std. Prints tables, never asserts. Finished cells are cached in
``--output`` (an interrupted run resumes). The numbers are not the paper's: no pretrained backbones, tiny images.

Example:
    $ python benchmarks/robust_auroc_table.py --classes trouser --protocols defect
    $ python benchmarks/robust_auroc_table.py --models Padim AdvRAD --classes trouser --max-steps 20 --steps 3
"""

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from anomalib.engine import Engine
from anomalib.models import Cfa, Fastflow, Padim, Patchcore, ReverseDistillation, Stfpm
from rich.console import Console
from rich.table import Table

from anomalib_robust import AdvRAD
from anomalib_robust.data import FashionMNIST
from anomalib_robust.evaluation import RobustEvaluator
from anomalib_robust.evaluation.report import format_auroc, format_eps, write_atomic
from anomalib_robust.offline import random_init_backbones

THREATS = (("Linf", 2 / 255), ("L2", 0.2))
"""The paper's two threat models (sec. 5.1)."""


def detectors(size: int) -> dict[str, Callable[[], torch.nn.Module]]:
    """Random-init, CPU-sized constructors of the detectors of the table, at ``size`` x ``size`` pixels.

    anomalib's own evaluator and visualizer are switched off: ``RobustEval`` computes the AUROC, and the default
    evaluator's pixel metrics fail on the mask-free ``semantic`` protocol.
    """
    common = {"pre_processor": Padim.configure_pre_processor((size, size)), "evaluator": False, "visualizer": False}
    return {
        "Padim": lambda: Padim(backbone="resnet18", pre_trained=False, **common),
        "Patchcore": lambda: Patchcore(backbone="resnet18", pre_trained=False, **common),
        "Stfpm": lambda: Stfpm(backbone="resnet18", **common),
        "Fastflow": lambda: Fastflow(backbone="resnet18", pre_trained=False, **common),
        "Cfa": lambda: Cfa(backbone="resnet18", **common),
        "ReverseDistillation": lambda: ReverseDistillation(backbone="resnet18", pre_trained=False, **common),
        "AdvRAD": lambda: AdvRAD.cpu_preset(image_size=(size, size), evaluator=False, visualizer=False),
    }


def build(name: str, size: int) -> torch.nn.Module:
    """Detector ``name`` of :func:`detectors`, with backbones from random init."""
    with random_init_backbones():
        return detectors(size)[name]()


def measure(name: str, datamodule: FashionMNIST, args: argparse.Namespace) -> dict:
    """Train detector ``name`` and attack it at both threat models; the cell's numbers."""
    torch.manual_seed(0)
    model = build(name, args.image_size)
    started = time.perf_counter()
    engine = Engine(
        max_steps=args.max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir="results/benchmarks/robust_auroc_table",
    )
    engine.fit(model, datamodule=datamodule)
    stochastic = getattr(model.model, "stochastic", False)
    attacks = [attack for attack in args.attacks if not (stochastic and attack == "square")]
    cell = {"fit_seconds": time.perf_counter() - started, "robust": {}}
    for norm, eps in THREATS:
        evaluator = RobustEvaluator(
            attacks=attacks, eps=eps, norm=norm, steps=args.steps, n_queries=args.n_queries,
            eot_samples=args.eot_samples if stochastic else None, eval_repeats=args.eval_repeats,
            sanity_checks=False, num_grid_images=0,
        )  # fmt: skip
        report, _ = evaluator.evaluate(model, [datamodule.test_dataloader()])
        cell["standard"] = [report.clean_image_auroc, report.clean_image_auroc_std]
        cell["num_samples"] = report.num_samples
        for result in report.results:
            cell["robust"][f"{result.attack.removeprefix('EOT-')}|{norm}"] = [
                result.image_auroc,
                result.image_auroc_std,
            ]
    cell["seconds"] = time.perf_counter() - started
    return cell


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(detectors(32)))
    parser.add_argument("--classes", nargs="+", default=["trouser", "sneaker", "bag"])
    parser.add_argument("--protocols", nargs="+", default=["defect", "semantic"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=100, help="test and validation images together")
    parser.add_argument("--max-steps", type=int, default=800, help="training steps (AdvRAD's demo trains ~780)")
    parser.add_argument("--attacks", nargs="+", default=["pgd", "apgd", "square"])
    parser.add_argument("--steps", type=int, default=10, help="PGD / APGD steps")
    parser.add_argument("--n-queries", type=int, default=500, help="Square queries")
    parser.add_argument("--eot-samples", type=int, default=8, help="the attacker's EOT draws for AdvRAD")
    parser.add_argument("--eval-repeats", type=int, default=4, help="deployed scorings of AdvRAD")
    parser.add_argument("--output", type=Path, default=Path("results/benchmarks/robust_auroc_table.json"))
    args = parser.parse_args(argv)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    cells = json.loads(args.output.read_text()) if args.output.exists() else {}
    console = Console()
    columns = [(attack, norm) for norm, _ in THREATS for attack in ("PGD", "APGD", "Square")]
    for protocol in args.protocols:
        table = Table(
            title=f"Image AUROC (%) on Fashion-MNIST, {protocol} protocol, {args.image_size} px, {args.max_steps} "
            f"training steps; mean ± std over {args.eval_repeats} deployed scorings for AdvRAD"
        )
        table.add_column("Class")
        table.add_column("Model")
        table.add_column("standard", justify="right")
        for attack, norm in columns:
            eps = dict(THREATS)[norm]
            table.add_column(f"{attack} {norm} {format_eps(eps, norm)}", justify="right")
        for category in args.classes:
            datamodule = FashionMNIST(
                category=category,
                protocol=protocol,
                image_size=args.image_size,
                num_train=args.num_train,
                num_test=args.num_test,
            )
            for name in args.models:
                key = f"{protocol}|{category}|{name}|{args.max_steps}|{args.steps}|{args.eot_samples}"
                if key not in cells:
                    cells[key] = measure(name, datamodule, args)
                    write_atomic(args.output, json.dumps(cells, indent=1))
                    console.log(f"{protocol}/{category}/{name}: {cells[key]['seconds']:.0f} s")
                cell = cells[key]
                robust = [format_auroc(*cell["robust"].get(f"{attack}|{norm}", [None])) for attack, norm in columns]
                label = f"{name} (EOT-{args.eot_samples})" if name == "AdvRAD" else name
                table.add_row(category, label, format_auroc(*cell["standard"]), *robust)
        console.print(table)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
