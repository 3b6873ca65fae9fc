"""``SelectDiffusionStep``: AdvRAD chooses its diffusion step k and mean filter size s at the end of training, from
held-out training images only.

k trades detection for robustness: the noise of step k must drown the anomaly and the adversarial perturbation while
the image content survives (AdvRAD paper, sec. 4.3); the best k differs per category (appendix D.4, Tables 15-16),
and the paper's k = 100 is not the best on every data set. The callback measures the candidates on the user's data:

1. When fit starts, a seeded ``holdout`` fraction of the training images is kept out of training (the datamodule's
   ``train_data`` shrinks; the log says by how many).
2. At the last validation of fit (before anomalib's post-processor calibrates its threshold on the validation
   scores), for every candidate (k, s): the normal error map of Alg. 4 is recomputed from the remaining training
   images (:meth:`AdvRAD.set_inference <anomalib_robust.models.AdvRAD.set_inference>`), and
   :class:`~anomalib_robust.evaluation.RobustEvaluator` scores the held-out images, each one clean, with a faint
   Perlin defect (anomalib's generator) and with a CutPaste patch, on the object
   (:class:`~anomalib_robust.models.adv_rad.selection.HeldOutDefects`), clean and under EOT-8 PGD-10, as deployed
   and ``eval_repeats`` times.
3. Among the candidates whose standard AUROC is within ``margin`` of the best one, the most robust one wins; the
   candidates that a paired comparison on the same held-out images cannot separate from it (the 95 % bootstrap
   interval of the robust AUROC difference holds 0) are reported as tied with it (:func:`choose_candidate`). The
   model keeps the choice
   (``AdvRAD.diffusion_step_choice``, saved in its checkpoints, so ``anomalib test`` and export use it), the loggers
   get ``diffusion_step_selection/...`` metrics, and the console a table of the candidates.

**The choice assumes local defects.** Its held-out anomalies are small synthetic defects on the object, so it
picks the k that finds small local defects best under attack; on anomalies that change the whole image (another
object or class: Fashion-MNIST's semantic protocol) it was 7.4 robust AUROC points below the paper's k = 100 on
average (docs/benchmarks.md). The log line, the console table and the record
(:data:`~anomalib_robust.models.adv_rad.selection.LOCAL_DEFECTS`, ``DiffusionStepChoice.assumption``) say so with
every choice.

No test or validation image is read. A fit that ends without a validation at its last step (``max_steps`` in the
middle of an epoch, ``check_val_every_n_epoch`` not dividing ``max_epochs``) makes the choice when training ends
instead, with a warning: anomalib's threshold then comes from an earlier validation at another k, and the checkpoints
already written lack the choice.

Cost: per candidate, one pass over the training images (the normal map) plus ``eval_repeats`` clean and adversarial
scorings and the attack (``steps`` x ``eot_samples`` forward and backward passes) of the held-out images, each seen
three times (clean and with two defects). Measured on the CPU preset (32 x 32, 160 training + 40 held-out images, one
thread, trouser): 194-226 s per candidate with the defaults, 53 s with the former EOT-4 PGD-5 and 2 scorings in the same
process: about 4 times the cost, for 8 instead of 2 of the 14 robust differences the test images resolved
(docs/benchmarks.md, "Choosing k: a held-out estimate that tells the candidates apart").

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_robust import AdvRAD
    >>> from anomalib_robust.callbacks import SelectDiffusionStep
    >>> engine = Engine(max_epochs=100, check_val_every_n_epoch=100, callbacks=[SelectDiffusionStep()])
    >>> engine.fit(AdvRAD.cpu_preset(), datamodule=datamodule)  # doctest: +SKIP

    From the command line (the plugin's ``--callbacks`` shorthand):

    $ anomalib train --config configs/model/adv_rad_cpu.yaml --data configs/data/fashion_mnist.yaml \\
        --callbacks select_diffusion_step --callbacks.init_args.diffusion_steps "[50, 100]"
"""

import itertools
import logging
import time
from collections.abc import Iterable, Sequence

from anomalib.data import AnomalibDataModule, Batch
from lightning.pytorch import Callback, LightningModule, Trainer
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from anomalib_robust.evaluation.evaluator import RobustEvaluator
from anomalib_robust.evaluation.metrics import paired_auroc_difference
from anomalib_robust.evaluation.report import format_auroc, format_eps
from anomalib_robust.models.adv_rad import AdvRAD
from anomalib_robust.models.adv_rad.lightning_model import read_as_test_images
from anomalib_robust.models.adv_rad.selection import (
    DiffusionStepCandidate,
    DiffusionStepChoice,
    HeldOutDefects,
    check_candidates,
    held_out_split,
)

logger = logging.getLogger(__name__)


