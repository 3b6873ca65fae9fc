"""Standard AUROC of AdvRAD's CPU preset on real Fashion-MNIST, next to anomalib's Padim and Patchcore.

For every class: AdvRAD is trained once on the normal images of the class, then tested on both protocols of
:class:`~anomalib_robust.data.FashionMNIST` (``defect``: image and pixel AUROC; ``semantic``: image AUROC). Padim and
Patchcore use random-init ResNet-18 backbones (no weights can be downloaded here) at 64 x 64 and run in the same script
on the same data. Prints a table per class and the mean, and writes it as Markdown (for the README) to ``--output``.

    make fashion-mnist   # the full data set from Debian; without it the embedded subset is used
    python benchmarks/adv_rad_quality.py --classes 0 1 2 --epochs 100
"""

import argparse
import json
import os
from pathlib import Path

import torch
from anomalib.engine import Engine
from anomalib.models import Padim, Patchcore
from lightning.pytorch import seed_everything
from rich.console import Console
from rich.table import Table

from anomalib_robust import AdvRAD
from anomalib_robust.data import CLASS_NAMES, FashionMNIST
from anomalib_robust.evaluation.report import write_atomic

COLUMNS = ("AdvRAD image", "AdvRAD pixel", "Padim image", "Padim pixel", "Patchcore image", "Patchcore pixel")


def baselines() -> dict[str, object]:
    """Undefended anomalib detectors with random-init backbones at 64 x 64."""
    pre_processor = Padim.configure_pre_processor(image_size=(64, 64))
    return {
        "Padim": Padim(
            backbone="resnet18", pre_trained=False, layers=["layer1", "layer2"], pre_processor=pre_processor
        ),
        "Patchcore": Patchcore(
            backbone="resnet18",
            pre_trained=False,
            layers=["layer2", "layer3"],
            coreset_sampling_ratio=0.1,
            pre_processor=Patchcore.configure_pre_processor(image_size=(64, 64)),
        ),
    }


def evaluate(model: object, datamodules: dict[str, FashionMNIST], root: Path, **trainer: int) -> dict[str, dict]:
    """Fit on the (shared) training split, test on each protocol; returns metrics per protocol."""
    engine = Engine(default_root_dir=root, logger=False, enable_progress_bar=False, **trainer)
    engine.fit(model, datamodule=datamodules["defect"])
    return {protocol: engine.test(model, datamodule=datamodule)[0] for protocol, datamodule in datamodules.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", nargs="+", type=int, default=list(range(10)))
    parser.add_argument("--epochs", type=int, default=100, help="AdvRAD training epochs (13 iterations each)")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--output", type=Path, default=Path("results/benchmarks/adv_rad_quality.md"))
    arguments = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    rows: dict[tuple[str, str], list[float | None]] = {}
    root = arguments.output.parent / "runs"
    for label in arguments.classes:
        # Finished classes are kept as JSON next to the runs, so an interrupted benchmark resumes where it stopped.
        finished = root / f"adv_rad_quality_class{label}_epochs{arguments.epochs}.json"
        if finished.exists():
            rows |= {
                (CLASS_NAMES[label], protocol): values for protocol, values in json.loads(finished.read_text()).items()
            }
            continue
        seed_everything(0)
        datamodules = {
            protocol: FashionMNIST(
                category=label,
                protocol=protocol,
                image_size=32,
                num_train=arguments.num_train,
                num_test=arguments.num_test,
                train_batch_size=16,
            )
            for protocol in ("defect", "semantic")
        }
        results = {
            "AdvRAD": evaluate(
                AdvRAD.cpu_preset(noise_seed=0),
                datamodules,
                root,
                max_epochs=arguments.epochs,
                check_val_every_n_epoch=arguments.epochs,
            ),
        }
        results |= {name: evaluate(model, datamodules, root, max_epochs=1) for name, model in baselines().items()}
        for protocol in datamodules:
            rows[CLASS_NAMES[label], protocol] = [
                results[model][protocol].get(f"{level}_AUROC") if protocol == "defect" or level == "image" else None
                for model in ("AdvRAD", "Padim", "Patchcore")
                for level in ("image", "pixel")
            ]
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(finished, json.dumps({protocol: rows[CLASS_NAMES[label], protocol] for protocol in datamodules}))

    title = (
        f"Standard AUROC (%) on Fashion-MNIST, AdvRAD CPU preset ({arguments.epochs} epochs) vs random-init baselines"
    )
    table = Table(title=title)
    for column in ("class", "protocol", *COLUMNS):
        table.add_column(column, justify="right")
    markdown = [f"| class | protocol | {' | '.join(COLUMNS)} |", "|---" * (len(COLUMNS) + 2) + "|"]
    for protocol in ("defect", "semantic"):
        selected = {key: values for key, values in rows.items() if key[1] == protocol}
        means = [
            sum(column) / len(column) if (column := [v for v in values if v is not None]) else None
            for values in zip(*selected.values(), strict=True)
        ]
        for (name, _), values in [*selected.items(), (("mean", protocol), means)]:
            cells = ["-" if value is None else f"{100 * value:.1f}" for value in values]
            table.add_row(name, protocol, *cells)
            markdown.append(f"| {name} | {protocol} | {' | '.join(cells)} |")
    Console(width=160).print(table)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(arguments.output, "\n".join(markdown) + "\n")


if __name__ == "__main__":
    main()
