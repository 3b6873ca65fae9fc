"""Does the attacked gradient describe the score? A tiny-step check and a check at the attack's own step size.

A white-box attack follows ``g = grad_x y * A(x)`` as :class:`~anomalib_robust.attacks.detector.DetectorScore`
computes it. Gradient masking (Athalye, Carlini & Wagner, ICML 2018, "Obfuscated Gradients Give a False Sense of
Security") makes that gradient useless while the score is unchanged, in two ways that need two different tests
(Carlini et al., 2019, "On Evaluating Adversarial Robustness", sec. 5):

- **A wrong gradient** (a branch that is ``.detach()``-ed, a custom ``Function`` with a zero backward, a
  straight-through estimator): autograd disagrees with the score's true derivative. The **finite-difference check**
  compares, per image, autograd's directional derivatives ``<g, v>`` with central differences
  ``(y A(x + h v) - y A(x - h v)) / 2h`` over ``num_directions`` random unit directions plus the gradient's own
  direction: per image the relative error ``||ad - fd|| / max(||ad||, ||fd||)`` of the vector over the random
  directions, and that of the gradient's own direction, each normalised on its own; an image's error is the larger.
  Comparing vectors, not the worst single direction, matters: along a random direction ``<g, v>`` is about
  ``||g|| / sqrt(d)`` times a standard normal, so one direction nearly orthogonal to ``g`` inflates a per-direction
  error without anything being wrong. Normalising the random directions apart from the gradient's own matters too:
  the gradient's entry is ``||g||``, about ``sqrt(d)`` times a random one, so in one vector an error orthogonal to
  ``g`` (a detached region of the image) was diluted by about ``2 / sqrt(d)``: 0.10 at 3 x 16 x 16, 0.011 at
  3 x 224 x 224 for half the image detached.
- **A shattered gradient** (a quantiser, JPEG, any piecewise-constant stage): the derivative is exactly zero, or
  correct but meaningless, almost everywhere, so a tiny step agrees with autograd (both are zero). Only a test at the
  attack's scale sees it. The **attack-step check** steps by the attack's step size ``alpha`` along the attack's own
  direction (``sign(g)`` for L_inf, ``g / ||g||`` for L_2) and along ``num_steps`` random sign directions, and
  compares the change the gradient predicts, ``<g, delta>``, with the change that happens: their ratio along the
  attack's direction (one-sided, the step the attack takes), and the cosine between predicted and actual changes over
  the random directions (central, ``(A(x + delta) - A(x - delta)) / 2``, so that the curvature common to every
  direction cancels). A zero gradient under a score that moves has an infinite ratio. It runs at ``alpha / 2``,
  ``alpha`` and ``2 alpha`` (:data:`STEP_SCALES`) and passes only if at each the ratio is at most
  :data:`MAX_STEP_RATIO` (and at least :data:`MIN_STEP_RATIO` up to ``alpha``) and the cosine is at least
  :data:`MIN_STEP_COSINE`: a high-frequency term passes one scale or another by its phase, never all three.

Choices, each from a measured false alarm of the former check (issue "Sanity checks that tell a masked detector from
a robust one"):

- **float64, including the default dtype.** Parameters and buffers are cast for the duration of the check and
  ``torch.set_default_dtype(torch.float64)`` is set, because some anomalib maps start from ``torch.ones(...)`` in the
  default dtype (Stfpm), and a float32 score makes the round-off of a central difference dominate. A model that does
  not run in float64 is reported as not evaluated, never with a float32 verdict.
- **At the attack's starting points.** The checked points are PGD's random start (uniform in the L_inf ball, or a
  random point of the L_2 ball) around the test images, reflected into [0, 1] instead of clipped. A clean image has
  many pixels exactly at the box edge (a third of Fashion-MNIST's), and after clipping so has a clipped start: max
  pools, argmaxes and nearest neighbours then see exact ties, where the score has no derivative at all and the error
  does not shrink with ``h``. A reflected point has none.
- **Normal and anomalous images.** The caller passes both classes (the evaluator takes a stratified subset), so both
  score directions are checked.
- **Randomised detectors** (``detector.stochastic``) use common random numbers: torch's global RNG is reseeded with
  ``seed`` before each single-draw evaluation, inside :func:`torch.random.fork_rng`, so that every evaluation sees the
  same draw ``w`` of ``A(.; w)`` and the caller's RNG state is untouched. A detector that draws from its own
  ``torch.Generator`` (or any source the reseeding does not reach) gives two different scores at the same point and
  seed; both checks then read "not evaluated" with that reason, never "failed": their differences would compare
  different draws.

The tolerances come from ``benchmarks/gradient_check_tolerances.py`` (healthy Padim, Patchcore, Stfpm and Fastflow,
and the same detectors behind planted masking; docs/benchmarks.md, "Gradient check tolerances").

The check runs through the attack's own path: :meth:`DetectorScore.differentiable_objective` (anomalib's ``no_grad``
and ``detach`` lifted, BPDA stages installed) for the gradient and :meth:`DetectorScore.draw_objective` for the
score, inside :meth:`DetectorScore.prepared` (entered here if the caller has not). A detector attacked through BPDA
fails the finite-difference check by design: the surrogate's gradient is not the gradient of the true stage. A
:class:`~anomalib_robust.attacks.detector.NotDifferentiableError` propagates, for the caller to report.

Example:
    >>> import torch
    >>> from anomalib.data import InferenceBatch
    >>> from anomalib_robust.attacks import DetectorScore
    >>> class Square(torch.nn.Module):
    ...     def forward(self, x):
    ...         return InferenceBatch(pred_score=(x**2).mean(dim=(1, 2, 3)))
    >>> holder = torch.nn.Module()
    >>> holder.model = Square()
    >>> check = check_gradient(DetectorScore(holder), torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), eps=2 / 255)
    >>> check.finite_difference.passed, check.attack_step.passed
    (True, True)
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from anomalib_robust.attacks.base import check_norm
from anomalib_robust.attacks.detector import DetectorScore, NotDifferentiableError, scoring_tolerance
from anomalib_robust.attacks.objective import check_labels
from anomalib_robust.attacks.pgd import random_offset

DIFFERENCE_STEP = 1e-6
"""Finite-difference step ``h`` (L_2 length of the step, float64): truncation ``O(h^2)`` and round-off
``O(1e-16 |A| / h)`` are both far below the tolerance, and a kink of the score (a max changing hands) lies within
``h`` of a checked point rarely enough (at ``h = 1e-5`` a max over 96 near-equal pixels crossed one on 1 image of 5)."""

DIFFERENCE_TOLERANCE = 1e-3
"""Largest relative error of autograd against finite differences on an image (healthy detectors measure 1e-10 to
1e-5, planted wrong gradients 0.9 to 1.2)."""

KINKED_SHARE = 0.25
"""The finite-difference check fails when this share of the images (and at least two, or all of them if fewer) is
above the tolerance. One image may sit within ``h`` of a kink (a nearest neighbour or a max changing hands: Patchcore
measured 1e-4 and 2.5e-3 on single images of healthy fits); masking shows on every image it touches."""

MAX_STEP_RATIO = 2.0
"""Largest median ratio of actual to predicted change along the attack's direction that passes. A masked share of the
score makes the gradient predict too little (ratio 8 to 10 with 90 % detached)."""

MIN_STEP_RATIO = 0.25
"""Smallest median ratio that passes at ``alpha / 2`` and ``alpha``. Below 1 is partly curvature: the attack's sign
step crosses nearest-neighbour switches (healthy Patchcore measured medians of 0.44 at ``alpha``, single images down
to -0.1). A high-frequency term ``sin(w x)`` makes the change ``sin(w a) / (w a)`` times the prediction at step
``a``: ratios of 0.0013 to 0.128 (and negative ones) are a gradient that describes the score only at scales far
below the attack's. At ``2 alpha`` curvature alone lowers healthy ratios further (Patchcore 0.41 to 0.43 where it read
0.75 to 0.77 at ``alpha``), so there only the upper bound and the cosine apply."""

STEP_SCALES = (0.5, 1.0, 2.0)
"""Multiples of the attack's step size ``alpha`` at which the attack-step check runs; it passes only if it passes at
each. For a separable high-frequency term ``sin(w x)`` both the one-sided ratio and the central differences over
random sign steps are ``sin(w a) / (w a)`` times the prediction at step ``a``, so at one scale the cosine is +1 or -1
by the phase (``w = 1e3`` and ``1e4`` passed at ``alpha = 0.5 / 255``, ``w = 3e3`` failed). A ratio of at least
:data:`MIN_STEP_RATIO` at ``alpha`` needs ``w alpha < 2.47``, and a positive cosine at ``2 alpha`` then needs
``w alpha < pi / 2``, where the gradient predicts at least 64 % of the change at ``alpha``: a term whose gradient is
meaningless at the attack's scale fails at some scale, whatever its phase."""

