"""Training-time defenses for any gradient-trained anomalib detector: adversarial training and Gaussian noise.

Both are Lightning callbacks that replace ``batch.image`` of each *training* batch in place, in [0, 1] pixel space,
before the model's pre-processor resizes and normalises it, and before ``training_step`` computes the detector's own
loss. Labels, masks and every other field of the batch are left unchanged. They are the two training-time baselines
that the AdvRAD paper compares AdvRAD against:

- :class:`AdversarialTraining`: Madry et al. (2018) adversarial training, AdvRAD paper, sec. 5.4, Table 8
  ("AT + FastFlow", "AT + CFA"). The inner maximisation is the unified score-direction PGD of the AdvRAD paper,
  sec. 3 (eq. 1-2, :class:`anomalib_robust.attacks.PGD`), run on the normal training images; the outer minimisation is
  the detector's unchanged training step on the perturbed images.
- :class:`GaussianNoiseTraining`: Gaussian-noise injection as data augmentation, AdvRAD paper, appendix D.6, Table 19
  ("FastFlow + GN", "CFA + GN"), noise standard deviations drawn from ``{0, 0.005, 0.01, 0.05, 0.1}``.

Objective of the inner maximisation (a design choice between the anomaly score and the training loss):
PGD maximises the detector's *raw anomaly score* ``A(x)`` (eval-mode forward through the pre-processor and the torch
model, :class:`anomalib_robust.attacks.DetectorScore`) with direction ``y = +1`` for the normal training images, i.e.
exactly the test-time attack on normal samples (a false alarm). Reasons:

1. Madry's min-max trains against the adversary the model will face. In anomaly detection that adversary moves the
   score ``A(x)`` (AdvRAD paper, sec. 3), not the training loss; for classifiers the two coincide, for detectors they do
   not (Draem's loss involves synthetic anomalies, Fastflow's a negative log-likelihood with Jacobian terms, Cfa's a
   memory-bank distance that the score soft-mins differently).
2. It is model-agnostic: every anomalib torch model returns ``InferenceBatch(pred_score=...)`` in eval mode, whereas
   train-mode outputs (losses, features, hidden variables) and ``training_step`` signatures differ per model.
3. Eval mode has no side effects during the attack: no BatchNorm running statistics are updated by the PGD
   iterates, no dropout noise enters the inner maximisation, and no optimizer state or logged loss is touched.

Only normal images are available in one-class training, so AT can only harden the "normal -> false alarm" direction;
the AdvRAD paper (sec. 5.4) names exactly this as AT's flaw for anomaly detection (anomalies stay unprotected).

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib.models import Stfpm
    >>> from anomalib_robust.data import FashionMNIST
    >>> from anomalib_robust.defenses.training import AdversarialTraining, GaussianNoiseTraining
    >>> engine = Engine(max_steps=100, callbacks=[AdversarialTraining(eps=2 / 255, steps=7)])  # doctest: +SKIP
    >>> engine.fit(Stfpm(), datamodule=FashionMNIST())  # doctest: +SKIP

    From the command line (``--callbacks`` shorthand of the plugin, or ``configs/callbacks/*.yaml``):

    $ anomalib train --model Stfpm --data anomalib_robust.data.FashionMNIST --callbacks adversarial_training \\
        --callbacks.init_args.eps 0.0078431
    $ anomalib train --model Fastflow --data anomalib_robust.data.FashionMNIST --callbacks gaussian_noise_training
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from anomalib_robust.attacks import PGD
from anomalib_robust.attacks.base import check_count, check_norm, check_positive
from anomalib_robust.attacks.objective import check_labels

DEFAULT_NOISE_STDS = (0.0, 0.005, 0.01, 0.05, 0.1)
"""Noise standard deviations of the AdvRAD paper, appendix D.6 (in [0, 1] pixel units)."""


class NotGradientTrainedError(TypeError):
    """A training-time defense was attached to a detector that is not trained by gradient descent."""


def trainable_parameters(optimizers: Sequence[torch.optim.Optimizer]) -> list[nn.Parameter]:
    """Parameters that ``optimizers`` update (``requires_grad`` ones only); empty for Lightning's mock optimizer."""
    return [
        parameter
        for optimizer in optimizers
        for group in getattr(optimizer, "param_groups", [])
        for parameter in group.get("params", [])
        if isinstance(parameter, torch.Tensor) and parameter.requires_grad
    ]


