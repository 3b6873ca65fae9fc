"""PatchGuard's adversarial training examples: L_inf PGD that flips patch labels (PatchGuard paper, sec. L).

The official training attack (PatchGuard's official code) maximises, on the patch logits ``s``,

    J(x) = sum_b [ mean_{j: y_bj = 0} s_bj  -  mean_{j: y_bj = 1} s_bj ]

(normal patches pushed to look anomalous, anomalous ones to look normal: "all pixels are flipped", sec. L), with
``eps = 8/255``, 10 steps of ``2/255`` (``2.5 eps / steps``), no random start, images clipped to [0, 1], model in
whatever mode the caller left it (train mode in the official recipe). The ascent step and the projection are
:func:`anomalib_robust.attacks.pgd.ascent_step` and :func:`anomalib_robust.attacks.pgd.project` (AdvRAD paper, eq. 1).
"""

from collections.abc import Callable

import torch

from anomalib_robust.attacks.pgd import ascent_step, project, random_start


def label_flip_objective(patch_logits: torch.Tensor, patch_labels: torch.Tensor) -> torch.Tensor:
    """``J``: per image, mean logit of the normal patches minus mean logit of the anomalous ones, summed."""
    anomalous = patch_labels.to(patch_logits.dtype)
    normal = 1.0 - anomalous
    normal_mean = (patch_logits * normal).sum(dim=1) / normal.sum(dim=1).clamp_min(1.0)
    anomalous_mean = (patch_logits * anomalous).sum(dim=1) / anomalous.sum(dim=1).clamp_min(1.0)
    return (normal_mean - anomalous_mean).sum()


def check_attack_settings(eps: float, steps: int, alpha: float | None) -> float:
    """Validate ``eps``, ``steps`` and ``alpha``; return the step size (``2.5 eps / steps`` when ``alpha`` is None)."""
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps <= 1:
        msg = f"adversarial_eps must be in (0, 1] (images are in [0, 1]), got {eps!r}"
        raise ValueError(msg)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        msg = f"adversarial_steps must be a positive integer, got {steps!r}"
        raise ValueError(msg)
    if alpha is None:
        return 2.5 * eps / steps
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        msg = f"adversarial_alpha must be positive or None, got {alpha!r}"
        raise ValueError(msg)
    return float(alpha)


def patch_label_flip_pgd(
    patch_logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    patch_labels: torch.Tensor,
    eps: float = 8 / 255,
    steps: int = 10,
    alpha: float | None = None,
    random_init: bool = False,
) -> torch.Tensor:
    """L_inf PGD maximising :func:`label_flip_objective`; returns detached images in the ``eps``-ball and in [0, 1].

    Args:
        patch_logits_fn: maps images ``(B, 3, H, W)`` to patch logits ``(B, N)``.
        images: clean images in [0, 1].
        patch_labels: true patch labels ``(B, N)`` in {0, 1}.
        eps, steps, alpha: radius, number of steps, step size (``None``: ``2.5 eps / steps``, i.e. 2/255 officially).
        random_init: start from a random point of the ball (the official recipe starts at ``x``).

    Only the input receives gradients (``torch.autograd.grad``), so parameter gradients are left untouched.
    """
    alpha = check_attack_settings(eps, steps, alpha)
    images = images.detach()
    adversarial = random_start(images, eps, "Linf") if random_init else images.clone()
    with torch.enable_grad():
        for _ in range(steps):
            adversarial.requires_grad_(True)
            objective = label_flip_objective(patch_logits_fn(adversarial), patch_labels)
            (gradient,) = torch.autograd.grad(objective, adversarial)
            adversarial = project(ascent_step(adversarial.detach(), gradient, alpha, "Linf"), images, eps, "Linf")
    return adversarial.detach()
