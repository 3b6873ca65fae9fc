"""AdvRAD's accuracy-robustness frontier: standard vs robust AUROC over k, the mean filter size and the noise draws.

One trained U-Net serves every setting (AdvRAD paper, sec. 4.3 and appendix D.4: k is an inference-time choice); for
each setting the normal error map of Alg. 4 is recomputed from the training images (``AdvRAD.set_inference``) and the
test set of the Fashion-MNIST datamodule is attacked with EOT-PGD and scored as deployed, ``--eval-repeats`` times
(:class:`~anomalib_robust.evaluation.RobustEvaluator`; cells are mean ± std). Prints a rich table and writes
``frontier.png`` (robust against standard AUROC, one point per setting) and ``frontier.json`` (finished settings: an
interrupted run resumes) to ``--output``.

Without ``--ckpt`` the CPU preset is trained first (``--epochs``) with
:class:`~anomalib_robust.callbacks.SelectDiffusionStep`, so the table also marks the setting chosen automatically
from held-out training images; with a checkpoint that has such a choice, it is marked too, and the normal maps are
computed from the same training split. A trained model is saved as ``<output>/adv_rad_<class>_<epochs>epochs.ckpt``
and reused by the next run. ``auto`` in ``--diffusion-steps`` is the automatic choice (its k and its mean filter).
With several classes, a last table per protocol puts the classes side by side and averages them.

Example:
    $ python benchmarks/adv_rad_frontier.py --category trouser --epochs 60
    $ python benchmarks/adv_rad_frontier.py --ckpt model.ckpt --diffusion-steps 50 100 --mean-filter-sizes 5 \\
        --noise-draws 1 4 --protocol semantic
    $ python benchmarks/adv_rad_frontier.py --category t_shirt_top trouser bag --diffusion-steps 100 auto \\
        --mean-filter-sizes 5 --protocol defect semantic --steps 20 --eot-samples 20   # k = 100 against auto
"""

import argparse
import itertools
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import torch
from anomalib.data import Folder
from anomalib.engine import Engine
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from anomalib_robust import AdvRAD
from anomalib_robust.callbacks import SelectDiffusionStep
from anomalib_robust.callbacks.diffusion_step import attack_label, candidate_table, measure_setting
from anomalib_robust.data import FashionMNIST
from anomalib_robust.data.texture import TEXTURES, texture_datamodule
from anomalib_robust.evaluation import RobustEvaluator
from anomalib_robust.evaluation.metrics import paired_auroc_difference
from anomalib_robust.evaluation.report import format_auroc, write_atomic
from anomalib_robust.models.adv_rad.lightning_model import read_as_test_images
from anomalib_robust.models.adv_rad.selection import DiffusionStepCandidate, held_out_split

PAPER_DIFFUSION_STEP = 100


def datamodule(args: argparse.Namespace, category: str, protocol: str) -> FashionMNIST | Folder:
    """The Fashion-MNIST datamodule of ``protocol`` (the training images are the same for both), or a texture's
    (``brick``, ``grass``, ``gravel``, ``moon``: :mod:`anomalib_robust.data.texture`, whose anomalies are defects)."""
    if category in TEXTURES:
        if protocol != "defect":
            msg = f"--protocol: the {category} texture has the defect protocol only, got {protocol!r}"
            raise SystemExit(msg)
        return texture_datamodule(category, root=args.output / "textures", num_train=args.num_train,
                                  num_test=args.num_test)  # fmt: skip
    return FashionMNIST(
        category=category, protocol=protocol, image_size=32, num_train=args.num_train, num_test=args.num_test,
        train_batch_size=16, eval_batch_size=16,
    )  # fmt: skip


