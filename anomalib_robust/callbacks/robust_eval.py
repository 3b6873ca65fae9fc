"""``RobustEval``: standard vs robust AUROC of any anomalib detector, after its normal test metrics.

Runs the configured score-direction attacks (:mod:`anomalib_robust.attacks`; seed 000, sec. 3) on the test set once
anomalib has accumulated its own test metrics (which the callback does not touch), then

- prints a rich table of standard and robust image AUROC per attack and eps (pixel AUROC when the model outputs
  anomaly maps and the data has masks), with the sanity checks of Carlini et al. (2019) against gradient masking;
- logs ``robust/<attack>_<norm>_eps<eps>/image_AUROC`` (and ``pixel_AUROC``, ``robust/clean/...``) to the Lightning
  loggers, so they also appear in the dictionary ``Engine.test`` returns;
- writes ``report.json``, ``report.csv``, ``auroc_vs_eps.png`` and ``adversarial_examples.png`` to
  ``<default_root_dir>/robust_eval/<norm>/`` (``robust_eval/<defense>/<norm>/`` with a defense).

With ``defense`` (a :class:`~anomalib_robust.defenses.DiffusionPurifier`: DiffPure, TMA) the evaluated system is the
purifier in front of the tested detector (:class:`~anomalib_robust.defenses.Purified`): its standard AUROC, and its
robust AUROC under attacks through the purifier, with full gradients through the whole chain (``"full"``, EOT) and
with BPDA (identity backward through the purifier, ``"bpda"``, EOT), as ``purifier_gradients`` selects.

Attacks run on the raw [0, 1] test images (the callback reads the test set itself, before the pre-processor) and on the
raw anomaly score. A randomised detector (``model.model.stochastic = True``) is attacked and scored with EOT over
``eot_samples`` draws. Under DDP every rank attacks its share of the test batches (the same batches as in one
process, with randomness seeded per batch), scores are gathered before AUROC, and rank 0 prints and writes; the
numbers equal a single-process run.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib.models import Padim
    >>> from anomalib_robust.callbacks import RobustEval
    >>> from anomalib_robust.data import FashionMNIST
    >>> engine = Engine(callbacks=[RobustEval(attacks=["pgd", "apgd"], eps=[1 / 255, 2 / 255])])  # doctest: +SKIP
    >>> engine.test(Padim(pre_trained=False), datamodule=FashionMNIST(), ckpt_path="padim.ckpt")  # doctest: +SKIP

    From the command line (the plugin's ``--callbacks`` shorthand), or with ``configs/callbacks/robust_eval.yaml``:

    $ anomalib test --model Padim --data MVTecAD --ckpt_path padim.ckpt --callbacks robust_eval \\
        --callbacks.init_args.eps "[0.0039, 0.0078]"
"""

import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import distributed
from torch.utils.data import DataLoader, Dataset, default_collate
from torchmetrics.functional.classification import binary_auroc

from anomalib_robust.attacks import ATTACKS, Attack, DetectorScore, NotDifferentiableError, build_attack
from anomalib_robust.attacks.base import check_count, check_norm, check_positive
from anomalib_robust.callbacks.robust_plots import plot_adversarial_grid, plot_auroc_vs_eps
from anomalib_robust.callbacks.robust_report import AttackResult, RobustReport, format_eps, sanity_checks
from anomalib_robust.defenses import DiffusionPurifier, Purified

PURIFIER_GRADIENTS = ("full", "bpda")
"""How attacks differentiate through a defense's purifier: the whole chain, or BPDA with the identity backward."""

LARGE_EPS = 0.5
"""Default very large radius of the sanity check: half the pixel range, per pixel (L_inf) or in RMS terms (L_2,
multiplied by the square root of the number of pixel values)."""


@dataclass
class _Run:
    """One attack run and the per-sample outputs it has produced on this rank so far."""

    attack: Attack
    result: AttackResult
    scores: list[torch.Tensor] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)


