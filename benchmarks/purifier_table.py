"""Purifiers in front of Padim vs AdvRAD on Fashion-MNIST, in the shape of the AdvRAD paper's Table 7.

For every class and protocol: Padim (random-init ResNet-18) undefended, ``DiffPure(p) + Padim`` for every level p,
``TMA(T*) + Padim`` for every depth T* (``--tma-depths``; the TMA paper's 140 is its CIFAR-10 setting),
``RAP + Padim`` (the RAP paper, Alg. 2 in its one-step mode, the adapter trained here against the fitted Padim,
:func:`purifier_setup.train_rap`), ``AGDM(t*) + Padim`` for every depth t* and guidance ratio (the AGDM paper, Alg. 1,
each step's guidance shift over its noise, ``--agdm-ratios``; its guidance network trained here,
:func:`purifier_setup.trained_guidance`), and AdvRAD (CPU preset, one-shot), each
as "robust (standard)" image AUROC in percent under L_inf PGD 2/255 with EOT, attacking through the purifier with
full gradients (memory bounded by gradient checkpointing) and with BPDA (identity backward). Full-gradient attacks
through chains longer than ``--full-max-level`` U-Net calls are not run (shown as "-"): their cost grows with p, and
BPDA is reported for every level. Randomised systems are scored ``--eval-repeats`` times as deployed (mean ± std);
one-step RAP is deterministic, and its cell comes from one adapter (``--rap-seed``), so it carries no training
spread. A second table gives each system's cost per image (U-Net calls, seconds of one scoring pass) and the training
time of what the run trained (AdvRAD, RAP's adapter, AGDM's guidance network).

The purifier's diffusion model is AdvRAD's U-Net trained on the class's normal images: ``--denoiser-root`` reuses the
checkpoints written by ``benchmarks/adv_rad_quality.py`` (``<root>/AdvRAD/FashionMNIST/<class>/*/weights/...``),
otherwise the CPU preset is trained here. Every finished (class, protocol, system) cell is cached as JSON next to
``--output``, so an interrupted run resumes; within a cell, every attacked batch is kept as well
(``RobustEvaluator(resume_dir=...)``). Prints tables, never asserts.

Example:
    $ make fashion-mnist
    $ python benchmarks/purifier_table.py --classes trouser --levels 5 25 50 100 200 --max-samples 40
    $ python benchmarks/purifier_table.py --denoiser-root results/benchmarks/runs --eot-samples 4 --steps 5
    $ python benchmarks/purifier_table.py --levels 70 --agdm-depths 70 --rap-epochs 50 --max-samples 100
    $ python benchmarks/purifier_table.py --levels 70 --agdm-depths 70 --agdm-ratios 0.1 0.5 1 --rap-epochs 0
    $ python benchmarks/purifier_table.py --levels 25 --tma-depths 30 60 90 140 --rap-epochs 0 --agdm-depths
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from anomalib.engine import Engine
from purifier_setup import SIZE, fitted_padim, train_rap, trained_guidance
from rich.console import Console
from rich.table import Table

from anomalib_robust import AdvRAD, RobustEval
from anomalib_robust.attacks import DetectorScore
from anomalib_robust.data import CLASS_NAMES, FashionMNIST
from anomalib_robust.defenses import AGDM, TMA, DiffPure, Purified
from anomalib_robust.defenses.agdm import GUIDANCE_RATIO
from anomalib_robust.evaluation.report import RobustReport, format_auroc, write_atomic
from anomalib_robust.models.agdm_guidance.torch_model import ARCHITECTURE


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
    repeats = report.eval_repeats
    robust = {
        result.attack.startswith("BPDA"): format_auroc(result.image_auroc, result.image_auroc_std, repeats)
        for result in report.results
    }
    standard = format_auroc(report.clean_image_auroc, report.clean_image_auroc_std, repeats)
    return {"standard": standard, "full": robust.get(False, "-"), "bpda": robust.get(True, "-")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", nargs="+", default=["trouser", "sneaker", "bag"], choices=CLASS_NAMES)
    parser.add_argument("--protocols", nargs="+", default=["defect", "semantic"], choices=["defect", "semantic"])
    parser.add_argument("--levels", nargs="*", type=int, default=[5, 25, 50, 100, 200], help="DiffPure levels p")
    parser.add_argument("--tma-depths", nargs="*", type=int, default=[140], help="TMA T*, one column per value")
    parser.add_argument("--tma-stride", type=int, default=10)
    parser.add_argument("--rap-epochs", type=int, default=10, help="RAP adapter training epochs (0: no RAP column)")
    parser.add_argument("--rap-steps", type=int, default=5, help="T of the adapter's forward process (Alg. 1)")
    parser.add_argument("--rap-seed", type=int, default=0)
    parser.add_argument("--agdm-depths", nargs="*", type=int, default=[70], help="AGDM t* (the AGDM paper's 70)")
    parser.add_argument("--agdm-ratios", nargs="+", type=float, default=[GUIDANCE_RATIO],
                        help="AGDM's guidance shift over the step's noise (sets s per step), one column per value")
    parser.add_argument("--guidance-epochs", type=int, default=10, help="AGDM guidance network training epochs")
    parser.add_argument("--full-max-level", type=int, default=50, help="longest chain attacked with full gradients")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eot-samples", type=int, default=8)
    parser.add_argument("--eval-repeats", type=int, default=4, help="deployed scorings of a randomised system")
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
        "eval_repeats": arguments.eval_repeats,
        "max_samples": arguments.max_samples,
        "sanity_checks": False,
        "plots": False,
        "resume_dir": runs / "partial",  # a cell stopped midway resumes its attacked batches
    }
    attack_key = (f"steps{arguments.steps}_eot{arguments.eot_samples}_r{arguments.eval_repeats}_"
                  f"n{arguments.max_samples}")  # fmt: skip
    rap = ["RAP"] if arguments.rap_epochs > 0 else []
    agdm_names = {f"AGDM t*={depth} ratio={ratio:g}": (depth, ratio)
                  for depth in arguments.agdm_depths for ratio in arguments.agdm_ratios}  # fmt: skip
    systems = ["Padim", *(f"DiffPure p={level}" for level in arguments.levels),
               *(f"TMA T*={depth}" for depth in arguments.tma_depths), *rap, *agdm_names, "AdvRAD"]  # fmt: skip
    cache_keys = {name: name.replace(" ", "").replace("*", "").replace("=", "") for name in systems}
    if rap:
        cache_keys["RAP"] += f"_T{arguments.rap_steps}_e{arguments.rap_epochs}_seed{arguments.rap_seed}"
    for name in agdm_names:
        cache_keys[name] += f"_g{arguments.guidance_epochs}_a{ARCHITECTURE}"
    results: dict[tuple[str, str], dict[str, dict]] = {}
    costs: dict[str, dict] = {}
    for category in arguments.classes:
        trained: dict[str, object] = {}  # per class: AdvRAD, Padim, RAP and the guidance network, fitted once
        for protocol in arguments.protocols:
            row = results[category, protocol] = {}
            pending = []
            for name in systems:
                path = runs / f"purifier_table_{category}_{protocol}_{cache_keys[name]}_{attack_key}.json"
                if path.exists():
                    row[name] = json.loads(path.read_text())
                else:
                    pending.append((name, path))
            if not pending:
                continue
            torch.manual_seed(0)
            datamodule = FashionMNIST(category=category, protocol=protocol, image_size=SIZE,
                                      num_train=arguments.num_train, num_test=arguments.num_test,
                                      train_batch_size=16)  # fmt: skip
            if not trained:  # Padim right after the seed: the same random-init backbone in every run and resume
                trained["padim"] = fitted_padim(datamodule, runs)
                trained["adv_rad"] = denoiser(category, arguments.denoiser_root, arguments.epochs, runs)
            adv_rad, padim = trained["adv_rad"], trained["padim"]
            datamodule.setup()
            loader = datamodule.test_dataloader()
            for name, path in pending:
                defense, training_seconds = defense_of(name, arguments, adv_rad, padim, datamodule, runs, category,
                                                       trained, agdm_names)  # fmt: skip
                started = time.perf_counter()
                if name == "Padim":
                    report = RobustEval(**settings).evaluate(padim, loader)
                elif name == "AdvRAD":
                    report = RobustEval(**settings).evaluate(adv_rad, loader)
                else:
                    full = defense.unet_evaluations <= arguments.full_max_level
                    callback = RobustEval(defense=defense, purifier_gradients=["full", "bpda"] if full else ["bpda"],
                                          **settings)  # fmt: skip
                    report = callback.evaluate(padim, loader)
                row[name] = cell(report) | {"attack_seconds": time.perf_counter() - started}
                if name not in costs:
                    costs[name] = system_cost(name, defense, padim, adv_rad, next(iter(loader)).image[:8])
                    costs[name]["training_seconds"] = training_seconds
                row[name]["cost"] = costs[name]
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, json.dumps(row[name]))
                print(category, protocol, name, row[name], flush=True)
        for name in systems:
            costs.setdefault(name, results[category, arguments.protocols[0]][name]["cost"])
    write_tables(arguments, systems, results, costs)


def defense_of(name: str, arguments: argparse.Namespace, adv_rad: AdvRAD, padim: torch.nn.Module,
               datamodule: FashionMNIST, runs: Path, category: str, trained: dict[str, object],
               agdm_names: dict[str, tuple[int, float]]) -> tuple[object | None, float | None]:  # fmt: skip
    """The purifier of the system called ``name`` (``None`` for Padim and AdvRAD) and the seconds this run spent
    training it (``None`` when nothing was trained for it). RAP's adapter and AGDM's guidance network are trained once
    per class, against the class's Padim and on its normal training images."""
    if name.startswith("DiffPure"):
        return DiffPure(adv_rad, level=int(name.split("=")[1])), None
    if name.startswith("TMA"):
        return TMA(adv_rad, depth=int(name.split("=")[1]), stride=arguments.tma_stride), None
    if name == "RAP":
        if "rap" not in trained:
            trained["rap"] = train_rap(padim, datamodule, runs, arguments.rap_seed, arguments.rap_steps,
                                       arguments.rap_epochs)  # fmt: skip
        return trained["rap"]
    if name in agdm_names:
        if "guidance" not in trained:
            path = runs / f"agdm_guidance_v{ARCHITECTURE}_{category}_e{arguments.guidance_epochs}.ckpt"
            trained["guidance"] = trained_guidance(datamodule, path, arguments.guidance_epochs)
        network, seconds = trained["guidance"]
        depth, ratio = agdm_names[name]
        return AGDM(adv_rad, network, depth=depth, guidance_ratio=ratio), seconds
    return None, None


