"""Purifiers in front of Padim vs AdvRAD on Fashion-MNIST, in the shape of the AdvRAD paper's Table 7, with paired
statistics that say which defense beats which.

For every class and protocol: Padim (random-init ResNet-18) undefended, ``DiffPure(p) + Padim`` for every level p,
``TMA(T*) + Padim`` for every depth T* (``--tma-depths``; the TMA paper's 140 is its CIFAR-10 setting),
``RAP + Padim`` (the RAP paper, Alg. 2 in its one-step mode, the adapter trained here against the fitted Padim,
:func:`purifier_setup.train_rap`), ``AGDM(t*) + Padim`` for every depth t* and guidance strength (the AGDM paper, Alg. 1: our
normalised ratio of each step's guidance shift to its noise, ``--agdm-ratios``, and the paper's fixed scale s,
``--agdm-scales``; its guidance network trained here,
:func:`purifier_setup.trained_guidance`), and AdvRAD (CPU preset, one-shot), each as "robust (standard)" image AUROC in
percent under L_inf PGD 2/255 with EOT (default PGD-50 with EOT-20, the AdvRAD paper's Table 10 draws), attacking
through the purifier with full gradients (memory bounded by gradient checkpointing) and with BPDA (identity backward).
A purified system's robust AUROC is the worst case per image over both attacks. Full-gradient attacks through chains
longer than ``--full-max-level`` U-Net calls are not run: their cost grows with p, and BPDA is run for every level.
Randomised systems are scored ``--eval-repeats`` times as deployed (mean ± std); one-step RAP is deterministic, and its
cell comes from one adapter (``--rap-seed``), so it carries no training spread.

Every cell sees the same test images with the same attack and scoring seeds, so systems are compared **paired**: per
class and protocol a table gives each system's difference to undefended Padim and to AdvRAD with a 95 % bootstrap
interval over images and scorings (:func:`~anomalib_robust.evaluation.metrics.paired_auroc_difference`), and a line
lists every "A > B" whose robust interval excludes zero. ``--convergence`` runs stronger attacks (``STEPSxEOT``) on the
first class and protocol and compares them with the reported one, paired: the reported attack has converged for a
system when no stronger attack lowers its robust AUROC beyond the interval. A last table gives each system's cost per
image (U-Net calls, seconds of one scoring pass) and the training time of what the run trained (AdvRAD, RAP's
adapter, AGDM's guidance network).

The purifier's diffusion model is AdvRAD's U-Net trained on the class's normal images: ``--denoiser-root`` reuses the
checkpoints written by ``benchmarks/adv_rad_quality.py`` (``<root>/AdvRAD/FashionMNIST/<class>/*/weights/...``),
otherwise the CPU preset is trained here. Every finished (class, protocol, system, attack) cell is cached as JSON with
its per-image scores next to ``--output``, under a name that holds the code's key (the package's source digest and
versions: a commit that changes only docs, tests or benchmarks keeps the cells), so an interrupted run resumes; within
a cell, every attacked batch is kept as well (``RobustEvaluator(resume_dir=...)``). Prints tables, never asserts.

Example:
    $ make fashion-mnist
    $ python benchmarks/purifier_table.py --classes trouser --levels 5 25 50 --max-samples 40 --convergence 100x20 50x40
    $ python benchmarks/purifier_table.py --denoiser-root results/benchmarks/runs --eot-samples 4 --steps 5
    $ python benchmarks/purifier_table.py --levels 70 --agdm-depths 70 --agdm-ratios 0.1 0.5 1 --rap-epochs 0
    $ python benchmarks/purifier_table.py --levels 25 --tma-depths 30 60 90 140 --rap-epochs 0 --agdm-depths
"""

import argparse
import hashlib
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
from anomalib_robust.defenses import AGDM, TMA, DiffPure, DiffusionChainPurifier, Purified
from anomalib_robust.defenses.agdm import GUIDANCE_RATIO
from anomalib_robust.evaluation.evaluator import DEFAULT_SURROGATE_STEPS, PURIFIER_GRADIENT_MODES
from anomalib_robust.evaluation.metrics import PairedDifference, paired_auroc_difference
from anomalib_robust.evaluation.provenance import loaded_code_identity, loaded_code_key
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


