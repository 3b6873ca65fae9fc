"""AGDM: adversarially guided diffusion purification in front of any anomalib detector (the AGDM paper, Alg. 1).

The AGDM paper (Lin et al., "Robust Diffusion Models for Adversarial Purification") purifies as DiffPure
does, diffusing the input ``x'`` to ``t*`` (eq. 7) and running the reverse chain back, but shifts every reverse mean by
the gradient of a robust network's guidance (sec. 3.1):

    x_{t-1} ~ N(mu + s Sigma grad_{x_t} log p(y | x_t) - s Sigma grad_{x_t} D(f_phi(x'), f_phi(x_t)), Sigma)

The consistency term is the gradient of eq. (4). The diffusion model is the AdvRAD U-Net that DiffPure uses,
unchanged; f_phi is :class:`~anomalib_robust.models.AGDMGuidance` (``anomalib train --model AGDMGuidance``), a
per-patch normal-vs-pseudo-anomaly classifier conditioned on the diffusion step and trained with eq. (6); D is the
squared distance of its spatial features (:mod:`anomalib_robust.models.agdm_guidance.torch_model`), the input's
taken at step 0 (``f_phi(x', 0)``) and the sample's at its step (``f_phi(x_t, t)``), as Alg. 1 compares them
(``D(f_phi(x'), f_phi(x_t))``, with ``p(x' | x_t) ~ exp(-D)`` relating "adversarial and diffused clean images",
sec. 3.1). f_phi's robust term is trained on exactly those pairs (an image perturbed at step 0 against its clean copy
diffused to step t; :mod:`anomalib_robust.models.agdm_guidance.loss`), so that D is small between an input and its
own diffused copy. t* = 70 is the paper's (sec. 5.1).

**Two guidance strengths** (``guidance_mode``):

- ``"fixed_scale"``, **the AGDM paper's**: every step is shifted by ``s Sigma grad log p`` with a fixed ``s``
  (``guidance_scale``, default ``s = 1``, sec. 3.3 and 5.1; :func:`~anomalib_robust.defenses.chains.fixed_scale_shift`).
  How far that moves a step depends on the scale of f_phi's gradient: on the CPU presets (README, "AGDM") ``s = 1``
  moves a step by about 1e-6 of its noise, so the chain is DiffPure's.
- ``"ratio"`` (the default), **our adaptation**: ``s_t`` is set at every step so that the guidance moves the reverse
  mean by ``guidance_ratio`` (default 0.5) times the norm of the step's noise
  (:func:`~anomalib_robust.defenses.chains.guidance_shift`). The reason: nothing ties f_phi's gradient scale to the
  diffusion model's noise, so a fixed ``s`` is inert or overwhelming depending on the network; the ratio says how
  strong the guidance is whatever the network. 0.5 is not tuned for robustness (``benchmarks/purifier_table.py
  --agdm-ratios`` sweeps it): it is large enough that the purified image's features measurably approach the input's
  (``tests/unit/defenses/test_agdm.py``) and leaves the step's own noise the larger term. The default stays the ratio
  because the paper's ``s = 1`` is measurably inert at our scale: an AGDM that is DiffPure would be reported under
  AGDM's name.

Either way, every purification measures the guidance-to-noise ratio of each step (``||shift|| / ||sqrt(Sigma)||``)
into :attr:`AGDM.guidance_to_noise`, and the first one logs its range, however small. The mode's strength is part of
the purifier's name (``AGDM(depth=70, guidance_ratio=0.5)``, ``AGDM(depth=70, guidance_scale=1.0)``), so every
reported result says which guidance it had.

Further adaptations to one-class anomaly detection:

- **No label guidance by default** (``label_guidance=False``): an anomaly detector's test image has no class, and
  guiding towards "normal" would erase the real defects the detector must find. With ``label_guidance=True`` the
  ``y`` term uses f_phi's "normal" logits (``log p(normal | x_t)``, averaged over the patches), for users who accept
  that trade.
- **The consistency term stays**: it pulls each sample towards the input's f_phi features, defect or not, which is
  what keeps a defect that f_phi sees from being repaired.

Cost per image: t* U-Net calls, t* forward and backward passes of f_phi and one forward pass on ``x'``. Attacks
(``RobustEval(defense=AGDM(...))``) use EOT (the chain draws fresh noise) with full gradients through every step:
each U-Net call is recomputed in the backward pass (``gradient_checkpointing``), and each guidance gradient is built
with ``create_graph`` so that the attack differentiates through the guidance and through ``s_t`` too (f_phi's second
derivatives; f_phi uses SiLU). BPDA (``purifier_gradients: [bpda]``) replaces the whole purifier by the identity in
the backward pass.

Example:
    >>> from anomalib_robust.defenses import AGDM, Purified
    >>> defended = Purified(fitted_padim, AGDM("adv_rad.ckpt", guidance="agdm_guidance.ckpt"))  # doctest: +SKIP
    >>> AGDM("adv_rad.ckpt", guidance="agdm_guidance.ckpt").unet_evaluations  # doctest: +SKIP
    70
"""

