"""Adversarial training (AT) and Gaussian-noise training (GN) of Stfpm/Fastflow vs AdvRAD (AdvRAD paper, Table 8).

The AdvRAD paper, sec. 5.4 (Table 8) compares "AT + FastFlow" and "AT + CFA" (Madry et al., 2018) with AdvRAD, and
appendix D.6 (Table 19) adds Gaussian-noise injection ("+ GN"). Here, for every Fashion-MNIST class of the chosen
protocol, Stfpm and Fastflow are trained from the same random initialisation three ways: normally, with
:class:`~anomalib_robust.defenses.training.AdversarialTraining` (L_inf PGD, eps 2/255, on every normal training batch)
and with :class:`~anomalib_robust.defenses.training.GaussianNoiseTraining` (stds 0, 0.005, 0.01, 0.05, 0.1); AdvRAD (CPU
preset) is trained next to them. Every detector is then attacked with the unified score-direction PGD (AdvRAD paper,
sec. 3) at L_inf 2/255, AdvRAD with EOT-PGD (sec. 5.6). Cells read "robust (standard)" image AUROC in percent, as in the
paper, with a last column for training time. Prints tables, never asserts. Defaults are CPU-sized; numbers are not the
paper's (random-init backbones, small images and training budgets).

Data: ``--root`` (default: the Debian Fashion-MNIST files in /usr/share/datasets/fashion-mnist when present, else the
embedded subset).

Example:
    $ python benchmarks/adversarial_training_table.py --classes trouser sneaker bag
    $ python benchmarks/adversarial_training_table.py --classes trouser --max-steps 10 --num-train 32 --num-test 32 \\
        --at-steps 2 --steps 3 --advrad-max-steps 50
"""

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from anomalib.engine import Engine
from anomalib.models import Fastflow, Stfpm
from lightning.pytorch import Callback
from rich.console import Console
from rich.table import Table

from anomalib_robust import AdvRAD
from anomalib_robust.callbacks import RobustEval
from anomalib_robust.data import FashionMNIST
from anomalib_robust.defenses.training import DEFAULT_NOISE_STDS, AdversarialTraining, GaussianNoiseTraining
from anomalib_robust.evaluation.report import format_auroc, write_atomic
from anomalib_robust.offline import random_init_backbones

EPS = 2 / 255
"""The paper's L_inf radius (sec. 5.1), for both training and evaluation."""


def detectors(size: int) -> dict[str, Callable[[], torch.nn.Module]]:
    """Random-init, CPU-sized constructors, at ``size`` x ``size`` pixels (anomalib's evaluator/visualizer off)."""
    common = {"pre_processor": Stfpm.configure_pre_processor((size, size)), "evaluator": False, "visualizer": False}
    return {
        "Stfpm": lambda: Stfpm(backbone="resnet18", **common),
        "Fastflow": lambda: Fastflow(backbone="resnet18", pre_trained=False, **common),
        "AdvRAD": lambda: AdvRAD.cpu_preset(image_size=(size, size), evaluator=False, visualizer=False),
    }


def trainings(args: argparse.Namespace) -> dict[str, Callable[[], list[Callback]]]:
    """The training variants of the baselines: their callbacks, built fresh per run."""
    return {
        "": list,
        "AT + ": lambda: [AdversarialTraining(eps=EPS, steps=args.at_steps)],
        "GN + ": lambda: [GaussianNoiseTraining(stds=DEFAULT_NOISE_STDS)],
    }


def run(name: str, callbacks: list[Callback], datamodule: FashionMNIST, args: argparse.Namespace) -> dict[str, float]:
    """Train ``name`` from seed 0 with ``callbacks``; standard and robust AUROC (mean, std over repeats), seconds."""
    torch.manual_seed(0)
    with random_init_backbones():
        model = detectors(args.image_size)[name]()
    max_steps = args.advrad_max_steps if name == "AdvRAD" else args.max_steps
    engine = Engine(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir="results/benchmarks/adversarial_training_table",
    )
    started = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - started
    evaluation = RobustEval(
        attacks=["pgd"],
        eps=EPS,
        norm="Linf",
        steps=args.steps,
        eot_samples=args.eot_samples if name == "AdvRAD" else None,
        sanity_checks=False,
        plots=False,
    )
    report = evaluation.evaluate(model, datamodule.test_dataloader())
    (result,) = report.results
    return {
        "standard": report.clean_image_auroc,
        "standard_std": report.clean_image_auroc_std,
        "robust": result.image_auroc,
        "robust_std": result.image_auroc_std,
        "seconds": seconds,
    }


