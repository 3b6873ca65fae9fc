"""AGDM: adversarially guided diffusion purification in front of any anomalib detector (the AGDM paper, Alg. 1).

The AGDM paper (Lin et al., "Robust Diffusion Models for Adversarial Purification") purifies as DiffPure
does, diffusing the input ``x'`` to ``t*`` (eq. 7) and running the reverse chain back, but shifts every reverse mean by
the gradient of a robust network's guidance (sec. 3.1):

    x_{t-1} ~ N(mu + s Sigma grad_{x_t} log p(y | x_t) - s Sigma grad_{x_t} D(f_phi(x'), f_phi(x_t)), Sigma)

The diffusion model is the AdvRAD U-Net that DiffPure uses, unchanged; f_phi is
:class:`~anomalib_robust.models.AGDMGuidance` (``anomalib train --model AGDMGuidance``), a normal-vs-pseudo-anomaly
classifier trained with eq. (6); D is the KL divergence of its outputs. Defaults are the paper's (sec. 5.1): t* = 70,
s = 1.0 (lambda = 6 is f_phi's training weight).

Adapted to one-class anomaly detection:

- **No label guidance by default** (``label_guidance=False``): an anomaly detector's test image has no class, and
  guiding towards "normal" would erase the real defects the detector must find. With ``label_guidance=True`` the
  ``y`` term uses f_phi's "normal" logit (``log p(normal | x_t)``), for users who accept that trade.
- **The consistency term stays**: it pulls each sample towards the input's f_phi output, defect or not, which is what
  keeps a defect that f_phi sees from being repaired.

Cost per image: t* U-Net calls, t* forward and backward passes of f_phi and one forward pass on ``x'``. Attacks
(``RobustEval(defense=AGDM(...))``) use EOT (the chain draws fresh noise) with full gradients through every step:
each U-Net call is recomputed in the backward pass (``gradient_checkpointing``), and each guidance gradient is built
with ``create_graph`` so that the attack differentiates through the guidance too (f_phi's second derivatives; f_phi
uses SiLU). BPDA (``purifier_gradients: [bpda]``) replaces the whole purifier by the identity in the backward pass.

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
from anomalib_robust.defenses.chains import check_level, guided_ddpm_purification
from anomalib_robust.defenses.purifiers import DiffusionPurifier
from anomalib_robust.models.adv_rad import AdvRAD
from anomalib_robust.models.adv_rad.diffusion import DiffusionSchedule
from anomalib_robust.models.adv_rad.torch_model import AdvRADModel
from anomalib_robust.models.agdm_guidance import AGDMGuidance, GuidanceNetworkModel
from anomalib_robust.models.agdm_guidance.torch_model import NORMAL, consistency_divergence

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


class AGDM(DiffusionPurifier):
    """The AGDM paper's guided reverse diffusion (Alg. 1) with the AdvRAD diffusion model, in front of any detector.

    Args:
        denoiser: the diffusion model trained on the normal images: an AdvRAD checkpoint path, ``AdvRAD`` or
            ``AdvRADModel`` (as DiffPure's).
        guidance: the trained robust guidance network: an AGDMGuidance checkpoint path or ``AGDMGuidance``.
        depth: t* in ``[1, T]``.
        scale: s, the guidance scale (>= 0; 0 is DiffPure at level t*).
        label_guidance: add ``s Sigma grad log p(normal | x_t)`` (off: see the module docstring).
        gradient_checkpointing: see :class:`~anomalib_robust.defenses.DiffusionPurifier`.
        clip_denoised: see :class:`~anomalib_robust.defenses.DiffusionPurifier`.
    """

    def __init__(
        self,
        denoiser: str | Path | AdvRAD | AdvRADModel,
        guidance: str | Path | AGDMGuidance,
        depth: int = 70,
        scale: float = 1.0,
        label_guidance: bool = False,
        gradient_checkpointing: bool = True,
        clip_denoised: bool = False,
    ) -> None:
        super().__init__(denoiser, gradient_checkpointing, clip_denoised)
        if check_level("depth", depth, self.schedule.num_timesteps) == 0:
            msg = f"depth (t* of Alg. 1) must be in [1, T = {self.schedule.num_timesteps}], got 0 (no purification)."
            raise ValueError(msg)
        self.depth = depth
        self.scale = check_non_negative("scale", scale)
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

    def log_guidance(self, reference_logits: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """Per image: ``-D(f(x'), f(x_t))`` (+ ``log p(normal | x_t)`` with ``label_guidance``); ``x_t`` in [-1, 1]."""
        logits = self.network.logits((xt + 1) / 2)
        log_guidance = -consistency_divergence(reference_logits, logits)
        if self.label_guidance:
            log_guidance = log_guidance + logits.log_softmax(dim=1)[:, NORMAL]
        return log_guidance

    def chain(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. (7) to t*, then Alg. 1's guided reverse steps; ``x`` (the input ``x'``) in [-1, 1]."""
        with torch.inference_mode(False):
            x = x.clone() if x.is_inference() else x
            attacked = torch.is_grad_enabled() and x.requires_grad  # the attack differentiates the guidance too
            reference_logits = self.network.logits((x + 1) / 2)

            def guidance(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                del t  # f_phi is not time-conditioned (AGDMGuidance trains it on all steps up to t*)
                with torch.enable_grad():
                    probe = xt if attacked else xt.detach().requires_grad_(True)
                    log_guidance = self.log_guidance(reference_logits, probe).sum()
                    return torch.autograd.grad(log_guidance, probe, create_graph=attacked)[0]

            return guided_ddpm_purification(self.denoise, self.schedule, x, self.depth, guidance, self.scale,
                                            clip_denoised=self.clip_denoised)  # fmt: skip

    def extra_repr(self) -> str:
        label = ", label_guidance=True" if self.label_guidance else ""
        return f"depth={self.depth}, scale={self.scale}{label}"
