"""Planted gradient masking: known-masked versions of any anomalib detector, to show that a sanity check can fail.

A sanity check earns its place by failing on a masked detector and passing on healthy ones (Carlini et al., 2019,
"On Evaluating Adversarial Robustness", sec. 5). Each function here wraps the torch model of an anomalib detector
(``model.model``) in place, keeping its score's value and changing only what a gradient attack sees, in the ways
Athalye, Carlini & Wagner (ICML 2018, "Obfuscated Gradients Give a False Sense of Security", sec. 4) list:

- ``"quantised"``: the model's input rounded to ``levels`` grey levels first, a non-differentiable pre-processing step
  (shattered gradients: zero almost everywhere). Seen by the attack-step check and the very-large-eps check.
- ``"straight_through"``: the same rounding with a straight-through estimator, ``x + (round(x) - x).detach()``
  (van den Oord et al., 2017, "Neural Discrete Representation Learning"): the gradient of the identity, not of the
  score. Seen by the finite-difference check.
- ``"detached"``: ``detached_share`` of the score is ``.detach()``-ed, so autograd sees a scaled-down gradient.
  Seen by the finite-difference check.

The wrappers live in this package, whose ``.detach()`` calls :func:`~anomalib_robust.attacks.unmasked_gradients`
leaves alone (it lifts anomalib's own).

Example:
    >>> from anomalib.models import Padim
    >>> model = plant_masking(Padim(pre_trained=False), "quantised")
    >>> type(model.model).__name__
    'QuantisedInput'
"""

import torch
from anomalib.data import InferenceBatch
from torch import nn

MASKINGS = ("quantised", "straight_through", "detached")
"""The kinds of :func:`plant_masking`."""


class _Wrapped(nn.Module):
    """A torch model that calls ``inner``; it is randomised exactly when ``inner`` is."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @property
    def stochastic(self) -> bool:
        """``inner.stochastic`` (AdvRAD's fresh diffusion noise), ``False`` for deterministic models."""
        return bool(getattr(self.inner, "stochastic", False))


class QuantisedInput(_Wrapped):
    """``inner(round(x * levels) / levels)``; with ``straight_through`` the rounding has the identity's gradient."""

    def __init__(self, inner: nn.Module, levels: int = 64, straight_through: bool = False) -> None:
        super().__init__(inner)
        self.levels = levels
        self.straight_through = straight_through

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        quantised = torch.round(images * self.levels) / self.levels
        if self.straight_through:
            quantised = images + (quantised - images).detach()
        return self.inner(quantised)


class PartlyDetachedScore(_Wrapped):
    """``inner``'s score with ``detached_share`` of it detached: the same value, a gradient scaled by
    ``1 - detached_share``."""

    def __init__(self, inner: nn.Module, detached_share: float = 0.9) -> None:
        super().__init__(inner)
        self.detached_share = detached_share

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        output = self.inner(images)
        score = output.pred_score
        if score is None or not isinstance(output, InferenceBatch):
            return output
        kept = (1 - self.detached_share) * score + self.detached_share * score.detach()
        return output._replace(pred_score=kept)


def plant_masking(model: nn.Module, kind: str, levels: int = 64, detached_share: float = 0.9) -> nn.Module:
    """``model`` with its torch model wrapped by the masking ``kind`` (one of :data:`MASKINGS`), in place.

    Raises:
        ValueError: for an unknown ``kind``.
    """
    if kind not in MASKINGS:
        msg = f"kind must be one of {MASKINGS}, got {kind!r}."
        raise ValueError(msg)
    if kind == "detached":
        model.model = PartlyDetachedScore(model.model, detached_share)
    else:
        model.model = QuantisedInput(model.model, levels, straight_through=kind == "straight_through")
    return model
