"""``RobustEval``: standard vs robust AUROC of any anomalib detector, after its normal test metrics.

A thin Lightning adapter around :class:`~anomalib_robust.evaluation.RobustEvaluator`: once anomalib has accumulated
its own test metrics (which the callback does not touch), it attacks the test set with the configured
score-direction attacks (AdvRAD paper, sec. 3) and

- prints a rich table of standard and robust image AUROC per attack and eps (pixel AUROC when the model outputs
  anomaly maps and the data has masks), each the mean and standard deviation over ``eval_repeats`` scorings of the
  detector as deployed, with the sanity checks against gradient masking (Carlini et al., 2019);
- logs ``robust/<attack>_<norm>_eps<eps>/image_AUROC`` (and ``pixel_AUROC``, ``robust/clean/...``) to the Lightning
  loggers, so they also appear in the dictionary ``Engine.test`` returns;
- writes ``report.json``, ``report.csv``, ``auroc_vs_eps.png`` and ``adversarial_examples.png`` to
  ``<default_root_dir>/robust_eval/<norm>/`` (``robust_eval/<defense>/<norm>/`` with a defense).

With ``defense`` (DiffPure, TMA, AGDM, RAP) the evaluated system is the purifier in front of the tested detector,
attacked through the purifier as ``purifier_gradients`` selects (by default as measured strongest for that defense:
the chain respaced to 5 U-Net calls for DiffPure and TMA, full gradients and BPDA for AGDM and RAP). Under DDP every rank attacks
its share of the test batches, scores are gathered before AUROC, and rank 0 prints and writes; the numbers equal a
single-process run. A single-process run on a CPU (memory-bank models such as Padim test on one device) shards its
batches the same way over ``processes`` spawned processes (``--callbacks.init_args.processes 2``).

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

import re
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from rich.console import Console
from torch.utils.data import DataLoader

from anomalib_robust.defenses import DiffusionPurifier
from anomalib_robust.evaluation.budget import DEFAULT_SANITY_BUDGET
from anomalib_robust.evaluation.evaluator import (
    DEFAULT_EVAL_REPEATS,
    DEFAULT_SURROGATE_STEPS,
    RobustEvaluator,
)
from anomalib_robust.evaluation.plots import plot_adversarial_grid, plot_auroc_vs_eps
from anomalib_robust.evaluation.report import RobustReport


class RobustEval(Callback):
    """Robust AUROC of an anomalib detector under score-direction attacks, reported after the test metrics.

    Args:
        attacks: attack names (``pgd``, ``apgd``, ``square``, ``autoattack``).
        eps: one radius or a list (the AUROC-vs-eps curve); the AdvRAD paper uses ``2/255`` (L_inf), ``0.2`` (L_2).
        norm: ``"Linf"`` or ``"L2"``.
        steps: iterations of the gradient attacks.
        alpha: PGD step size; ``None`` for ``2.5 * eps / steps`` (at most ``eps``).
        restarts: random restarts per attack.
        n_queries: score queries of Square.
        select: which PGD iterate is returned: ``"auto"`` (final for randomised detectors, best otherwise),
            ``"best"`` or ``"final"``.
        eot_samples: the attacker's draws per gradient for randomised detectors; ``None`` for 8 (must be >= 2).
        max_batch: most images per forward call of the batched EOT draws; ``None`` picks it from the image size.
        eval_repeats: independent scorings of a randomised detector behind each AUROC (mean and std are reported).
        targets: ``"score"`` (the image score), ``"map"`` (the anomaly map: robust localisation), or both.
        resolution: ``"model"``: eps is measured at the model's input size (the papers' convention); ``"native"``:
            on the test image before the pre-processor resizes it.
        sanity_checks: also run the sanity checks and report their verdicts.
        sanity_budget: the sanity runs may cost this multiple of the configured runs (default 1.5: the paired runs on
            whole batches, Square on fewer images with its configured queries and draws, the very large eps with 10
            steps); ``None`` for full sanity runs on every image. The report states each check's budget.
        large_eps: radius of the "very large eps" check; ``None`` for 0.5 (L_inf) or ``0.5 * sqrt(C * H * W)`` (L_2).
        tolerance: AUROC slack of the comparisons, on top of the noise of the repeats.
        max_samples: evaluate only ``max_samples`` evenly spaced images of each test dataloader.
        plots: write the AUROC-vs-eps plot and the grid of clean vs adversarial images.
        num_grid_images: images in that grid.
        output_dir: where to write; ``None`` for the trainer's ``default_root_dir``.
        seed: root of every seed of the evaluation; the global RNG is restored afterwards.
        defense: a diffusion purifier (DiffPure, TMA) in front of the tested detector; ``None`` for the detector.
        purifier_gradients: with a defense, ``"full"`` gradients through the purifier, ``"bpda"``, the ``"surrogate"``
            chain respaced to ``surrogate_steps`` U-Net calls (Lee & Kim, ICCV 2023), or several; ``None``: the
            defense's ``attack_gradients`` (the surrogate for DiffPure and TMA, full gradients and BPDA for the
            others).
        surrogate_steps: U-Net calls of the surrogate chain.
        gradient_precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (bf16 autocast of the attacks' gradient passes where
            the hardware computes bf16 natively); the reported scores stay fp32.
        resume_dir: keep every attacked batch's scores there as they are computed, so that an interrupted test run
            again with the same settings and checkpoint resumes where it stopped; ``None`` keeps nothing.
        processes: in a single-process run of a CPU model, shard the test batches over this many spawned processes
            (each with its share of the threads), as DDP shards them over ranks; the numbers equal one process's.
            Ignored, with a warning, under DDP and on an accelerator.
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
        select: str = "auto",
        eot_samples: int | None = None,
        max_batch: int | None = None,
        eval_repeats: int = DEFAULT_EVAL_REPEATS,
        targets: str | Sequence[str] = ("score",),
        resolution: str = "model",
        sanity_checks: bool = True,
        sanity_budget: float | None = DEFAULT_SANITY_BUDGET,
        large_eps: float | None = None,
        tolerance: float = 0.02,
        max_samples: int | None = None,
        plots: bool = True,
        num_grid_images: int = 4,
        output_dir: str | Path | None = None,
        seed: int = 0,
        defense: DiffusionPurifier | None = None,
        purifier_gradients: Sequence[str] | None = None,
        surrogate_steps: int = DEFAULT_SURROGATE_STEPS,
        gradient_precision: str = "fp32",
        resume_dir: str | Path | None = None,
        processes: int = 1,
    ) -> None:
        super().__init__()
        self.evaluator = RobustEvaluator(
            attacks=attacks,
            eps=eps,
            norm=norm,
            steps=steps,
            alpha=alpha,
            restarts=restarts,
            n_queries=n_queries,
            select=select,
            eot_samples=eot_samples,
            max_batch=max_batch,
            eval_repeats=eval_repeats,
            targets=targets,
            resolution=resolution,
            sanity_checks=sanity_checks,
            sanity_budget=sanity_budget,
            large_eps=large_eps,
            tolerance=tolerance,
            max_samples=max_samples,
            num_grid_images=num_grid_images if plots else 0,
            seed=seed,
            defense=defense,
            purifier_gradients=purifier_gradients,
            surrogate_steps=surrogate_steps,
            gradient_precision=gradient_precision,
            resume_dir=resume_dir,
            processes=processes,
        )
        self.plots = plots
        self.output_dir = output_dir
        self.report: RobustReport | None = None
        """The last report, also on non-zero ranks."""

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attack the test set, gather, then report (rank 0) and log (every rank, identical values)."""
        loaders = trainer.test_dataloaders
        loaders = [loaders] if isinstance(loaders, DataLoader) else list(loaders or [])
        show_progress = trainer.is_global_zero and trainer.progress_bar_callback is not None
        report, grid = self.evaluator.evaluate(
            pl_module, loaders, trainer.global_rank, trainer.world_size, show_progress
        )
        self.report = report
        for name, value in _metrics(report).items():
            pl_module.log(name, value, sync_dist=trainer.world_size > 1)
        if trainer.is_global_zero:
            self._publish(report, grid, Path(self.output_dir or trainer.default_root_dir))

    def evaluate(
        self, model: LightningModule, dataloader: DataLoader, output_dir: str | Path | None = None
    ) -> RobustReport:
        """Single-process evaluation without a Trainer; prints and writes when ``output_dir`` is given."""
        report, grid = self.evaluator.evaluate(model, [dataloader])
        self.report = report
        if output_dir is not None:
            self._publish(report, grid, Path(output_dir))
        return report

    def _publish(self, report: RobustReport, grid: dict | None, root: Path) -> None:
        """Print the table and write the report (and plots) to ``<root>/robust_eval[/<defense>]/<norm>``."""
        directory = root / "robust_eval"
        if self.evaluator.defense is not None:
            directory /= re.sub(r"[^a-z0-9]+", "_", report.model.lower()).strip("_")
        directory /= report.norm.lower()
        Console().print(report.table())
        report.write(directory)
        if self.plots:
            plot_auroc_vs_eps(report, directory / "auroc_vs_eps.png")
            if grid is not None:
                plot_adversarial_grid(**grid, path=directory / "adversarial_examples.png")


def _metrics(report: RobustReport) -> dict[str, float]:
    """The values ``RobustEval`` logs: clean and per-run image/pixel AUROC (means over the repeats)."""
    metrics = {"robust/clean/image_AUROC": report.clean_image_auroc}
    if report.clean_pixel_auroc is not None:
        metrics["robust/clean/pixel_AUROC"] = report.clean_pixel_auroc
    for result in report.results:
        if result.image_auroc is not None:
            metrics[f"robust/{result.key}/image_AUROC"] = result.image_auroc
        if result.pixel_auroc is not None:
            metrics[f"robust/{result.key}/pixel_AUROC"] = result.pixel_auroc
    return metrics
