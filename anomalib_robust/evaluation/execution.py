"""Executing a robust evaluation on one rank: the attack passes over its batches, the deployed scoring, the resume.

Each rank attacks its share of the test batches (:func:`~anomalib_robust.evaluation.sharding.rank_shards`) with every
run, then scores the adversarial images as the detector is deployed: ``repeats`` scorings, each with its own noise
seed, never an EOT ensemble (EOT is the attacker's tool, AdvRAD paper, sec. 5.6). The seeds of a batch come from
``(seed, phase, batch, run, repeat)`` (:func:`~anomalib_robust.evaluation.planning.derive_seed`), so the numbers do
not depend on the ranks. With a :class:`~anomalib_robust.evaluation.resume.BatchStore` every attacked batch is kept as
it is computed, and a batch found there is read back instead of attacked again.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> from anomalib_robust.evaluation.execution import selections
    >>> loaders = [DataLoader(list(range(4))), DataLoader(list(range(3)))]
    >>> selections(loaders, torch.tensor([1, 5]))
    [[1], [1]]
"""

import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import distributed, nn
from torch.utils.data import DataLoader

from anomalib_robust.attacks import DetectorScore, NotDifferentiableError
from anomalib_robust.evaluation.budget import EvaluationPlan
from anomalib_robust.evaluation.planning import Run, SanityGroup, Scored, derive_seed
from anomalib_robust.evaluation.report import format_eps
from anomalib_robust.evaluation.resume import BatchStore, batch_digest, dataset_fingerprint, model_fingerprint
from anomalib_robust.evaluation.sharding import gather_by_index, images_and_labels, rank_shards, resize_masks

logger = logging.getLogger(__name__)


