"""The two processes of RAP as pure functions: the attack as a diffusion (Alg. 1) and its reverse (Alg. 2).

The RAP paper ("From Malicious to Marvelous: the Art of Adversarial Attack as Diffusion"), sec. 3.1-3.3. Images are in
[0, 1]. Adaptations to one-class anomaly detection (written down here, used by
:class:`~anomalib_robust.models.rap_adapter.RAPAdapter` and :class:`~anomalib_robust.defenses.RAP`):

- **The attacked system** is the defended detector, the adapter in front of the detector (sec. 3.3: "we utilize
  adversaries of the full robust classifier"), deployed in its one-step form: ``A(f~(x, T))``, with ``A`` the
  detector's raw anomaly score (pre-processor + torch model, as the attacks of this project score it).
- **The loss L of Alg. 1** is this project's score-direction objective (AdvRAD paper, sec. 3): ``y * A``, with
  ``y = +1`` for normal images (push the score up: a false alarm) and ``y = -1`` for anomalous ones (push it down: a
  miss). The paper's cross-entropy needs a class label; an anomaly detector has none, only normal/anomalous.
- **Clamp** of Alg. 1 line 8 is the projection onto the L_inf ball of radius ``eps`` around the clean image, then onto
  the [0, 1] box (the projected gradient ascent of Madry et al., which the paper's attacks are); the sign step makes
  the process an L_inf attack, so only L_inf is offered.
- **Indexing of Alg. 1**: ``x~_0 = Clamp(x_0 + zeta)`` with ``zeta ~ Uniform(-c, c)`` (line 4-5), then for
  ``t = 1..T``: ``x_t = Clamp(x_{t-1} + lambda * sign(dL/dx at x_{t-1}))``. ``x_t`` has had exactly ``t`` gradient
  steps.
- **The direction y at inference.** Alg. 2 re-runs Alg. 1 with the label ``y``, which a test image does not have;
  :func:`decision_direction` takes it from the detector's own decision (its image threshold) on the current estimate.
- **Gradients through the process.** Each step's ascent direction ``sign(dL/dx)`` is computed on a detached copy
  (which leaves the caller's graph as it was) and enters the backward pass as a constant, so the backward pass treats
  a run of Alg. 1 as "add a fixed perturbation, then project": BPDA (Athalye et al., 2018, "Obfuscated Gradients Give
  a False Sense of Security", sec. 4.1) of the inner attack, whose Jacobian is the identity up to the projections.
  ``sign`` is piecewise constant, so this is also the derivative almost everywhere, but that derivative is the
  shattered gradient BPDA stands in for: it ignores how the attack's direction depends on its input.

Example:
    >>> import torch
    >>> x0 = torch.full((1, 1, 4, 4), 0.5)
    >>> xt = forward_process(lambda x: x.sum(dim=(1, 2, 3)), x0, 3, eps=0.1, step_size=0.02, start_noise=0.0)
    >>> torch.allclose(xt, x0 + 0.06)  # three ascent steps of lambda on a score that grows with every pixel
    True
    >>> unet_calls(20, 1), unet_calls(20, 20)
    (1, 210)
"""

from collections.abc import Callable

import torch

from anomalib_robust.attacks.detector import test_transform
from anomalib_robust.attacks.pgd import project
from anomalib_robust.attacks.unmasking import unmasked_gradients

Objective = Callable[[torch.Tensor], torch.Tensor]
"""Per-sample objective ``(N, C, H, W) -> (N,)`` that the forward process maximises."""