def cell(report: RobustReport) -> dict:
    """Standard and robust (full-gradient, BPDA, and the worst case per image over both) image AUROC of one report,
    formatted with their repeat spread, and the per-image scores a paired comparison needs: labels, clean scores and
    the robust scores, ``(N, repeats)`` each. A system's robust score is its worst case when it was attacked twice, else
    its one attack's."""
    repeats = report.eval_repeats
    formatted = {}
    for result in report.results:
        name = ("worst" if result.role == "worst_case" else "bpda" if result.attack.startswith("BPDA")
                else "surrogate" if result.attack.startswith("Surrogate") else "full")  # fmt: skip
        formatted[name] = format_auroc(result.image_auroc, result.image_auroc_std, repeats)
    worst = [result for result in report.results if result.role == "worst_case"]
    (robust,) = worst or [result for result in report.results if result.role == "attack"]
    scores = report.image_scores
    return {
        "standard": format_auroc(report.clean_image_auroc, report.clean_image_auroc_std, repeats),
        "full": formatted.get("full", "-"),
        "bpda": formatted.get("bpda", "-"),
        "surrogate": formatted.get("surrogate", "-"),
        "robust": format_auroc(robust.image_auroc, robust.image_auroc_std, repeats),
        "scores": {"labels": scores.labels.tolist(), "clean": scores.clean.tolist(),
                   "robust": scores.attacked[robust.key].tolist()},
    }  # fmt: skip