def trained_model(args: argparse.Namespace, category: str) -> tuple[AdvRAD, str]:
    """The checkpoint's model, or the CPU preset trained with the automatic choice of k (checkpoint saved, and reused
    when it exists); with the model's key in the cache of finished cells."""
    if args.ckpt is not None:
        return AdvRAD.load_from_checkpoint(args.ckpt, map_location="cpu"), str(args.ckpt)
    key = f"cpu_preset_{category}_{args.epochs}epochs"
    saved = args.output / f"adv_rad_{category}_{args.epochs}epochs.ckpt"
    if saved.is_file():
        Console().log(f"reusing {saved}")
        return AdvRAD.load_from_checkpoint(saved, map_location="cpu"), key
    torch.manual_seed(0)
    model = AdvRAD.cpu_preset(evaluator=False, visualizer=False)
    engine = Engine(
        max_epochs=args.epochs,
        check_val_every_n_epoch=args.epochs,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=args.output / "runs",
        callbacks=[SelectDiffusionStep(args.select_steps, args.select_filter_sizes)],
    )
    started = time.perf_counter()
    engine.fit(model, datamodule=datamodule(args, category, args.protocol[0]))
    Console().log(f"{category}: trained {args.epochs} epochs and chose k in {time.perf_counter() - started:.0f} s")
    partial = saved.with_suffix(".partial")  # a copy cut short by an interruption is never taken for a checkpoint
    shutil.copyfile(engine.trainer.checkpoint_callback.best_model_path, partial)
    partial.replace(saved)
    Console().log(f"checkpoint: {saved}")
    return model, key


def settings_of(args: argparse.Namespace, model: AdvRAD) -> dict[str, tuple[int, int, int]]:
    """(k, mean filter, draws) by a name that is the same across classes: numeric k crossed with the filter sizes
    (``k=100 s=5 n=1``), ``auto`` (``auto n=1``) as chosen for this model."""
    choice = model.diffusion_step_choice
    settings = {}
    for step in args.diffusion_steps:
        if step == "auto" and choice is None:
            msg = "--diffusion-steps auto: the model has no automatic choice of k (train it without --ckpt)"
            raise SystemExit(msg)
        if step == "auto":
            settings |= {f"auto n={n}": (choice.diffusion_step, choice.mean_filter_size, n) for n in args.noise_draws}
        else:
            settings |= {f"k={step} s={size} n={n}": (int(step), size, n)
                         for size, n in itertools.product(args.mean_filter_sizes, args.noise_draws)}  # fmt: skip
    return settings


def training_images(model: AdvRAD, datamodule: FashionMNIST) -> DataLoader:
    """The training images the model's normal maps come from: without those its automatic choice held out."""
    datamodule.setup()
    choice, train_data = model.diffusion_step_choice, datamodule.train_data
    if choice is not None and choice.holdout is not None:
        train_data = held_out_split(train_data, choice.holdout, choice.seed)[0]
    return read_as_test_images(datamodule, train_data)


def plot_frontier(rows: list[tuple[str, DiffusionStepCandidate]], marked: dict[str, str], path: Path) -> None:
    """Robust against standard AUROC with the spread over repeats, one labelled point per setting."""
    figure, axis = plt.subplots(figsize=(6, 5))
    for label, cell in rows:
        axis.errorbar(
            100 * cell.standard, 100 * cell.robust, xerr=100 * cell.standard_std, yerr=100 * cell.robust_std,
            fmt="o", capsize=3, color="tab:red" if label in marked else "tab:blue",
        )  # fmt: skip
        axis.annotate(f"{label}{marked.get(label, '')}", (100 * cell.standard, 100 * cell.robust), fontsize=7,
                      xytext=(4, 4), textcoords="offset points")  # fmt: skip
    axis.set_xlabel("standard image AUROC (%)")
    axis.set_ylabel("robust image AUROC (%)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def diffusion_step_argument(value: str) -> str:
    if value != "auto" and not value.isdigit():
        msg = f"expected a positive integer or 'auto', got {value!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def frontier_table(category: str, protocol: str, model_key: str, label: str, repeats: int,
                   rows: list[tuple[str, DiffusionStepCandidate]], marked: dict[str, str]) -> Table:  # fmt: skip
    table = Table(
        title=f"AdvRAD frontier, {category}, {protocol} protocol, {model_key}; "
        f"{label}, image AUROC % (mean ± std over {repeats} deployed scorings)"
    )
    for column in ("k", "mean filter", "noise draws", "standard", "robust",
                   f"robust vs k = {PAPER_DIFFUSION_STEP} (paired 95 %)", "seconds", ""):  # fmt: skip
        table.add_column(column, justify="right")
    for row_label, cell in rows:
        table.add_row(
            str(cell.diffusion_step), str(cell.mean_filter_size), str(cell.num_noise_draws),
            *_aurocs(cell, repeats), _versus_paper_step(cell, [row for _, row in rows]),
            f"{cell.seconds:.0f}", marked.get(row_label, "").strip(" ()"),
        )  # fmt: skip
    return table