import copy
import logging
from pathlib import Path

import torch

from anomalib_robust.attacks.base import check_non_negative
from anomalib_robust.defenses.chains import (
    check_level,
    fixed_scale_shift,
    guidance_shift,
    guidance_to_noise,
    guided_ddpm_purification,
)
from anomalib_robust.defenses.purifiers import DiffusionChainPurifier
from anomalib_robust.models.adv_rad import AdvRAD
from anomalib_robust.models.adv_rad.diffusion import DiffusionSchedule
from anomalib_robust.models.adv_rad.torch_model import AdvRADModel
from anomalib_robust.models.agdm_guidance import AGDMGuidance, GuidanceNetworkModel
from anomalib_robust.models.agdm_guidance.torch_model import NORMAL, consistency_divergence

GUIDANCE_RATIO = 0.5
"""Default norm of the guidance shift of every reverse step, in units of the norm of the step's noise (``"ratio"``)."""

GUIDANCE_SCALE = 1.0
"""The AGDM paper's fixed guidance scale s (sec. 5.1), the default of ``"fixed_scale"``."""

GUIDANCE_MODES = ("ratio", "fixed_scale")
"""How the guidance scale is set: our normalised ratio, or the AGDM paper's fixed s (module docstring)."""

INERT_RATIO = 1e-3
"""Guidance-to-noise ratio under which the log calls the guidance inert (a shift of a thousandth of the noise)."""

logger = logging.getLogger(__name__)


def load_guidance(guidance: str | Path | AGDMGuidance) -> AGDMGuidance:
    """A frozen copy of the trained guidance network behind ``guidance`` (a checkpoint path or ``AGDMGuidance``).

    Raises:
        FileNotFoundError: for a path that does not exist.
        TypeError: for anything else.
    """
    if isinstance(guidance, str | Path):
        path = Path(guidance)
        if not path.is_file():
            msg = f"guidance checkpoint {str(path)!r} does not exist (expected an AGDMGuidance checkpoint, .ckpt)."
            raise FileNotFoundError(msg)
        return AGDMGuidance.load_from_checkpoint(path, map_location="cpu")
    if isinstance(guidance, AGDMGuidance):
        return copy.deepcopy(guidance)
    msg = (
        "guidance must be an AGDMGuidance checkpoint path or a trained AGDMGuidance "
        f"(anomalib train --model AGDMGuidance), got {type(guidance).__name__}."
    )
    raise TypeError(msg)


def noise_level(schedule: DiffusionSchedule, step: int) -> float:
    """``sqrt(1 - alpha-bar_step)``, the noise standard deviation of eq. (7) at ``step`` (0 at step 0)."""
    return float((1 - schedule.alphas_cumprod[step - 1]).sqrt()) if step else 0.0