def attack_setting(text: str) -> tuple[int, int]:
    """``STEPSxEOT`` (e.g. ``100x20``) as ``(steps, eot_samples)``."""
    steps, _, eot = text.partition("x")
    if not (steps.isdigit() and eot.isdigit() and int(steps) > 0 and int(eot) > 0):
        msg = f"expected STEPSxEOT with two positive integers, e.g. 100x20, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return int(steps), int(eot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", nargs="+", default=["trouser", "sneaker", "bag"], choices=CLASS_NAMES)
    parser.add_argument("--protocols", nargs="+", default=["defect", "semantic"], choices=["defect", "semantic"])
    parser.add_argument("--levels", nargs="*", type=int, default=[5, 25, 50], help="DiffPure levels p")
    parser.add_argument("--tma-depths", nargs="*", type=int, default=[140], help="TMA T*, one column per value")
    parser.add_argument("--tma-stride", type=int, default=10)
    parser.add_argument("--rap-epochs", type=int, default=10, help="RAP adapter training epochs (0: no RAP column)")
    parser.add_argument("--rap-steps", type=int, default=5, help="T of the adapter's forward process (Alg. 1)")
    parser.add_argument("--rap-seed", type=int, default=0)
    parser.add_argument("--agdm-depths", nargs="*", type=int, default=[70], help="AGDM t* (the AGDM paper's 70)")
    parser.add_argument("--agdm-scales", nargs="*", type=float, default=[],
                        help="the AGDM paper's fixed guidance scale s (guidance_mode='fixed_scale'; 1 in the paper), "
                        "one column per value")  # fmt: skip
    parser.add_argument("--agdm-ratios", nargs="*", type=float, default=[GUIDANCE_RATIO],
                        help="AGDM's guidance shift over the step's noise (sets s per step), one column per value")
    parser.add_argument("--guidance-epochs", type=int, default=10, help="AGDM guidance network training epochs")
    parser.add_argument("--purifier-gradients", nargs="+", choices=PURIFIER_GRADIENT_MODES, default=["full", "bpda"],
                        help="how the attack differentiates a purifier; a system's robust score is its worst case per "
                        "image over these")  # fmt: skip
    parser.add_argument("--surrogate-steps", type=int, default=DEFAULT_SURROGATE_STEPS,
                        help="U-Net calls of the surrogate chain (Lee & Kim, ICCV 2023)")
    parser.add_argument("--full-max-level", type=int, default=50, help="longest chain attacked with full gradients")
    parser.add_argument("--steps", type=int, default=50, help="PGD steps of the reported attack")
    parser.add_argument("--eot-samples", type=int, default=20, help="the reported attack's EOT draws")
    parser.add_argument("--convergence", nargs="*", type=attack_setting, default=[],
                        help="stronger attacks as STEPSxEOT (e.g. 100x20 50x40), run on the first class and protocol "
                        "and compared with the reported attack, paired, for every system")  # fmt: skip
    parser.add_argument("--eval-repeats", type=int, default=4, help="deployed scorings of a randomised system")
    parser.add_argument("--max-samples", type=int, default=40, help="test images per class and protocol")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--denoiser-root", type=Path, help="runs directory of benchmarks/adv_rad_quality.py")
    parser.add_argument("--epochs", type=int, default=60, help="AdvRAD training epochs when no checkpoint is found")
    parser.add_argument("--output", type=Path, default=Path("results/benchmarks/purifier_table.md"))
    parser.add_argument("--any-code", action="store_true",
                        help="read a cell computed by other code where none of this code is kept (every cell records "
                        "its commit and source digest)")  # fmt: skip
    parser.add_argument("--cells", type=Path, help="where the finished cells are kept (default: the runs directory "
                        "next to --output, where the trained models go)")  # fmt: skip
    arguments = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    runs = arguments.output.parent / "runs"
    reported = (arguments.steps, arguments.eot_samples)
    rap = ["RAP"] if arguments.rap_epochs > 0 else []
    agdm_names = {f"AGDM t*={depth} ratio={ratio:g}": {"depth": depth, "guidance_ratio": ratio}
                  for depth in arguments.agdm_depths for ratio in arguments.agdm_ratios}  # fmt: skip
    agdm_names |= {f"AGDM t*={depth} s={scale:g}": {"depth": depth, "guidance_mode": "fixed_scale",
                                                    "guidance_scale": scale}
                   for depth in arguments.agdm_depths for scale in arguments.agdm_scales}  # fmt: skip
    systems = ["Padim", *(f"DiffPure p={level}" for level in arguments.levels),
               *(f"TMA T*={depth}" for depth in arguments.tma_depths), *rap, *agdm_names, "AdvRAD"]  # fmt: skip
    cache_keys = {name: name.replace(" ", "").replace("*", "").replace("=", "") for name in systems}
    if rap:
        cache_keys["RAP"] += f"_T{arguments.rap_steps}_e{arguments.rap_epochs}_seed{arguments.rap_seed}"
    for name in agdm_names:
        cache_keys[name] += f"_g{arguments.guidance_epochs}_a{ARCHITECTURE}"
    if arguments.purifier_gradients != ["full", "bpda"]:
        modes = "-".join(arguments.purifier_gradients).replace("surrogate", f"surrogate{arguments.surrogate_steps}")
        for name in systems:
            if name not in ("Padim", "AdvRAD"):
                cache_keys[name] += f"_{modes}"
    results: dict[tuple[str, str, tuple[int, int]], dict[str, dict]] = {}
    costs: dict[str, dict] = {}
    for category in arguments.classes:
        trained: dict[str, object] = {}  # per class: AdvRAD, Padim, RAP and the guidance network, fitted once
        for protocol in arguments.protocols:
            first = (category, protocol) == (arguments.classes[0], arguments.protocols[0])
            pending = []
            for attack in [reported, *(arguments.convergence if first else [])]:
                row = results[category, protocol, attack] = {}
                for name in systems:
                    key = f"{category}_{protocol}_{cache_keys[name]}_{attack_key(arguments, attack)}"
                    path = cell_file(arguments.cells or runs, key, arguments.any_code)
                    cached = json.loads(path.read_text()) if path.exists() else {}
                    if "scores" in cached:  # a cell written before the per-image scores is measured again
                        row[name] = cached
                    else:
                        pending.append((name, attack, path))
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
            for name, attack, path in pending:
                defense, training_seconds = defense_of(name, arguments, adv_rad, padim, datamodule, runs, category,
                                                       trained, agdm_names)  # fmt: skip
                settings = evaluation_settings(arguments, attack, runs)
                started = time.perf_counter()
                if defense is None:
                    report = RobustEval(**settings).evaluate(adv_rad if name == "AdvRAD" else padim, loader)
                else:
                    callback = RobustEval(defense=defense, purifier_gradients=gradient_modes(arguments, defense),
                                          surrogate_steps=arguments.surrogate_steps, **settings)  # fmt: skip
                    report = callback.evaluate(padim, loader)
                row = results[category, protocol, attack]
                row[name] = cell(report) | {"attack_seconds": time.perf_counter() - started,
                                            "code": loaded_code_identity()}  # fmt: skip
                if name not in costs:
                    costs[name] = system_cost(name, defense, padim, adv_rad, next(iter(loader)).image[:8])
                    costs[name]["training_seconds"] = training_seconds
                row[name]["cost"] = costs[name]
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, json.dumps(row[name]))
                print(category, protocol, name, attack, {key: row[name][key] for key in ("standard", "robust")},
                      flush=True)  # fmt: skip
        for name in systems:
            costs.setdefault(name, results[category, arguments.protocols[0], reported][name]["cost"])
    markdown = auroc_tables(arguments, systems, results)
    markdown += paired_tables(arguments, systems, results)
    if arguments.convergence:
        markdown += convergence_table(arguments, systems, results)
    markdown += cost_table(systems, costs)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(arguments.output, "\n".join(markdown) + "\n")


