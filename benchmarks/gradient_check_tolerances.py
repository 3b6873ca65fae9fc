"""What the gradient checks measure on healthy detectors and on the same detectors behind planted masking.

The tolerances of :mod:`anomalib_robust.evaluation.gradient_check` must separate the two groups. This script fits the
reduced leaderboard's four detectors (configs/benchmark/robust_fashion_mnist_reduced.yaml: Padim, Patchcore, Stfpm,
Fastflow, random-init ResNet-18 at 32 x 32) on one embedded Fashion-MNIST class, plants each masking of
:mod:`anomalib_robust.evaluation.masking` in front of Padim and Fastflow, and prints per detector and threat model the
finite-difference check's relative error and the attack-step check's ratio and cosine, with both verdicts, on a
stratified set of test images. Prints a table, never asserts.

Example:
    $ OMP_NUM_THREADS=1 python benchmarks/gradient_check_tolerances.py --category t_shirt_top
"""

import argparse
import copy
import tempfile

import torch
from anomalib.engine import Engine
from lightning import seed_everything
from rich.console import Console
from rich.table import Table

from anomalib_robust.attacks import DetectorScore
from anomalib_robust.evaluation.budget import stratified_subset
from anomalib_robust.evaluation.gradient_check import STEP_SCALES, check_gradient
from anomalib_robust.evaluation.masking import MASKINGS, plant_masking
from anomalib_robust.leaderboard.config import data_label, load_config, model_label
from anomalib_robust.leaderboard.job import build_datamodule, build_model

CONFIG = "configs/benchmark/robust_fashion_mnist_reduced.yaml"
THREATS = (("Linf", 2 / 255), ("L2", 0.2))


def fitted_models(category: str, epochs: int) -> tuple[dict[str, torch.nn.Module], object]:
    """The reduced grid's detectors fitted on ``category`` (at most ``epochs`` epochs each), and the datamodule."""
    groups = [group for group in load_config(CONFIG).groups if data_label(group.data)[1] == category]
    datamodule = build_datamodule(groups[0].data)
    models = {}
    for group in groups:
        entry = group.model
        seed_everything(0, workers=True)
        model = build_model(entry, random_init=True)
        epochs_of_entry = min(epochs, {**group.trainer, **(entry.get("trainer") or {})}.get("max_epochs", 1))
        with tempfile.TemporaryDirectory() as directory:
            engine = Engine(max_epochs=epochs_of_entry, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=directory)  # fmt: skip
            engine.fit(model, datamodule=datamodule)
        models[model_label(entry)] = model.eval()
    return models, datamodule


def test_images(datamodule: object, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` test images, both classes in proportion (as the evaluator picks them)."""
    dataset = datamodule.test_dataloader().dataset
    labels = torch.tensor([int(dataset[index].gt_label) for index in range(len(dataset))])
    picks = stratified_subset(torch.arange(len(dataset)), labels, count).tolist()
    return torch.stack([dataset[index].image for index in picks]), labels[picks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--category", default="t_shirt_top")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    models, datamodule = fitted_models(args.category, args.epochs)
    images, labels = test_images(datamodule, args.images)
    cases = [(name, None, model) for name, model in models.items()]
    cases += [
        (name, kind, plant_masking(copy.deepcopy(models[name]), kind))
        for name in ("Padim", "Fastflow")
        for kind in MASKINGS
    ]
    table = Table(title=f"Gradient checks on {args.category}, {len(labels)} test images ({int(labels.sum())} anomalous)")
    scales = "/".join(f"{scale:g}" for scale in STEP_SCALES)
    for column in ("detector", "masking", "threat", "FD error", "FD", f"step ratio at {scales} alpha",
                   f"step cosine at {scales} alpha", "step"):  # fmt: skip
        table.add_column(column)
    marks = {True: "pass", False: "FAIL", None: "n/a"}
    for name, kind, model in cases:
        detector = DetectorScore(model)
        inputs = detector.to_input_resolution(images)
        for norm, eps in THREATS:
            check = check_gradient(detector, inputs, labels, eps=eps, norm=norm)
            table.add_row(
                name, kind or "-", f"{norm} {eps:.4g}", f"{check.relative_error:.2e}",
                marks[check.finite_difference.passed], " / ".join(f"{ratio:.3g}" for ratio in check.scale_ratios),
                " / ".join(f"{cosine:.3g}" for cosine in check.scale_cosines),
                marks[check.attack_step.passed],
            )  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