def average(values: list[dict[str, float]]) -> dict[str, float]:
    """Mean over classes; the repeat spread of a mean of independent cells is sqrt(sum std^2) / n."""
    count = len(values)
    mean = {key: sum(value[key] for value in values) / count for key in ("standard", "robust", "seconds")}
    for key in ("standard", "robust"):
        mean[f"{key}_std"] = math.sqrt(sum(value[f"{key}_std"] ** 2 for value in values)) / count
    return mean


def robust_standard(value: dict[str, float]) -> str:
    """A table cell: robust (standard) AUROC in percent, each with its repeat spread."""
    standard = format_auroc(value["standard"], value["standard_std"])
    return f"{format_auroc(value['robust'], value['robust_std'])} ({standard})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["Stfpm", "Fastflow"], choices=["Stfpm", "Fastflow"])
    parser.add_argument("--trainings", nargs="+", default=["standard", "AT", "GN"], choices=["standard", "AT", "GN"])
    parser.add_argument("--no-advrad", action="store_true", help="leave out the AdvRAD row")
    parser.add_argument("--classes", nargs="+", default=["trouser", "sneaker", "bag"])
    parser.add_argument("--protocol", default="defect", choices=["defect", "semantic"])
    parser.add_argument("--root", default=None, help="Fashion-MNIST idx files or 'embedded' (default: Debian path)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-train", type=int, default=100)
    parser.add_argument("--num-test", type=int, default=80)
    parser.add_argument("--max-steps", type=int, default=100, help="training steps of Stfpm / Fastflow")
    parser.add_argument("--advrad-max-steps", type=int, default=300, help="training steps of AdvRAD")
    parser.add_argument("--at-steps", type=int, default=7, help="PGD steps of adversarial training")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps of the evaluation attack")
    parser.add_argument("--eot-samples", type=int, default=4, help="EOT draws for AdvRAD")
    args = parser.parse_args()

    variants = {"standard": "", "AT": "AT + ", "GN": "GN + "}
    rows = [(variants[training], model) for model in args.models for training in args.trainings]
    if not args.no_advrad:
        rows.append(("", "AdvRAD"))
    console = Console()
    cells: dict[str, list[dict[str, float]]] = {prefix + model: [] for prefix, model in rows}
    cache = Path("results/benchmarks/adversarial_training_table/cells")
    for category in args.classes:
        datamodule = FashionMNIST(
            category=category,
            protocol=args.protocol,
            root=args.root,
            image_size=args.image_size,
            num_train=args.num_train,
            num_test=args.num_test,
        )
        for prefix, model in rows:
            name = f"{args.protocol}_{category}_{prefix.strip(' +') or 'standard'}_{model}_steps{args.steps}.json"
            finished = cache / name
            if finished.exists():
                value = json.loads(finished.read_text())
            else:
                value = run(model, trainings(args)[prefix](), datamodule, args)
                finished.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(finished, json.dumps(value))
            cells[prefix + model].append(value)
            console.log(f"{category}/{prefix}{model}: {robust_standard(value)}, trained in {value['seconds']:.0f} s")

    table = Table(
        title=f"Robust (standard) image AUROC (%), L_inf PGD 2/255 ({args.steps} steps; AdvRAD: EOT-PGD, "
        f"{args.eot_samples} draws), Fashion-MNIST {args.protocol} protocol, {args.image_size} px"
    )
    table.add_column("Method")
    for column in [*args.classes, "Average", "train s/class"]:
        table.add_column(column, justify="right")
    for method, values in cells.items():
        mean = average(values)
        table.add_row(method, *(robust_standard(value) for value in [*values, mean]), f"{mean['seconds']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