MIN_STEP_COSINE = 0.5
"""Smallest median cosine between predicted and actual changes over random sign steps that passes."""

CHANGE_FLOOR = 1e-12
"""A predicted or actual change (or derivative) below this, in absolute terms, counts as zero."""


@dataclass(frozen=True)
class Verdict:
    """One of the two checks: ``passed`` is ``None`` when it could not be evaluated; ``detail`` is one line."""

    passed: bool | None
    detail: str


@dataclass(frozen=True)
class GradientCheck:
    """Outcome of :func:`check_gradient`.

    Attributes:
        finite_difference: autograd against central differences at ``step`` (the tiny-step check).
        attack_step: predicted against actual change at the attack's step size ``alpha``.
        num_samples: images checked.
        relative_error: largest per-image relative error of the finite-difference check (``nan`` if not evaluated).
        step_ratio: median over images of actual / predicted change along the attack's direction, at ``alpha``.
        step_cosine: median over images of the cosine between predicted and actual changes over random sign steps,
            at ``alpha``.
        scale_ratios: ``step_ratio`` at each of :data:`STEP_SCALES`.
        scale_cosines: ``step_cosine`` at each of :data:`STEP_SCALES`.
    """

    finite_difference: Verdict
    attack_step: Verdict
    num_samples: int
    relative_error: float = math.nan
    step_ratio: float = math.nan
    step_cosine: float = math.nan
    scale_ratios: tuple[float, ...] = ()
    scale_cosines: tuple[float, ...] = ()