class RobustEval(Callback):
    """Robust AUROC of an anomalib detector under score-direction attacks, reported after the test metrics.

    Args:
        attacks: attack names from :data:`anomalib_robust.attacks.ATTACKS` (``pgd``, ``apgd``, ``square``,
            ``autoattack``).
        eps: one radius or a list (the AUROC-vs-eps curve); seed 000 uses ``2/255`` (L_inf) and ``0.2`` (L_2).
        norm: ``"Linf"`` or ``"L2"``.
        steps: iterations of the gradient attacks.
        alpha: PGD step size; ``None`` for ``2.5 * eps / steps`` (at most ``eps``).
        restarts: random restarts per attack (worst case per sample kept).
        n_queries: score queries of Square.
        eot_samples: draws per score and gradient for randomised detectors; ``None`` for 8 (must be >= 2 for them).
        threshold: raw-score threshold at which APGD and Square centre their two logits; ``None`` for the model's
            image threshold, or the median clean test score when the model has none.
        sanity_checks: also run the sanity-check attacks (twice the steps and a very large eps with the first
            gradient attack; Square at the largest eps unless configured) and report their verdicts.
        large_eps: radius of the "very large eps" check; ``None`` for 0.5 (L_inf) or ``0.5 * sqrt(C * H * W)`` (L_2).
        near_zero: AUROC the very large eps must reach for the check to pass.
        tolerance: AUROC slack of the monotonicity and Square checks.
        max_samples: evaluate only ``max_samples`` evenly spaced images of each test dataloader.
        plots: write the AUROC-vs-eps plot and the grid of clean vs adversarial images.
        num_grid_images: images in that grid.
        output_dir: where to write; ``None`` for the trainer's ``default_root_dir``.
        seed: seeds attacks and the detector's randomness; the global RNG is restored afterwards.
        defense: a diffusion purifier (DiffPure, TMA) put in front of the tested detector; ``None`` evaluates the
            detector itself.
        purifier_gradients: with a defense, attack through the purifier with ``"full"`` gradients, ``"bpda"``, or
            both (each configured attack runs once per mode).
    """

    def __init__(
        self,
        attacks: Sequence[str] = ("pgd",),
        eps: float | Sequence[float] = 2 / 255,
        norm: str = "Linf",
        steps: int = 10,
        alpha: float | None = None,
        restarts: int = 1,
        n_queries: int = 500,
        eot_samples: int | None = None,
        threshold: float | None = None,
        sanity_checks: bool = True,
        large_eps: float | None = None,
        near_zero: float = 0.1,
        tolerance: float = 0.02,
        max_samples: int | None = None,
        plots: bool = True,
        num_grid_images: int = 4,
        output_dir: str | Path | None = None,
        seed: int = 0,
        defense: DiffusionPurifier | None = None,
        purifier_gradients: Sequence[str] = PURIFIER_GRADIENTS,
    ) -> None:
        super().__init__()
        self.attacks = [attacks] if isinstance(attacks, str) else list(attacks)
        if not self.attacks:
            msg = f"attacks must name at least one attack from {sorted(ATTACKS)}, got an empty list."
            raise ValueError(msg)
        for name in self.attacks:
            if name.lower().replace("-", "").replace("_", "") not in ATTACKS:
                msg = f"Unknown attack {name!r} in attacks: expected names from {sorted(ATTACKS)}."
                raise ValueError(msg)
        values = [eps] if isinstance(eps, int | float) else list(eps)
        self.eps = sorted(check_positive("eps", value) for value in values)
        if not self.eps:
            msg = "eps must hold at least one radius, got an empty list."
            raise ValueError(msg)
        self.norm = check_norm(norm)
        self.settings = {
            "steps": check_count("steps", steps),
            "alpha": None if alpha is None else check_positive("alpha", alpha),
            "restarts": check_count("restarts", restarts),
            "n_queries": check_count("n_queries", n_queries),
            "seed": seed,
        }
        self.eot_samples = eot_samples
        self.threshold = threshold
        self.sanity_checks = sanity_checks
        self.large_eps = None if large_eps is None else check_positive("large_eps", large_eps)
        self.near_zero = near_zero
        self.tolerance = tolerance
        self.max_samples = None if max_samples is None else check_count("max_samples", max_samples)
        self.plots = plots
        self.num_grid_images = num_grid_images
        self.output_dir = output_dir
        self.seed = seed
        if defense is not None and not isinstance(defense, DiffusionPurifier):
            msg = f"defense must be a DiffusionPurifier (DiffPure, TMA) or None, got {type(defense).__name__}."
            raise TypeError(msg)
        self.defense = defense
        self.purifier_gradients = [purifier_gradients] if isinstance(purifier_gradients, str) else purifier_gradients
        if not self.purifier_gradients or any(mode not in PURIFIER_GRADIENTS for mode in self.purifier_gradients):
            msg = f"purifier_gradients must be a non-empty subset of {PURIFIER_GRADIENTS}, got {purifier_gradients!r}."
            raise ValueError(msg)
        self.report: RobustReport | None = None
        """The last report, also on non-zero ranks."""

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attack the test set, gather, then report (rank 0) and log (every rank, identical values)."""
        loaders = trainer.test_dataloaders
        loaders = [loaders] if isinstance(loaders, DataLoader) else list(loaders or [])
        show_progress = trainer.is_global_zero and trainer.progress_bar_callback is not None
        report, grid = self._evaluate(pl_module, loaders, trainer.global_rank, trainer.world_size, show_progress)
        self.report = report
        metrics = {"robust/clean/image_AUROC": report.clean_image_auroc}
        if report.clean_pixel_auroc is not None:
            metrics["robust/clean/pixel_AUROC"] = report.clean_pixel_auroc
        for result in report.results:
            if result.image_auroc is not None:
                metrics[f"robust/{result.key}/image_AUROC"] = result.image_auroc
            if result.pixel_auroc is not None:
                metrics[f"robust/{result.key}/pixel_AUROC"] = result.pixel_auroc
        for name, value in metrics.items():
            pl_module.log(name, value, sync_dist=trainer.world_size > 1)
        if trainer.is_global_zero:
            self._publish(report, grid, Path(self.output_dir or trainer.default_root_dir))

    def evaluate(
        self, model: LightningModule, dataloader: DataLoader, output_dir: str | Path | None = None
    ) -> RobustReport:
        """Single-process evaluation without a Trainer; prints and writes when ``output_dir`` is given."""
        report, grid = self._evaluate(model, [dataloader], rank=0, world_size=1, show_progress=False)
        self.report = report
        if output_dir is not None:
            self._publish(report, grid, Path(output_dir))
        return report

    def _publish(self, report: RobustReport, grid: dict | None, root: Path) -> None:
        directory = root / "robust_eval"
        if self.defense is not None:
            directory /= re.sub(r"[^a-z0-9]+", "_", report.model.lower()).strip("_")
        directory /= self.norm.lower()
        Console().print(report.table())
        report.write(directory)
        if self.plots:
            plot_auroc_vs_eps(report, directory / "auroc_vs_eps.png")
            if grid is not None:
                plot_adversarial_grid(**grid, path=directory / "adversarial_examples.png")

    def _evaluate(
        self,
        model: LightningModule,
        loaders: list[DataLoader],
        rank: int,
        world_size: int,
        show_progress: bool,
    ) -> tuple[RobustReport, dict | None]:
        """Clean pass (labels, threshold), attack pass, gather across ranks, AUROC and sanity checks."""
        if self.defense is not None:
            model = Purified(model, self.defense, visualizer=False).to(model.device)
        detector = DetectorScore(model, eot_samples=self.eot_samples)
        if detector.stochastic and detector.eot_samples < 2:
            msg = (
                f"RobustEval: {detector.name} is randomised (model.model.stochastic is True), so its robust AUROC "
                f"needs EOT: eot_samples must be >= 2 or None (default 8), got {self.eot_samples}."
            )
            raise ValueError(msg)
        shards = self._shards(loaders, rank, world_size)
        device = model.device
        with torch.inference_mode(False), detector.prepared(), torch.random.fork_rng(devices=_cuda(device)):
            labels, clean_scores = _gather(*self._clean_pass(detector, shards, device, self.seed))
            _check_both_classes(labels)
            threshold = self.threshold if self.threshold is not None else detector.threshold
            logits = {
                "threshold": float(clean_scores.median()) if threshold is None else threshold,
                "scale": max(float(clean_scores.std()), 1e-6),
            }
            runs = self._runs(self._attacked_detectors(detector), logits, shards)
            with Progress(
                TextColumn("[bold]RobustEval[/] {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                disable=not show_progress,
            ) as progress:
                task = progress.add_task(detector.name, total=len(runs) * sum(len(shard) for shard in shards))
                outputs, grid = self._attack_pass(detector, shards, runs, device, progress, task)
        report = RobustReport(
            model=detector.name,
            norm=self.norm,
            eot_samples=detector.eot_samples,
            num_samples=int(labels.numel()),
            clean_image_auroc=float(binary_auroc(clean_scores, labels)),
            threshold=logits["threshold"],
        )
        masks, clean_maps, *per_run = _gather(*outputs)
        report.clean_pixel_auroc = _pixel_auroc(clean_maps, masks)
        for run, (scores, maps) in zip(runs, zip(per_run[::2], per_run[1::2], strict=True), strict=True):
            if run.result.status == "ok":
                run.result.image_auroc = float(binary_auroc(scores, labels))
                run.result.pixel_auroc = _pixel_auroc(maps, masks)
            report.results.append(run.result)
        if self.sanity_checks:
            report.checks = sanity_checks(report, self.near_zero, self.tolerance, **self._sanity_runs(runs))
        return report, grid

    def _shards(self, loaders: list[DataLoader], rank: int, world_size: int) -> list[DataLoader]:
        """This rank's share of every test loader: every ``world_size``-th batch, batches as in one process."""
        shards, offset = [], 0
        for loader in loaders:
            size = len(loader.dataset)
            selected = list(range(size))
            if self.max_samples is not None and self.max_samples < size:
                selected = torch.linspace(0, size - 1, self.max_samples).round().long().tolist()
            batch_size = loader.batch_size or 1
            batches = [
                list(range(start, min(start + batch_size, len(selected))))
                for start in range(0, len(selected), batch_size)
            ]
            subset = _IndexedSubset(loader.dataset, selected, offset, loader.collate_fn)
            shards.append(DataLoader(subset, batch_sampler=batches[rank::world_size], collate_fn=subset.collate))
            offset += size
        if offset == 0:
            msg = "RobustEval found no test data: the trainer has no test dataloader, or it is empty."
            raise ValueError(msg)
        return shards

    @staticmethod
    def _clean_pass(
        detector: DetectorScore,
        shards: list[DataLoader],
        device: torch.device,
        seed: int,
    ) -> tuple[list, ...]:
        """Sample indices, labels and clean scores of this rank's images (randomness seeded per batch)."""
        indices, labels, scores = [], [], []
        for shard in shards:
            for index, batch in shard:
                torch.manual_seed(seed + int(index[0]))
                images, batch_labels = _images_and_labels(batch, device)
                indices.append(index)
                labels.append(batch_labels.cpu())
                scores.append(detector.predict(images)[0].cpu())
        return indices, labels, scores

    def _attacked_detectors(self, detector: DetectorScore) -> list[DetectorScore]:
        """The scores the attacks differentiate: the detector, or per purifier-gradient mode with a defense."""
        if self.defense is None:
            return [detector]
        bpda = DetectorScore(detector.detector, detector.eot_samples, bpda={"model.purifier": None})
        return [detector if mode == "full" else bpda for mode in self.purifier_gradients]

    def _runs(self, detectors: list[DetectorScore], logits: dict, shards: list[DataLoader]) -> list[_Run]:
        """The configured runs (every attack at every eps, per attacked detector) and the sanity-check runs."""
        runs = [
            self._make_run(name, eps, detector, logits)
            for detector in detectors
            for name in self.attacks
            for eps in self.eps
        ]
        configured, detector = len(runs), detectors[0]
        if self.sanity_checks:
            gradient = next((name for name in self.attacks if name.lower() != "square"), "pgd")
            largest = self.eps[-1]
            runs.append(self._make_run(gradient, largest, detector, logits, steps=2 * self.settings["steps"]))
            runs.append(self._make_run(gradient, self._large_eps(shards), detector, logits))
            if all(name.lower() != "square" for name in self.attacks):
                runs.append(self._make_run("square", largest, detector, logits))
            for run in runs[configured:]:
                run.result.role = "sanity"
        return runs

    def _make_run(self, name: str, eps: float, detector: DetectorScore, logits: dict, **override: int) -> _Run:
        attack = build_attack(name, detector, eps=eps, norm=self.norm, **{**self.settings, **logits, **override})
        return _Run(attack, AttackResult(attack.label, self.norm, eps, steps=getattr(attack, "steps", None)))

    def _large_eps(self, shards: list[DataLoader]) -> float:
        """Radius of the "very large eps" check: ``large_eps``, or half the pixel range (RMS per value for L_2)."""
        if self.large_eps is not None:
            return self.large_eps
        if self.norm == "Linf":
            return LARGE_EPS
        _, batch = next(iter(shards[0]))
        return LARGE_EPS * math.sqrt(batch.image[0].numel())

    def _sanity_runs(self, runs: list[_Run]) -> dict[str, object]:
        """The runs each sanity check compares, by the keyword names of :func:`sanity_checks`."""
        configured = [run.result for run in runs if run.result.role == "attack"]
        sanity = [run.result for run in runs if run.result.role == "sanity"]
        largest = self.eps[-1]
        more_steps = next((r for r in sanity if r.eps == largest and r.steps and not r.attack.endswith("Square")), None)
        fewer_steps = next(
            (r for r in configured if more_steps and r.attack == more_steps.attack and r.eps == largest), None
        )
        return {
            "large_eps": next((r for r in sanity if r.eps > largest), None),
            "more_steps": (fewer_steps, more_steps) if fewer_steps and more_steps else None,
            "square": next((r.result for r in runs if r.attack.name == "Square" and r.result.eps == largest), None),
        }

    def _attack_pass(
        self,
        detector: DetectorScore,
        shards: list[DataLoader],
        runs: list[_Run],
        device: torch.device,
        progress: Progress,
        task: int,
    ) -> tuple[list[list], dict | None]:
        """Attack every batch with every run.

        Returns per-batch lists, in :func:`_gather` order (indices, masks, clean maps, then scores and maps of each
        run), and the grid of the first batch under the first attack at the largest eps.
        """
        indices, masks, clean_maps = [], [], []
        grid = None
        for shard in shards:
            for index, batch in shard:
                torch.manual_seed(self.seed + int(index[0]))
                images, labels = _images_and_labels(batch, device)
                indices.append(index)
                _, maps = detector.predict(images)
                batch_masks = getattr(batch, "gt_mask", None)
                if maps is not None and batch_masks is not None:
                    clean_maps.append(maps.cpu())
                    masks.append(_resize_masks(batch_masks, maps.shape[-2:]))
                for number, run in enumerate(runs):
                    progress.update(
                        task,
                        advance=1,
                        description=f"{detector.name}: {run.result.attack} eps={format_eps(run.result.eps, self.norm)}",
                    )
                    adversarial = self._attack_batch(run, images, labels, with_maps=bool(masks))
                    if grid is None and self.plots and number == len(self.eps) - 1 and adversarial is not None:
                        grid = _grid(images, adversarial, maps, run.maps[-1] if masks else None, labels, run, self)
        per_run = [values for run in runs for values in (run.scores, run.maps)]
        return [indices, masks, clean_maps, *per_run], grid

    @staticmethod
    def _attack_batch(run: _Run, images: torch.Tensor, labels: torch.Tensor, with_maps: bool) -> torch.Tensor | None:
        """Attack one batch, record its scores (and maps); a non-differentiable score marks the run not attackable."""
        if run.result.status != "ok":
            return None
        try:
            adversarial = run.attack(images, labels)
        except NotDifferentiableError as error:
            run.result.status, run.result.reason = "not attackable", str(error)
            return None
        scores, maps = run.attack.detector.predict(adversarial)
        run.scores.append(scores.cpu())
        if with_maps and maps is not None:
            run.maps.append(maps.cpu())
        return adversarial