class AttackPasses:
    """Attack and score this rank's batches with every run.

    Args:
        detector: the deployed score (the attacks carry their own differentiated scores).
        repeats: deployed scorings per image.
        device: where the images go.
        seed: root of the attack and scoring seeds.
        resolution: ``"model"`` to attack at the model's input size, ``"native"`` to attack the test image.
        store: the stored batches to read and write (``resume_dir``), or ``None``.
        grid: images of the grid of clean vs adversarial examples, and the number of the configured run it shows.
    """

    def __init__(
        self,
        detector: DetectorScore,
        repeats: int,
        device: torch.device,
        seed: int,
        resolution: str,
        store: BatchStore | None,
        grid: tuple[int, int],
    ) -> None:
        self.detector = detector
        self.repeats = repeats
        self.device = device
        self.seed = seed
        self.resolution = resolution
        self.store = store
        self.grid_images, self.grid_run = grid

    def run(
        self,
        loaders: list[DataLoader],
        shards: list[DataLoader],
        configured: list[Run],
        groups: list[SanityGroup],
        rank: int,
        world_size: int,
        plan: EvaluationPlan,
        show_progress: bool,
    ) -> tuple[Scored, dict | None]:
        """The configured runs on this rank's ``shards``, then each sanity group on its own shards (``group.seen``);
        returns the clean pass and the grid. The progress bar counts (batch, run) pairs, and the wall time is
        estimated after the first batch (:meth:`EvaluationPlan.estimator`)."""
        for group in groups:
            group.shards = rank_shards(loaders, rank, world_size, selections=selections(loaders, group.subset))
        with Progress(
            TextColumn("[bold]RobustEval[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=not show_progress,
        ) as progress:
            steps = len(configured) * sum(map(len, shards))
            steps += sum(len(group.runs) * sum(map(len, group.shards)) for group in groups)
            bar = (progress, progress.add_task(self.detector.name, total=steps))
            estimate = plan.estimator(world_size, progress if show_progress else None)
            clean, grid = self._attack_pass(shards, configured, bar, 0, estimate)
            number = len(configured)
            for group in groups:
                group.seen, _ = self._attack_pass(group.shards, group.runs, bar, number)
                number += len(group.runs)
        return clean, grid

    def _attack_pass(
        self,
        shards: list[DataLoader],
        runs: list[Run],
        progress: tuple[Progress, int],
        first_run: int = 0,
        on_first_batch: Callable[[float, int], None] | None = None,
    ) -> tuple[Scored, dict | None]:
        """Attack every batch of ``shards`` with every run and score the adversarial images.

        The configured pass (``first_run == 0``) also scores the clean images and keeps the grid; the sanity passes
        number their runs from ``first_run``, so that every run has its own seeds, except the convergence run, which
        takes those of the configured run it is paired with (the same random start, draws and scoring noise). A
        (batch, run) found in the store is read instead of attacked, and one attacked now is written to it.
        ``on_first_batch(seconds, images)`` is called once, after the first batch, if that batch was attacked now.
        """
        seen, grid, configured, store = Scored(), None, first_run == 0, self.store
        started = time.perf_counter()
        for shard in shards:
            for index, batch in shard:
                first = int(index[0])
                images, labels = images_and_labels(batch, self.device)
                if self.resolution == "model":
                    images = self.detector.to_input_resolution(images)
                seen.indices.append(index)
                seen.labels.append(labels.cpu())
                digest = None if store is None else batch_digest(images, labels, getattr(batch, "gt_mask", None))
                restored = False
                maps = masks = None
                if configured:
                    scores, maps = self._score(images, first, "clean")
                    gt_masks = getattr(batch, "gt_mask", None)
                    masks = None if maps is None or gt_masks is None else resize_masks(gt_masks, maps.shape[-2:])
                    seen.scores.append(scores)
                    if masks is not None:
                        seen.maps.append(maps)
                        seen.masks.append(masks)
                for number, run in enumerate(runs, start=first_run):
                    progress[0].update(
                        progress[1],
                        advance=1,
                        description=f"{self.detector.name}: {run.result.attack} "
                        f"eps={format_eps(run.result.eps, run.result.norm)}",
                    )
                    keep_maps = masks is not None and run.result.role == "attack"
                    for_grid = configured and grid is None and self.grid_images and number == self.grid_run
                    stored = None if store is None else store.get(first, number, digest)
                    if stored is not None and not (for_grid and stored["adversarial"] is None):
                        restored = True
                        adversarial, run_scores, run_maps = stored["adversarial"], stored["scores"], stored["maps"]
                    else:
                        seeds = number if run.pairs_with is None else run.pairs_with
                        adversarial = attack_batch(
                            run, images, labels, masks, derive_seed(self.seed, "attack", first, seeds)
                        )
                        if adversarial is None:
                            continue
                        run_scores, run_maps = self._score(adversarial, first, seeds)
                        if store is not None:
                            store.put(first, number, digest, scores=run_scores, maps=run_maps if keep_maps else None,
                                      adversarial=adversarial if for_grid else None)  # fmt: skip
                    run.scores.append(run_scores)
                    if keep_maps:
                        run.maps.append(run_maps)
                    if for_grid:
                        adversarial_maps = run_maps if masks is not None else None
                        grid = _grid(images, adversarial.to(images.device), maps, adversarial_maps, labels, run,
                                     self.grid_images)  # fmt: skip
                if on_first_batch is not None:
                    if not restored:
                        on_first_batch(time.perf_counter() - started, len(index))
                    on_first_batch = None
        return seen, grid

    def _score(self, images: torch.Tensor, first: int, phase: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Deployed scores ``(N, repeats)`` and maps ``(N, repeats, H, W)``, each repeat with its own noise seed."""
        scores, maps = [], []
        for repeat in range(self.repeats):
            torch.manual_seed(derive_seed(self.seed, "evaluate", first, phase, repeat))
            score, anomaly_map = self.detector.predict(images)
            scores.append(score.cpu())
            maps.append(None if anomaly_map is None else anomaly_map.cpu())
        stacked_maps = None if maps[0] is None else torch.stack(maps, dim=1)
        return torch.stack(scores, dim=1), stacked_maps


def attack_batch(
    run: Run, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None, seed: int
) -> torch.Tensor | None:
    """Attack one batch; a non-differentiable score (or a map target without masks) marks the run not attackable."""
    if run.result.status != "ok":
        return None
    target = contextlib.nullcontext()
    if run.result.target == "map":
        if masks is None:
            run.result.status = "not attackable"
            run.result.reason = "target='map' needs anomaly maps and ground-truth masks in the test set"
            return None
        target = run.attack.detector.map_target(masks.to(images.device))
    run.attack.seed = seed
    try:
        with target:
            return run.attack(images, labels)
    except NotDifferentiableError as error:
        run.result.status, run.result.reason = "not attackable", str(error)
        return None


def open_store(directory: Path, settings: dict, model: nn.Module, loaders: list[DataLoader]) -> BatchStore:
    """The stored batches in ``directory`` under a fingerprint of the evaluator's ``settings``, of the model, of the
    test set and of the code (which the store adds)."""
    fingerprint = {**settings, "model": model_fingerprint(model), "test_set": dataset_fingerprint(loaders)}
    store = BatchStore(directory, fingerprint)
    stored = store.stored_runs()
    if stored:
        logger.info("RobustEval: resuming from %s (%d attacked batches stored)", store.directory, stored)
    return store


def gathered_test_set(shards: list[DataLoader]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and labels of the whole (selected) test set, gathered from every rank's shard, in test-set order."""
    indices, labels = [], []
    for shard in shards:
        for index, batch in shard:
            indices.append(index)
            labels.append(images_and_labels(batch, torch.device("cpu"))[1])
    return gather_by_index(indices, indices, labels)


def selections(loaders: list[DataLoader], subset: torch.Tensor) -> list[list[int]]:
    """Per loader, the dataset indices of the test-set indices ``subset`` (loaders are numbered one after another)."""
    chosen, offset = [], 0
    for loader in loaders:
        size = len(loader.dataset)
        chosen.append([index - offset for index in subset.tolist() if offset <= index < offset + size])
        offset += size
    return chosen


def selected_images(
    detector: DetectorScore, loaders: list[DataLoader], test_indices: torch.Tensor, device: torch.device,
    resolution: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The test images ``test_indices`` (indices in the whole test set) and their labels, at the attacked
    ``resolution``: the same images on every rank, whatever its shard."""
    items = [
        (loader.collate_fn or torch.utils.data.default_collate, loader.dataset[index])
        for loader, selection in zip(loaders, selections(loaders, test_indices), strict=True)
        for index in selection
    ]
    images, labels = images_and_labels(items[0][0]([item for _, item in items]), device)
    if resolution == "model":
        images = detector.to_input_resolution(images)
    return images, labels


def synchronise_status(runs: list[Run]) -> None:
    """A run that could not be carried out on some rank (or some batch) is reported as such everywhere."""
    local = [(run.result.status, run.result.reason) for run in runs]
    if distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1:
        parts = [None] * distributed.get_world_size()
        distributed.all_gather_object(parts, local)
    else:
        parts = [local]
    for number, run in enumerate(runs):
        failed = next((part[number] for part in parts if part[number][0] != "ok"), None)
        if failed is not None:
            run.result.status, run.result.reason = failed
            run.scores.clear()
            run.maps.clear()


def _grid(
    images: torch.Tensor,
    adversarial: torch.Tensor,
    clean_maps: torch.Tensor | None,
    adversarial_maps: torch.Tensor | None,
    labels: torch.Tensor,
    run: Run,
    count: int,
) -> dict:
    """Arguments of :func:`~anomalib_robust.evaluation.plots.plot_adversarial_grid` for ``count`` images of a batch
    (first scoring repeat), normal and anomalous alternating where the batch has both."""
    normal, anomalous = ((labels == label).nonzero().flatten().tolist() for label in (0, 1))
    alternating = [index for pair in itertools.zip_longest(normal, anomalous) for index in pair if index is not None]
    pick = torch.tensor(alternating[:count])
    with_maps = clean_maps is not None and adversarial_maps is not None
    return {
        "clean": images[pick.to(images.device)].cpu(),
        "adversarial": adversarial[pick.to(images.device)].cpu(),
        "clean_maps": clean_maps[pick, 0] if with_maps else None,
        "adversarial_maps": adversarial_maps[pick, 0] if with_maps else None,
        "labels": labels[pick.to(labels.device)].cpu(),
        "title": f"{run.attack.detector.name}: {run.result.attack} {run.result.norm} "
        f"eps={format_eps(run.result.eps, run.result.norm)}",
    }