def cell_file(directory: Path, key: str, any_code: bool) -> Path:
    """The file of the cell called ``key``; with ``any_code``, where this code has none, the newest cell of the same
    settings computed by other code."""
    path = directory / f"purifier_table_{key}.json"
    if any_code and not path.exists():
        found = sorted(directory.glob(f"purifier_table_{key.rpartition('_code')[0]}_code*.json"))
        return max(found, key=lambda other: other.stat().st_mtime) if found else path
    return path


def gradient_modes(arguments: argparse.Namespace, defense: object) -> list[str]:
    """The purifier-gradient modes attacking ``defense``: ``--purifier-gradients`` less the full gradient through a
    chain longer than ``--full-max-level`` U-Net calls (BPDA alone if nothing is left). RAP's one adapter call has no
    chain to respace: the surrogate is its exact full gradient."""
    modes = list(arguments.purifier_gradients)
    if not isinstance(defense, DiffusionChainPurifier):
        modes = list(dict.fromkeys("full" if mode == "surrogate" else mode for mode in modes))
    too_long = defense.unet_evaluations > arguments.full_max_level
    modes = [mode for mode in modes if not (mode == "full" and too_long)]
    return modes or ["bpda"]


def attack_key(arguments: argparse.Namespace, attack: tuple[int, int]) -> str:
    """What names a cell's attack, images and code in its cache file: a cell is reused only for the same attack,
    scorings, training images, test images and code (:func:`~anomalib_robust.evaluation.provenance.loaded_code_key`,
    which a commit that changes only docs, tests or benchmarks keeps)."""
    steps, eot_samples = attack
    images = f"train{arguments.num_train}_test{arguments.num_test}_n{arguments.max_samples}"
    code = hashlib.sha256(json.dumps(loaded_code_key(), sort_keys=True).encode()).hexdigest()[:8]
    return f"steps{steps}_eot{eot_samples}_r{arguments.eval_repeats}_{images}_code{code}"


def evaluation_settings(arguments: argparse.Namespace, attack: tuple[int, int], runs: Path) -> dict:
    """``RobustEval``'s arguments for one attack: L_inf 2/255, the same seeds for every system (so that cells on the
    same images pair up), no sanity runs; a cell stopped midway resumes its attacked batches."""
    steps, eot_samples = attack
    return {"eps": 2 / 255, "steps": steps, "eot_samples": eot_samples, "eval_repeats": arguments.eval_repeats,
            "max_samples": arguments.max_samples, "sanity_checks": False, "plots": False,
            "resume_dir": runs / "partial"}  # fmt: skip


def defense_of(name: str, arguments: argparse.Namespace, adv_rad: AdvRAD, padim: torch.nn.Module,
               datamodule: FashionMNIST, runs: Path, category: str, trained: dict[str, object],
               agdm_names: dict[str, dict]) -> tuple[object | None, float | None]:  # fmt: skip
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
        return AGDM(adv_rad, network, **agdm_names[name]), seconds
    return None, None


def system_cost(name: str, defense: object | None, padim: torch.nn.Module, adv_rad: AdvRAD,
                images: torch.Tensor) -> dict[str, float]:  # fmt: skip
    """U-Net calls and seconds per image of one scoring pass of the system."""
    if name == "AdvRAD":
        return {"unet_calls": 1, "seconds": seconds_per_image(adv_rad, images)}
    if defense is None:
        return {"unet_calls": 0, "seconds": seconds_per_image(padim, images)}
    return {"unet_calls": defense.unet_evaluations, "seconds": seconds_per_image(Purified(padim, defense), images)}


def print_table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """Print one table with rich; return it as markdown lines."""
    table = Table(title=title)
    for column in header:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=250).print(table)
    return [f"**{title}**", "", f"| {' | '.join(header)} |", "|---" * len(header) + "|",
            *(f"| {' | '.join(row)} |" for row in rows), ""]  # fmt: skip


def auroc_tables(arguments: argparse.Namespace, systems: list[str],
                 results: dict[tuple[str, str, tuple[int, int]], dict[str, dict]]) -> list[str]:  # fmt: skip
    """Per protocol: every class's robust (worst case over full gradients and BPDA) and standard image AUROC, and the
    two attacks apart, for every system under the reported attack."""
    markdown = []
    reported = (arguments.steps, arguments.eot_samples)
    for protocol in arguments.protocols:
        title = (f"Fashion-MNIST {protocol}: robust (standard) image AUROC, L_inf PGD 2/255, {arguments.steps} steps, "
                 f"EOT {arguments.eot_samples}; a purified system's robust is the worst case per image over its "
                 f"gradients through the purifier ({', '.join(arguments.purifier_gradients)}; surrogate: "
                 f"{arguments.surrogate_steps} U-Net call(s)), given after it as full / BPDA where both ran")  # fmt: skip
        rows = []
        for category in arguments.classes:
            row = results[category, protocol, reported]
            rows.append([category, *(
                f"{row[name]['robust']} ({row[name]['standard']})"
                + (f" [{row[name]['full']} / {row[name]['bpda']}]" if name not in ("Padim", "AdvRAD") else "")
                for name in systems
            )])  # fmt: skip
        markdown += print_table(title, ["class", *systems], rows)
    return markdown


