"""DiffPure and TMA in front of Padim vs AdvRAD on Fashion-MNIST, in the shape of the AdvRAD paper's Table 7.

For every class and protocol: Padim (random-init ResNet-18) undefended, ``DiffPure(p) + Padim`` for every level p,
``TMA + Padim``, and AdvRAD (CPU preset, one-shot), each as "robust (standard)" image AUROC in percent under L_inf PGD
2/255 with EOT, attacking through the purifier with full gradients (memory bounded by gradient checkpointing) and with
BPDA (identity backward). Full-gradient attacks through chains longer than ``--full-max-level`` U-Net calls are not
run (shown as "-"): their cost grows with p, and BPDA is reported for every level. A second table gives each system's
cost per image (U-Net calls, seconds of one scoring pass).

The purifier's diffusion model is AdvRAD's U-Net trained on the class's normal images: ``--denoiser-root`` reuses the
checkpoints written by ``benchmarks/adv_rad_quality.py`` (``<root>/AdvRAD/FashionMNIST/<class>/*/weights/...``),
otherwise the CPU preset is trained here. Finished (class, protocol) cells are cached as JSON next to ``--output``, so an
interrupted run resumes. Prints tables, never asserts.

Example:
    $ make fashion-mnist
    $ python benchmarks/purifier_table.py --classes trouser --levels 5 25 50 100 200 --max-samples 40
    $ python benchmarks/purifier_table.py --denoiser-root results/benchmarks/runs --eot-samples 4 --steps 5
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from anomalib.engine import Engine
from anomalib.models import Padim
from rich.console import Console
from rich.table import Table

from anomalib_robust import AdvRAD, RobustEval
from anomalib_robust.attacks import DetectorScore
from anomalib_robust.data import CLASS_NAMES, FashionMNIST
from anomalib_robust.defenses import TMA, DiffPure, Purified
from anomalib_robust.evaluation.report import RobustReport, format_auroc, write_atomic

SIZE = 32
"""The AdvRAD CPU preset's image size; purifier, AdvRAD and Padim all see 32 x 32 images."""



def fitted_padim(datamodule: FashionMNIST, root: Path | str) -> Padim:
    """The detector behind the purifiers: Padim on a random-init ResNet-18 (layers 1-2) at ``SIZE`` x ``SIZE``,
    fitted on ``datamodule``'s training images (anomalib's evaluator and visualizer off)."""
    padim = Padim(
        backbone="resnet18",
        pre_trained=False,
        layers=["layer1", "layer2"],
        pre_processor=Padim.configure_pre_processor((SIZE, SIZE)),
        evaluator=False,
        visualizer=False,
    )
    Engine(default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False).fit(
        padim, datamodule=datamodule
    )
    return padim

def denoiser(category: str, root: Path | None, epochs: int, runs: Path) -> AdvRAD:
    """The class's AdvRAD: the newest checkpoint under ``root`` if there is one, else the CPU preset trained here."""
    checkpoints = sorted((root or runs).glob(f"AdvRAD/FashionMNIST/{category}/*/weights/lightning/*.ckpt"))
    if checkpoints:
        return AdvRAD.load_from_checkpoint(checkpoints[-1], map_location="cpu")
    model = AdvRAD.cpu_preset(noise_seed=0)
    datamodule = FashionMNIST(category=category, image_size=SIZE, train_batch_size=16)
    engine = Engine(default_root_dir=runs, logger=False, max_epochs=epochs, check_val_every_n_epoch=epochs)
    engine.fit(model, datamodule=datamodule)
    return model