def _versus_paper_step(cell: DiffusionStepCandidate, cells: list[DiffusionStepCandidate]) -> str:
    """The cell's robust AUROC minus that of k = 100 with the same filter and draws, in points, with the paired 95 %
    bootstrap interval over the same test images and scorings; empty without such a cell or per-image scores."""
    setting = (PAPER_DIFFUSION_STEP, cell.mean_filter_size, cell.num_noise_draws)
    reference = next(
        (other for other in cells if (other.diffusion_step, other.mean_filter_size, other.num_noise_draws) == setting),
        None,
    )
    if reference is None or reference is cell or cell.robust_scores is None or reference.robust_scores is None:
        return ""
    difference = paired_auroc_difference(reference.robust_scores, cell.robust_scores, cell.labels)
    return f"{100 * difference.difference:+.1f} [{100 * difference.low:+.1f}, {100 * difference.high:+.1f}]"


def classes_table(
    protocol: str, label: str, repeats: int, cells: dict[str, dict[str, DiffusionStepCandidate]]
) -> Table:
    """Classes side by side, ``standard / robust`` per setting, and their mean. The mean's ± is the scoring noise of
    the mean (the classes' repeat stds combined: sqrt(sum std^2) / classes), not the spread between classes."""
    table = Table(title=f"AdvRAD over {len(cells)} classes, {protocol} protocol, {label}: standard / robust image "
                  "AUROC %, mean ± std over deployed scorings")  # fmt: skip
    columns = list(next(iter(cells.values())))  # every class has the same setting names
    table.add_column("class")
    for column in columns:
        table.add_column(column, justify="right")
    for category, row in cells.items():
        table.add_row(category, *(" / ".join(_aurocs(row[column], repeats)) for column in columns))
    mean_row = []
    for column in columns:
        column_cells = [row[column] for row in cells.values()]
        mean_row.append(" / ".join(
            format_auroc(sum(getattr(cell, name) for cell in column_cells) / len(column_cells),
                         math.sqrt(sum(getattr(cell, f"{name}_std") ** 2 for cell in column_cells)) / len(column_cells),
                         repeats)
            for name in ("standard", "robust")
        ))  # fmt: skip
    table.add_row("mean", *mean_row)
    return table