def check_gradient_trained(model: LightningModule, optimizers: Sequence[torch.optim.Optimizer], defense: str) -> None:
    """Raise when ``model`` has nothing that gradient descent trains, so a training-time defense cannot act.

    Memory-bank and density detectors (Padim, Patchcore, Dfm, Dfkde) return no optimizer from
    ``configure_optimizers``: their single "training" epoch only collects features of a frozen backbone, so there is
    no loss to minimise on adversarial or noisy images.

    Raises:
        NotGradientTrainedError: naming the model, what was expected and what was found.
    """
    if trainable_parameters(optimizers):
        return
    name = type(model).__name__
    msg = (
        f"{defense} does not apply to {name}: it needs a detector trained by gradient descent (an optimizer over "
        f"trainable parameters, e.g. Stfpm, Fastflow, Cfa, ReverseDistillation, Draem), but {name}.configure_optimizers "
        "returned no optimizer with trainable parameters. Memory-bank and density detectors such as Padim and Patchcore "
        "only collect features of a frozen backbone, so there is no training loss to minimise on perturbed images. "
        "Evaluate such a detector with a purifier in front of it instead."
    )
    raise NotGradientTrainedError(msg)


def _check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        msg = f"fraction must be a number in (0, 1] (share of each training batch that is perturbed), got {fraction!r}."
        raise ValueError(msg)
    return float(fraction)


def _check_start_epoch(start_epoch: int) -> int:
    if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
        msg = f"start_epoch must be an integer >= 0, got {start_epoch!r}."
        raise ValueError(msg)
    return start_epoch


def _check_images(images: torch.Tensor, defense: str) -> torch.Tensor:
    """``images`` (a batch's ``image`` field), checked to be a float ``(N, C, H, W)`` batch in [0, 1]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else images
        msg = f"{defense}: batch.image must be a float tensor (N, C, H, W) in [0, 1], got {got}."
        raise TypeError(msg)
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 1:
        msg = (
            f"{defense}: batch.image must lie in [0, 1] pixel space, got values in [{low:.3f}, {high:.3f}]. The "
            "defense must run before the model's pre-processor normalises the images: pass it in the Engine's or "
            "Trainer's callbacks (anomalib adds the pre-processor after them)."
        )
        raise ValueError(msg)
    return images


def _check_runs_before_pre_processor(trainer: Trainer, pl_module: LightningModule, callback: Callback) -> None:
    """Raise when the model's pre-processor callback would transform ``batch.image`` before ``callback`` sees it."""
    pre_processor = getattr(pl_module, "pre_processor", None)
    callbacks = list(trainer.callbacks)
    if not isinstance(pre_processor, Callback) or pre_processor not in callbacks or callback not in callbacks:
        return
    if callbacks.index(pre_processor) < callbacks.index(callback):
        msg = (
            f"{type(callback).__name__} must run before {type(pl_module).__name__}'s pre-processor (it perturbs [0, 1] "
            "pixels, the pre-processor then resizes and normalises them), but it comes after the pre-processor in "
            "trainer.callbacks. Pass it in the Engine's or Trainer's callbacks, not in configure_callbacks."
        )
        raise RuntimeError(msg)


