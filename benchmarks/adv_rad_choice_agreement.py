"""How often AdvRAD's automatic choice of k picks the candidate that is best on the test set, before and after issue 32.

Reads the runs of ``benchmarks/adv_rad_frontier.py`` (a trained checkpoint per class, and ``frontier.json`` with the
test cells of every candidate k at one mean filter size, with per-image scores). For each class it recomputes the
choice on the checkpoint's held-out training images, with the same candidates, as three estimates:

- ``before``: the estimate before issue 32: half of the held-out images with one Fashion-MNIST ``defect`` protocol
  defect (pixels brighter than 25 of 255 are the object), the plain rule (most robust within the margin), under the
  callback's former cheap attack (EOT-4 PGD-5 L_inf 2/255, 2 scorings);
- ``now``: :class:`~anomalib_robust.models.adv_rad.selection.HeldOutDefects` (every image clean, with a faint Perlin
  defect and with a CutPaste patch, on the object found by
  :func:`~anomalib_robust.data.defects.object_region`) and the same rule
  (:func:`~anomalib_robust.callbacks.diffusion_step.choose_candidate`), under the same cheap attack; two tie rules
  are reported too: of the candidates the paired comparison cannot separate from the chosen one, the smallest k, or
  the best standard AUROC;
- ``now, EOT-8 PGD-10, 4 scorings``: ``HeldOutDefects`` under ``--held-out-attack`` (``STEPSxEOTxSCORINGS``; by
  default the callback's own attack and scorings, which are the test cells').

The oracle applies the plain rule to the test cells. For each choice the table gives its test AUROCs, the regret
(oracle minus chosen, robust and standard), whether the paired 95 % interval of the robust difference to the oracle on
the test images holds 0 ("as good as the oracle within the test set's noise"), and the gain over k = 100 with its
paired interval. Results are cached in ``--output``/agreement.json (an interrupted run resumes).

Example:
    $ python benchmarks/adv_rad_choice_agreement.py --runs results/benchmarks/choice_oracle/a \\
        results/benchmarks/choice_oracle/b --category trouser coat
"""

import argparse
import copy
import itertools
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from anomalib.data import ImageBatch, ImageItem
from rich.console import Console
from rich.table import Table
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).parent))
from adv_rad_frontier import datamodule as frontier_datamodule  # noqa: E402

from anomalib_robust import AdvRAD  # noqa: E402
from anomalib_robust.callbacks import SelectDiffusionStep  # noqa: E402
from anomalib_robust.callbacks.diffusion_step import choose_candidate, choose_diffusion_step  # noqa: E402
from anomalib_robust.data.defects import add_small_defect  # noqa: E402
from anomalib_robust.evaluation.metrics import PairedDifference, paired_auroc_difference  # noqa: E402
from anomalib_robust.evaluation.report import write_atomic  # noqa: E402
from anomalib_robust.models.adv_rad.lightning_model import read_as_test_images  # noqa: E402
from anomalib_robust.models.adv_rad.selection import (  # noqa: E402
    DiffusionStepCandidate,
    HeldOutDefects,
    gray_uint8,
    held_out_split,
)

REFERENCE_STEP = 100
CHEAP_ATTACK = {"steps": 5, "eot_samples": 4, "eval_repeats": 2}  # SelectDiffusionStep's defaults until 2026-12-06