def _percent(value: float) -> str:
    """``0.003 -> '0.3%'``, ``3e-07 -> '3e-05%'``, ``1.08 -> '108%'``."""
    if math.isnan(value):
        return "nan"
    percent = 100 * value
    return f"{percent:.0f}%" if percent >= 10 else f"{percent:.2g}%"


@contextmanager
def _cast_floating(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Floating-point parameters and buffers of ``module`` in ``dtype``; the original tensors are put back on exit."""
    parameters = [(parameter, parameter.data) for parameter in module.parameters() if parameter.is_floating_point()]
    buffers = [
        (owner, name, buffer)
        for owner in module.modules()
        for name, buffer in owner.named_buffers(recurse=False)
        if buffer.is_floating_point()
    ]
    cast: dict[int, torch.Tensor] = {}
    try:
        for parameter, data in parameters:
            parameter.data = data.to(dtype)
        for owner, name, buffer in buffers:
            setattr(owner, name, cast.setdefault(id(buffer), buffer.to(dtype)))
        yield
    finally:
        for parameter, data in parameters:
            parameter.data = data
        for owner, name, buffer in buffers:
            setattr(owner, name, buffer)


@contextmanager
def float64(module: nn.Module) -> Iterator[None]:
    """``module``'s floating-point state in float64 and float64 as torch's default dtype; both restored on exit."""
    default = torch.get_default_dtype()
    with _cast_floating(module, torch.float64):
        torch.set_default_dtype(torch.float64)
        try:
            yield
        finally:
            torch.set_default_dtype(default)


@contextmanager
def _common_random_numbers(device: torch.device) -> Iterator[None]:
    """Fork torch's RNG (CPU and ``device``) so that reseeding inside leaves the caller's state untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def attack_start_points(images: torch.Tensor, eps: float, norm: str, seed: int) -> torch.Tensor:
    """PGD's random start around ``images`` (:func:`~anomalib_robust.attacks.pgd.random_offset`, drawn on the CPU in
    float64 from ``seed``), reflected into [0, 1] rather than clipped, so that no pixel sits exactly on the box edge;
    each pixel stays within its ball."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        offset = random_offset(images.detach().cpu().double(), eps, norm)
    points = images + offset.to(images)
    return 1 - (1 - points.abs()).abs()  # reflect at 0, then at 1


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    """Each ``(..., N, C, H, W)`` vector over its last three dimensions scaled to unit L_2 norm (zero stays zero)."""
    return vectors / vectors.flatten(-3).norm(dim=-1).clamp_min(1e-300)[..., None, None, None]


def _attack_direction(gradient: torch.Tensor, norm: str) -> torch.Tensor:
    """The attack's step direction of unit size: ``sign(g)`` (L_inf, eq. 1) or ``g / ||g||_2`` (L_2, eq. 2)."""
    return gradient.sign() if norm == "Linf" else _unit(gradient)


def _cosine(predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """Per image, the cosine between the columns ``(K, N)`` of ``predicted`` and ``actual`` changes: 0 where the
    gradient predicts no change but the score moves (a zero gradient predicts nothing), ``nan`` where neither moves."""
    predicted_norm, actual_norm = predicted.norm(dim=0), actual.norm(dim=0)
    cosine = (predicted * actual).sum(dim=0) / (predicted_norm * actual_norm).clamp_min(1e-300)
    moves = actual_norm > CHANGE_FLOOR
    cosine = torch.where(predicted_norm > CHANGE_FLOOR, cosine, torch.where(moves, 0.0, torch.nan))
    return torch.where(moves | (predicted_norm > CHANGE_FLOOR), cosine, torch.nan)


def _ratio(actual: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Per image, ``actual / predicted``: ``inf`` where the gradient predicts no change but the score moves, ``nan``
    where neither changes."""
    unpredicted = torch.where(actual.abs() > CHANGE_FLOOR, torch.inf, torch.nan)
    return torch.where(predicted.abs() > CHANGE_FLOOR, actual / predicted, unpredicted)


def _finite_median(values: torch.Tensor) -> float:
    """Median of the non-nan ``values`` (``inf`` counts), ``nan`` when there are none."""
    kept = values[~values.isnan()]
    return float(kept.median()) if kept.numel() else math.nan


@dataclass(frozen=True)
class _Measured:
    """Raw measurements per image: finite-difference errors along the gradient's own direction ``(N,)`` and over the
    random directions ``(N,)``; per scale of :data:`STEP_SCALES`, attack-step ratios and cosines ``(S, N)``; whether
    every evaluated objective was finite; and how far two evaluations at the same point and seed differ, against
    the tolerance of a reproduced score (:func:`~anomalib_robust.attacks.detector.scoring_tolerance`)."""

    gradient_errors: torch.Tensor
    random_errors: torch.Tensor
    ratios: torch.Tensor
    cosines: torch.Tensor
    finite: bool
    reproduction: tuple[float, float] = (0.0, 0.0)

    @property
    def reproduced(self) -> bool:
        """Whether reseeding torch's global RNG reproduced the score (common random numbers hold)."""
        difference, tolerance = self.reproduction
        return difference <= tolerance


def _relative_error(autograd: torch.Tensor, differences: torch.Tensor) -> torch.Tensor:
    """Per image, ``||ad - fd|| / max(||ad||, ||fd||)`` over the directions (dimension 0) of ``(K, N)`` derivatives."""
    scale = torch.maximum(autograd.norm(dim=0), differences.norm(dim=0))
    return (autograd - differences).norm(dim=0) / scale.clamp_min(CHANGE_FLOOR)


def _measure(
    detector: DetectorScore,
    points: torch.Tensor,
    labels: torch.Tensor,
    directions: torch.Tensor,
    signs: torch.Tensor,
    alpha: float,
    norm: str,
    seed: int,
) -> _Measured:
    """Both checks at ``points`` (float64): ``directions`` ``(K, N, C, H, W)`` of unit length, ``signs`` random sign
    steps ``(S, N, C, H, W)`` of unit size in ``norm``."""

    def objective(images: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(seed)
        return detector.draw_objective(images, labels).double()

    with _common_random_numbers(points.device):
        torch.manual_seed(seed)
        x = points.clone().requires_grad_(True)
        value = detector.differentiable_objective(x, labels)
        if value.dtype != torch.float64:
            msg = f"{detector.name} returned a {value.dtype} score for float64 images"
            raise TypeError(msg)
        (gradient,) = torch.autograd.grad(value.sum(), x)
        with torch.no_grad():
            base = objective(x)
            reproduction = (float((base - value.detach()).abs().max()), scoring_tolerance(base))
            if reproduction[0] > reproduction[1]:
                empty = torch.empty(0)
                return _Measured(empty, empty, empty, empty, True, reproduction)
            h = DIFFERENCE_STEP
            unit = torch.cat([directions, _unit(gradient)[None]])
            autograd = (gradient * unit).flatten(2).sum(dim=2)
            differences = torch.stack([(objective(x + h * v) - objective(x - h * v)) / (2 * h) for v in unit])
            random_errors = _relative_error(autograd[:-1], differences[:-1])
            gradient_errors = _relative_error(autograd[-1:], differences[-1:])
            ratios, cosines, evaluated = [], [], [value.detach(), differences, base]
            for scale in STEP_SCALES:
                step = scale * alpha * _attack_direction(gradient, norm)
                along = objective(x + step) - base
                random_steps = scale * alpha * signs
                random_predicted = (gradient * random_steps).flatten(2).sum(dim=2)
                random_actual = torch.stack([(objective(x + s) - objective(x - s)) / 2 for s in random_steps])
                ratios.append(_ratio(along, (gradient * step).flatten(1).sum(dim=1)))
                cosines.append(_cosine(random_predicted, random_actual))
                evaluated += [along, random_actual]
        finite = all(bool(torch.isfinite(tensor).all()) for tensor in evaluated)
    return _Measured(gradient_errors, random_errors, torch.stack(ratios), torch.stack(cosines), finite, reproduction)


def _finite_difference_verdict(measured: _Measured, directions: int) -> tuple[Verdict, float]:
    errors = torch.maximum(measured.gradient_errors, measured.random_errors)
    error = float(errors.max())
    above = int((errors > DIFFERENCE_TOLERANCE).sum())
    allowed = min(errors.numel(), max(2, math.ceil(KINKED_SHARE * errors.numel()))) - 1
    detail = (
        f"autograd vs central differences (float64, h={DIFFERENCE_STEP:g}) on {errors.numel()} images: max relative "
        f"error {_percent(float(measured.random_errors.max()))} over {directions} random directions, "
        f"{_percent(float(measured.gradient_errors.max()))} along the gradient's own; {above} images above the "
        f"tolerance {_percent(DIFFERENCE_TOLERANCE)} (pass with at most {allowed})"
    )
    passed = above <= allowed
    if not passed:
        detail += "; the attacked gradient is not the score's (a detached, masked or approximated branch)"
    return Verdict(passed, detail), error


def _scale_name(scale: float) -> str:
    """``0.5 -> 'alpha/2'``, ``1.0 -> 'alpha'``, ``2.0 -> '2 alpha'``."""
    if scale == 1:
        return "alpha"
    return f"alpha/{1 / scale:g}" if scale < 1 else f"{scale:g} alpha"


def _attack_step_verdict(
    medians: list[tuple[float, float]], images: int, alpha: float, steps: int
) -> Verdict:
    """From the median ratio and cosine over images at each scale of :data:`STEP_SCALES`: it passes only where every
    scale at which the score moves passes (a phase of a high-frequency term can pass one scale, never all three)."""
    per_scale = ", ".join(
        f"{_scale_name(scale)}: ratio {ratio:.3g}, cosine {cosine:.3g}"
        for scale, (ratio, cosine) in zip(STEP_SCALES, medians, strict=True)
    )
    summary = (
        f"predicted vs actual change at the attack's step alpha = {alpha:.3g} and at {len(STEP_SCALES) - 1} other "
        f"scales on {images} images, median ratio along the attack's direction (pass in "
        f"[{MIN_STEP_RATIO:g}, {MAX_STEP_RATIO:g}], no lower bound beyond alpha) and median cosine over {steps} "
        f"random sign steps (pass >= {MIN_STEP_COSINE:g}): {per_scale}"
    )
    moving = [(ratio, cosine) for ratio, cosine in medians if not (math.isnan(ratio) and math.isnan(cosine))]
    if not moving:
        return Verdict(None, f"{summary}; not evaluated, the score does not change at these steps")
    failed = [
        _scale_name(scale)
        for scale, (ratio, cosine) in zip(STEP_SCALES, medians, strict=True)
        if (scale <= 1 and ratio < MIN_STEP_RATIO) or ratio > MAX_STEP_RATIO or cosine < MIN_STEP_COSINE
    ]
    if failed:
        summary += (
            f"; fails at {', '.join(failed)}: the gradient does not predict the score's change at the attack's scale "
            "(shattered, masked or high-frequency)"
        )
    return Verdict(not failed, summary)


def check_gradient(
    detector: DetectorScore,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    alpha: float | None = None,
    norm: str = "Linf",
    num_directions: int = 4,
    num_steps: int = 8,
    seed: int = 0,
) -> GradientCheck:
    """The finite-difference and attack-step checks on ``images`` (module docstring).

    Args:
        detector: the attacked score; the check enters :meth:`DetectorScore.prepared` unless the caller has.
        images: ``(N, C, H, W)`` test images in [0, 1], normal and anomalous ones.
        labels: their anomalib labels (0 normal, 1 anomalous), which set ``y``.
        eps: the attack's radius: the checked points are its random starts.
        alpha: the attack's step size; ``None`` for PGD's default ``min(eps, 2.5 eps / 10)``.
        norm: ``"Linf"`` or ``"L2"``.
        num_directions: random unit directions of the finite-difference check per image (plus the gradient's).
        num_steps: random sign steps of the attack-step check per image.
        seed: seeds the starting points, the directions and the common random numbers of randomised detectors.

    Returns:
        The :class:`GradientCheck`; the model's state (mode, parameters, buffers, dtypes), torch's default dtype and
        the caller's RNG are as they were, and no ``.grad`` is left on anything.

    Raises:
        NotDifferentiableError: if the score has no gradient at all.
        ValueError: for invalid arguments.
    """
    if num_directions < 1 or num_steps < 1:
        msg = f"num_directions and num_steps must be >= 1, got {num_directions} and {num_steps}."
        raise ValueError(msg)
    if not eps > 0 or (alpha is not None and not alpha > 0):
        msg = f"eps and alpha must be > 0, got eps={eps} and alpha={alpha}."
        raise ValueError(msg)
    norm = check_norm(norm)
    alpha = min(eps, 2.5 * eps / 10) if alpha is None else alpha
    labels = check_labels(labels, images.shape[0]).to(images.device)
    count = images.shape[0]
    if count == 0:
        missing = Verdict(None, "no images to check gradients on")
        return GradientCheck(missing, missing, 0)
    points = attack_start_points(images.detach().double(), eps, norm, seed)
    generator = torch.Generator().manual_seed(seed)
    directions = _unit(torch.randn((num_directions, *images.shape), generator=generator, dtype=torch.float64))
    signs = torch.randint(0, 2, (num_steps, *images.shape), generator=generator, dtype=torch.float64) * 2 - 1
    if norm == "L2":
        signs = _unit(signs)
    device = images.device
    try:
        with detector.prepared(), float64(detector):
            measured = _measure(detector, points, labels, directions.to(device), signs.to(device), alpha, norm, seed)
    except NotDifferentiableError:
        raise
    except (RuntimeError, TypeError, NotImplementedError) as error:
        skipped = Verdict(None, f"not evaluated: {detector.name} failed in float64 ({type(error).__name__}: {error})")
        return GradientCheck(skipped, skipped, count)
    if not measured.reproduced:
        difference, tolerance = measured.reproduction
        skipped = Verdict(
            None,
            f"not evaluated: reseeding torch's global RNG does not reproduce {detector.name}'s score (two evaluations "
            f"at the same point and seed differ by up to {difference:.3g}, tolerance {tolerance:.3g}); it draws its "
            "noise elsewhere (its own torch.Generator?), so differences would compare different draws",
        )
        return GradientCheck(skipped, skipped, count)
    if not measured.finite:
        skipped = Verdict(None, "not evaluated: the score is not finite at the checked points")
        return GradientCheck(skipped, skipped, count)
    difference, error = _finite_difference_verdict(measured, num_directions)
    medians = [_finite_median(ratio) for ratio in measured.ratios], [_finite_median(c) for c in measured.cosines]
    step = _attack_step_verdict(list(zip(*medians, strict=True)), count, alpha, num_steps)
    at_alpha = STEP_SCALES.index(1.0)
    return GradientCheck(difference, step, count, error, medians[0][at_alpha], medians[1][at_alpha],
                         tuple(medians[0]), tuple(medians[1]))  # fmt: skip
