"""PatchGuard on a CPU: training throughput with/without adversarial training, pseudo-anomaly rate, robust AUROC.

Three measurements (prints tables, never asserts):

1. Training throughput (images/s, counting the normal images of a batch) of ``PatchGuard.cpu_preset()`` without
   adversarial training and with L_inf PGD adversarial training of ``--at-steps`` steps (official recipe: 10, i.e.
   ~24 forward/backward passes per batch: 2 clean + 2 adversarial + 2 x 10 attack passes), and their ratio.
2. Pseudo-anomaly generation rate (foreground estimation + self-CutPaste, images/s on one thread) next to the training
   step rate: generation starves training only if it is slower than the training step consumes images.
3. Standard vs robust image and pixel AUROC on Fashion-MNIST (``defect`` protocol) of PatchGuard (CPU preset, trained
   with adversarial training), AdvRAD (CPU preset, EOT-PGD) and Padim (random-init ResNet-18), under label-aware
   score-direction L_inf PGD with ``--pgd-steps`` steps (PGD-10 and PGD-100 by default) at 8/255 (the PatchGuard
   paper's budget) and 2/255 (the AdvRAD paper's): on the image score (image AUROC, and the pixel AUROC under the
   image attack) and on the anomaly map (``target="map"``: its pixel AUROC is the robust localisation).

Example:
    $ python benchmarks/patch_guard_benchmark.py                                  # full CPU run (long)
    $ python benchmarks/patch_guard_benchmark.py --max-steps 100 --num-test 60 --pgd-steps 10 --models PatchGuard Padim
"""

import argparse
import time

import torch
from anomalib.data import ImageBatch
from anomalib.engine import Engine
from anomalib.models import Padim
from rich.console import Console
from rich.table import Table

from anomalib_robust import AdvRAD, PatchGuard
from anomalib_robust.data import FashionMNIST
from anomalib_robust.evaluation import RobustEvaluator
from anomalib_robust.evaluation.report import format_auroc
from anomalib_robust.offline import random_init_backbones

EPSILONS = (8 / 255, 2 / 255)
TARGETS = ("score", "map")


def training_throughput(batch: torch.Tensor, at_steps: int, repeats: int) -> dict[str, float]:
    """Images/s of full training steps (forward, backward, AdamW) without and with adversarial training."""
    rates = {}
    for label, overrides in (
        ("no AT", {"adversarial_training": False}),
        (f"AT PGD-{at_steps}", {"adversarial_steps": at_steps}),
    ):
        torch.manual_seed(0)
        model = PatchGuard.cpu_preset(**overrides)
        model.log = model.log_dict = lambda *args, **kwargs: None
        model.train()
        optimizer = torch.optim.AdamW(model.model.parameters(), lr=8e-4)
        images = ImageBatch(image=batch, gt_label=torch.zeros(len(batch), dtype=torch.bool))
        for step in range(repeats + 1):
            if step == 1:  # the first step warms up
                started = time.perf_counter()
            loss = model.training_step(images)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rates[label] = repeats * len(batch) / (time.perf_counter() - started)
    return rates


def pseudo_anomaly_rate(batch: torch.Tensor, repeats: int) -> float:
    """Images/s of foreground estimation plus self-CutPaste with the CPU preset's settings."""
    model = PatchGuard.cpu_preset()
    started = time.perf_counter()
    for _ in range(repeats):
        model.pseudo_anomaly_generator(batch, model.foreground_estimator(batch))
    return repeats * len(batch) / (time.perf_counter() - started)


def build(name: str, size: int) -> torch.nn.Module:
    if name == "PatchGuard":
        return PatchGuard.cpu_preset(image_size=(size, size))
    if name == "PatchGuard (no AT)":
        return PatchGuard.cpu_preset(image_size=(size, size), adversarial_training=False)
    if name == "AdvRAD":
        return AdvRAD.cpu_preset(image_size=(size, size))
    if name == "Padim":
        with random_init_backbones():
            return Padim(
                backbone="resnet18", pre_trained=False, pre_processor=Padim.configure_pre_processor((size, size))
            )
    msg = f"unknown model {name!r}"
    raise ValueError(msg)