def measure_setting(
    model: AdvRAD,
    evaluator: RobustEvaluator,
    loaders: Sequence[DataLoader],
    normal_images: AnomalibDataModule | Iterable[Batch],
    diffusion_step: int,
    mean_filter_size: int,
    num_noise_draws: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DiffusionStepCandidate:
    """Set k, s and the draws (recomputing the normal map from ``normal_images``), then evaluate on ``loaders``.

    ``evaluator`` must run exactly one attack (one attack, one eps, the score target); its report gives the standard
    and robust image AUROC, mean and std over its ``eval_repeats``.
    """
    started = time.perf_counter()
    model.set_inference(diffusion_step, mean_filter_size, num_noise_draws, normal_images=normal_images)
    report, _ = evaluator.evaluate(model, loaders, rank, world_size)
    attacks = [result for result in report.results if result.role == "attack"]
    if len(attacks) != 1:
        msg = f"measure_setting needs an evaluator with one attack and one eps, got {len(attacks)} attack runs"
        raise ValueError(msg)
    scores = report.image_scores
    return DiffusionStepCandidate(
        diffusion_step=diffusion_step,
        mean_filter_size=mean_filter_size,
        num_noise_draws=model.model.num_noise_draws,
        standard=report.clean_image_auroc,
        standard_std=report.clean_image_auroc_std,
        robust=attacks[0].image_auroc,
        robust_std=attacks[0].image_auroc_std,
        seconds=time.perf_counter() - started,
        labels=scores.labels.tolist(),
        standard_scores=scores.clean.tolist(),
        robust_scores=scores.attacked[attacks[0].key].tolist(),
    )


def choose_candidate(
    candidates: Sequence[DiffusionStepCandidate], margin: float, level: float = 0.95, seed: int = 0
) -> tuple[DiffusionStepCandidate, list[int]]:
    """The most robust candidate within ``margin`` of the best standard AUROC, and the indices of the candidates tied
    with it.

    Eligible are the candidates whose standard AUROC is at least the best one's minus ``margin``; the most robust of
    them is chosen (exact ties: higher standard AUROC, then smaller k). A candidate is tied with it when the paired
    bootstrap interval (``level``) of their robust AUROC difference on the same images and scorings holds 0
    (:func:`~anomalib_robust.evaluation.metrics.paired_auroc_difference`; candidates without per-image scores are
    tied with none): the held-out images cannot tell those apart, and the table says so. The tie does not move the
    choice: taking the smallest tied k instead lost 10 points of robust AUROC on one of eight data sets and gained
    nothing on the others (docs/benchmarks.md, "Choosing k: a held-out estimate that tells the candidates apart").
    """
    if not candidates:
        msg = "choose_candidate needs at least one candidate"
        raise ValueError(msg)
    if not 0 <= margin <= 1:
        msg = f"margin must be an AUROC difference in [0, 1], got {margin!r}"
        raise ValueError(msg)
    best_standard = max(candidate.standard for candidate in candidates)
    eligible = [candidate for candidate in candidates if candidate.standard >= best_standard - margin]
    chosen = max(eligible, key=lambda c: (c.robust, c.standard, -c.diffusion_step, -c.mean_filter_size))
    tied = [index for index, c in enumerate(candidates) if c is chosen or _inseparable(chosen, c, level, seed)]
    return chosen, tied


def _inseparable(first: DiffusionStepCandidate, second: DiffusionStepCandidate, level: float, seed: int) -> bool:
    """Whether the paired interval of the two candidates' robust AUROC difference holds 0 (``False`` without
    per-image scores on the same images)."""
    if first.robust_scores is None or second.robust_scores is None or first.labels != second.labels:
        return False
    difference = paired_auroc_difference(first.robust_scores, second.robust_scores, first.labels, level=level,
                                         seed=seed)  # fmt: skip
    return not difference.excludes(0.0)


def choose_diffusion_step(
    model: AdvRAD,
    normal_images: AnomalibDataModule | Iterable[Batch],
    held_out: HeldOutDefects,
    evaluator: RobustEvaluator,
    diffusion_steps: Sequence[int],
    mean_filter_sizes: Sequence[int],
    margin: float,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    holdout: float | None = None,
    seed: int = 0,
) -> DiffusionStepChoice:
    """Measure every candidate (k, s) on ``held_out``, then set ``model`` to the chosen one and return the choice.

    ``normal_images`` are the training images the normal error map of every candidate is computed from. The choice
    is also stored as ``model.diffusion_step_choice``; ``holdout`` and ``seed`` (how ``held_out`` was split off the
    training set) are recorded with it.
    """
    started = time.perf_counter()
    diffusion_steps, mean_filter_sizes = check_candidates(
        diffusion_steps, mean_filter_sizes, model.model.schedule.num_timesteps
    )
    loader = DataLoader(held_out, batch_size=batch_size, collate_fn=held_out.collate_fn)
    candidates = [
        measure_setting(model, evaluator, [loader], normal_images, k, s, rank=rank, world_size=world_size)
        for k, s in itertools.product(diffusion_steps, mean_filter_sizes)
    ]
    chosen, tied = choose_candidate(candidates, margin, seed=seed)
    model.set_inference(chosen.diffusion_step, chosen.mean_filter_size, normal_images=normal_images)
    defective = sum(int(item.gt_label) for item in held_out.items)
    model.diffusion_step_choice = DiffusionStepChoice(
        candidates=candidates,
        chosen=candidates.index(chosen),
        margin=margin,
        attack=attack_label(evaluator),
        num_normal=len(held_out) - defective,
        num_defective=defective,
        holdout=holdout,
        seed=seed,
        seconds=time.perf_counter() - started,
        eval_repeats=evaluator.eval_repeats,
        tied=tied,
    )
    return model.diffusion_step_choice


def attack_label(evaluator: RobustEvaluator) -> str:
    """``EOT-8 PGD-10 Linf 2/255``: the evaluator's (first) attack and budget."""
    attack = evaluator.attacks[0].upper()
    return (
        f"EOT-{evaluator.eot_samples} {attack}-{evaluator.settings['steps']} {evaluator.norm} "
        f"{format_eps(evaluator.eps[0], evaluator.norm)}"
    )


class SelectDiffusionStep(Callback):
    """Choose AdvRAD's k and s at the end of training on held-out training images (see the module docstring).

    Args:
        diffusion_steps: candidate k (each in [1, T]). Defaults to ``(25, 50, 100, 200)``.
        mean_filter_sizes: candidate s (odd). Defaults to ``None``: the model's own s only (on the CPU preset s = 3
            and s = 5 were within the scoring noise at every k, docs/benchmarks.md; each s doubles the cost).
        margin: how far below the best standard AUROC a candidate may be and still be chosen. Defaults to ``0.03``.
        holdout: fraction of the training images kept out of training for the choice. Defaults to ``0.2``.
        eps: radius of the attack. Defaults to ``2/255`` (the AdvRAD paper's L_inf budget).
        norm: ``"Linf"`` or ``"L2"``. Defaults to ``"Linf"``.
        steps: PGD steps. Defaults to ``10``.
        eot_samples: the attacker's noise draws per gradient (at least 2). Defaults to ``8``.
        eval_repeats: deployed scorings per candidate (mean and std). Defaults to ``4``. The attack and the scorings
            are those of the test cells the choice was measured against (docs/benchmarks.md): with EOT-4 PGD-5 and 2
            scorings the held-out robust AUROC separated 2 of the 14 pairs of candidates the test images separate,
            with these 8 (never the opposite way).
        seed: seed of the held-out split, the defects and the evaluation. Defaults to ``0``.
    """

    def __init__(
        self,
        diffusion_steps: Sequence[int] = (25, 50, 100, 200),
        mean_filter_sizes: Sequence[int] | None = None,
        margin: float = 0.03,
        holdout: float = 0.2,
        eps: float = 2 / 255,
        norm: str = "Linf",
        steps: int = 10,
        eot_samples: int = 8,
        eval_repeats: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.diffusion_steps, _ = check_candidates(diffusion_steps, mean_filter_sizes or (1,))
        self.mean_filter_sizes = None if mean_filter_sizes is None else check_candidates((1,), mean_filter_sizes)[1]
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin <= 1:
            msg = f"margin must be an AUROC difference in [0, 1], got {margin!r}"
            raise ValueError(msg)
        if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0 < holdout < 1:
            msg = f"holdout must be a fraction in (0, 1), got {holdout!r}"
            raise ValueError(msg)
        if isinstance(eot_samples, bool) or not isinstance(eot_samples, int) or eot_samples < 2:
            msg = f"eot_samples must be an integer >= 2 (AdvRAD is randomised: EOT), got {eot_samples!r}"
            raise ValueError(msg)
        self.margin = float(margin)
        self.holdout = float(holdout)
        self.seed = seed
        self.evaluator = RobustEvaluator(
            attacks=["pgd"],
            eps=eps,
            norm=norm,
            steps=steps,
            eot_samples=eot_samples,
            eval_repeats=eval_repeats,
            sanity_checks=False,
            num_grid_images=0,
            seed=seed,
        )
        self._training_split = None
        self._held_out = None
        self._chosen_at_step: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the model and the candidates, and hold out the images of the choice (fit only)."""
        if stage != "fit":
            return
        if not isinstance(pl_module, AdvRAD):
            msg = f"SelectDiffusionStep chooses AdvRAD's diffusion step; the model is a {type(pl_module).__name__}"
            raise TypeError(msg)
        check_candidates(self.diffusion_steps, self._filter_sizes(pl_module), pl_module.model.schedule.num_timesteps)
        datamodule = trainer.datamodule
        if not isinstance(datamodule, AnomalibDataModule) or getattr(datamodule, "train_data", None) is None:
            msg = (
                "SelectDiffusionStep holds out training images of an anomalib datamodule: fit with "
                f"datamodule=<AnomalibDataModule>, got {type(datamodule).__name__}"
            )
            raise ValueError(msg)
        if datamodule.train_data is self._training_split:  # a second fit on the same datamodule
            return
        size = len(datamodule.train_data)
        self._training_split, self._held_out = held_out_split(datamodule.train_data, self.holdout, self.seed)
        datamodule.train_data = self._training_split
        logger.info(
            "SelectDiffusionStep: %d of %d training images held out to choose AdvRAD's k; training on %d",
            len(self._held_out), size, len(self._training_split),
        )  # fmt: skip

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Choose at the last validation of fit, so that anomalib calibrates its threshold at the chosen k."""
        if trainer.state.fn == "fit" and _is_last_validation(trainer) and self._chosen_at_step != trainer.global_step:
            self.select(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Choose now when fit ended without a validation at its last step (with a warning)."""
        if self._chosen_at_step == trainer.global_step:
            return
        logger.warning(
            "SelectDiffusionStep: training ended without a validation at its last step, so k is chosen now; "
            "anomalib's threshold and normalisation come from an earlier validation and the checkpoints written "
            "so far lack the choice. End training with a validation (e.g. check_val_every_n_epoch = max_epochs)."
        )
        self.select(trainer, pl_module)

    def select(self, trainer: Trainer, pl_module: AdvRAD) -> DiffusionStepChoice:
        """Measure every candidate on the held-out images, set the model to the chosen one and report."""
        if self._held_out is None:
            msg = "SelectDiffusionStep.select runs during fit, after setup has held out its images"
            raise RuntimeError(msg)
        datamodule = trainer.datamodule
        choice = choose_diffusion_step(
            pl_module,
            normal_images=read_as_test_images(datamodule),  # the training split, without the held-out images
            held_out=HeldOutDefects(read_as_test_images(datamodule, self._held_out).dataset, seed=self.seed),
            evaluator=self.evaluator,
            diffusion_steps=self.diffusion_steps,
            mean_filter_sizes=self._filter_sizes(pl_module),
            margin=self.margin,
            batch_size=datamodule.eval_batch_size,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            holdout=self.holdout,
            seed=self.seed,
        )
        self._chosen_at_step = trainer.global_step
        self._report(trainer, choice)
        return choice

    def _filter_sizes(self, model: AdvRAD) -> tuple[int, ...]:
        """The candidate s: as configured, or the model's own."""
        return self.mean_filter_sizes or (model.model.mean_filter_size,)

    @staticmethod
    def _report(trainer: Trainer, choice: DiffusionStepChoice) -> None:
        """Log the choice and every candidate's numbers; rank 0 prints the table."""
        logger.info("SelectDiffusionStep: %s", choice.summary())
        metrics = {
            "diffusion_step_selection/diffusion_step": choice.diffusion_step,
            "diffusion_step_selection/mean_filter_size": choice.mean_filter_size,
            "diffusion_step_selection/seconds": choice.seconds,
        }
        for candidate in choice.candidates:
            prefix = f"diffusion_step_selection/k{candidate.diffusion_step}_s{candidate.mean_filter_size}"
            metrics |= {f"{prefix}/standard_AUROC": candidate.standard, f"{prefix}/robust_AUROC": candidate.robust}
        for experiment_logger in trainer.loggers:
            experiment_logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            Console().print(candidate_table(choice))


def candidate_table(choice: DiffusionStepChoice) -> Table:
    """The candidates as a rich table, the chosen row marked, and those tied with the most robust one."""
    table = Table(
        title=f"AdvRAD: choice of k on {choice.num_normal} normal + {choice.num_defective} defective held-out "
        f"training images ({choice.attack}); image AUROC %, mean ± std over scorings",
        caption=f"The choice {choice.assumption}.",
    )
    for column in ("k", "mean filter", "standard", "robust", "seconds", "chosen"):
        table.add_column(column, justify="right")
    for index, candidate in enumerate(choice.candidates):
        table.add_row(
            str(candidate.diffusion_step),
            str(candidate.mean_filter_size),
            format_auroc(candidate.standard, candidate.standard_std, choice.eval_repeats),
            format_auroc(candidate.robust, candidate.robust_std, choice.eval_repeats),
            f"{candidate.seconds:.1f}",
            "<-" if index == choice.chosen else ("tied" if index in (choice.tied or ()) else ""),
        )
    return table


def _is_last_validation(trainer: Trainer) -> bool:
    """Whether this validation of fit is its last: ``max_steps`` reached, the end of the last epoch, or a stop."""
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs - 1
    return (last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch) or trainer.should_stop
