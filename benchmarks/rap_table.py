"""RAP and AGDM in front of Padim on Fashion-MNIST, next to the undefended Padim and DiffPure.

The protocol of ``benchmarks/purifier_table.py`` (32 x 32 images, 200 training images, Padim with a random-init
ResNet-18 on layer1 + layer2, fitted after ``torch.manual_seed(0)``; L_inf PGD 2/255, evenly spaced test images, no
sanity runs), so its Padim column is reproduced here and its DiffPure/TMA columns are the comparison. For each adapter
seed a RAP adapter (``configs/model/rap_adapter_cpu.yaml`` with ``--rap-steps`` = T) is trained against the fitted Padim
for ``--epochs`` epochs, once per ``--task-weights`` value (the weight of the score hinges; Alg. 3 adds its
cross-entropy with weight 1) and once without the identity term at the first weight, then ``RAP`` (one step,
deterministic) + Padim is attacked with full gradients through the adapter and with BPDA. One-step RAP is deterministic,
so each cell is scored once; the spread reported is over adapter seeds (training randomness: attack start noise, t
draws, pseudo anomalies, U-Net init). Each finished (variant, seed) is cached as JSON next to ``--output``. Prints
tables, never asserts.

``--diffpure-levels`` and ``--agdm-depths`` add DiffPure(p) and AGDM(t*) rows (the AGDM paper, Alg. 1), both with the
AdvRAD CPU preset trained here as the diffusion model (attacked with EOT, full gradients and BPDA). AGDM's guidance
network is ``AGDMGuidance.cpu_preset()`` trained ``--guidance-epochs`` epochs on the same normal images; one AGDM
row per ``--agdm-ratios`` value (our mode: the guidance shift of every reverse step over the step's noise, in the row's
name) and one per ``--agdm-scales`` value (the AGDM paper's mode: a fixed scale s, 1 in the paper); DiffPure at
p = t* is AGDM without guidance (ratio 0), its ablation.

Example:
    $ nice -n 10 python benchmarks/rap_table.py --category trouser --epochs 3 --seeds 0 1 2 --max-samples 20
    $ nice -n 10 python benchmarks/rap_table.py --task-weights 0.1 0.3 1 --seeds 0 1 2 --max-samples 20
    $ nice -n 10 python benchmarks/rap_table.py --seeds --diffpure-levels 70 --agdm-depths 70 --max-samples 20
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from anomalib.engine import Engine
from purifier_setup import SIZE, fitted_padim, train_rap, trained_guidance

from anomalib_robust import AdvRAD, RobustEval
from anomalib_robust.data import CLASS_NAMES, FashionMNIST
from anomalib_robust.defenses import AGDM, DiffPure, Purified
from anomalib_robust.defenses.agdm import GUIDANCE_RATIO, GUIDANCE_SCALE
from anomalib_robust.evaluation.report import format_auroc, write_atomic
from anomalib_robust.models import AGDMGuidance
from anomalib_robust.models.agdm_guidance.torch_model import ARCHITECTURE


def aurocs(report: object) -> dict[str, float]:
    """Standard and robust (full-gradient, BPDA) image AUROC of one report, in percent."""
    row = {"standard": 100 * report.clean_image_auroc, "standard_std": 100 * report.clean_image_auroc_std,
           "repeats": report.eval_repeats}  # fmt: skip
    for result in report.results:
        key = "bpda" if result.attack.startswith("BPDA") else "full"
        row[key], row[f"{key}_std"] = 100 * result.image_auroc, 100 * result.image_auroc_std
    return row


def summary(rows: list[dict[str, float]], key: str) -> str:
    """Mean ± std over adapter seeds; for a single row, ± the std over its scoring repeats (none when scored once)."""
    if len(rows) == 1:
        value, spread = rows[0][key], rows[0].get(f"{key}_std", 0.0)
        return format_auroc(value / 100, spread / 100, rows[0].get("repeats", 1))
    values = [row[key] for row in rows]
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def purifier_cost(purified: Purified, images: torch.Tensor) -> dict[str, float]:
    """U-Net calls and milliseconds per image of one scoring pass."""
    purifier = purified.model.purifier
    with torch.no_grad():
        started = time.perf_counter()
        purified.model(images)
        milliseconds = 1000 * (time.perf_counter() - started) / images.shape[0]
    return {"unet_calls": purifier.unet_evaluations, "ms": milliseconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="trouser", choices=CLASS_NAMES)
    parser.add_argument("--protocol", default="defect", choices=["defect", "semantic"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rap-steps", type=int, default=5, help="T of the adapter's forward process")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="RAP adapter seeds (none: no RAP)")
    parser.add_argument("--task-weights", nargs="+", type=float, default=[0.1],
                        help="task_weight of the RAP adapter, one adapter per value (a sweep)")
    parser.add_argument("--steps", type=int, default=5, help="PGD steps of the evaluation")
    parser.add_argument("--max-samples", type=int, default=20)
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--diffpure-levels", nargs="*", type=int, default=[],
                        help="also DiffPure(p) + Padim, with the AdvRAD CPU preset trained here as the denoiser")
    parser.add_argument("--agdm-depths", nargs="*", type=int, default=[], help="also AGDM(t*) + Padim")
    parser.add_argument("--agdm-ratios", nargs="+", type=float, default=[GUIDANCE_RATIO],
                        help="AGDM's guidance shift over the step's noise (sets s per step), one row per value")
    parser.add_argument("--agdm-scales", nargs="*", type=float, default=[GUIDANCE_SCALE],
                        help="AGDM with the AGDM paper's fixed guidance scale s, one row per value (none: no such row)")
    parser.add_argument("--guidance-epochs", type=int, default=10)
    parser.add_argument("--advrad-epochs", type=int, default=60)
    parser.add_argument("--eot-samples", type=int, default=2, help="the attacker's EOT draws against DiffPure")
    parser.add_argument("--output", type=Path, default=Path("results/benchmarks/rap_table.md"))
    arguments = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    runs = arguments.output.parent / "rap_runs"
    settings = {"eps": 2 / 255, "steps": arguments.steps, "max_samples": arguments.max_samples,
                "sanity_checks": False, "plots": False, "resume_dir": runs / "partial"}  # fmt: skip

    torch.manual_seed(0)
    datamodule = FashionMNIST(category=arguments.category, protocol=arguments.protocol, image_size=SIZE,
                              num_train=arguments.num_train, num_test=arguments.num_test,
                              train_batch_size=16)  # fmt: skip
    padim = fitted_padim(datamodule, runs)
    datamodule.setup()
    loader = datamodule.test_dataloader()
    rows = {"Padim": [aurocs(RobustEval(**settings).evaluate(padim, loader))]}
    costs = {}
    variants = [(f"RAP, task weight {weight:g}", weight, 1.0) for weight in arguments.task_weights]
    variants.append((f"RAP without identity term, task weight {arguments.task_weights[0]:g}",
                     arguments.task_weights[0], 0.0))  # fmt: skip
    for variant, task_weight, identity_weight in variants if arguments.seeds else ():
        rows[variant] = []
        for seed in arguments.seeds:
            cache = runs / (f"rap_{arguments.category}_{arguments.protocol}_T{arguments.rap_steps}_"
                            f"e{arguments.epochs}_tw{task_weight:g}_id{identity_weight:g}_seed{seed}_"
                            f"pgd{arguments.steps}_n{arguments.max_samples}.json")  # fmt: skip
            if cache.exists():
                cached = json.loads(cache.read_text())
                rows[variant].append(cached["aurocs"])
                costs.setdefault(variant, []).append(cached["train_seconds"])
                continue
            rap, seconds = train_rap(padim, datamodule, runs, seed, arguments.rap_steps, arguments.epochs,
                                     identity_weight, task_weight)  # fmt: skip
            row = aurocs(RobustEval(defense=rap, **settings).evaluate(padim, loader))
            images = next(iter(loader)).image[:8]
            purified = Purified(padim, rap, visualizer=False).eval()
            with torch.no_grad():
                started = time.perf_counter()
                purified.model(images)
                costs["ms"] = 1000 * (time.perf_counter() - started) / images.shape[0]
            costs.setdefault(variant, []).append(seconds)
            rows[variant].append(row)
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, json.dumps({"aurocs": row, "train_seconds": seconds}))
            print(variant, seed, row, f"trained in {seconds:.0f} s", flush=True)

    diffusion = {}

    def denoiser() -> AdvRAD:
        """The AdvRAD CPU preset of this class, trained once (or its checkpoint from an earlier run)."""
        if "adv_rad" not in diffusion:
            checkpoints = sorted(runs.glob(f"AdvRAD/FashionMNIST/{arguments.category}/*/weights/lightning/*.ckpt"))
            if checkpoints:
                diffusion["adv_rad"] = AdvRAD.load_from_checkpoint(checkpoints[-1], map_location="cpu")
            else:
                torch.manual_seed(0)
                diffusion["adv_rad"] = AdvRAD.cpu_preset(noise_seed=0)
                started = time.perf_counter()
                Engine(default_root_dir=runs, logger=False, max_epochs=arguments.advrad_epochs,
                       check_val_every_n_epoch=arguments.advrad_epochs,
                       enable_progress_bar=False).fit(diffusion["adv_rad"], datamodule=datamodule)  # fmt: skip
                print(f"AdvRAD trained in {time.perf_counter() - started:.0f} s", flush=True)
        return diffusion["adv_rad"]

    guidance_path = runs / (f"agdm_guidance_v{ARCHITECTURE}_{arguments.category}_{arguments.protocol}_"
                            f"e{arguments.guidance_epochs}.ckpt")  # fmt: skip

    def guidance() -> AGDMGuidance:
        """AGDM's guidance network of this class (trained once, then its checkpoint)."""
        return trained_guidance(datamodule, guidance_path, arguments.guidance_epochs)[0]

    purifiers = {f"DiffPure p={level}": (f"diffpure_p{level}", lambda level=level: DiffPure(denoiser(), level=level))
                 for level in arguments.diffpure_levels}  # fmt: skip
    purifiers |= {
        f"AGDM t*={depth}, ratio={ratio:g}": (
            f"agdm_t{depth}_r{ratio:g}_g{arguments.guidance_epochs}_a{ARCHITECTURE}",
            lambda depth=depth, ratio=ratio: AGDM(denoiser(), guidance(), depth=depth, guidance_ratio=ratio),
        )
        for depth in arguments.agdm_depths
        for ratio in arguments.agdm_ratios
    }
    purifiers |= {
        f"AGDM t*={depth}, paper's s={scale:g}": (
            f"agdm_t{depth}_s{scale:g}_g{arguments.guidance_epochs}_a{ARCHITECTURE}",
            lambda depth=depth, scale=scale: AGDM(denoiser(), guidance(), depth=depth, guidance_mode="fixed_scale",
                                                  guidance_scale=scale),
        )
        for depth in arguments.agdm_depths
        for scale in arguments.agdm_scales
    }
    for name, (key, build) in purifiers.items():
        cache = runs / (f"{key}_{arguments.category}_{arguments.protocol}_e{arguments.advrad_epochs}_"
                        f"pgd{arguments.steps}_eot{arguments.eot_samples}_n{arguments.max_samples}.json")  # fmt: skip
        if not cache.exists():
            purifier = build()
            diffpure = {**settings, "eot_samples": arguments.eot_samples}
            row = aurocs(RobustEval(defense=purifier, **diffpure).evaluate(padim, loader))
            row |= purifier_cost(Purified(padim, purifier, visualizer=False).eval(), next(iter(loader)).image[:8])
            write_atomic(cache, json.dumps({"aurocs": row}))
            print(name, row, flush=True)
        rows[name] = [json.loads(cache.read_text())["aurocs"]]

    lines = [
        f"Fashion-MNIST {arguments.category} ({arguments.protocol}), L_inf PGD 2/255, {arguments.steps} steps, "
        f"{arguments.max_samples} test images; adapters: T = {arguments.rap_steps}, {arguments.epochs} epochs, "
        f"seeds {arguments.seeds}; attacker EOT {arguments.eot_samples} draws against DiffPure and AGDM",
        "",
        "| system | robust, full gradients | robust, BPDA | standard | adapter training (s, mean over seeds) |",
        "|---|---|---|---|---|",
    ]
    for name, values in rows.items():
        cells = [summary(values, key) if key in values[0] else "-" for key in ("full", "bpda", "standard")]
        train = f"{statistics.mean(costs[name]):.0f}" if name in costs else "-"
        lines.append(f"| {name} | {' | '.join(cells)} | {train} |")
    if "ms" in costs:
        lines.append(f"\nOne-step RAP + Padim: 1 U-Net call, {costs['ms']:.1f} ms per image (scoring pass of 8).")
    for name in purifiers:
        row = rows[name][0]
        lines.append(f"{name} + Padim: {row['unet_calls']} U-Net calls, {row['ms']:.0f} ms per image.")
    text = "\n".join(lines)
    print(text)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(arguments.output, text + "\n")


if __name__ == "__main__":
    main()