class _IndexedSubset(Dataset):
    """Items ``indices`` of ``dataset``, each returned with its index in the whole test set (``offset`` + index)."""

    def __init__(self, dataset: Dataset, indices: list[int], offset: int, collate_fn: Callable | None) -> None:
        self.dataset = dataset
        self.indices = indices
        self.offset = offset
        self.collate_fn = collate_fn or default_collate

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, object]:
        index = self.indices[position]
        return self.offset + index, self.dataset[index]

    def collate(self, items: list[tuple[int, object]]) -> tuple[torch.Tensor, object]:
        """Collate with the test loader's own ``collate_fn``, plus the tensor of sample indices."""
        return torch.tensor([index for index, _ in items]), self.collate_fn([item for _, item in items])


def _images_and_labels(batch: object, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[0, 1] images and ``gt_label`` of an anomalib test batch, on ``device``."""
    images, labels = getattr(batch, "image", None), getattr(batch, "gt_label", None)
    if not isinstance(images, torch.Tensor) or labels is None:
        msg = (
            "RobustEval needs labelled test batches: anomalib batches with `image` and `gt_label` (0 normal, "
            f"1 anomalous); got a {type(batch).__name__} with image={type(images).__name__}, "
            f"gt_label={type(labels).__name__}."
        )
        raise ValueError(msg)
    return images.to(device), torch.as_tensor(labels).to(device)


def _resize_masks(masks: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Ground-truth masks at the anomaly-map resolution (nearest neighbour), as booleans ``(N, H, W)``."""
    masks = masks.reshape(masks.shape[0], 1, *masks.shape[-2:]).float()
    return F.interpolate(masks, size=tuple(size), mode="nearest")[:, 0].bool().cpu()


def _gather(indices: list[torch.Tensor], *values: list[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """Concatenate per-batch ``values`` of every rank, ordered by sample index; ``None`` where a list is empty."""
    local = [torch.cat(items) if items else None for items in (indices, *values)]
    if distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1:
        parts = [None] * distributed.get_world_size()
        distributed.all_gather_object(parts, local)
    else:
        parts = [local]
    parts = [part for part in parts if part[0] is not None]
    order = torch.cat([part[0] for part in parts]).argsort()
    return tuple(
        None if any(part[position] is None for part in parts) else torch.cat([part[position] for part in parts])[order]
        for position in range(1, len(local))
    )


def _check_both_classes(labels: torch.Tensor) -> None:
    normal, anomalous = int((labels == 0).sum()), int((labels == 1).sum())
    if normal == 0 or anomalous == 0:
        msg = (
            f"RobustEval: the test set has {normal} normal and {anomalous} anomalous images; AUROC is undefined with "
            "a single class. Use a test split that contains both normal and anomalous images."
        )
        raise ValueError(msg)


def _pixel_auroc(maps: torch.Tensor | None, masks: torch.Tensor | None) -> float | None:
    """Pixel AUROC at anomaly-map resolution; ``None`` without maps or without both kinds of pixels."""
    if maps is None or masks is None or maps.shape != masks.shape or masks.all() or not masks.any():
        return None
    return float(binary_auroc(maps.flatten(), masks.flatten().long()))


def _grid(
    images: torch.Tensor,
    adversarial: torch.Tensor,
    clean_maps: torch.Tensor | None,
    adversarial_maps: torch.Tensor | None,
    labels: torch.Tensor,
    run: _Run,
    callback: RobustEval,
) -> dict:
    """Arguments of :func:`plot_adversarial_grid` for ``num_grid_images`` images of a batch, normal and anomalous
    alternating where the batch has both."""
    normal, anomalous = ((labels == label).nonzero().flatten().tolist() for label in (0, 1))
    alternating = [index for pair in itertools.zip_longest(normal, anomalous) for index in pair if index is not None]
    pick = torch.tensor(alternating[: callback.num_grid_images], device=images.device)
    with_maps = clean_maps is not None and adversarial_maps is not None
    return {
        "clean": images[pick].cpu(),
        "adversarial": adversarial[pick].cpu(),
        "clean_maps": clean_maps[pick].cpu() if with_maps else None,
        "adversarial_maps": adversarial_maps[pick.cpu()] if with_maps else None,
        "labels": labels[pick].cpu(),
        "title": f"{run.attack.detector.name}: {run.result.attack} {callback.norm} "
        f"eps={format_eps(run.result.eps, callback.norm)}",
    }


def _cuda(device: torch.device) -> list[torch.device]:
    return [device] if device.type == "cuda" else []
