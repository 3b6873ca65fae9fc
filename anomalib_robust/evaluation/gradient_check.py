"""Directional finite-difference check of the attacked gradient: does autograd see the score the detector computes?

A white-box attack follows ``grad_x y * A(x)`` as :class:`~anomalib_robust.attacks.detector.DetectorScore` computes
it. Gradient masking (Athalye, Carlini & Wagner, 2018, "Obfuscated Gradients Give a False Sense of Security") makes
that gradient wrong while the score is unchanged: a branch of the score that is ``.detach()``-ed or wrapped in a
custom autograd ``Function`` with a zero backward still leaves ``scores.requires_grad`` true, so
:class:`~anomalib_robust.attacks.detector.NotDifferentiableError` cannot see it, and the attack silently optimises
another function. Carlini et al. (2019, "On Evaluating Adversarial Robustness") recommend verifying that the
gradients an evaluation uses are correct, as one of the checks for gradient masking. :func:`check_gradient` does it
with finite differences, which evaluate the score itself and so cannot be fooled by what autograd records: for a few
images ``x`` and random unit directions ``v`` (L_2-normalised per image),

    <grad_x y * A(x), v>   vs.   (y * A(x + h v) - y * A(x - h v)) / (2 h),

and reports the largest relative error ``|ad - fd| / max(|ad|, |fd|, floor)``.

Choices:

- **Precision.** The check runs in float64 where the model allows: parameters and buffers are cast for the duration
  of the check and the original tensors are put back afterwards (bit-exact). The central difference then has a
  truncation error O(h^2) and a round-off error O(1e-16 |A| / h), both negligible at the default ``h = 1e-3``. If
  the model cannot run in float64 (a dtype error, a device without float64) or returns a score in another dtype, it
  runs in the images' dtype with ``h = max(step, 1e-2)``: float32 round-off (~1e-7 |A| per evaluation, more after a
  deep network) divided by ``2 h`` stays near 1e-5 |A| at that step, and the O(h^2) truncation error of a smooth
  score is still small, which is the usual ``eps^(1/3)`` balance for central differences (on the tiny AdvRAD of the
  unit tests, float32 gives a 0.2% error at ``h = 1e-2`` but 7% at ``h = 1e-3``).
- **Box constraint.** The images are clamped to ``[h, 1 - h]`` first. ``||v||_2 = 1`` bounds every pixel of ``h v``
  by ``h``, so ``x +- h v`` stays in [0, 1] and the difference stays central; only pixels within ``h`` of 0 or 1
  move, by at most ``h``.
- **Randomised detectors** (``detector.stochastic``, e.g. AdvRAD's fresh diffusion noise) use common random numbers:
  torch's global RNG is reseeded with ``seed`` before each of the single-draw evaluations (the gradient and the two
  sides of every difference), inside :func:`torch.random.fork_rng` so that the caller's RNG state is untouched. One
  draw, not EOT: the check compares the gradient and the differences of the same function ``A(.; w)``. Deterministic
  detectors are reseeded too, which changes nothing for them.
- **Zero derivatives.** The relative error has an absolute floor (:data:`DERIVATIVE_FLOOR`) so that a derivative that
  is genuinely zero on both sides does not divide by zero.

The check runs through the attack's own path: one draw of :meth:`DetectorScore.differentiable_objective` (anomalib's
``no_grad`` / ``detach`` lifted, BPDA stages installed; the map objective inside :meth:`DetectorScore.map_target`)
for the gradient and the same objective without gradients for the differences, inside
:meth:`DetectorScore.prepared` (entered here if the caller has not). A detector attacked through BPDA fails it by
design: the surrogate's gradient is not the gradient of the true stage, and the report should say so. A
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
    >>> check = check_gradient(DetectorScore(holder), torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))
    >>> check.passed, check.num_samples, check.num_directions
    (True, 2, 2)
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from anomalib_robust.attacks.detector import DetectorScore, NotDifferentiableError
from anomalib_robust.attacks.objective import check_labels

FLOAT32_STEP = 1e-2
"""Smallest finite-difference step used when the check cannot run in float64."""

DERIVATIVE_FLOOR = 1e-8
"""Absolute floor of the relative error's denominator: a derivative below it on both sides counts as zero."""


