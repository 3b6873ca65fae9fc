"""PGD, APGD and Square reach the closed-form optimum of ``y * A(x)`` on a linear detector ``A(x) = <w, x>``.

Away from the [0, 1] box edges the best point of the eps-ball is ``x + eps * y * sign(w)`` for L_inf (gain
``eps * ||w||_1``) and ``x + eps * y * w / ||w||_2`` for L_2 (gain ``eps * ||w||_2``), AdvRAD paper, sec. 3, eq. 1-2.
"""

from collections.abc import Callable

import pytest
import torch

from anomalib_robust.attacks import APGD, PGD, Square

SHAPE = (3, 8, 8)
EPS = {"Linf": 4 / 255, "L2": 0.2}


@pytest.fixture
def linear_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, images in [0.3, 0.7] (eps never reaches the box edges) and labels of both classes."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(SHAPE, generator=generator)
    images = 0.3 + 0.4 * torch.rand(6, *SHAPE, generator=generator)
    return weights, images, torch.tensor([0, 1, 0, 1, 0, 1])


def _relative_gain(
    weights: torch.Tensor, images: torch.Tensor, adversarial: torch.Tensor, labels: torch.Tensor, norm: str
) -> torch.Tensor:
    """Per sample, the objective gain of ``adversarial`` over ``images`` as a fraction of the analytic optimum."""
    direction = 1.0 - 2.0 * labels.float()
    gain = direction * ((adversarial - images) * weights).flatten(1).sum(dim=1)
    optimum = EPS[norm] * (weights.abs().sum() if norm == "Linf" else weights.norm())
    return gain / optimum


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("attack_class", [PGD, APGD])
def test_gradient_attacks_reach_the_optimum(
    linear_detector: Callable,
    linear_problem: tuple,
    attack_class: type,
    norm: str,
) -> None:
    """Within 1% of the optimum gain, from a random start (PGD with step eps / 2: from a random start on the L_2
    sphere the default step 2.5 * eps / steps only turns slowly towards ``w``)."""
    weights, images, labels = linear_problem
    settings = {"steps": 20, "alpha": EPS[norm] / 2} if attack_class is PGD else {"steps": 20}
    adversarial = attack_class(linear_detector(weights), eps=EPS[norm], norm=norm, **settings)(images, labels)
    gain = _relative_gain(weights, images, adversarial, labels, norm)
    assert (gain >= 0.99).all(), gain
    assert (gain <= 1 + 1e-4).all(), gain


def test_square_linf_gets_close_to_the_optimum(linear_detector: Callable, linear_problem: tuple) -> None:
    """Random search, so a looser bound: > 90% of the optimum gain after 1000 queries (measured: 96-99%)."""
    weights, images, labels = linear_problem
    adversarial = Square(linear_detector(weights), eps=EPS["Linf"], norm="Linf", n_queries=1000)(images, labels)
    gain = _relative_gain(weights, images, adversarial, labels, "Linf")
    assert (gain > 0.9).all(), gain
    assert (gain <= 1 + 1e-4).all(), gain


def test_square_l2_makes_progress(linear_detector: Callable, linear_problem: tuple) -> None:
    """L_2 squares are a poor basis for a random direction ``w``; > 40% of the optimum after 1000 queries (measured
    55-70%), at radius exactly eps."""
    weights, images, labels = linear_problem
    adversarial = Square(linear_detector(weights), eps=EPS["L2"], norm="L2", n_queries=1000)(images, labels)
    gain = _relative_gain(weights, images, adversarial, labels, "L2")
    assert (gain > 0.4).all(), gain
    radius = (adversarial - images).flatten(1).norm(dim=1)
    assert torch.allclose(radius, torch.full_like(radius, EPS["L2"]), rtol=1e-4)