def _rows(batch_size: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the ``ceil(fraction * batch_size)`` samples to perturb, drawn without replacement, on the
    generator's device."""
    count = max(1, math.ceil(fraction * batch_size))
    if count >= batch_size:
        return torch.arange(batch_size, device=generator.device)
    return torch.randperm(batch_size, generator=generator, device=generator.device)[:count].sort().values


class _TrainingBatchDefense(Callback, ABC):
    """Replaces ``batch.image`` of every training batch from ``start_epoch`` on, before the pre-processor.

    The shared mechanism of both training defenses: refuse detectors without gradient training (and a pre-processor
    that would run first) at ``fit`` start, seed each batch with ``seed + batches_changed``, and keep that counter in
    the callback's state so that a resumed run continues the same sequence.
    """

    defense = "training defense"
    """Name in messages and errors, e.g. ``"Adversarial training"``."""
    changed = "changed"
    """Verb of the end-of-training report (``"2 batches attacked."``)."""

    def __init__(self, start_epoch: int, seed: int) -> None:
        super().__init__()
        self.start_epoch = _check_start_epoch(start_epoch)
        if isinstance(seed, bool) or not isinstance(seed, int):
            msg = f"seed must be an integer, got {seed!r}."
            raise TypeError(msg)
        self.seed = seed
        self.batches_changed = 0
        """Training batches changed so far (the per-batch seed offset)."""

    def batch_generator(self, device: torch.device) -> torch.Generator:
        """The RNG of the current batch on ``device`` (that of the images it serves), seeded with
        ``seed + batches_changed``."""
        return torch.Generator(device=device).manual_seed(self.seed + self.batches_changed)

    @abstractmethod
    def describe(self) -> str:
        """The settings, for the message printed at ``fit`` start."""

    @abstractmethod
    def replace_images(self, pl_module: LightningModule, batch: object) -> torch.Tensor:
        """The new [0, 1] images of a training batch."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse detectors without gradient training, and a pre-processor that would run first."""
        check_gradient_trained(pl_module, trainer.optimizers, self.defense)
        _check_runs_before_pre_processor(trainer, pl_module, self)
        rank_zero_info(f"{self.defense} of {type(pl_module).__name__}: {self.describe()}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Report how many training batches were changed."""
        del trainer
        rank_zero_info(f"{self.defense} of {type(pl_module).__name__}: {self.batches_changed} batches {self.changed}.")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int) -> None:
        """Replace ``batch.image`` (from ``start_epoch`` on), before the pre-processor."""
        del batch_idx
        if trainer.current_epoch >= self.start_epoch:
            batch.image = self.replace_images(pl_module, batch)

    def state_dict(self) -> dict[str, int]:
        """The batch counter, so that a resumed run continues the same sequence of seeds."""
        return {"batches_changed": self.batches_changed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Restore the batch counter saved by :meth:`state_dict`."""
        self.batches_changed = int(state_dict.get("batches_changed", 0))


class AdversarialTraining(_TrainingBatchDefense):
    """Madry et al. (2018) adversarial training of an anomalib detector (AdvRAD paper, sec. 5.4, Table 8).

    Before each training step, the selected images of the batch are replaced by PGD adversarial examples that
    maximise ``y * A(x)`` with ``y = +1`` (normal) within the ``eps``-ball (AdvRAD paper, sec. 3, eq. 1-2, reusing
    :class:`anomalib_robust.attacks.PGD`); the detector's own ``training_step`` then minimises its usual loss on them.
    The attack runs on the eval-mode raw anomaly score, with the model's mode, ``requires_grad`` flags, buffers and
    the global RNG restored afterwards (see the module docstring for why the score, not the training loss).

    Args:
        eps: radius of the perturbation ball in [0, 1] pixel units. The default ``2/255`` (L_inf) is the radius of
            the AdvRAD paper's evaluation attack (sec. 5.1), against which Table 8 reports AT; Madry et al. train at the
            radius they evaluate at. Use ``0.2`` with ``norm="L2"`` for the paper's L_2 threat model.
        steps: PGD iterations of the inner maximisation (Madry et al. use 7 on CIFAR-10).
        alpha: PGD step size; ``None`` for ``min(eps, 2.5 * eps / steps)`` (Madry et al.).
        norm: ``"Linf"`` (eq. 1) or ``"L2"`` (eq. 2).
        fraction: share of each batch replaced by adversarial examples, the others stay clean. Madry et al. train on
            adversarial examples only (``1.0``, the default); ``0.5`` gives Goodfellow et al.'s (2015) mixed batches.
        start_epoch: first epoch (0-based) with adversarial batches; earlier epochs train on clean images (warm-up:
            attacking a randomly initialised detector gives uninformative perturbations).
        random_start: start PGD at a random point of the ball (Madry et al.) instead of at the clean image.
        eot_samples: draws per score and gradient for randomised detectors; ``None`` for the attack's default.
        seed: seeds the attack's randomness; each batch uses ``seed + <number of batches attacked so far>``, so runs
            are reproducible and random starts differ between batches.

    Raises:
        ValueError: ``eps``, ``alpha`` not finite and > 0, ``steps`` < 1, an unknown ``norm``, ``fraction`` outside
            (0, 1], ``start_epoch`` < 0.
        NotGradientTrainedError: at ``fit`` start, for a detector without gradient training (Padim, Patchcore, ...).
    """

    defense = "Adversarial training"
    changed = "attacked"

    def __init__(
        self,
        eps: float = 2 / 255,
        steps: int = 7,
        alpha: float | None = None,
        norm: str = "Linf",
        fraction: float = 1.0,
        start_epoch: int = 0,
        random_start: bool = True,
        eot_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(start_epoch, seed)
        self.eps = check_positive("eps", eps)
        self.steps = check_count("steps", steps)
        self.alpha = None if alpha is None else check_positive("alpha", alpha)
        self.norm = check_norm(norm)
        self.fraction = _check_fraction(fraction)
        self.random_start = bool(random_start)
        self.eot_samples = None if eot_samples is None else check_count("eot_samples", eot_samples)

    @property
    def state_key(self) -> str:
        """Key of the callback's checkpoint state, distinct per configuration (several instances can be attached)."""
        return self._generate_state_key(
            eps=self.eps,
            steps=self.steps,
            alpha=self.alpha,
            norm=self.norm,
            fraction=self.fraction,
            start_epoch=self.start_epoch,
            random_start=self.random_start,
            eot_samples=self.eot_samples,
            seed=self.seed,
        )

    def attack(self, model: LightningModule) -> PGD:
        """The inner-maximisation PGD on ``model`` (a fresh attack object; it holds no state across batches)."""
        return PGD(
            model,
            eps=self.eps,
            alpha=self.alpha,
            steps=self.steps,
            norm=self.norm,
            random_start=self.random_start,
            eot_samples=self.eot_samples,
            seed=self.seed + self.batches_changed,
        )

    def perturb(self, model: LightningModule, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial version of the [0, 1] ``images`` for ``model``; only ``fraction`` of the rows are attacked.

        ``labels`` are anomalib ``gt_label`` values (0 normal, 1 anomalous) that set the score direction of each row;
        ``None`` treats every image as normal, as in one-class training. The labels themselves are not changed.
        """
        images = _check_images(images, type(self).__name__)
        labels = torch.zeros(images.shape[0]) if labels is None else labels
        labels = check_labels(labels, images.shape[0]).to(images.device)
        rows = _rows(images.shape[0], self.fraction, self.batch_generator(images.device))
        adversarial = self.attack(model)(images[rows], labels[rows])
        self.batches_changed += 1
        result = images.clone()
        result[rows] = adversarial.to(result.dtype)
        return result

    def describe(self) -> str:
        """PGD settings and the share of each batch attacked."""
        return (
            f"PGD {self.norm} eps={self.eps:.6g}, {self.steps} steps, on {100 * self.fraction:.0f}% of each training "
            f"batch from epoch {self.start_epoch}."
        )

    def replace_images(self, pl_module: LightningModule, batch: object) -> torch.Tensor:
        """Adversarial images of the batch, in the direction set by its ``gt_label`` (normal when missing)."""
        return self.perturb(pl_module, getattr(batch, "image", None), getattr(batch, "gt_label", None))


class GaussianNoiseTraining(_TrainingBatchDefense):
    """Gaussian-noise injection as training augmentation (AdvRAD paper, appendix D.6, Table 19).

    Each training batch gets ``x + N(0, sigma^2)``, clamped to [0, 1], with ``sigma`` drawn uniformly from ``stds``
    (one draw per batch, or per image with ``per_sample=True``); ``sigma = 0`` leaves the batch clean. The AdvRAD paper
    uses ``stds = (0, 0.005, 0.01, 0.05, 0.1)``, whose largest values "dominate" an L_inf 2/255 perturbation, and finds
    that it does not make FastFlow or CFA robust to PGD (Table 19): the cheap baseline next to adversarial training.

    Args:
        stds: noise standard deviations in [0, 1] pixel units; at least one must be > 0.
        per_sample: draw ``sigma`` per image instead of per batch.
        start_epoch: first epoch (0-based) with noisy batches.
        seed: seeds the noise; each batch uses ``seed + <number of batches seen so far>``.

    Raises:
        ValueError: an empty ``stds``, a negative or non-finite std, only zeros, or ``start_epoch`` < 0.
        NotGradientTrainedError: at ``fit`` start, for a detector without gradient training (Padim, Patchcore, ...).
    """

    defense = "Gaussian-noise training"
    changed = "augmented"

    def __init__(
        self,
        stds: Sequence[float] = DEFAULT_NOISE_STDS,
        per_sample: bool = False,
        start_epoch: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(start_epoch, seed)
        values = [stds] if isinstance(stds, int | float) and not isinstance(stds, bool) else stds
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or len(values) == 0:
            msg = f"stds must be a non-empty list of noise standard deviations >= 0, got {stds!r}."
            raise ValueError(msg)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                msg = (
                    f"stds must hold finite numbers >= 0 (noise standard deviations), got {value!r} in {list(values)}."
                )
                raise ValueError(msg)
        if max(values) == 0:
            msg = f"stds must hold at least one standard deviation > 0 (all zeros never changes the images), got {list(values)}."
            raise ValueError(msg)
        self.stds = torch.tensor([float(value) for value in values], dtype=torch.float64)
        self.per_sample = bool(per_sample)
        self.last_stds: torch.Tensor | None = None
        """The standard deviation(s) drawn for the last batch (diagnostics)."""

    @property
    def state_key(self) -> str:
        """Key of the callback's checkpoint state, distinct per configuration (several instances can be attached)."""
        return self._generate_state_key(
            stds=self.stds.tolist(), per_sample=self.per_sample, start_epoch=self.start_epoch, seed=self.seed
        )

    def perturb(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` plus Gaussian noise of a standard deviation drawn from ``stds``, clamped to [0, 1]."""
        images = _check_images(images, type(self).__name__)
        generator = self.batch_generator(images.device)
        draws = images.shape[0] if self.per_sample else 1
        choice = torch.randint(len(self.stds), (draws,), generator=generator, device=images.device)
        sigma = self.stds.to(images.device)[choice]
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype, device=images.device)
        self.last_stds = sigma
        self.batches_changed += 1
        noisy = images + noise * sigma.to(images.dtype).view(-1, 1, 1, 1)
        return noisy.clamp(0.0, 1.0)

    def describe(self) -> str:
        """The noise levels and how often they are drawn."""
        return (
            f"stds {self.stds.tolist()}, one draw per {'image' if self.per_sample else 'batch'}, "
            f"from epoch {self.start_epoch}."
        )

    def replace_images(self, pl_module: LightningModule, batch: object) -> torch.Tensor:
        """Noisy images of the batch."""
        del pl_module
        return self.perturb(getattr(batch, "image", None))


__all__ = [
    "DEFAULT_NOISE_STDS",
    "AdversarialTraining",
    "GaussianNoiseTraining",
    "NotGradientTrainedError",
    "check_gradient_trained",
    "trainable_parameters",
]