@dataclass(frozen=True)
class GradientCheck:
    """Outcome of :func:`check_gradient`.

    Attributes:
        passed: ``max_relative_error <= tolerance``; ``None`` if the check could not be evaluated (no images, or a
            non-finite score).
        num_samples: images checked.
        num_directions: random directions per image.
        max_relative_error: largest ``|ad - fd| / max(|ad|, |fd|, floor)`` over images and directions.
        step: finite-difference step ``h`` that was used (larger than asked for when the check ran in float32).
        tolerance: largest relative error that passes.
        detail: one-line summary for a report.
    """

    passed: bool | None
    num_samples: int
    num_directions: int
    max_relative_error: float
    step: float
    tolerance: float
    detail: str


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
def _common_random_numbers(device: torch.device) -> Iterator[None]:
    """Fork torch's RNG (CPU and ``device``) so that reseeding inside leaves the caller's state untouched."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            yield
    else:
        with torch.random.fork_rng(devices=[device.index or 0], device_type=device.type):
            yield


def _derivatives(
    detector: DetectorScore,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_directions: int,
    step: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """Autograd and central-difference directional derivatives ``(num_directions, N)`` and whether the objective is
    finite; ``None`` if the detector returned a score in another dtype than the images (it computes in that dtype)."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn((num_directions, *images.shape), generator=generator, dtype=torch.float64)
    directions = directions / directions.flatten(2).norm(dim=2)[..., None, None, None]
    directions = directions.to(images)
    with _common_random_numbers(images.device):
        torch.manual_seed(seed)
        x = images.clone().requires_grad_(True)
        objective = detector.differentiable_objective(x, labels)
        if objective.dtype != images.dtype:
            return None
        (gradient,) = torch.autograd.grad(objective.sum(), x)
        finite = bool(torch.isfinite(objective).all())
        autograd, differences = [], []
        with torch.no_grad():
            for direction in directions:
                sides = []
                for sign in (1, -1):
                    torch.manual_seed(seed)
                    sides.append(detector.draw_objective(images + sign * step * direction, labels))
                finite = finite and all(bool(torch.isfinite(side).all()) for side in sides)
                differences.append((sides[0] - sides[1]) / (2 * step))
                autograd.append((gradient * direction).flatten(1).sum(dim=1))
    return torch.stack(autograd).double(), torch.stack(differences).double(), finite


def check_gradient(
    detector: DetectorScore,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_samples: int = 4,
    num_directions: int = 2,
    step: float = 1e-3,
    tolerance: float = 0.1,
    seed: int = 0,
) -> GradientCheck:
    """Compare autograd's directional derivatives of ``y * A(x)`` with central finite differences (module docstring).

    Args:
        detector: the attacked score; the check enters :meth:`DetectorScore.prepared` unless the caller has.
        images: ``(N, C, H, W)`` images in [0, 1]; the first ``num_samples`` are checked.
        labels: their anomalib labels (0 normal, 1 anomalous), which set ``y``.
        num_samples: images checked (at most ``N``).
        num_directions: random unit directions per image.
        step: finite-difference step ``h`` in float64 (at least :data:`FLOAT32_STEP` in float32).
        tolerance: largest relative error that passes.
        seed: seeds the directions and the common random numbers of randomised detectors.

    Returns:
        The :class:`GradientCheck`; the model's state (mode, parameters, buffers, dtypes) and the caller's RNG are as
        they were, and no ``.grad`` is left on anything.

    Raises:
        NotDifferentiableError: if the score has no gradient at all.
        ValueError: for invalid arguments.
    """
    if num_samples < 1 or num_directions < 1:
        msg = f"num_samples and num_directions must be >= 1, got {num_samples} and {num_directions}."
        raise ValueError(msg)
    if not 0 < step < 0.5 or not tolerance > 0:
        msg = f"step must be in (0, 0.5) and tolerance > 0, got step={step} and tolerance={tolerance}."
        raise ValueError(msg)
    labels = check_labels(labels, images.shape[0])[:num_samples].to(images.device)
    images = images[:num_samples].detach()
    count = images.shape[0]
    if count == 0:
        return GradientCheck(None, 0, num_directions, float("nan"), step, tolerance, "no images to check gradients on")
    fallback = images if images.is_floating_point() else images.float()
    with detector.prepared():
        result, used_step, precision = None, step, "float64"
        try:
            with _cast_floating(detector, torch.float64):
                result = _derivatives(
                    detector, images.double().clamp(step, 1 - step), labels, num_directions, step, seed
                )
        except NotDifferentiableError:
            raise
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            result = None  # the model does not run in float64: check in the images' dtype below
        if result is None:
            precision = str(fallback.dtype).removeprefix("torch.")
            used_step = step if fallback.dtype == torch.float64 else max(step, FLOAT32_STEP)
            clamped = fallback.clamp(used_step, 1 - used_step)
            result = _derivatives(detector, clamped, labels, num_directions, used_step, seed)
            if result is None:
                msg = f"{detector.name} returned a score in another dtype than its {precision} input."
                raise TypeError(msg)
    autograd, differences, finite = result
    floor = torch.tensor(DERIVATIVE_FLOOR, dtype=torch.float64)
    errors = (autograd - differences).abs() / torch.maximum(torch.maximum(autograd.abs(), differences.abs()), floor)
    max_error = float(errors.max())
    summary = (
        f"autograd vs finite differences on {count} images x {num_directions} directions ({precision}, h={used_step:g})"
    )
    if not finite:
        detail = f"{summary}: not evaluated, the score is not finite"
        return GradientCheck(None, count, num_directions, max_error, used_step, tolerance, detail)
    passed = bool(max_error <= tolerance)
    detail = f"{summary}: max relative error {_percent(max_error)} (tolerance {_percent(tolerance)})"
    if not passed:
        detail += "; the attacked gradient is not the score's (masked or approximated branch)"
    return GradientCheck(passed, count, num_directions, max_error, used_step, tolerance, detail)
