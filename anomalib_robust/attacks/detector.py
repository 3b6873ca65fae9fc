"""Detector adapter: the raw anomaly score of any anomalib model as a differentiable function of [0, 1] images.

Every attack targets ``A(x) = model.model(model.pre_processor(x)).pred_score`` (DESIGN.md: the raw score, never the
post-processed one, whose normalisation and clamping would mask gradients). :class:`DetectorScore` wraps an
``AnomalibModule`` (or any module with ``.model`` and an optional ``.pre_processor``) and provides

- ``detector(x)``: the score, averaged over ``eot_samples`` draws for randomised detectors (EOT, seed 000 sec. 5.6),
  differentiable when gradients are enabled;
- :meth:`DetectorScore.objective_and_gradient`: ``y * A(x)`` (seed 000, sec. 3) and its EOT gradient;
- :meth:`DetectorScore.predict`: scores and anomaly maps for evaluation, with the same randomness budget.

Gradient unmasking: anomalib wraps feature extraction in ``torch.no_grad()`` (Padim, Patchcore, Cfa, the timm feature
extractor), detaches some inference outputs (Cfa's anomaly map) and freezes backbones with ``requires_grad=False``.
None of this changes the score's value, only whether autograd sees it. Without editing anomalib,
:func:`unmasked_gradients` turns ``torch.no_grad`` and ``Tensor.detach`` called from anomalib's own code into no-ops
while the score is differentiated, and :meth:`DetectorScore.prepared` puts the
model in eval mode, freezes parameters (only the input needs a gradient), replaces buffers created under
``torch.inference_mode`` by ordinary copies, and installs BPDA stages; all of it is undone on exit. A score that is
still not differentiable raises :class:`NotDifferentiableError` naming the model.

Example:
    >>> import torch
    >>> from anomalib.models import Padim
    >>> from anomalib_robust.attacks import DetectorScore
    >>> detector = DetectorScore(Padim(pre_trained=False))
    >>> detector.name, detector.stochastic, detector.eot_samples
    ('Padim', False, 1)
"""

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from anomalib_robust.attacks.bpda import bpda_stages, check_stages
from anomalib_robust.attacks.eot import expected_value, expected_value_and_gradient, resolve_eot_samples
from anomalib_robust.attacks.objective import attack_objective


class NotDifferentiableError(RuntimeError):
    """The anomaly score of a detector has no gradient w.r.t. its input image."""


class _GradientPassthrough:
    """Stands in for ``torch.no_grad`` while gradients are unmasked: a context manager that changes nothing."""

    def __init__(self, *args: object) -> None:
        del args

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


_DETACH = torch.Tensor.detach
UNMASKED_PACKAGES = ("anomalib.",)
"""Modules whose ``Tensor.detach()`` calls are lifted by :func:`unmasked_gradients`."""


def _detach_outside_anomalib(tensor: torch.Tensor) -> torch.Tensor:
    """``Tensor.detach`` for every caller except anomalib's modules, which get a graph-keeping view instead."""
    if sys._getframe(1).f_globals.get("__name__", "").startswith(UNMASKED_PACKAGES):
        return tensor.view_as(tensor)
    return _DETACH(tensor)


@contextmanager
def unmasked_gradients() -> Iterator[None]:
    """Record gradients through anomalib's ``torch.no_grad()`` blocks and ``.detach()`` calls inside the context.

    ``with torch.no_grad():`` looks the name up when it runs, so replacing ``torch.no_grad`` (and its alias
    ``torch.autograd.no_grad``) by a no-op makes anomalib's feature extraction differentiable without editing it;
    ``Tensor.detach`` called from a module of :data:`UNMASKED_PACKAGES` returns a view that keeps the graph. Values are
    unchanged; only autograd sees more. Both replacements are process-wide while the context is active, and restored
    on exit; keep the context around a single forward pass. Decorators applied at import time
    (``@torch.no_grad()``) are not affected; use BPDA for such stages.
    """
    originals = torch.no_grad, torch.autograd.no_grad
    torch.no_grad = torch.autograd.no_grad = _GradientPassthrough
    torch.Tensor.detach = _detach_outside_anomalib
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        torch.no_grad, torch.autograd.no_grad = originals
        torch.Tensor.detach = _DETACH