def seconds_per_image(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Wall time of one scoring pass (pre-processor + torch model, no gradients), per image."""
    detector = DetectorScore(model, eot_samples=1)
    with detector.prepared():
        start = time.perf_counter()
        detector.predict(images)
    return (time.perf_counter() - start) / images.shape[0]


def cell(report: RobustReport) -> dict[str, str]:
    """Standard and robust (full-gradient, BPDA) image AUROC of one report, formatted with their repeat spread."""
    robust = {
        result.attack.startswith("BPDA"): format_auroc(result.image_auroc, result.image_auroc_std)
        for result in report.results
    }
    standard = format_auroc(report.clean_image_auroc, report.clean_image_auroc_std)
    return {"standard": standard, "full": robust.get(False, "-"), "bpda": robust.get(True, "-")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", nargs="+", default=["trouser", "sneaker", "bag"], choices=CLASS_NAMES)
    parser.add_argument("--protocols", nargs="+", default=["defect", "semantic"], choices=["defect", "semantic"])
    parser.add_argument("--levels", nargs="+", type=int, default=[5, 25, 50, 100, 200])
    parser.add_argument("--tma-depth", type=int, default=140)
    parser.add_argument("--tma-stride", type=int, default=10)
    parser.add_argument("--full-max-level", type=int, default=50, help="longest chain attacked with full gradients")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eot-samples", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=40, help="test images per class and protocol")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--denoiser-root", type=Path, help="runs directory of benchmarks/adv_rad_quality.py")
    parser.add_argument("--epochs", type=int, default=60, help="AdvRAD training epochs when no checkpoint is found")
    parser.add_argument("--output", type=Path, default=Path("results/benchmarks/purifier_table.md"))
    arguments = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    runs = arguments.output.parent / "runs"
    settings = {
        "eps": 2 / 255,
        "steps": arguments.steps,
        "eot_samples": arguments.eot_samples,
        "max_samples": arguments.max_samples,
        "sanity_checks": False,
        "plots": False,
    }
    systems = ["Padim", *(f"DiffPure p={level}" for level in arguments.levels), "TMA", "AdvRAD"]
    results: dict[tuple[str, str], dict[str, dict]] = {}
    for category in arguments.classes:
        adv_rad = padim = None
        for protocol in arguments.protocols:
            finished = (
                runs / f"purifier_table_{category}_{protocol}_steps{arguments.steps}_eot{arguments.eot_samples}_v2.json"
            )
            if finished.exists():
                results[category, protocol] = json.loads(finished.read_text())
                continue
            torch.manual_seed(0)
            datamodule = FashionMNIST(
                category=category,
                protocol=protocol,
                image_size=SIZE,
                num_train=arguments.num_train,
                num_test=arguments.num_test,
                train_batch_size=16,
            )
            if adv_rad is None:
                adv_rad = denoiser(category, arguments.denoiser_root, arguments.epochs, runs)
                padim = fitted_padim(datamodule, runs)
            defenses = {f"DiffPure p={level}": DiffPure(adv_rad, level=level) for level in arguments.levels}
            defenses["TMA"] = TMA(adv_rad, depth=arguments.tma_depth, stride=arguments.tma_stride)
            datamodule.setup()
            loader = datamodule.test_dataloader()
            row = {"Padim": cell(RobustEval(**settings).evaluate(padim, loader))}
            for name, defense in defenses.items():
                gradients = ["full", "bpda"] if defense.unet_evaluations <= arguments.full_max_level else ["bpda"]
                callback = RobustEval(defense=defense, purifier_gradients=gradients, **settings)
                row[name] = cell(callback.evaluate(padim, loader))
            row["AdvRAD"] = cell(RobustEval(**settings).evaluate(adv_rad, loader))
            results[category, protocol] = row
            finished.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(finished, json.dumps(row))
            cost_file = runs / "purifier_table_costs.json"
            if not cost_file.exists():
                images = next(iter(loader)).image[:8]
                measured = {"Padim": (0, seconds_per_image(padim, images))}
                for name, defense in defenses.items():
                    measured[name] = (defense.unet_evaluations, seconds_per_image(Purified(padim, defense), images))
                measured["AdvRAD"] = (1, seconds_per_image(adv_rad, images))
                write_atomic(cost_file, json.dumps(measured))

    markdown = []
    for protocol in arguments.protocols:
        title = (
            f"Fashion-MNIST {protocol}: robust (standard) image AUROC, L_inf PGD 2/255, {arguments.steps} steps, "
            f"EOT {arguments.eot_samples}; full gradients / BPDA through the purifier"
        )
        table = Table(title=title)
        header = ["class", *systems]
        for column in header:
            table.add_column(column, justify="right")
        markdown += [f"**{protocol}**", "", f"| {' | '.join(header)} |", "|---" * len(header) + "|"]
        for category in arguments.classes:
            row = results[category, protocol]
            cells = [
                row[name]["full"]
                + (f" / {row[name]['bpda']}" if name.startswith(("DiffPure", "TMA")) else "")
                + f" ({row[name]['standard']})"
                for name in systems
            ]
            table.add_row(category, *cells)
            markdown.append(f"| {category} | {' | '.join(cells)} |")
        markdown.append("")
        Console(width=200).print(table)
    cost_file = runs / "purifier_table_costs.json"
    if cost_file.exists():
        costs = json.loads(cost_file.read_text())
        table = Table(title="Cost per image (one scoring pass, no gradients)")
        for column in ("system", "U-Net calls", "ms / image"):
            table.add_column(column, justify="right")
        markdown += ["| system | U-Net calls | ms / image |", "|---|---|---|"]
        for name, (calls, seconds) in costs.items():
            table.add_row(name, str(calls), f"{1000 * seconds:.1f}")
            markdown.append(f"| {name} | {calls} | {1000 * seconds:.1f} |")
        Console(width=200).print(table)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(arguments.output, "\n".join(markdown) + "\n")


if __name__ == "__main__":
    main()
