"""The main job end to end on the embedded data: train AdvRAD, attack it and an undefended anomalib model, compare.

1. Train AdvRAD's CPU preset on normal images of one Fashion-MNIST class (``defect`` protocol, embedded data), with
   its recipe for local defects: ``SelectDiffusionStep`` chooses k from held-out training images at the end.
2. Fit anomalib's Padim (random-init ResNet-18: no weights are downloaded) on the same data.
3. Test both with the ``RobustEval`` callback: standard AUROC, then robust AUROC under the unified L_inf PGD attack
   (AdvRAD paper, eq. 1) at eps = 2/255, with EOT over AdvRAD's diffusion noise, as the paper attacks it (sec. 5.6).
   AdvRAD is scored as deployed (one noise draw per image), repeated with fresh noise: mean ± std.
4. Print one table with both models, next to anomalib's own test AUROC.

    python examples/demo.py                 # `make demo`, about 7 minutes on 2 CPU cores
    python examples/demo.py --epochs 1      # smoke run
"""

import argparse
from pathlib import Path

from anomalib.engine import Engine
from anomalib.models import Padim
from rich.console import Console
from rich.table import Table

from anomalib_robust import AdvRAD
from anomalib_robust.callbacks import RobustEval, SelectDiffusionStep
from anomalib_robust.data import FashionMNIST
from anomalib_robust.evaluation.report import format_auroc

EPS = 2 / 255


def evaluate(
    name: str, model: object, datamodule: FashionMNIST, arguments: argparse.Namespace, callbacks: tuple = (), **fit: int
) -> list:
    """Fit ``model`` (with ``callbacks``), test it with RobustEval; returns the table cells: anomalib's own test image
    AUROC, then standard and robust image and pixel AUROC (mean and std over the deployed scorings)."""
    stochastic = getattr(model.model, "stochastic", False)
    robust_eval = RobustEval(
        attacks=["pgd"],
        eps=[EPS],
        steps=arguments.attack_steps,
        eot_samples=arguments.eot_samples if stochastic else None,
        eval_repeats=arguments.eval_repeats,
        sanity_checks=False,  # `anomalib test --callbacks robust_eval` runs them; here they would double the time
        output_dir=arguments.results / name,
    )
    engine = Engine(default_root_dir=arguments.results, logger=False, callbacks=[*callbacks, robust_eval], **fit)
    engine.fit(model, datamodule=datamodule)
    (metrics,) = engine.test(model, datamodule=datamodule)
    report = robust_eval.report
    (pgd,) = [result for result in report.results if result.role == "attack"]
    return [
        format_auroc(metrics["image_AUROC"]),
        format_auroc(report.clean_image_auroc, report.clean_image_auroc_std),
        format_auroc(pgd.image_auroc, pgd.image_auroc_std),
        format_auroc(report.clean_pixel_auroc, report.clean_pixel_auroc_std),
        format_auroc(pgd.pixel_auroc, pgd.pixel_auroc_std),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="trouser", help="Fashion-MNIST class (name or 0-9)")
    parser.add_argument("--epochs", type=int, default=60, help="AdvRAD training epochs (13 iterations each)")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=100)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--eot-samples", type=int, default=8, help="the attacker's EOT draws for AdvRAD")
    parser.add_argument("--eval-repeats", type=int, default=4, help="deployed scorings of AdvRAD (mean ± std)")
    parser.add_argument("--results", type=Path, default=Path("results/demo"))
    arguments = parser.parse_args(argv)

    datamodule = FashionMNIST(
        category=arguments.category,
        image_size=32,
        num_train=arguments.num_train,
        num_test=arguments.num_test,
        train_batch_size=16,
    )
    padim = Padim(
        backbone="resnet18",
        pre_trained=False,
        layers=["layer1", "layer2"],
        pre_processor=Padim.configure_pre_processor(image_size=(64, 64)),
    )
    adv_rad = AdvRAD.cpu_preset()
    results = {
        "AdvRAD (CPU preset)": evaluate(
            "AdvRAD",
            adv_rad,
            datamodule,
            arguments,
            callbacks=(SelectDiffusionStep(diffusion_steps=(25, 50, 100)),),  # as configs/model/adv_rad_cpu.yaml
            max_epochs=arguments.epochs,
            check_val_every_n_epoch=arguments.epochs,  # the normal statistics are computed once, at the end
        ),
        "Padim (undefended)": evaluate("Padim", padim, datamodule, arguments, max_epochs=1),
    }
    chosen = adv_rad.diffusion_step_choice

    title = f"Fashion-MNIST '{arguments.category}', defect protocol: standard vs robust AUROC (%), PGD L_inf 2/255"
    table = Table(
        title=title
        + f", {arguments.attack_steps} steps; EOT over {arguments.eot_samples} draws for AdvRAD's attacker, "
        f"AdvRAD scored as deployed (one draw), mean ± std over {arguments.eval_repeats} scorings"
    )
    columns = ("model", "anomalib test AUROC", "image AUROC", "robust image AUROC", "pixel AUROC", "robust pixel AUROC")
    for column in columns:
        table.add_column(column, justify="right")
    for name, cells in results.items():
        table.add_row(f"{name}, k = {chosen.diffusion_step}" if name.startswith("AdvRAD") else name, *cells)
    Console(width=140).print(table)
    print(f"reports, plots and anomaly maps: {arguments.results}")


if __name__ == "__main__":
    main()