class DetectorScore(nn.Module):
    """Raw anomaly score ``A(x)`` of an anomalib detector on [0, 1] images.

    Args:
        model: an ``AnomalibModule`` (anything with a ``.model`` whose eval forward returns an object with
            ``pred_score``, and an optional ``.pre_processor``).
        eot_samples: draws per score for randomised detectors (``model.model.stochastic = True``); ``None`` picks
            1 for deterministic and 8 for randomised detectors.
        bpda: non-differentiable stages to differentiate through a surrogate, as ``{path: surrogate}`` with paths
            relative to ``model`` and ``None`` for the identity (see :mod:`anomalib_robust.attacks.bpda`).
    """

    def __init__(
        self,
        model: nn.Module,
        eot_samples: int | None = None,
        bpda: Mapping[str, Callable | None] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(getattr(model, "model", None), nn.Module):
            msg = (
                "model must be an anomalib AnomalibModule (with a torch model in `.model`), "
                f"got {type(model).__name__} without a `.model` module."
            )
            raise TypeError(msg)
        self.detector = model
        self.stochastic = bool(getattr(model.model, "stochastic", False))
        self.eot_samples = resolve_eot_samples(eot_samples, self.stochastic)
        self.bpda = check_stages(model, bpda or {})
        self._is_prepared = False

    @property
    def name(self) -> str:
        """Name of the wrapped detector (an ``AnomalibModule``'s ``name``, else its class name), for reports."""
        name = getattr(self.detector, "name", None)
        return name if isinstance(name, str) else type(self.detector).__name__

    @property
    def threshold(self) -> float | None:
        """The detector's image threshold on the raw score (anomalib's post-processor), or ``None`` if not set."""
        threshold = getattr(getattr(self.detector, "post_processor", None), "image_threshold", None)
        if threshold is None or not torch.isfinite(torch.as_tensor(threshold)):
            return None
        return float(threshold)

    def single_draw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Score ``(N,)`` and anomaly map ``(N, H, W)`` (or ``None``) of one forward pass, one draw of randomness."""
        pre_processor = getattr(self.detector, "pre_processor", None)
        output = self.detector.model(pre_processor(images) if isinstance(pre_processor, nn.Module) else images)
        pred_score = getattr(output, "pred_score", None)
        if not isinstance(pred_score, torch.Tensor):
            msg = (
                f"{self.name}: the torch model's eval forward must return an anomalib InferenceBatch with a "
                f"`pred_score` tensor, got {type(output).__name__} without it."
            )
            raise TypeError(msg)
        anomaly_map = getattr(output, "anomaly_map", None)
        if isinstance(anomaly_map, torch.Tensor):
            anomaly_map = anomaly_map.reshape(images.shape[0], *anomaly_map.shape[-2:])
        else:
            anomaly_map = None
        return pred_score.reshape(images.shape[0], -1)[:, 0], anomaly_map

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        return self.single_draw(images)[0]

    def _differentiable_score(self, images: torch.Tensor) -> torch.Tensor:
        with unmasked_gradients():
            scores = self._score(images)
        if not scores.requires_grad:
            msg = (
                f"The anomaly score of {self.name} is not differentiable w.r.t. the input image, even with "
                "anomalib's torch.no_grad() blocks and detach() calls lifted. Attack it with BPDA (bpda="
                "{'<submodule path>': None} for the non-differentiable stage) or with the black-box Square attack."
            )
            raise NotDifferentiableError(msg)
        return scores

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Score ``(N,)`` averaged over ``eot_samples`` draws; differentiable when ``images`` requires a gradient."""
        if not (torch.is_grad_enabled() and images.requires_grad):
            return expected_value(self._score, images, self.eot_samples)
        return torch.stack([self._differentiable_score(images) for _ in range(self.eot_samples)]).mean(dim=0)

    def objective_and_gradient(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """EOT estimate of ``y * A(x)`` per sample and of its gradient w.r.t. ``images`` (seed 000, eq. 1-2)."""
        return expected_value_and_gradient(
            lambda x: attack_objective(self._differentiable_score(x), labels),
            images,
            self.eot_samples,
        )

    def objective(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """EOT estimate of ``y * A(x)`` per sample, without gradients."""
        return attack_objective(expected_value(self._score, images, self.eot_samples), labels)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores and anomaly maps averaged over ``eot_samples`` draws (the budget the attack used)."""
        draws = [self.single_draw(images) for _ in range(self.eot_samples)]
        scores = torch.stack([score for score, _ in draws]).mean(dim=0)
        if draws[0][1] is None:
            return scores, None
        return scores, torch.stack([anomaly_map for _, anomaly_map in draws]).mean(dim=0)

    @contextmanager
    def prepared(self) -> Iterator["DetectorScore"]:
        """Put the detector in attack state (eval mode, frozen parameters, BPDA stages), then restore it exactly.

        Re-entrant: a nested call (an ensemble running its members) finds the state prepared and changes nothing.
        """
        if self._is_prepared:
            yield self
            return
        model = self.detector
        modes = {module: module.training for module in model.modules()}
        flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
        inference_buffers = [
            (module, name, buffer)
            for module in model.modules()
            for name, buffer in module.named_buffers(recurse=False)
            if buffer.is_inference()
        ]
        try:
            model.eval()
            for parameter in flags:
                parameter.requires_grad_(False)
            with torch.inference_mode(False):
                for module, name, buffer in inference_buffers:
                    setattr(module, name, buffer.clone())
            with bpda_stages(model, self.bpda):
                self._is_prepared = True
                yield self
        finally:
            self._is_prepared = False
            for module, name, buffer in inference_buffers:
                setattr(module, name, buffer)
            for parameter, flag in flags.items():
                parameter.requires_grad_(flag)
            for module, training in modes.items():
                module.training = training
