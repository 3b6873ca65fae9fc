"""Standard and robust AUROC of anomalib detectors and AdvRAD on Fashion-MNIST, in the shape of seed 000, Table 3.

For every class and protocol (``defect``: small synthetic defects; ``semantic``: the other classes are anomalies) of
the embedded datamodule, each detector is trained from random init, then attacked with the unified score-direction
PGD (seed 000, sec. 3) at L_inf 2/255 and L_2 0.2; AdvRAD, a randomised detector, with EOT-PGD (sec. 5.6). One row
per class and detector: standard and robust image AUROC in percent. Prints tables, never asserts. Defaults are
CPU-sized; the numbers are not the paper's (no pretrained backbones, tiny images and training budgets).

Example:
    $ python benchmarks/robust_auroc_table.py --classes trouser sneaker --protocols defect semantic
    $ python benchmarks/robust_auroc_table.py --models Padim AdvRAD --classes trouser --max-steps 20 --steps 3
"""

import argparse
import time
from collections.abc import Callable

import torch
from anomalib.engine import Engine
from anomalib.models import Cfa, Fastflow, Padim, Patchcore, Stfpm
from rich.console import Console
from rich.table import Table

from anomalib_robust import AdvRAD
from anomalib_robust.callbacks import RobustEval
from anomalib_robust.evaluation.report import format_eps
from anomalib_robust.data import FashionMNIST
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
        "AdvRAD": lambda: AdvRAD.cpu_preset(image_size=(size, size), evaluator=False, visualizer=False),
    }


def build(name: str, size: int) -> torch.nn.Module:
    """Detector ``name`` of :func:`detectors`, with backbones from random init."""
    with random_init_backbones():
        return detectors(size)[name]()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(detectors(32)))
    parser.add_argument("--classes", nargs="+", default=["trouser", "sneaker", "bag"])
    parser.add_argument("--protocols", nargs="+", default=["defect", "semantic"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-train", type=int, default=100)
    parser.add_argument("--num-test", type=int, default=80)
    parser.add_argument("--max-steps", type=int, default=100, help="training steps of the trained detectors")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps")
    parser.add_argument("--eot-samples", type=int, default=4, help="EOT draws for AdvRAD")
    args = parser.parse_args()

    console = Console()
    for protocol in args.protocols:
        table = Table(title=f"Image AUROC (%) on Fashion-MNIST, {protocol} protocol, {args.image_size} px")
        for column in (
            "Class",
            "Model",
            "standard",
            *(f"robust {norm} {format_eps(eps, norm)}" for norm, eps in THREATS),
        ):
            table.add_column(column, justify="left" if column in {"Class", "Model"} else "right")
        for category in args.classes:
            datamodule = FashionMNIST(
                category=category,
                protocol=protocol,
                image_size=args.image_size,
                num_train=args.num_train,
                num_test=args.num_test,
            )
            for name in args.models:
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
                robust, standard = [], None
                for norm, eps in THREATS:
                    callback = RobustEval(
                        attacks=["pgd"],
                        eps=eps,
                        norm=norm,
                        steps=args.steps,
                        eot_samples=args.eot_samples if name == "AdvRAD" else None,
                        sanity_checks=False,
                        plots=False,
                    )
                    report = callback.evaluate(model, datamodule.test_dataloader())
                    (result,) = report.results
                    standard = report.clean_image_auroc
                    robust.append(f"{100 * result.image_auroc:.1f}")
                label = f"{name} (EOT-PGD)" if name == "AdvRAD" else name
                table.add_row(category, label, f"{100 * standard:.1f}", *robust)
                console.log(f"{protocol}/{category}/{name}: {time.perf_counter() - started:.0f} s")
        console.print(table)


if __name__ == "__main__":
    main()
