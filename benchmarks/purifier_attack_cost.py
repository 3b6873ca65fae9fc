"""What a converged attack on a diffusion purifier costs, and whether the cheaper gradients are as strong: core minutes
per cell and robust AUROC of every way to differentiate the purifier, compared paired on the same images and seeds.

The systems are those of ``purifier_table.py`` (DiffPure, TMA and AGDM in front of the random-init Padim, the AdvRAD
CPU preset as their diffusion model, Fashion-MNIST at 32 x 32), set up the same way so that cells pair with its own.
Each system is attacked with L_inf EOT-PGD 2/255 through each ``--gradients`` mode, one cell per mode and attack:

- ``full``: the whole chain, gradient checkpointing ``"auto"`` (off where the chain's activations fit in memory);
- ``full-checkpointed``: the same gradient with every U-Net call recomputed in the backward pass (the former default;
  its numbers equal ``full``'s, only its cost differs);
- ``surrogate-M``: the surrogate process of Lee & Kim (ICCV 2023, "Robust Evaluation of Diffusion-Based Adversarial
  Purification"): the chain respaced to M U-Net calls is differentiated, the system is scored with its real chain;
- ``bpda``: the identity backward.

Cells record digests of the models they attacked (Padim, the denoiser, AGDM's guidance network); only cells of the same
models are paired, and a run that had to train the models again (another machine trains them to other bits) measures
its cached cells of other models again.

Every cell is scored as deployed (``--eval-repeats`` scorings with fresh noise), with the same attack and scoring
seeds, so cells pair: the table gives each mode's robust AUROC minus the full gradient's with a 95 % bootstrap interval
over images and scorings; a cheaper mode is at least as strong where that difference is <= 0 with an upper end of at
most +2 points. Core minutes are the process's CPU time (all threads) for the cell's attacks and scorings.

Every finished cell is kept as JSON in ``--cells`` under a key of its settings and of the code
(:func:`~anomalib_robust.evaluation.provenance.loaded_code_key`: a commit that changes only docs, tests or benchmarks
keeps it), so an interrupted run resumes and a later session on another machine continues the committed cells.
Prints tables, never asserts.

Example:
    $ make fashion-mnist
    $ OMP_NUM_THREADS=1 python benchmarks/purifier_attack_cost.py --systems "DiffPure p=25" \\
        --gradients full surrogate-5 --attacks 10x4 --cells docs/measurements/purifier_attack_cost_2026-12-07
"""

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from purifier_setup import SIZE, fitted_padim, trained_guidance
from purifier_table import attack_setting, cell, denoiser, points, print_table

from anomalib_robust import RobustEval
from anomalib_robust.attacks import DetectorScore
from anomalib_robust.attacks.precision import native_bf16
from anomalib_robust.data import CLASS_NAMES, FashionMNIST
from anomalib_robust.defenses import AGDM, TMA, DiffPure, Purified
from anomalib_robust.evaluation.evaluator import DEFAULT_SURROGATE_STEPS, purifier_gradient_detectors
from anomalib_robust.evaluation.metrics import paired_auroc_difference
from anomalib_robust.evaluation.provenance import loaded_code_identity, loaded_code_key
from anomalib_robust.evaluation.report import write_atomic
from anomalib_robust.evaluation.resume import model_fingerprint


def gradient_mode(text: str) -> str:
    """``full``, ``full-checkpointed``, ``bpda`` or ``surrogate-M`` with M a positive integer."""
    steps = text.removeprefix("surrogate-")
    if text in ("full", "full-checkpointed", "bpda") or (text.startswith("surrogate-") and steps.isdigit() and int(steps)):
        return text
    msg = f"expected full, full-checkpointed, bpda or surrogate-M (M > 0), got {text!r}"
    raise argparse.ArgumentTypeError(msg)


def purifier(system: str, gradients: str, adv_rad: object, guidance: object, tma_stride: int) -> object:
    """The purifier of ``system`` (``DiffPure p=P``, ``TMA T*=D``, ``AGDM t*=D``), checkpointed as ``gradients``
    asks."""
    checkpointing = True if gradients == "full-checkpointed" else "auto"
    kind, _, value = system.partition(" ")
    depth = int(value.split("=")[1])
    if kind == "DiffPure":
        return DiffPure(adv_rad, level=depth, gradient_checkpointing=checkpointing)
    if kind == "TMA":
        return TMA(adv_rad, depth=depth, stride=tma_stride, gradient_checkpointing=checkpointing)
    return AGDM(adv_rad, guidance, depth=depth, gradient_checkpointing=checkpointing)


def evaluator_arguments(gradients: str) -> dict:
    """``RobustEval``'s purifier-gradient arguments for a mode."""
    if gradients.startswith("surrogate-"):
        return {"purifier_gradients": ["surrogate"], "surrogate_steps": int(gradients.removeprefix("surrogate-"))}
    return {"purifier_gradients": ["bpda" if gradients == "bpda" else "full"]}


