"""Diffusion purifiers that sit in front of any anomalib detector: DiffPure and TMA.

A purifier maps [0, 1] images to purified [0, 1] images with a diffusion model trained on the normal data. The
denoiser is an AdvRAD U-Net: pass a trained :class:`~anomalib_robust.AdvRAD` (or its checkpoint path); a fresh one is
trained the same way (``anomalib train --model AdvRAD``). The purifier's weights are frozen and its randomness is part
of the defended system (``stochastic = True``): every call draws fresh noise, so attacks on it use EOT.

Full gradients through the whole chain are what the papers attack with (AdvRAD paper, Table 7; TMA paper, sec. 5);
with ``gradient_checkpointing`` each U-Net evaluation is recomputed in the backward pass instead of stored, so memory
stays that of one U-Net call plus the chain's images, whatever the number of steps. By default (``"auto"``) it is on
only where the activations of the whole chain would not fit in half of the memory free on the images' device
(:meth:`DiffusionPurifier.checkpointing_needed`): on a CPU at 32 x 32 it recomputed every U-Net call for nothing.
BPDA (identity backward) is the cheaper second attack: ``DetectorScore(purified, bpda={"model.purifier": None})``.
The surrogate process of Lee & Kim (ICCV 2023, "Robust Evaluation of Diffusion-Based Adversarial Purification") is
the third: the attack differentiates the same chain respaced to fewer U-Net calls (:class:`RespacedPurifier`,
``DetectorScore(purified, surrogates={"model.purifier": RespacedPurifier(purifier, 5)})``), while the system is still
scored with its real chain.

The caveat of the AdvRAD paper, sec. 4.2: a purifier trained on normal data also repairs real defects, so raising the
level removes the attack and the anomaly signal together. Judge a purifier by standard AND robust AUROC per level.

Example:
    >>> from anomalib_robust.defenses import DiffPure, TMA
    >>> purifier = DiffPure("adv_rad.ckpt", level=50)  # doctest: +SKIP
    >>> purified = purifier(images)  # doctest: +SKIP
    >>> TMA("adv_rad.ckpt", depth=140, stride=10, eta=1.0).unet_evaluations  # doctest: +SKIP
    14
"""

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from anomalib_robust.defenses.chains import check_level, ddim_purification, ddim_timesteps, ddpm_purification
from anomalib_robust.defenses.memory import activation_bytes, available_memory
from anomalib_robust.models.adv_rad import AdvRAD
from anomalib_robust.models.adv_rad.torch_model import AdvRADModel


def load_denoiser(denoiser: str | Path | AdvRAD | AdvRADModel) -> AdvRADModel:
    """The AdvRAD torch model behind ``denoiser``: a checkpoint path, a Lightning ``AdvRAD`` or an ``AdvRADModel``.

    Raises:
        FileNotFoundError: for a path that does not exist.
        TypeError: for anything else.
    """
    if isinstance(denoiser, str | Path):
        path = Path(denoiser)
        if not path.is_file():
            msg = f"denoiser checkpoint {str(path)!r} does not exist (expected an AdvRAD checkpoint, .ckpt)."
            raise FileNotFoundError(msg)
        denoiser = AdvRAD.load_from_checkpoint(path, map_location="cpu")
    if isinstance(denoiser, AdvRAD):
        denoiser = denoiser.model
    if not isinstance(denoiser, AdvRADModel):
        msg = (
            "denoiser must be an AdvRAD checkpoint path, an AdvRAD model or an AdvRADModel, "
            f"got {type(denoiser).__name__}."
        )
        raise TypeError(msg)
    return denoiser


