"""Assembling the report of a robust evaluation from every rank's scores.

The scores of every rank are gathered back into test-set order
(:func:`~anomalib_robust.evaluation.sharding.gather_by_index`), and every AUROC is the rank AUROC on raw scores in
float64 (:mod:`~anomalib_robust.evaluation.metrics`), the mean over the deployed scoring repeats with its standard
deviation: the clean images, each configured run on every image, the per-image worst case over the configured runs at
each eps (as AutoAttack reports robust accuracy, Croce & Hein, ICML 2020), and each sanity run on its own images.

Example:
    >>> import torch
    >>> from anomalib_robust.evaluation.assembly import image_auroc
    >>> image_auroc(torch.tensor([[0.1, 0.2], [0.9, 0.1]]), torch.tensor([0, 1]))
    (0.5, 0.7071067811865476)
"""

from dataclasses import dataclass

import torch

from anomalib_robust.attacks import DetectorScore
from anomalib_robust.evaluation.metrics import mean_and_std, pixel_auroc, rank_auroc
from anomalib_robust.evaluation.planning import Run, SanityGroup, Scored
from anomalib_robust.evaluation.report import AttackResult, ImageScores, RobustReport
from anomalib_robust.evaluation.sharding import gather_by_index


@dataclass
class Gathered:
    """The configured runs' scores ``(N, R)`` on every test image (``None`` for a run that could not be carried out),
    with the images' test-set ``indices`` and ``labels``."""

    indices: torch.Tensor
    labels: torch.Tensor
    scores: list[torch.Tensor | None]


def assemble_report(
    detector: DetectorScore,
    norm: str,
    resolution: str,
    repeats: int,
    clean: Scored,
    configured: list[Run],
    groups: list[SanityGroup],
) -> tuple[RobustReport, Gathered]:
    """Gather every rank's scores and compute each AUROC: configured runs on every image, with the worst case
    over them per eps, and sanity runs on their images. Also returns the configured runs' gathered scores."""
    indices, labels, scores, maps, masks, *per_run = gather_by_index(
        clean.indices,
        clean.indices,
        clean.labels,
        clean.scores,
        clean.maps,
        clean.masks,
        *(values for run in configured for values in (run.scores, run.maps)),
    )
    report = RobustReport(
        model=detector.name,
        norm=norm,
        eot_samples=detector.eot_samples,
        num_samples=int(labels.numel()),
        clean_image_auroc=0.0,
        eval_repeats=repeats,
        resolution=resolution,
    )
    report.clean_image_auroc, report.clean_image_auroc_std = image_auroc(scores, labels)
    report.clean_pixel_auroc, report.clean_pixel_auroc_std = _pixel_auroc(maps, masks)
    for run, run_scores, run_maps in zip(configured, per_run[::2], per_run[1::2], strict=True):
        if run.result.status == "ok":
            run.result.image_auroc, run.result.image_auroc_std = image_auroc(run_scores, labels)
            run.result.pixel_auroc, run.result.pixel_auroc_std = _pixel_auroc(run_maps, masks)
        report.results.append(run.result)
    worst_cases = _worst_cases(configured, per_run[::2], labels)
    report.results += [result for result, _ in worst_cases]
    report.image_scores = ImageScores(labels, scores, {
        run.result.key: run_scores for run, run_scores in zip(configured, per_run[::2], strict=True)
        if run.result.status == "ok" and run.result.target == "score"
    } | {result.key: worst for result, worst in worst_cases})  # fmt: skip
    for group in groups:
        group.indices, group.labels, *group_scores = gather_by_index(
            group.seen.indices, group.seen.indices, group.seen.labels, *(run.scores for run in group.runs)
        )
        for run, run_scores in zip(group.runs, group_scores, strict=True):
            if run.result.status == "ok":
                run.result.image_auroc, run.result.image_auroc_std = image_auroc(run_scores, group.labels)
                group.scores.append(run_scores)
            else:
                group.scores.append(None)
            report.results.append(run.result)
    return report, Gathered(indices, labels, per_run[::2])


def image_auroc(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean and std over repeats (columns of ``scores``) of the rank AUROC."""
    return mean_and_std([rank_auroc(scores[:, repeat], labels) for repeat in range(scores.shape[1])])


def _pixel_auroc(maps: torch.Tensor | None, masks: torch.Tensor | None) -> tuple[float | None, float]:
    """Mean and std over repeats of the pixel AUROC; ``None`` without maps, masks or both kinds of pixels."""
    if maps is None or masks is None:
        return None, 0.0
    values = [pixel_auroc(maps[:, repeat], masks) for repeat in range(maps.shape[1])]
    if any(value is None for value in values):
        return None, 0.0
    return mean_and_std(values)


def _worst_cases(
    configured: list[Run], scores: list[torch.Tensor | None], labels: torch.Tensor
) -> list[tuple[AttackResult, torch.Tensor]]:
    """Per eps with two or more configured image-score runs, the worst case over them (as AutoAttack reports robust
    accuracy, Croce & Hein, ICML 2020): per image and scoring repeat the highest score of a normal image and the lowest
    of an anomalous one; its AUROC, with those scores ``(N, repeats)``.

    For a randomised detector each repeat takes the worst of that repeat's independent scorings, which also picks the
    luckier draw for the attacker: a lower bound of the detector as deployed, not a mean."""
    by_eps: dict[float, list[tuple[Run, torch.Tensor]]] = {}
    for run, run_scores in zip(configured, scores, strict=True):
        if run.result.status == "ok" and run.result.target == "score" and run_scores is not None:
            by_eps.setdefault(run.result.eps, []).append((run, run_scores))
    results = []
    for eps, members in by_eps.items():
        if len(members) < 2:
            continue
        stacked = torch.stack([run_scores for _, run_scores in members])
        worst = torch.where(labels.bool()[:, None], stacked.min(dim=0).values, stacked.max(dim=0).values)
        first = members[0][0].result
        budget = "per image, the worst of " + ", ".join(run.result.attack for run, _ in members)
        result = AttackResult("Worst case", first.norm, eps, role="worst_case", num_images=int(labels.numel()),
                              budget=budget)  # fmt: skip
        result.image_auroc, result.image_auroc_std = image_auroc(worst, labels)
        results.append((result, worst))
    return results