def forward_process(
    objective: Objective,
    images: torch.Tensor,
    steps: int | torch.Tensor,
    eps: float,
    step_size: float,
    start_noise: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Alg. 1 of the RAP paper: ``x_t`` after uniform start noise and ``t`` sign-gradient ascent steps on ``objective``.

    Args:
        objective: per-sample objective to maximise (e.g. ``y * A(f~(x, T))``).
        images: clean images ``x_0`` in [0, 1], ``(N, C, H, W)``; the centre of the eps-ball.
        steps: ``t``, one number or one per image (``(N,)``, Alg. 3 line 4 draws it per image); 0 gives the noisy start.
        eps: L_inf radius of ``Clamp``.
        step_size: lambda.
        start_noise: c (0: no start noise, the deterministic process).
        generator: random generator of the start noise.

    Returns:
        ``x_t`` in the eps-ball around ``images`` and in [0, 1]; differentiable w.r.t. ``images`` (see the module
        docstring).
    """
    steps = torch.as_tensor(steps, device=images.device).long().expand(images.shape[0])
    zeta = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    adversarial = project(images + (2 * zeta - 1) * start_noise, images, eps, "Linf")
    for step in range(1, int(steps.max()) + 1):
        with unmasked_gradients():
            probe = adversarial.detach().clone().requires_grad_(True)
            (gradient,) = torch.autograd.grad(objective(probe).sum(), probe)
        active = (steps >= step).to(images.dtype).view(-1, *([1] * (images.ndim - 1)))
        adversarial = project(adversarial + active * step_size * gradient.sign(), images, eps, "Linf")
    return adversarial


def timesteps(steps: int, inference_steps: int) -> list[int]:
    """The sub-sequence ``tau = (T, ..., 0)`` of Alg. 2 with ``inference_steps`` reverse steps (T of them: Alg. 2).

    Raises:
        ValueError: unless ``1 <= inference_steps <= steps``.
    """
    if isinstance(inference_steps, bool) or not isinstance(inference_steps, int) or not 1 <= inference_steps <= steps:
        msg = (
            f"inference_steps must be an integer in [1, T] = [1, {steps}] (1: one adapter call; T: Alg. 2 in full), "
            f"got {inference_steps!r}."
        )
        raise ValueError(msg)
    return [steps * (inference_steps - index) // inference_steps for index in range(inference_steps + 1)]


def unet_calls(steps: int, inference_steps: int) -> int:
    """U-Net forward calls per image of :func:`reverse_process`: one per reverse step, plus one per step of each
    re-run of Alg. 1 (``sum`` of the intermediate ``tau``); each of the latter also costs one backward pass of the
    U-Net and one forward and backward pass of the detector. T steps: ``T + T (T - 1) / 2``; one step: 1."""
    tau = timesteps(steps, inference_steps)
    return inference_steps + sum(tau[1:-1])


def reverse_process(
    adapter: Callable[[torch.Tensor, int], torch.Tensor],
    attack: Callable[[torch.Tensor, int], torch.Tensor] | None,
    images: torch.Tensor,
    steps: int,
    inference_steps: int,
) -> torch.Tensor:
    """Alg. 2 of the RAP paper on a sub-sequence ``tau`` of ``(T, ..., 0)``: the purified image, clamped to [0, 1].

    For each ``tau_i`` (the input is ``x_T``): ``x0_hat = f~(x_{tau_i}, tau_i)`` (line 3); at the last step return
    it, else re-run Alg. 1 from ``x0_hat`` for ``tau_{i+1}`` steps to get ``x_{tau_{i+1}}`` (line 4, eq. 9).
    ``inference_steps = T`` is Alg. 2 as written; ``inference_steps = 1`` is the one-step mode of sec. 4.5 (one
    adapter call, no attack). Cost: :func:`unet_calls`.

    Args:
        adapter: ``(x_t, t) -> x0_hat``.
        attack: ``(x0_hat, t) -> x_t`` (Alg. 1 on the defended detector); unused with one step (may be ``None``).
        images: attacked images ``x_T`` in [0, 1].
        steps: T.
        inference_steps: reverse steps.
    """
    tau = timesteps(steps, inference_steps)
    if inference_steps > 1 and attack is None:
        msg = "reverse_process with inference_steps > 1 re-runs Alg. 1 and needs the attack (x0_hat, t) -> x_t."
        raise ValueError(msg)
    current = images
    for index, step in enumerate(tau[:-1]):
        estimate = adapter(current, step).clamp(0.0, 1.0)
        following = tau[index + 1]
        if following == 0:
            return estimate
        current = attack(estimate, following)
    return current


def detector_score(pre_processor: torch.nn.Module | None, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Raw anomaly score ``(N,)`` of a detector's torch model on [0, 1] ``images``, pre-processed as anomalib tests."""
    output = model(test_transform(pre_processor, images))
    return output.pred_score.reshape(images.shape[0], -1)[:, 0]


def decision_direction(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """``y`` of the score-direction objective from a detector's decision: ``+1`` where the raw score is at most the
    image threshold (normal: an attack would raise it), ``-1`` above it (anomalous: an attack would lower it), as
    anomalib's post-processor labels (``pred_score > threshold``)."""
    return torch.where(scores > threshold, -1.0, 1.0).to(scores.dtype)


def score_hinge(
    scores: torch.Tensor, clean_scores: torch.Tensor, direction: torch.Tensor | float, scale: torch.Tensor | float
) -> torch.Tensor:
    """Per image ``relu(y (A(f~(x_t, t)) - A(x_0))) / s``: the task term of Alg. 3 for the anomaly detector.

    Zero on the side of the clean score that the attack in direction ``y`` did not push towards: for normal images
    (``y = +1``) a purified score at or below the clean one, for anomalous ones (``y = -1``) at or above it; positive,
    in units of ``s``, past it.
    """
    return (direction * (scores - clean_scores)).relu() / scale


def defended_objective(
    adapter: Callable[[torch.Tensor, int], torch.Tensor],
    steps: int,
    pre_processor: torch.nn.Module | None,
    model: torch.nn.Module,
    direction: torch.Tensor,
) -> Objective:
    """``x -> y * A(f~(x, T))``: the score-direction objective on the defended detector (one-step adapter)."""

    def objective(images: torch.Tensor) -> torch.Tensor:
        return direction * detector_score(pre_processor, model, adapter(images, steps).clamp(0.0, 1.0))

    return objective