class DiffusionPurifier(nn.Module, ABC):
    """Frozen diffusion denoiser + a purification chain on [0, 1] images.

    Args:
        denoiser: the diffusion model trained on normal images: an AdvRAD checkpoint path, ``AdvRAD`` or
            ``AdvRADModel``. Only its U-Net and noise schedule are used.
        gradient_checkpointing: recompute U-Net activations in the backward pass (bounded memory for attacks):
            ``True``, ``False``, or ``"auto"`` (default): only when the chain's activations need more than
            :data:`CHECKPOINT_MEMORY_SHARE` of the free memory (:meth:`checkpointing_needed`).
        clip_denoised: clamp every predicted x_0 of the chain to [-1, 1] (``improved-diffusion``'s default; see
            :func:`~anomalib_robust.models.adv_rad.reconstruction.arbitrary_shot`). Off by default: DiffPure p = 25 in
            front of the CPU-preset AdvRAD (Fashion-MNIST trouser) kept its clean image AUROC, 0.691 vs 0.692, paired
            difference -0.001 +- 0.001 over 5 noise draws (draw-to-draw spread 0.05).
    """

    stochastic = True
    """Fresh noise at every call: attacks through the purifier must use EOT."""

    attack_gradients: tuple[str, ...] = ("full", "bpda")
    """How an evaluation differentiates this purifier unless told otherwise (``RobustEval(purifier_gradients=None)``):
    the exact gradient of the whole chain and BPDA, each a run, worst case per image. A purifier whose cheaper
    surrogate was measured at least as strong, paired, names it instead."""

    def __init__(
        self,
        denoiser: str | Path | AdvRAD | AdvRADModel,
        gradient_checkpointing: bool | str = "auto",
        clip_denoised: bool = False,
    ) -> None:
        super().__init__()
        diffusion = load_denoiser(denoiser)
        self.unet = diffusion.unet
        self.schedule = diffusion.schedule
        self.image_size = tuple(diffusion.image_size)
        self.in_channels = diffusion.in_channels
        self.gradient_checkpointing = check_checkpointing(gradient_checkpointing)
        self.clip_denoised = clip_denoised
        self._checkpointing = False  # the decision of the current differentiated call (:meth:`forward`)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "DiffusionPurifier":
        """The denoiser stays in eval mode: the purifier is a fixed, pre-trained stage."""
        del mode
        return super().train(False)

    def attach(self, detector: nn.Module) -> None:
        """Called by ``Purified`` with the detector it defends; a purifier that depends on it (RAP) checks it here."""
        del detector

    @property
    @abstractmethod
    def unet_evaluations(self) -> int:
        """U-Net calls per purified image (the purifier's cost)."""

    @abstractmethod
    def chain(self, x: torch.Tensor) -> torch.Tensor:
        """Purify images ``x`` in [-1, 1]."""

    def denoise(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """U-Net output ``[eps, v]``, checkpointed when gradients flow and the call is checkpointed (:meth:`forward`)."""
        if self._checkpointing and torch.is_grad_enabled() and xt.requires_grad:
            return checkpoint(lambda x: self.unet(x, t).sample, xt, use_reentrant=False)
        return self.unet(xt, t).sample

    def checkpointing_needed(self, images: torch.Tensor, unet_calls: int) -> bool:
        """Whether a differentiated chain of ``unet_calls`` U-Net calls on ``images`` needs gradient checkpointing: its
        stored activations (:func:`~anomalib_robust.defenses.memory.activation_bytes` of one call, times the calls)
        exceed :data:`CHECKPOINT_MEMORY_SHARE` of the memory free on the images' device. ``True`` or ``False`` given
        as ``gradient_checkpointing`` decides without measuring."""
        if isinstance(self.gradient_checkpointing, bool):
            return self.gradient_checkpointing
        needed = activation_bytes(self.unet, images) * unet_calls
        return needed > CHECKPOINT_MEMORY_SHARE * available_memory(images.device)

    @contextmanager
    def _checkpointing_for(self, images: torch.Tensor, unet_calls: int) -> Iterator[None]:
        differentiated = torch.is_grad_enabled() and images.requires_grad
        self._checkpointing = differentiated and self.checkpointing_needed(images, unet_calls)
        try:
            yield
        finally:
            self._checkpointing = False

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a clear error unless ``images`` match the size and channels the denoiser was trained on."""
        expected = (self.in_channels, *self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            msg = (
                f"{type(self).__name__}: the denoiser was trained on images of shape (C, H, W) = {expected}; got "
                f"a batch of shape {tuple(images.shape)}. Resize the detector's input to {self.image_size} (the "
                "Purified wrapper does), or train the denoiser at the detector's image size and channels."
            )
            raise ValueError(msg)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Purified ``images`` (``(N, C, H, W)`` in [0, 1]), clipped to [0, 1]."""
        self.check_images(images)
        with self._checkpointing_for(images, self.unet_evaluations):
            return ((self.chain(images * 2 - 1) + 1) / 2).clamp(0, 1)


class DiffusionChainPurifier(DiffusionPurifier):
    """A purifier whose reverse chain can be respaced to fewer U-Net calls (DiffPure, TMA, AGDM): the chain of
    :class:`RespacedPurifier`, the surrogate process of Lee & Kim (ICCV 2023)."""

    @abstractmethod
    def respaced_chain(self, x: torch.Tensor, denoising_steps: int | None) -> torch.Tensor:
        """Purify images ``x`` in [-1, 1] with the chain respaced to ``denoising_steps`` U-Net calls (``None``: the
        purifier's own chain)."""

    def chain(self, x: torch.Tensor) -> torch.Tensor:
        """The purifier's own chain on images ``x`` in [-1, 1]."""
        return self.respaced_chain(x, None)

    def respaced(self, images: torch.Tensor, denoising_steps: int) -> torch.Tensor:
        """``images`` in [0, 1] purified by the chain respaced to ``denoising_steps`` U-Net calls, clipped to [0, 1]."""
        self.check_images(images)
        with self._checkpointing_for(images, denoising_steps):
            return ((self.respaced_chain(images * 2 - 1, denoising_steps) + 1) / 2).clamp(0, 1)


class RespacedPurifier(nn.Module):
    """The surrogate process of Lee & Kim (ICCV 2023, "Robust Evaluation of Diffusion-Based Adversarial Purification"):
    ``purifier``'s chain over the same noise levels with ``denoising_steps`` U-Net calls, evenly respaced.

    Differentiating the full chain costs its every U-Net call forward and backward; the respaced chain's gradient
    approximates it at a fraction of the cost. An attack differentiates this module in place of the purifier
    (``DetectorScore(..., surrogates={"model.purifier": RespacedPurifier(purifier, m)})``), while the defended system
    is scored with its real chain, so a weaker surrogate can only make the attack weaker, never the reported
    robustness lower than it is. Whether it is at least as strong as the full gradient is measured, paired
    (``benchmarks/purifier_attack_cost.py``).

    Args:
        purifier: DiffPure, TMA or AGDM (a :class:`DiffusionChainPurifier`).
        denoising_steps: U-Net calls of the respaced chain, ``1 <= m <= purifier.unet_evaluations``.

    Raises:
        TypeError: for a purifier without a respaceable chain (RAP's is one adapter call).
        ValueError: naming ``denoising_steps`` when it is out of range.
    """

    stochastic = True
    """The respaced chain draws fresh noise at every call, as the purifier does."""

    def __init__(self, purifier: DiffusionPurifier, denoising_steps: int) -> None:
        super().__init__()
        if not isinstance(purifier, DiffusionChainPurifier):
            msg = (
                f"the surrogate gradient respaces a diffusion chain (DiffPure, TMA, AGDM); {type(purifier).__name__} "
                "has none: attack it with full gradients or BPDA."
            )
            raise TypeError(msg)
        calls = purifier.unet_evaluations
        steps = denoising_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= max(calls, 1):
            msg = f"denoising_steps must be an integer in [1, {calls}] (the purifier's U-Net calls), got {steps!r}."
            raise ValueError(msg)
        self.purifier = purifier
        self.denoising_steps = denoising_steps

    @property
    def unet_evaluations(self) -> int:
        """U-Net calls per image of the respaced chain."""
        return self.denoising_steps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` in [0, 1] purified by the respaced chain."""
        return self.purifier.respaced(images, self.denoising_steps)

    def extra_repr(self) -> str:
        return f"denoising_steps={self.denoising_steps}"


CHECKPOINT_MEMORY_SHARE = 0.5
"""Gradient checkpointing turns on (``gradient_checkpointing="auto"``) when a differentiated chain's activations would
take more than this share of the memory free on its device."""


def check_checkpointing(value: bool | str) -> bool | str:
    """``value`` if it is ``True``, ``False`` or ``"auto"``.

    Raises:
        ValueError: naming ``gradient_checkpointing`` otherwise.
    """
    if not isinstance(value, bool) and value != "auto":
        msg = f"gradient_checkpointing must be True, False or 'auto', got {value!r}."
        raise ValueError(msg)
    return value


class DiffPure(DiffusionChainPurifier):
    """DiffPure (Nie et al., ICML 2022) as applied to anomaly detection in the AdvRAD paper (sec. 4.2, Tables 2, 7, 13).

    Diffuse to purification level ``p`` (eq. 3), then reverse DDPM ``p -> 0`` with the learned variance
    (:func:`~anomalib_robust.defenses.chains.ddpm_purification`). The AdvRAD paper sweeps ``p`` in
    {5, 25, 50, 100, 200, 300} of T = 1000.

    Args:
        denoiser: AdvRAD checkpoint path, ``AdvRAD`` or ``AdvRADModel`` trained on the normal images.
        level: purification level ``p`` in ``[0, T]`` (0: identity, no purification).
        gradient_checkpointing: see :class:`DiffusionPurifier`.
        clip_denoised: see :class:`DiffusionPurifier`.
    """

    attack_gradients = ("surrogate",)
    """Attacked through its chain respaced to 5 U-Net calls (Lee & Kim, ICCV 2023): on Fashion-MNIST trouser at
    32 px (40 images, EOT-4 PGD-10, paired) it was at least as strong as the full chain's gradient, +0.1 [+0.0, +0.5]
    robust AUROC points at p = 25 and identical at p = 5, at a quarter of the cost; BPDA lowered no image's score below
    it (docs/benchmarks.md, "What an attack on a purifier costs")."""

    def __init__(
        self,
        denoiser: str | Path | AdvRAD | AdvRADModel,
        level: int = 100,
        gradient_checkpointing: bool | str = "auto",
        clip_denoised: bool = False,
    ) -> None:
        super().__init__(denoiser, gradient_checkpointing, clip_denoised)
        self.level = check_level("level", level, self.schedule.num_timesteps)

    @property
    def unet_evaluations(self) -> int:
        """``p`` U-Net calls per image."""
        return self.level

    def respaced_chain(self, x: torch.Tensor, denoising_steps: int | None) -> torch.Tensor:
        """Eq. (3) to step ``p``, then DDPM ``p -> 0`` (respaced to ``denoising_steps`` calls when given)."""
        return ddpm_purification(
            self.denoise, self.schedule, x, self.level, clip_denoised=self.clip_denoised, denoising_steps=denoising_steps
        )

    def extra_repr(self) -> str:
        return f"level={self.level}" + (", clip_denoised=True" if self.clip_denoised else "")


class TMA(DiffusionChainPurifier):
    """Threat-model-agnostic purification (TMA paper, Blau et al., Alg. 2): stochastic DDIM from ``T*``.

    Diffuse to ``depth`` = T*, then DDIM along ``(T*, T* - stride, ..., stride, 0)`` (eq. 4) with noise ``sigma_t``
    set by ``eta`` (:func:`~anomalib_robust.defenses.chains.ddim_purification`). The TMA paper does not give sigma_t
    numerically; ``eta = 1``, the default here, makes it the DDPM posterior standard deviation ``sqrt(beta_tilde)`` of
    the schedule respaced to the sub-sequence.

    T* = 140 with stride 10 (14 U-Net calls) is the TMA paper's CIFAR-10 setting (sec. 4). The depth trades removing
    the attack against keeping the image (sec. 4.3, Fig. 4; on CIFAR-10-C it prefers T* in [30, 90]), and the best
    value depends on the data and the diffusion model: sweep ``depth`` as DiffPure's ``level`` (``init_args.depth`` of
    the defense in ``configs/callbacks/robust_eval_diffpure.yaml``, whose header shows TMA).

    Args:
        denoiser: AdvRAD checkpoint path, ``AdvRAD`` or ``AdvRADModel`` trained on the normal images.
        depth: T* in ``[0, T]`` (0: identity); the paper's CIFAR-10 setting 140 by default.
        stride: gap between consecutive steps of the sub-sequence; must divide ``depth``.
        eta: DDIM stochasticity, >= 0.
        gradient_checkpointing: see :class:`DiffusionPurifier`.
        clip_denoised: see :class:`DiffusionPurifier`.
    """

    attack_gradients = ("surrogate",)
    """Attacked through its chain respaced to 5 U-Net calls (Lee & Kim, ICCV 2023): at T* = 140 on Fashion-MNIST
    trouser (40 images, EOT-4 PGD-10, paired) it matched the full chain's gradient, +0.0 [+0.0, +0.0] robust AUROC
    points, at a third of the cost; BPDA lowered no image's score below it (docs/benchmarks.md)."""

    def __init__(
        self,
        denoiser: str | Path | AdvRAD | AdvRADModel,
        depth: int = 140,
        stride: int = 10,
        eta: float = 1.0,
        gradient_checkpointing: bool | str = "auto",
        clip_denoised: bool = False,
    ) -> None:
        super().__init__(denoiser, gradient_checkpointing, clip_denoised)
        self.depth = check_level("depth", depth, self.schedule.num_timesteps)
        if depth:
            ddim_timesteps(depth, stride)
        if isinstance(eta, bool) or not isinstance(eta, int | float) or eta < 0:
            msg = f"eta must be a number >= 0 (it scales the DDIM noise sigma_t), got {eta!r}."
            raise ValueError(msg)
        self.stride = stride
        self.eta = float(eta)

    @property
    def unet_evaluations(self) -> int:
        """``T* / stride`` U-Net calls per image."""
        return self.depth // self.stride

    def respaced_chain(self, x: torch.Tensor, denoising_steps: int | None) -> torch.Tensor:
        """Eq. (3) to T*, then stochastic DDIM along the sub-sequence (respaced to ``denoising_steps`` when given)."""
        return ddim_purification(
            self.denoise, self.schedule, x, self.depth, self.stride, self.eta,
            clip_denoised=self.clip_denoised, denoising_steps=denoising_steps,
        )  # fmt: skip

    def extra_repr(self) -> str:
        clip = ", clip_denoised=True" if self.clip_denoised else ""
        return f"depth={self.depth}, stride={self.stride}, eta={self.eta}{clip}"
