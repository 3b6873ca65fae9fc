"""The robust guidance training of the AGDM paper (Lin et al., sec. 3.2, eq. 6), for a one-class guidance network.

Eq. (6): ``min_phi E[ L(f_phi(x), y) + lambda * max_{||delta|| <= eps} D(f_phi(x), f_phi(x + delta)) ]``, the
TRADES objective (Zhang et al., 2019). The AGDM paper takes D as the KL divergence of the outputs (appendix B, eq. 21);
here D is the one the guidance uses, the squared distance of f_phi's spatial features
(:func:`~anomalib_robust.models.agdm_guidance.torch_model.consistency_divergence`), so that training makes robust
exactly what Alg. 1 differentiates. The inner maximum is TRADES' attack: a start 0.001-Gaussian close to ``x``, then
sign-gradient steps on D, each projected onto the L_inf ball and the [0, 1] box.

Alg. 1 (with eq. 4) compares the input at step 0 with the sample at step t, ``D(f_phi(x'), f_phi(x_t))``, where
``p(x' | x_t) ~ exp(-D)`` relates "adversarial and diffused clean images" (the AGDM paper, sec. 3.1). The robust
term is trained on those pairs: an image ``x`` diffused to a random step ``t ~ U{0, ..., max_noise_step}`` with
eq. (7) (``t = 0``: the clean image), f_phi told ``t``, against ``x + delta`` at step 0, ``delta`` maximising D in the
eps-ball (:meth:`~anomalib_robust.models.agdm_guidance.AGDMGuidance.losses`). So D is small between an input and its
own diffused copy, the pair the guidance pulls together, and at ``t = 0`` the term is eq. (6) itself. (A network
trained only on same-step pairs, clean and perturbed images diffused with the same noise, gave D between an image at
step 0 and its own copy at step t >= 35 as large as between two different clean images: its guidance did not point
to the input.)
"""

from collections.abc import Callable

import torch

from anomalib_robust.attacks.pgd import ascent_step, project
from anomalib_robust.models.adv_rad.diffusion import DiffusionSchedule, q_sample
from anomalib_robust.models.agdm_guidance.torch_model import consistency_divergence

TRADES_START_STD = 0.001
"""Standard deviation of TRADES' random start around the clean image (Zhang et al., 2019, Alg. 1)."""


def diffuse(schedule: DiffusionSchedule, images: torch.Tensor, steps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] diffused to ``steps`` (per image, 0 = clean) with eq. (7), mapped back to the [0, 1] scale.

    The U-Net's ``x_t`` lives in [-1, 1]; f_phi sees ``(x_t + 1) / 2``, as in the guided chain.
    """
    diffused = q_sample(schedule, images * 2 - 1, (steps - 1).clamp_min(0), noise)
    clean = (steps == 0).view(-1, *([1] * (images.ndim - 1)))
    return (torch.where(clean, images * 2 - 1, diffused) + 1) / 2


def trades_perturbation(
    embed: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    clean_features: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
) -> torch.Tensor:
    """TRADES' inner maximum of D(clean_features, embed(x + delta)) over the L_inf ball of radius ``eps`` around
    ``images`` (detached); ``embed`` maps images to f_phi's features, ``clean_features`` are those of the clean images
    (in training, of ``images`` diffused to their steps: the pair of Alg. 1)."""
    images, reference = images.detach(), clean_features.detach()
    adversarial = project(images + TRADES_START_STD * torch.randn_like(images), images, eps, "Linf")
    for _ in range(steps):
        adversarial = adversarial.detach().requires_grad_(True)
        with torch.enable_grad():
            divergence = consistency_divergence(reference, embed(adversarial)).sum()
            (gradient,) = torch.autograd.grad(divergence, adversarial)
        adversarial = project(ascent_step(adversarial.detach(), gradient, step_size, "Linf"), images, eps, "Linf")
    return adversarial.detach()