def difference(first: dict, second: dict, scores: str) -> PairedDifference:
    """``second - first`` AUROC on the same images, paired over images and scoring repeats."""
    return paired_auroc_difference(first["scores"][scores], second["scores"][scores], first["scores"]["labels"])


def points(paired: PairedDifference) -> str:
    """A paired difference in points with its interval, starred when the interval excludes zero."""
    mark = " *" if paired.excludes(0.0) else ""
    return f"{100 * paired.difference:+.1f} [{100 * paired.low:+.1f}, {100 * paired.high:+.1f}]{mark}"


def paired_tables(arguments: argparse.Namespace, systems: list[str],
                  results: dict[tuple[str, str, tuple[int, int]], dict[str, dict]]) -> list[str]:  # fmt: skip
    """Per class and protocol, every system against undefended Padim and against AdvRAD (robust and standard, in points
    with paired 95 % bootstrap intervals over images and scorings), and the list of every "A beats B": a robust
    difference whose interval excludes zero. Every cell saw the same images and attack seeds."""
    markdown = []
    reported = (arguments.steps, arguments.eot_samples)
    for category in arguments.classes:
        for protocol in arguments.protocols:
            row = results[category, protocol, reported]
            rows = [[name, points(difference(row["Padim"], row[name], "robust")),
                     points(difference(row["Padim"], row[name], "clean")),
                     points(difference(row["AdvRAD"], row[name], "robust")),
                     points(difference(row["AdvRAD"], row[name], "clean"))] for name in systems]  # fmt: skip
            title = f"{category} {protocol}: paired differences in points (* : the 95 % interval excludes zero)"
            header = ["system", "robust - Padim", "standard - Padim", "robust - AdvRAD", "standard - AdvRAD"]
            markdown += print_table(title, header, rows)
            pairs = [(first, second) for first in systems for second in systems if first != second]
            beats = [f"{first} > {second} ({points(paired)})" for first, second in pairs
                     if (paired := difference(row[second], row[first], "robust")).low > 0]  # fmt: skip
            line = f"{category} {protocol}, robust: " + ("; ".join(beats) if beats else "no system beats another")
            Console(width=250).print(line)
            markdown += [line, ""]
    return markdown


def convergence_table(arguments: argparse.Namespace, systems: list[str],
                      results: dict[tuple[str, str, tuple[int, int]], dict[str, dict]]) -> list[str]:  # fmt: skip
    """On the first class and protocol: every system's robust AUROC under the reported attack and under each stronger
    one, with the paired difference (stronger - reported). The reported attack has converged for a system when no
    stronger attack lowers its robust AUROC beyond the interval."""
    category, protocol = arguments.classes[0], arguments.protocols[0]
    reported = (arguments.steps, arguments.eot_samples)
    settings = [reported, *arguments.convergence]
    header = ["system", *(f"PGD-{steps} EOT-{eot}" for steps, eot in settings)]
    rows = []
    for name in systems:
        base = results[category, protocol, reported][name]
        cells = [base["robust"]]
        for attack in arguments.convergence:
            stronger = results[category, protocol, attack][name]
            cells.append(f"{stronger['robust']}, {points(difference(base, stronger, 'robust'))}")
        rows.append([name, *cells])
    title = (f"Convergence on {category} {protocol}: robust image AUROC, and the paired difference to the reported "
             f"attack (PGD-{reported[0]} EOT-{reported[1]}) in points")  # fmt: skip
    return print_table(title, header, rows)


def cost_table(systems: list[str], costs: dict[str, dict]) -> list[str]:
    """U-Net calls and milliseconds per image of one scoring pass, and training seconds, of every system."""
    rows = []
    for name in systems:
        cost = costs[name]
        training = "-" if cost.get("training_seconds") is None else f"{cost['training_seconds']:.0f}"
        rows.append([name, str(cost["unet_calls"]), f"{1000 * cost['seconds']:.1f}", training])
    title = "Cost per image (one scoring pass, no gradients) and training time, on one class"
    return print_table(title, ["system", "U-Net calls", "ms / image", "training s"], rows)


if __name__ == "__main__":
    main()