def system_cost(name: str, defense: object | None, padim: torch.nn.Module, adv_rad: AdvRAD,
                images: torch.Tensor) -> dict[str, float]:  # fmt: skip
    """U-Net calls and seconds per image of one scoring pass of the system."""
    if name == "AdvRAD":
        return {"unet_calls": 1, "seconds": seconds_per_image(adv_rad, images)}
    if defense is None:
        return {"unet_calls": 0, "seconds": seconds_per_image(padim, images)}
    return {"unet_calls": defense.unet_evaluations, "seconds": seconds_per_image(Purified(padim, defense), images)}


def write_tables(arguments: argparse.Namespace, systems: list[str], results: dict[tuple[str, str], dict[str, dict]],
                 costs: dict[str, dict]) -> None:  # fmt: skip
    """Print the AUROC table per protocol and the cost table; write both as markdown to ``--output``."""
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
                + (f" / {row[name]['bpda']}" if name not in ("Padim", "AdvRAD") else "")
                + f" ({row[name]['standard']})"
                for name in systems
            ]
            table.add_row(category, *cells)
            markdown.append(f"| {category} | {' | '.join(cells)} |")
        markdown.append("")
        Console(width=250).print(table)
    table = Table(title="Cost per image (one scoring pass, no gradients) and training time, on one class")
    for column in ("system", "U-Net calls", "ms / image", "training s"):
        table.add_column(column, justify="right")
    markdown += ["| system | U-Net calls | ms / image | training s |", "|---|---|---|---|"]
    for name in systems:
        cost = costs[name]
        training = "-" if cost.get("training_seconds") is None else f"{cost['training_seconds']:.0f}"
        cells = (name, str(cost["unet_calls"]), f"{1000 * cost['seconds']:.1f}", training)
        table.add_row(*cells)
        markdown.append(f"| {' | '.join(cells)} |")
    Console(width=200).print(table)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(arguments.output, "\n".join(markdown) + "\n")


if __name__ == "__main__":
    main()
