"""``check_gradient``: autograd against central differences at a tiny step, and the predicted against the actual
change at the attack's step; each fails on its planted masking and passes on honest scores."""

import pytest
import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_robust.attacks import DetectorScore, NotDifferentiableError
from anomalib_robust.evaluation.gradient_check import GradientCheck, attack_start_points, check_gradient
from anomalib_robust.evaluation.masking import plant_masking


class _ZeroBackward(torch.autograd.Function):
    """Identity forward, zero backward: a masked branch that still ``requires_grad``."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        del ctx
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        del ctx
        return torch.zeros_like(grad)


class ToyModel(nn.Module):
    """Score = mean squared conv response (under ``torch.no_grad`` like anomalib) + optionally a masked branch."""

    def __init__(
        self, mask: str | None = None, noise: float = 0.0, float32_only: bool = False, pooled: bool = False
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.other = nn.Conv2d(3, 4, 3, padding=1)
        self.mask, self.noise, self.float32_only, self.pooled = mask, noise, float32_only, pooled
        self.stochastic = bool(noise)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        if self.float32_only and images.dtype != torch.float32:
            msg = "this model only runs in float32"
            raise RuntimeError(msg)
        with torch.no_grad():  # lifted by unmasked_gradients: an honest gradient
            features = self.conv(images)
        if self.noise:
            features = features + self.noise * torch.randn_like(features)
        score = (features**2).mean(dim=(1, 2, 3))
        if self.pooled:  # a max over pixels, in a map that starts from the default dtype (as anomalib's Stfpm)
            score = score + torch.ones(images.shape[0]) * images.amax(dim=(1, 2, 3))
        branch = torch.tanh(self.other(images)).mean(dim=(1, 2, 3))
        if self.mask == "detach":
            branch = branch.detach()  # this package's (the test's) detach: not lifted
        elif self.mask == "function":
            branch = _ZeroBackward.apply(branch)
        elif self.mask == "everything":
            score = score.detach()
            branch = branch.detach()
        return InferenceBatch(pred_score=score + 3 * branch)


class ToyDetector(nn.Module):
    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre_processor = nn.Identity()
        self.model = ToyModel(**kwargs)


EPS = 2 / 255


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(5, 3, 8, 8, generator=generator)
    images[0, :, :2] = 0.0  # pixels on the box boundary
    images[1, :, -2:] = 1.0
    return images, torch.tensor([0, 1, 0, 1, 0])


def test_honest_gradient_passes_both_checks_and_leaves_no_trace(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    toy = ToyDetector()
    toy.train()
    detector = DetectorScore(toy)
    parameters = {
        name: (parameter, parameter.data_ptr(), parameter.clone(), parameter.requires_grad)
        for name, parameter in toy.named_parameters()
    }
    rng_state = torch.get_rng_state()
    check = check_gradient(detector, images, labels, eps=EPS)
    assert isinstance(check, GradientCheck)
    assert (check.finite_difference.passed, check.attack_step.passed) == (True, True)
    assert check.num_samples == 5
    assert check.relative_error < 1e-6
    assert 0.5 < check.step_ratio < 2
    assert check.step_cosine > 0.9
    assert "float64" in check.finite_difference.detail
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert torch.get_default_dtype() == torch.float32
    assert toy.training
    for name, parameter in toy.named_parameters():
        original, address, value, requires_grad = parameters[name]
        assert parameter is original
        assert parameter.data_ptr() == address  # the original storage, put back
        assert torch.equal(parameter, value)
        assert parameter.dtype == torch.float32
        assert parameter.requires_grad == requires_grad
        assert parameter.grad is None
    assert images.grad is None


def test_a_max_over_pixels_at_the_box_edge_and_a_default_dtype_map_pass(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """At the clean image many pixels tie at 0 or 1 and a max has no derivative there; the checked points are the
    attack's reflected random starts, which have no ties, and the map runs in float64 through the default dtype."""
    images, labels = batch
    images = images.clone()
    images[:, :, :, :4] = 1.0  # the maximum ties over half of every image
    check = check_gradient(DetectorScore(ToyDetector(pooled=True)), images, labels, eps=EPS)
    assert check.finite_difference.passed is True
    assert check.relative_error < 1e-6