class AGDM(DiffusionChainPurifier):
    """The AGDM paper's guided reverse diffusion (Alg. 1) with the AdvRAD diffusion model, in front of any detector.

    Args:
        denoiser: the diffusion model trained on the normal images: an AdvRAD checkpoint path, ``AdvRAD`` or
            ``AdvRADModel`` (as DiffPure's).
        guidance: the trained robust guidance network: an AGDMGuidance checkpoint path or ``AGDMGuidance``.
        depth: t* in ``[1, T]``.
        guidance_mode: ``"ratio"`` (our adaptation, the default) or ``"fixed_scale"`` (the AGDM paper's): how the
            guidance scale of each step is set (module docstring).
        guidance_ratio: with ``"ratio"``, the norm of every step's guidance shift over the norm of the step's noise
            (>= 0; 0 is DiffPure at level t*).
        guidance_scale: with ``"fixed_scale"``, the AGDM paper's s (>= 0; 1 in the paper, sec. 5.1).
        label_guidance: add ``s Sigma grad log p(normal | x_t)`` (off: see the module docstring).
        gradient_checkpointing: see :class:`~anomalib_robust.defenses.DiffusionPurifier`.
        clip_denoised: see :class:`~anomalib_robust.defenses.DiffusionPurifier`.

    Attributes:
        guidance_to_noise: ``(t*, N)``, the guidance-to-noise ratio of every reverse step and image of the last
            purification (:func:`~anomalib_robust.defenses.chains.guidance_to_noise`); ``None`` before the first
            one and without guidance.
    """

    def __init__(
        self,
        denoiser: str | Path | AdvRAD | AdvRADModel,
        guidance: str | Path | AGDMGuidance,
        depth: int = 70,
        guidance_mode: str = "ratio",
        guidance_ratio: float = GUIDANCE_RATIO,
        guidance_scale: float = GUIDANCE_SCALE,
        label_guidance: bool = False,
        gradient_checkpointing: bool | str = "auto",
        clip_denoised: bool = False,
    ) -> None:
        super().__init__(denoiser, gradient_checkpointing, clip_denoised)
        if check_level("depth", depth, self.schedule.num_timesteps) == 0:
            msg = f"depth (t* of Alg. 1) must be in [1, T = {self.schedule.num_timesteps}], got 0 (no purification)."
            raise ValueError(msg)
        self.depth = depth
        if guidance_mode not in GUIDANCE_MODES:
            msg = (
                f"guidance_mode must be 'ratio' (the guidance shift as a share of each step's noise, our adaptation) "
                f"or 'fixed_scale' (the AGDM paper's fixed s), got {guidance_mode!r}."
            )
            raise ValueError(msg)
        self.guidance_mode = guidance_mode
        self.guidance_ratio = check_non_negative("guidance_ratio", guidance_ratio)
        self.guidance_scale = check_non_negative("guidance_scale", guidance_scale)
        self.guidance_to_noise: torch.Tensor | None = None
        self._reported = False
        self.label_guidance = bool(label_guidance)
        trained = load_guidance(guidance)
        self.network: GuidanceNetworkModel = trained.model
        if self.network.in_channels != self.in_channels:
            msg = (
                f"guidance network takes {self.network.in_channels}-channel images, the denoiser "
                f"{self.in_channels}-channel ones: train AGDMGuidance with --model.in_channels {self.in_channels}."
            )
            raise ValueError(msg)
        if tuple(trained.hparams["image_size"]) != self.image_size:
            msg = (
                f"guidance network trained on {tuple(trained.hparams['image_size'])} images, the denoiser on "
                f"{self.image_size}: train AGDMGuidance with --model.image_size {list(self.image_size)}."
            )
            raise ValueError(msg)
        trained_noise = noise_level(trained.schedule, trained.hparams["max_noise_step"])
        noise = noise_level(self.schedule, self.depth)
        if noise > trained_noise + 1e-6:
            logger.warning(
                "AGDM: depth t* = %d diffuses to noise level %.3f, beyond the %.3f (step %d of its schedule) that the "
                "guidance network was trained on: retrain it with a larger --model.max_noise_step, or the denoiser's "
                "--model.beta_schedule and --model.num_timesteps.",
                self.depth, noise, trained_noise, trained.hparams["max_noise_step"],
            )  # fmt: skip
        self.requires_grad_(False)
        self.eval()

    @property
    def unet_evaluations(self) -> int:
        """t* U-Net calls per image (plus t* forward/backward passes of the guidance network)."""
        return self.depth

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """``f_phi(x', 0)``: the guidance network's features of the input ``x`` in [-1, 1], a clean image (step 0)."""
        return self.network.features((x + 1) / 2, torch.zeros(len(x), dtype=torch.long, device=x.device))

    def log_guidance(self, reference: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per image: ``-D(f(x', 0), f(x_t, t))`` (+ the patches' mean ``log p(normal | x_t)`` with
        ``label_guidance``); ``x_t`` in [-1, 1] at U-Net step ``t`` (the network counts steps from 0 = clean)."""
        features = self.network.features((xt + 1) / 2, t + 1)
        log_guidance = -consistency_divergence(reference, features)
        if self.label_guidance:
            log_probabilities = self.network.head(features).log_softmax(dim=1)[:, NORMAL]
            log_guidance = log_guidance + log_probabilities.flatten(1).mean(dim=1)
        return log_guidance

    @property
    def strength(self) -> float:
        """The strength of the mode in use: ``guidance_ratio`` or ``guidance_scale`` (0: no guidance)."""
        return self.guidance_ratio if self.guidance_mode == "ratio" else self.guidance_scale

    def shift(self, gradient: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
        """``s_t Sigma g`` of one reverse step in the purifier's mode (module docstring)."""
        if self.guidance_mode == "ratio":
            return guidance_shift(gradient, log_variance, self.guidance_ratio)
        return fixed_scale_shift(gradient, log_variance, self.guidance_scale)

    def respaced_chain(self, x: torch.Tensor, denoising_steps: int | None) -> torch.Tensor:
        """Eq. (7) to t*, then Alg. 1's guided reverse steps (respaced to ``denoising_steps`` when given); ``x`` (the
        input ``x'``) in [-1, 1]."""
        with torch.inference_mode(False):
            x = x.clone() if x.is_inference() else x
            attacked = torch.is_grad_enabled() and x.requires_grad  # the attack differentiates the guidance too
            reference = self.reference(x)
            ratios = []

            def guidance(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                with torch.enable_grad():
                    probe = xt if attacked else xt.detach().requires_grad_(True)
                    log_guidance = self.log_guidance(reference, probe, t).sum()
                    return torch.autograd.grad(log_guidance, probe, create_graph=attacked)[0]

            def measured_shift(gradient: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
                shift = self.shift(gradient, log_variance)
                ratios.append(guidance_to_noise(shift.detach(), log_variance.detach()))
                return shift

            purified = guided_ddpm_purification(self.denoise, self.schedule, x, self.depth, guidance,
                                                measured_shift if self.strength else None,
                                                clip_denoised=self.clip_denoised,
                                                denoising_steps=denoising_steps)  # fmt: skip
        self.guidance_to_noise = torch.stack(ratios) if ratios else None
        self._report_guidance()
        return purified

    def _report_guidance(self) -> None:
        """Log the guidance-to-noise ratios of the first guided purification, however small."""
        if self._reported or self.guidance_to_noise is None:
            return
        self._reported = True
        ratios = self.guidance_to_noise.double()
        logger.info(
            "AGDM(%s): the guidance moved each reverse step by %.2g to %.2g (median %.2g) of the step's noise%s.",
            self.extra_repr(), ratios.min(), ratios.max(), ratios.median(),
            " (inert: this is DiffPure's chain)" if ratios.max() < INERT_RATIO else "",
        )  # fmt: skip

    def extra_repr(self) -> str:
        strength = (f"guidance_ratio={self.guidance_ratio}" if self.guidance_mode == "ratio"
                    else f"guidance_scale={self.guidance_scale}")  # fmt: skip
        label = ", label_guidance=True" if self.label_guidance else ""
        return f"depth={self.depth}, {strength}{label}"