class ProtocolDefects(Dataset):
    """The held-out set before issue 32: a seeded half of the images with one ``defect``-protocol Perlin defect."""

    def __init__(self, images: Dataset, seed: int = 0) -> None:
        count = len(images)
        defective = set(torch.randperm(count, generator=torch.Generator().manual_seed(seed))[: count // 2].tolist())
        self.items = []
        for index in range(count):
            item = images[index]
            image = torch.as_tensor(item.image).float()
            mask = torch.zeros(image.shape[-2:], dtype=torch.bool)
            if index in defective:
                painted, mask = add_small_defect(gray_uint8(image), seed=seed * 100_000 + index)
                image = torch.where(mask, painted.float() / 255, image)
            self.items.append(ImageItem(image=image, gt_label=torch.tensor(int(mask.any())), gt_mask=mask,
                                        image_path=item.image_path))  # fmt: skip
        self.collate_fn = ImageBatch.collate

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ImageItem:
        return copy.copy(self.items[index])


def test_cells(run: Path, category: str, steps: list[int], size: int) -> dict[int, DiffusionStepCandidate]:
    """The frontier run's test cells of ``category`` (defect protocol), by k."""
    cache = json.loads((run / "frontier.json").read_text())
    cells = {}
    for key, cell in cache.items():
        if key.startswith(f"cpu_preset_{category}_") and "|defect|" in key and cell["mean_filter_size"] == size:
            cells[cell["diffusion_step"]] = DiffusionStepCandidate(**cell)
    missing = sorted(set(steps) - set(cells))
    if missing:
        msg = f"{run}: no test cells for {category} at k = {missing} (mean filter {size})"
        raise SystemExit(msg)
    return {k: cells[k] for k in steps}


def held_out_choices(
    args: argparse.Namespace, run: Path, category: str, attacks: dict[str, SelectDiffusionStep]
) -> dict[str, list[dict]]:
    """The candidates (as dicts) of the estimates named in ``attacks`` on the checkpoint's held-out training images:
    ``before`` with :class:`ProtocolDefects`, any other with :class:`HeldOutDefects`, each with its callback's
    evaluator."""
    checkpoint = next(run.glob(f"adv_rad_{category}_*epochs.ckpt"))
    model = AdvRAD.load_from_checkpoint(checkpoint, map_location="cpu")
    stored = model.diffusion_step_choice
    data = frontier_datamodule(argparse.Namespace(num_train=args.num_train, num_test=args.num_test, output=run),
                               category, "defect")  # fmt: skip
    data.setup()
    training, held_out = held_out_split(data.train_data, stored.holdout, stored.seed)
    normal_images = read_as_test_images(data, training)
    images = read_as_test_images(data, held_out).dataset
    estimates = {}
    for name, callback in attacks.items():
        held = (ProtocolDefects if name == "before" else HeldOutDefects)(images, stored.seed)
        choice = choose_diffusion_step(model, normal_images, held, callback.evaluator, args.steps,
                                       [args.mean_filter_size], margin=callback.margin, seed=stored.seed)  # fmt: skip
        estimates[name] = [asdict(candidate) for candidate in choice.candidates]
    return estimates


def estimate_attacks(args: argparse.Namespace) -> dict[str, SelectDiffusionStep]:
    """The callbacks whose evaluators measure each estimate: ``before`` and ``now`` under :data:`CHEAP_ATTACK`, and
    the ``--held-out-attack`` one."""
    candidates = {"diffusion_steps": args.steps, "mean_filter_sizes": [args.mean_filter_size]}
    cheap = SelectDiffusionStep(**candidates, **CHEAP_ATTACK)
    try:
        steps, eot_samples, repeats = (int(part) for part in args.held_out_attack.split("x"))
    except ValueError:
        msg = f"--held-out-attack must be STEPSxEOTxSCORINGS, e.g. 10x8x4, got {args.held_out_attack!r}"
        raise SystemExit(msg) from None
    name = f"now, EOT-{eot_samples} PGD-{steps}, {repeats} scorings"
    strong = SelectDiffusionStep(**candidates, steps=steps, eot_samples=eot_samples, eval_repeats=repeats)
    return {"before": cheap, "now": cheap, name: strong}


def plain_rule(candidates: list[DiffusionStepCandidate], margin: float) -> DiffusionStepCandidate:
    """The rule before issue 32: the most robust candidate within ``margin`` (no paired ties)."""
    without_scores = [replace(c, robust_scores=None) for c in candidates]
    return candidates[without_scores.index(choose_candidate(without_scores, margin)[0])]


def difference(
    first: DiffusionStepCandidate, second: DiffusionStepCandidate, scores: str = "robust_scores"
) -> PairedDifference:
    """AUROC of ``second`` minus ``first`` on the same test images and scorings, with its paired 95 % interval."""
    return paired_auroc_difference(getattr(first, scores), getattr(second, scores), first.labels)


def points(value: PairedDifference) -> str:
    return f"{100 * value.difference:+.1f} [{100 * value.low:+.1f}, {100 * value.high:+.1f}]"


def sign(value: PairedDifference) -> int:
    """+1 or -1 when the interval excludes 0 above or below, else 0."""
    return 0 if not value.excludes(0.0) else (1 if value.low > 0 else -1)


def markdown(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def resolution(estimates: dict[str, list[DiffusionStepCandidate]], tests: dict[int, DiffusionStepCandidate],
               counts: dict[tuple[str, str], list[int]]) -> None:  # fmt: skip
    """Add one data set's pairs of candidates to ``counts``, per (estimate, score): pairs, pairs the held-out estimate
    separates (paired interval excludes 0), pairs the test set separates, and of those the held-out estimate separates
    in the same direction and in the opposite one."""
    for name, candidates in estimates.items():
        for first, second in itertools.combinations(candidates, 2):
            for scores in ("standard_scores", "robust_scores"):
                held, test = difference(first, second, scores), difference(tests[first.diffusion_step],
                                                                           tests[second.diffusion_step], scores)
                both = sign(held) * sign(test)
                tally = counts.setdefault((name, scores.split("_")[0]), [0] * 5)
                for index, counted in enumerate((True, held.excludes(0.0), test.excludes(0.0), both > 0, both < 0)):
                    tally[index] += counted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="adv_rad_frontier.py output folders")
    parser.add_argument("--category", nargs="+", required=True)
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 200], help="candidate k")
    parser.add_argument("--mean-filter-size", type=int, default=5)
    parser.add_argument("--num-train", type=int, default=200, help="as the frontier run had it")
    parser.add_argument("--num-test", type=int, default=100, help="as the frontier run had it")
    default = SelectDiffusionStep()
    parser.add_argument("--held-out-attack", metavar="STEPSxEOTxSCORINGS",
                        default=f"{default.evaluator.settings['steps']}x{default.evaluator.eot_samples}x"
                                f"{default.evaluator.eval_repeats}",
                        help="the third estimate's attack and scorings (default: the callback's)")  # fmt: skip
    parser.add_argument("--output", type=Path, default=Path("results/benchmarks/choice_agreement"))
    args = parser.parse_args(argv)
    attacks = estimate_attacks(args)
    args.output.mkdir(parents=True, exist_ok=True)
    cache_path = args.output / "agreement.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    margin = default.margin
    columns = ["class", "oracle k", "estimate", "held-out std/rob by k", "k", "test std / rob", "regret rob / std",
               "vs oracle (rob)", "vs k = 100 (std)", "vs k = 100 (rob)"]  # fmt: skip
    rows, tally, separated = [], {}, {}
    for category in args.category:
        run = next((run for run in args.runs if any(run.glob(f"adv_rad_{category}_*epochs.ckpt"))), None)
        if run is None:
            msg = f"no checkpoint for {category} in {args.runs}"
            raise SystemExit(msg)
        tests = test_cells(run, category, args.steps, args.mean_filter_size)
        missing = {name: attack for name, attack in attacks.items() if name not in cache.get(category, {})}
        if missing:
            cache.setdefault(category, {}).update(held_out_choices(args, run, category, missing))
            write_atomic(cache_path, json.dumps(cache))
        oracle = plain_rule(list(tests.values()), margin)
        estimates = {name: [DiffusionStepCandidate(**c) for c in cache[category][name]] for name in attacks}
        resolution(estimates, tests, separated)
        now_chosen, tied = choose_candidate(estimates["now"], margin)
        rules = {  # name: (choice, the estimate it was made from)
            "before": (plain_rule(estimates["before"], margin), "before"),
            "now": (now_chosen, "now"),
            "now, smallest tied k": (min((estimates["now"][i] for i in tied), key=lambda c: c.diffusion_step), "now"),
            "now, tied: best standard": (max((estimates["now"][i] for i in tied), key=lambda c: c.standard), "now"),
        }
        rules |= {name: (choose_candidate(estimates[name], margin)[0], name) for name in attacks if name not in rules}
        reference = tests[REFERENCE_STEP]
        for name, (chosen, source_name) in rules.items():
            source = estimates[source_name]
            test = tests[chosen.diffusion_step]
            to_oracle = difference(oracle, test)
            standard_gain, robust_gain = difference(reference, test, "standard_scores"), difference(reference, test)
            tally.setdefault(name, []).append((
                test is oracle, not to_oracle.excludes(0.0),
                oracle.robust - test.robust, oracle.standard - test.standard,
                robust_gain.difference, standard_gain.difference, sign(standard_gain), sign(robust_gain),
            ))  # fmt: skip
            rows.append([
                category, str(oracle.diffusion_step), name,
                " ".join(f"{c.diffusion_step}: {100 * c.standard:.0f}/{100 * c.robust:.0f}" for c in source),
                str(chosen.diffusion_step), f"{100 * test.standard:.1f} / {100 * test.robust:.1f}",
                f"{100 * (oracle.robust - test.robust):.1f} / {100 * (oracle.standard - test.standard):.1f}",
                points(to_oracle), points(standard_gain), points(robust_gain),
            ])  # fmt: skip
    summary_columns = ["estimate", "picks the oracle", "within the test noise of it", "mean regret rob / std",
                       "mean gain over k = 100 rob / std", "beats k = 100 / loses (std)",
                       "beats k = 100 / loses (rob)"]  # fmt: skip
    summary_rows = []
    for name, results in tally.items():
        count = len(results)

        def mean(column: int, values: list = results) -> float:
            return 100 * sum(r[column] for r in values) / len(values)

        summary_rows.append([
            name, f"{sum(r[0] for r in results)} / {count}", f"{sum(r[1] for r in results)} / {count}",
            f"{mean(2):.1f} / {mean(3):.1f}", f"{mean(4):+.1f} / {mean(5):+.1f}",
            *(f"{sum(r[c] > 0 for r in results)} / {sum(r[c] < 0 for r in results)}" for c in (6, 7)),
        ])  # fmt: skip
    resolution_columns = ["estimate", "AUROC", "pairs", "held-out separates", "test separates",
                          "of those, held-out agrees", "held-out disagrees"]  # fmt: skip
    resolution_rows = [[name, scores, *map(str, values)] for (name, scores), values in separated.items()]
    console = Console(width=180)
    for title, names, values in (
        ("AdvRAD's choice of k against the test set's best (oracle); test image AUROC %, EOT-8 PGD-10 L_inf 2/255, "
         "4 scorings; intervals are paired 95 % bootstrap intervals", columns, rows),
        (f"Over {len(args.category)} data sets: test AUROC points (beats / loses: the paired interval excludes 0)",
         summary_columns, summary_rows),
        ("Resolution: pairs of candidates whose paired 95 % interval excludes 0, on the held-out images and on the "
         "test images; 'agrees': both separate the pair, in the same direction", resolution_columns, resolution_rows),
    ):  # fmt: skip
        table = Table(title=title)
        for column in names:
            table.add_column(column, justify="right")
        for row in values:
            table.add_row(*row)
        console.print(table)
    tables = [markdown(columns, rows), markdown(summary_columns, summary_rows),
              markdown(resolution_columns, resolution_rows)]  # fmt: skip
    write_atomic(args.output / "agreement.md", "\n".join(tables))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