def cell_path(arguments: argparse.Namespace, system: str, gradients: str, attack: tuple[int, int]) -> Path:
    """Where a cell is kept: its readable settings and the digest of them and of the code."""
    settings = {
        "category": arguments.category, "protocol": arguments.protocol, "system": system, "gradients": gradients,
        "attack": attack, "eval_repeats": arguments.eval_repeats, "max_samples": arguments.max_samples,
        "num_train": arguments.num_train, "num_test": arguments.num_test, "epochs": arguments.epochs,
        "guidance_epochs": arguments.guidance_epochs, "tma_stride": arguments.tma_stride, "code": loaded_code_key(),
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = arguments.cells / f"{cell_name(arguments, system, gradients, attack)}_{digest}.json"
    if not path.exists() and arguments.any_code:
        found = sorted(arguments.cells.glob(f"{cell_name(arguments, system, gradients, attack)}_*.json"))
        return max(found, key=lambda other: other.stat().st_mtime) if found else path
    return path


def cell_name(arguments: argparse.Namespace, system: str, gradients: str, attack: tuple[int, int]) -> str:
    """The readable part of a cell's file name."""
    name = f"{arguments.category}_{arguments.protocol}_{system}_{gradients}_pgd{attack[0]}_eot{attack[1]}"
    return name.replace(" ", "").replace("*", "").replace("=", "")


def run_cell(arguments: argparse.Namespace, system: str, gradients: str, attack: tuple[int, int],
             trained: dict, loader: object) -> dict:  # fmt: skip
    """Attack and score one cell; its AUROCs, per-image scores, core and wall seconds."""
    defense = purifier(system, gradients, trained["adv_rad"], trained.get("guidance"), arguments.tma_stride)
    steps, eot_samples = attack
    callback = RobustEval(defense=defense, eps=2 / 255, steps=steps, eot_samples=eot_samples,
                          eval_repeats=arguments.eval_repeats, max_samples=arguments.max_samples, sanity_checks=False,
                          plots=False, resume_dir=arguments.cells / "partial", **evaluator_arguments(gradients))  # fmt: skip
    cpu, wall = time.process_time(), time.perf_counter()
    report = callback.evaluate(trained["padim"], loader)
    seconds = {"core_seconds": time.process_time() - cpu, "wall_seconds": time.perf_counter() - wall}
    return cell(report) | seconds | {"threads": torch.get_num_threads(), "code": loaded_code_identity(),
                                     "weights": weights(trained)}  # fmt: skip


def weights(trained: dict) -> dict[str, str]:
    """Digests of the trained models' weights: cells pair only when they attacked the same models."""
    return {name: model_fingerprint(model)["weights"] for name, model in sorted(trained.items())}


def gradient_timing(arguments: argparse.Namespace, trained: dict, images: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """Milliseconds per image of one EOT draw of the attack's gradient, per system, mode and precision, measured in
    this process (ratios are what carries over to another CPU): a warm-up call, then the mean of three."""
    rows = []
    for system in arguments.systems:
        for gradients in arguments.gradients:
            for precision in arguments.timing_precisions:
                defense = purifier(system, gradients, trained["adv_rad"], trained.get("guidance"), arguments.tma_stride)
                model = Purified(trained["padim"], defense, visualizer=False)
                mode = evaluator_arguments(gradients)
                full = DetectorScore(model, eot_samples=1, stochastic=True, gradient_precision=precision)
                (detector,) = purifier_gradient_detectors(full, defense, mode["purifier_gradients"],
                                                          mode.get("surrogate_steps", DEFAULT_SURROGATE_STEPS))
                with detector.prepared():
                    detector.objective_and_gradient(images, labels)
                    started = time.perf_counter()
                    for _ in range(3):
                        detector.objective_and_gradient(images, labels)
                milliseconds = 1000 * (time.perf_counter() - started) / 3 / images.shape[0]
                rows.append([system, gradients, precision, f"{milliseconds:.1f}"])
    title = (f"One EOT draw of the attack's gradient, ms per image ({images.shape[0]} images, "
             f"{torch.get_num_threads()} thread(s), CPU capability {torch.backends.cpu.get_cpu_capability()}, "
             f"native bf16: {native_bf16(torch.device('cpu'))})")  # fmt: skip
    return print_table(title, ["system", "gradient", "precision", "ms / image"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="trouser", choices=CLASS_NAMES)
    parser.add_argument("--protocol", default="defect", choices=["defect", "semantic"])
    parser.add_argument("--systems", nargs="+", default=["DiffPure p=5", "DiffPure p=25", "TMA T*=140", "AGDM t*=70"])
    parser.add_argument("--gradients", nargs="+", type=gradient_mode,
                        default=["full", "full-checkpointed", "surrogate-1", "surrogate-5", "bpda"])
    parser.add_argument("--attacks", nargs="+", type=attack_setting, default=[(10, 4)], help="STEPSxEOT")
    parser.add_argument("--timing-images", type=int, default=0,
                        help="also time one gradient per system, mode and precision on this many images (0: no)")
    parser.add_argument("--timing-only", action="store_true", help="only the gradient timing, no cells")
    parser.add_argument("--timing-precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--eval-repeats", type=int, default=4)
    parser.add_argument("--max-samples", type=int, default=40)
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=60, help="AdvRAD (the denoiser) training epochs")
    parser.add_argument("--guidance-epochs", type=int, default=10, help="AGDM guidance network training epochs")
    parser.add_argument("--tma-stride", type=int, default=10)
    parser.add_argument("--any-code", action="store_true",
                        help="read a cell computed by other code where none of this code is kept (the table names the "
                        "commit of every cell)")  # fmt: skip
    parser.add_argument("--runs", type=Path, default=Path("results/benchmarks/runs"), help="trained models")
    parser.add_argument("--cells", type=Path, default=Path("results/benchmarks/purifier_attack_cost"))
    parser.add_argument("--output", type=Path, default=Path("results/benchmarks/purifier_attack_cost.md"))
    arguments = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    cells = {}
    pending = []
    for system in [] if arguments.timing_only else arguments.systems:
        for attack in arguments.attacks:
            for gradients in arguments.gradients:
                path = cell_path(arguments, system, gradients, attack)
                if path.exists():
                    cells[system, gradients, attack] = json.loads(path.read_text())
                else:
                    pending.append((system, gradients, attack, path))
    markdown = []
    if pending or arguments.timing_images:
        torch.manual_seed(0)  # Padim right after the seed: the random-init backbone of purifier_table.py
        datamodule = FashionMNIST(category=arguments.category, protocol=arguments.protocol, image_size=SIZE,
                                  num_train=arguments.num_train, num_test=arguments.num_test,
                                  train_batch_size=16)  # fmt: skip
        trained = {"padim": fitted_padim(datamodule, arguments.runs)}
        trained["adv_rad"] = denoiser(arguments.category, None, arguments.epochs, arguments.runs)
        if any(system.startswith("AGDM") for system, *_ in pending):
            path = arguments.runs / f"agdm_guidance_{arguments.category}_e{arguments.guidance_epochs}.ckpt"
            trained["guidance"] = trained_guidance(datamodule, path, arguments.guidance_epochs)[0]
        datamodule.setup()
        loader = datamodule.test_dataloader()
        if arguments.timing_images:
            batch = next(iter(datamodule.test_dataloader()))
            chosen = torch.linspace(0, len(batch.image) - 1, arguments.timing_images).long()
            markdown += gradient_timing(arguments, trained, batch.image[chosen], batch.gt_label[chosen])
        stale = [key for key, found in cells.items() if found["weights"] != weights(trained)]
        pending += [(*key, cell_path(arguments, *key)) for key in stale]  # trained again, not bit for bit: measure again
        for system, gradients, attack, path in pending:
            cells[system, gradients, attack] = run_cell(arguments, system, gradients, attack, trained, loader)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(cells[system, gradients, attack]))
            found = cells[system, gradients, attack]
            print(system, gradients, attack, found["standard"], found["robust"],
                  f"{found['core_seconds'] / 60:.1f} core min", flush=True)  # fmt: skip
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    tables = [] if arguments.timing_only else cost_table(arguments, cells)
    write_atomic(arguments.output, "\n".join(markdown + tables) + "\n")


def cost_table(arguments: argparse.Namespace, cells: dict) -> list[str]:
    """Per system and attack: every mode's robust AUROC, its paired difference to the full gradient, core minutes."""
    rows = []
    for system in arguments.systems:
        for attack in arguments.attacks:
            full = cells.get((system, "full", attack))
            for gradients in arguments.gradients:
                found = cells[system, gradients, attack]
                paired = "-"
                if full is not None and gradients != "full" and full["weights"] == found["weights"]:
                    scores = found["scores"]
                    difference = paired_auroc_difference(full["scores"]["robust"], scores["robust"], scores["labels"])
                    paired = points(difference)
                commit = (found["code"]["git_commit"] or "?")[:7] + ("+" if found["code"]["git_dirty"] else "")
                rows.append([system, f"PGD-{attack[0]} EOT-{attack[1]}", gradients, found["standard"], found["robust"],
                             paired, f"{found['core_seconds'] / 60:.1f}", commit])  # fmt: skip
    title = (f"{arguments.category} {arguments.protocol}, {arguments.max_samples} images, L_inf 2/255: robust image "
             "AUROC by how the attack differentiates the purifier, paired against the full gradient (points, 95 % "
             "interval; negative: stronger), and core minutes per cell")  # fmt: skip
    header = ["system", "attack", "gradient", "standard", "robust", "robust - full", "core min", "code"]
    return print_table(title, header, rows)


if __name__ == "__main__":
    main()