def test_start_points_stay_in_the_ball_and_off_the_box_edge(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, _ = batch
    for norm, eps in (("Linf", EPS), ("L2", 0.2)):
        points = attack_start_points(images.double(), eps, norm, seed=0)
        assert ((points > 0) & (points < 1)).all()
        delta = (points - images.double()).flatten(1)
        size = delta.abs().amax(dim=1) if norm == "Linf" else delta.norm(dim=1)
        assert (size <= eps + 1e-12).all()


@pytest.mark.parametrize("mask", ["detach", "function"])
def test_masked_branch_fails_the_finite_differences(batch: tuple[torch.Tensor, torch.Tensor], mask: str) -> None:
    """The score still requires grad (the other branch is honest), so only the finite differences can tell."""
    detector = DetectorScore(ToyDetector(mask=mask))
    with detector.prepared():
        check = check_gradient(detector, *batch, eps=EPS)
    assert check.finite_difference.passed is False
    assert check.relative_error > 0.1
    assert "masked" in check.finite_difference.detail


@pytest.mark.parametrize(
    ("masking", "finite_difference", "attack_step"),
    [("quantised", None, False), ("straight_through", False, None), ("detached", False, False)],
)
def test_planted_masking_is_flagged_by_the_right_check(
    batch: tuple[torch.Tensor, torch.Tensor], masking: str, finite_difference: bool | None, attack_step: bool
) -> None:
    """A quantiser has a zero gradient where the score moves: only a step of the attack's size sees it. A
    straight-through quantiser has the identity's gradient, wrong at a tiny step (at the attack's step it depends on
    the quantiser's levels). A partly detached score has a scaled-down gradient, wrong at both. ``None``: either."""
    check = check_gradient(DetectorScore(plant_masking(ToyDetector(), masking, levels=16)), *batch, eps=EPS)
    if attack_step is not None:
        assert check.attack_step.passed is attack_step
    if finite_difference is not None:
        assert check.finite_difference.passed is finite_difference
    if masking == "quantised":
        assert check.step_cosine == 0.0


def test_stochastic_detector_passes_with_common_random_numbers(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    detector = DetectorScore(ToyDetector(noise=0.5))
    assert detector.stochastic
    assert detector.eot_samples > 1  # the check uses one draw, not the EOT budget
    rng_state = torch.get_rng_state()
    check = check_gradient(detector, *batch, eps=EPS, num_directions=3, seed=7)
    assert (check.finite_difference.passed, check.attack_step.passed) == (True, True)
    assert check.relative_error < 1e-6
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_model_without_float64_is_not_evaluated(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    toy = ToyDetector(float32_only=True)
    check = check_gradient(DetectorScore(toy), *batch, eps=EPS)
    assert (check.finite_difference.passed, check.attack_step.passed) == (None, None)
    assert "failed in float64 (RuntimeError: this model only runs in float32)" in check.finite_difference.detail
    assert all(parameter.dtype == torch.float32 for parameter in toy.parameters())
    assert torch.get_default_dtype() == torch.float32


def test_score_without_any_gradient_raises(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    with pytest.raises(NotDifferentiableError):
        check_gradient(DetectorScore(ToyDetector(mask="everything")), *batch, eps=EPS)


def test_no_images_cannot_be_evaluated() -> None:
    check = check_gradient(DetectorScore(ToyDetector()), torch.rand(0, 3, 8, 8), torch.zeros(0), eps=EPS)
    assert check.finite_difference.passed is None
    assert check.num_samples == 0


class _PrivateNoise(nn.Module):
    """A healthy randomised score that draws its noise from its own ``torch.Generator``: reseeding torch's global RNG
    does not reproduce it, so common random numbers are impossible."""

    stochastic = True

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        noise = torch.randn(images.shape[0], generator=self.generator).to(images)
        return InferenceBatch(pred_score=(self.conv(images) ** 2).mean(dim=(1, 2, 3)) + 0.1 * noise)


def test_a_private_generator_is_not_evaluated_never_failed(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    holder = nn.Module()
    holder.model = _PrivateNoise()
    check = check_gradient(DetectorScore(holder), *batch, eps=EPS)
    assert (check.finite_difference.passed, check.attack_step.passed) == (None, None)
    assert "does not reproduce" in check.finite_difference.detail
    assert "own torch.Generator" in check.attack_step.detail


class _HighFrequency(nn.Module):
    """A healthy score plus ``mean(sin(w x))``: the term dominates the gradient and is meaningless at the attack's
    scale (its change at step ``a`` is ``sin(w a) / (w a)`` times the prediction)."""

    def __init__(self, frequency: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.frequency = frequency

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        healthy = (self.conv(images) ** 2).mean(dim=(1, 2, 3))
        return InferenceBatch(pred_score=healthy + torch.sin(self.frequency * images).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("frequency", [1e3, 3e3, 1e4])
def test_a_high_frequency_term_fails_the_attack_step_whatever_its_phase(
    batch: tuple[torch.Tensor, torch.Tensor], frequency: float
) -> None:
    """At ``alpha = 0.5 / 255`` alone, w = 1e3 and 1e4 passed (cosine +1, ratios 0.47 and 0.03 with no lower bound)
    and w = 3e3 failed: the verdict followed the phase. At alpha/2, alpha and 2 alpha with a lower bound it fails."""
    holder = nn.Module()
    holder.model = _HighFrequency(frequency)
    check = check_gradient(DetectorScore(holder), *batch, eps=EPS)
    assert check.finite_difference.passed is True  # the gradient is the score's, at a tiny step
    assert check.attack_step.passed is False, check.attack_step.detail
    assert "fails at" in check.attack_step.detail


class _RegionScore(nn.Module):
    """Mean squared conv response over the image; the response of the first ``detached_rows`` rows is detached (a
    small share of the image whose contribution autograd does not see: an error orthogonal to the gradient)."""

    def __init__(self, detached_rows: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.detached_rows = detached_rows

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        response = torch.tanh(self.conv(images)) ** 2
        rows = self.detached_rows
        response = torch.cat([response[:, :, :rows].detach(), response[:, :, rows:]], dim=2)
        return InferenceBatch(pred_score=response.mean(dim=(1, 2, 3)))


@pytest.mark.parametrize(("detached_rows", "flagged"), [(0, False), (1, True)])
def test_a_small_detached_share_is_seen_at_224_pixels(detached_rows: int, flagged: bool) -> None:
    """One row of 224 (0.45 % of the image) detached: an error nearly orthogonal to the gradient. Normalised together
    with the gradient's own direction it read 5e-4 (below the tolerance of 1e-3, a pass); normalised on its own it
    reads 6 %. The healthy score raises no alarm at the same size (2e-6, round-off)."""
    holder = nn.Module()
    holder.model = _RegionScore(detached_rows)
    images = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    check = check_gradient(DetectorScore(holder), images, torch.tensor([0, 1, 0, 1]), eps=EPS, num_steps=1)
    assert check.finite_difference.passed is not flagged, check.finite_difference.detail
    if flagged:
        assert check.relative_error > 0.02
    else:
        assert check.relative_error < 1e-4 and check.attack_step.passed is True  # round-off: 2e-6