def _aurocs(cell: DiffusionStepCandidate, repeats: int) -> tuple[str, str]:
    """The cell's standard and robust AUROC, each with its spread over the ``repeats`` scorings."""
    standard = format_auroc(cell.standard, cell.standard_std, repeats)
    return standard, format_auroc(cell.robust, cell.robust_std, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="a trained AdvRAD checkpoint; without it the CPU preset is trained")
    parser.add_argument("--category", nargs="+", default=["trouser"],
                        help="Fashion-MNIST classes or textures (brick, grass, gravel, moon); one with --ckpt")  # fmt: skip
    parser.add_argument("--protocol", nargs="+", default=["defect"], choices=["defect", "semantic"])
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=100, help="test and validation images together")
    parser.add_argument("--epochs", type=int, default=75, help="training epochs without --ckpt (batch 16)")
    parser.add_argument("--select-steps", type=int, nargs="+", default=[25, 50, 100, 200],
                        help="candidate k of the automatic choice (without --ckpt)")  # fmt: skip
    parser.add_argument("--select-filter-sizes", type=int, nargs="+",
                        help="candidate mean filter sizes of the automatic choice (without --ckpt); default: the "
                        "preset's")  # fmt: skip
    parser.add_argument("--diffusion-steps", type=diffusion_step_argument, nargs="+",
                        default=["25", "50", "100", "200"],
                        help="k values; 'auto' is the automatic choice (its k and mean filter)")  # fmt: skip
    parser.add_argument("--mean-filter-sizes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--noise-draws", type=int, nargs="+", default=[1])
    parser.add_argument("--eps", type=float, default=2 / 255)
    parser.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
    parser.add_argument("--steps", type=int, default=10, help="PGD steps")
    parser.add_argument("--eot-samples", type=int, default=8, help="the attacker's EOT draws")
    parser.add_argument("--eval-repeats", type=int, default=4, help="deployed scorings per setting")
    parser.add_argument("--max-samples", type=int, help="evaluate only this many evenly spaced test images")
    parser.add_argument("--output", type=Path, default=Path("results/benchmarks/adv_rad_frontier"))
    args = parser.parse_args(argv)
    if args.ckpt is not None and len(args.category) > 1:
        parser.error(f"argument --category: one class with --ckpt, got {args.category}")
    args.output.mkdir(parents=True, exist_ok=True)
    console = Console(width=150)

    evaluator = RobustEvaluator(
        attacks=["pgd"], eps=args.eps, norm=args.norm, steps=args.steps, eot_samples=args.eot_samples,
        eval_repeats=args.eval_repeats, sanity_checks=False, num_grid_images=0, max_samples=args.max_samples,
    )  # fmt: skip
    label = attack_label(evaluator)
    cache_path = args.output / "frontier.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    per_class = {protocol: {} for protocol in args.protocol}  # protocol -> class -> setting name -> cell
    for category in args.category:
        model, model_key = trained_model(args, category)
        choice = model.diffusion_step_choice
        if choice is not None:
            console.print(candidate_table(choice))
        marked = {f"k={PAPER_DIFFUSION_STEP} s={s} n=1": " (paper k)" for s in args.mean_filter_sizes}
        if choice is not None:
            marked[f"k={choice.diffusion_step} s={choice.mean_filter_size} n=1"] = " (auto)"
        settings = settings_of(args, model)
        for protocol in args.protocol:
            test_data = datamodule(args, category, protocol)
            normal_images = training_images(model, test_data)
            cells = {}
            for name, (k, s, draws) in settings.items():
                key = f"{model_key}|{protocol}|{label}|r{args.eval_repeats}|k{k}|s{s}|n{draws}"
                if key not in cache:
                    cell = measure_setting(model, evaluator, [test_data.test_dataloader()], normal_images, k, s, draws)
                    cache[key] = asdict(cell)
                    write_atomic(cache_path, json.dumps(cache, indent=1))
                    console.log(f"{category} {protocol} k={k} s={s} draws={draws}: {cell.seconds:.0f} s")
                cells[name] = DiffusionStepCandidate(**cache[key])
            rows = list({f"k={c.diffusion_step} s={c.mean_filter_size} n={c.num_noise_draws}": c
                         for c in cells.values()}.items())  # fmt: skip  # auto may equal a numeric setting
            console.print(frontier_table(category, protocol, model_key, label, args.eval_repeats, rows, marked))
            plot_frontier(rows, marked, args.output / f"frontier_{category}_{protocol}.png")
            per_class[protocol][category] = cells
    if len(args.category) > 1:
        for protocol, cells in per_class.items():
            console.print(classes_table(protocol, label, args.eval_repeats, cells))
    console.log(f"plots and numbers in {args.output}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