def robust_table(args: argparse.Namespace, console: Console) -> Table:
    datamodule = FashionMNIST(category=args.category, protocol="defect", root=args.root, image_size=args.image_size,
                              num_train=args.num_train, num_test=args.num_test, train_batch_size=16)  # fmt: skip
    table = Table(
        title=f"Fashion-MNIST {args.category}, defect protocol, {args.image_size} px: image / pixel AUROC (%); "
        f"'map' columns: pixel AUROC under the attack on the anomaly map (robust localisation); AdvRAD scored as "
        f"deployed, mean ± std over {args.eval_repeats} scorings"
    )
    columns = ["standard"] + [
        f"PGD-{s} {round(eps * 255)}/255 {target}" for s in args.pgd_steps for eps in EPSILONS for target in TARGETS
    ]
    for column in ("Model", "train s", *columns):
        table.add_column(column, justify="left" if column == "Model" else "right")
    for name in args.models:
        torch.manual_seed(0)
        model = build(name, args.image_size)
        engine = Engine(max_steps=args.max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir="results/benchmarks/patch_guard")  # fmt: skip
        started = time.perf_counter()
        engine.fit(model, datamodule=datamodule)
        train_seconds = time.perf_counter() - started
        cells, standard = [], ""
        for steps in args.pgd_steps:
            evaluator = RobustEvaluator(
                attacks=["pgd"],
                eps=list(EPSILONS),
                steps=steps,
                targets=list(TARGETS),
                eot_samples=args.eot_samples if name == "AdvRAD" else None,
                eval_repeats=args.eval_repeats,
                sanity_checks=False,
                num_grid_images=0,
            )
            report, _ = evaluator.evaluate(model, [datamodule.test_dataloader()])  # fmt: skip
            standard = (f"{format_auroc(report.clean_image_auroc, report.clean_image_auroc_std)} / "
                        f"{format_auroc(report.clean_pixel_auroc, report.clean_pixel_auroc_std)}")  # fmt: skip
            runs = {(round(result.eps * 255), result.target): result for result in report.results}
            for eps in EPSILONS:
                score, pixel = runs[round(eps * 255), "score"], runs[round(eps * 255), "map"]
                cells.append(f"{format_auroc(score.image_auroc, score.image_auroc_std)} / "
                             f"{format_auroc(score.pixel_auroc, score.pixel_auroc_std)}")  # fmt: skip
                cells.append(format_auroc(pixel.pixel_auroc, pixel.pixel_auroc_std))
        label = f"{name} (EOT-{args.eot_samples})" if name == "AdvRAD" else name
        table.add_row(label, f"{train_seconds:.0f}", standard, *cells)
        console.log(
            f"{name}: trained in {train_seconds:.0f} s, evaluated in {time.perf_counter() - started - train_seconds:.0f} s"
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["speed", "auroc"], choices=["speed", "auroc"])
    parser.add_argument("--models", nargs="+", default=["PatchGuard", "PatchGuard (no AT)", "AdvRAD", "Padim"])
    parser.add_argument("--category", default="trouser")
    parser.add_argument("--root", default=None, help="Fashion-MNIST files; None: system copy if present, else embedded")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=600, help="training steps of every detector (batch 16)")
    parser.add_argument("--pgd-steps", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--eot-samples", type=int, default=8, help="the attacker's EOT draws for AdvRAD")
    parser.add_argument("--eval-repeats", type=int, default=4, help="deployed scorings of AdvRAD")
    parser.add_argument("--at-steps", type=int, default=10, help="PGD steps of adversarial training (speed section)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    console = Console()

    if "speed" in args.sections:
        datamodule = FashionMNIST(category=args.category, root=args.root, image_size=32, num_train=args.batch_size,
                                  train_batch_size=args.batch_size)  # fmt: skip
        datamodule.setup()
        batch = next(iter(datamodule.train_dataloader())).image
        rates = training_throughput(batch, args.at_steps, args.repeats)
        pseudo = pseudo_anomaly_rate(batch, 5 * args.repeats)
        table = Table(title=f"PatchGuard CPU preset, batch {args.batch_size}, {torch.get_num_threads()} thread(s)")
        for column in ("Measurement", "images/s", "note"):
            table.add_column(column, justify="left" if column != "images/s" else "right")
        (clean, clean_rate), (adversarial, adversarial_rate) = rates.items()
        table.add_row(f"training, {clean}", f"{clean_rate:.1f}", "")
        table.add_row(
            f"training, {adversarial}", f"{adversarial_rate:.1f}", f"{clean_rate / adversarial_rate:.1f}x slower"
        )
        table.add_row("pseudo anomalies (foreground + CutPaste)", f"{pseudo:.1f}",
                      f"{pseudo / clean_rate:.0f}x the no-AT training rate")  # fmt: skip
        console.print(table)
    if "auroc" in args.sections:
        console.print(robust_table(args, console))


if __name__ == "__main__":
    main()
