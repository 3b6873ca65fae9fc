"""Expectation over Transformation (EOT) for randomised detectors.

A randomised detector (AdvRAD, a diffusion purifier) draws fresh noise ``w`` at every call, so its score ``A(x; w)`` is
a random variable. EOT (Athalye et al., 2018; used against AdvRAD in the AdvRAD paper, sec. 5.6 and Table 10) attacks
the expected score: the gradient is the Monte Carlo mean of single-draw gradients,

    grad_x E_w[y * A(x; w)]  ~=  1/n * sum_k grad_x y * A(x; w_k).

EOT is the attacker's tool only: the evaluation scores each image as the detector is deployed, with fresh noise
(:meth:`~anomalib_robust.attacks.DetectorScore.predict`). The helpers below loop over draws one at a time, so memory
does not grow with ``n``.

Example:
    >>> import torch
    >>> from anomalib_robust.attacks.eot import expected_value_and_gradient
    >>> value, grad = expected_value_and_gradient(lambda x: (x**2).sum(dim=1), torch.ones(2, 3), samples=4)
    >>> value, grad[0]
    (tensor([3., 3.]), tensor([2., 2., 2.]))
"""

from collections.abc import Callable

import torch

DEFAULT_EOT_SAMPLES = 8
"""Draws per EOT estimate when a randomised detector is attacked and no budget is given."""


def resolve_eot_samples(eot_samples: int | None, stochastic: bool) -> int:
    """Number of draws per score: ``eot_samples`` if given, else 1 for deterministic and 8 for randomised detectors.

    Raises:
        ValueError: if ``eot_samples`` is not a positive integer.
    """
    if eot_samples is None:
        return DEFAULT_EOT_SAMPLES if stochastic else 1
    if isinstance(eot_samples, bool) or not isinstance(eot_samples, int) or eot_samples < 1:
        msg = f"eot_samples must be a positive integer (draws per EOT estimate), got {eot_samples!r}."
        raise ValueError(msg)
    return eot_samples


def expected_value(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, samples: int) -> torch.Tensor:
    """Monte Carlo mean of ``function(x)`` over ``samples`` draws of its randomness, without gradients."""
    with torch.no_grad():
        return torch.stack([function(x) for _ in range(samples)]).mean(dim=0)


def expected_value_and_gradient(
    function: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    samples: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-sample value of ``function(x)`` and mean gradient of its sum w.r.t. ``x`` over ``samples`` draws.

    ``function`` maps a batch to one value per sample; the gradient of the summed values gives each sample's own
    gradient because samples do not interact. Each draw is differentiated on its own graph (bounded memory), with
    ``torch.autograd.grad``, so no ``.grad`` is accumulated on any parameter.
    """
    value_sum = torch.zeros(x.shape[0], device=x.device)
    grad_sum = torch.zeros_like(x)
    for _ in range(samples):
        x_draw = x.detach().requires_grad_(True)
        value = function(x_draw)
        (grad,) = torch.autograd.grad(value.sum(), x_draw)
        value_sum += value.detach()
        grad_sum += grad
    return value_sum / samples, grad_sum / samples
