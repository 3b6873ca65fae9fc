"""PatchGuard loss: patch-wise BCE plus an attention regulariser that raises the attention degree (PatchGuard paper).

``L = (1/B) sum_b sum_j BCE(s_bj, y_bj) + sum_l c_l R_l`` over the regularised blocks ``l`` (official code: blocks
6/9/12 of 12 with ``c = (0.005, 0.01, 0.05)``). Two regularisers ``R_l`` of an attention map ``A`` (``(B, heads, N, N)``,
patch tokens only):

- ``"kl_uniform"`` (default, the official code's active regulariser): ``KL(U || A)`` averaged over rows, i.e. the
  mean over ``(b, h, i, j)`` of ``(1/N) (log(1/N) - log(A_bhij + 1e-8))``. A log barrier that pushes every weight
  towards uniform attention, which raises the attention degree.
- ``"degree"`` (the paper's definition, sec. C.2): the attention degree of a query token is the number of keys it
  attends to with weight above ``delta`` (``1/255`` for 256 tokens, i.e. ``1/(N-1)``). The count is not
  differentiable, so the loss is ``1 - mean soft degree / N`` with the count's indicator replaced by
  ``sigmoid((A / delta - 1) / temperature)``; minimising it raises the degree.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

OFFICIAL_ATTENTION_WEIGHTS = (0.005, 0.01, 0.05)
REGULARIZERS = ("kl_uniform", "degree")


def patch_bce(patch_logits: torch.Tensor, patch_labels: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_b sum_j BCEWithLogits(s_bj, y_bj)`` (per-image sum over patches, mean over images)."""
    if patch_logits.shape != patch_labels.shape:
        msg = f"patch_labels must have the shape of patch_logits {tuple(patch_logits.shape)}, got {tuple(patch_labels.shape)}"
        raise ValueError(msg)
    losses = F.binary_cross_entropy_with_logits(patch_logits, patch_labels.to(patch_logits.dtype), reduction="none")
    return losses.sum(dim=1).mean()


def kl_uniform_regularizer(attention: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-averaged ``KL(U || A)`` of the official code: mean of ``(1/N)(log(1/N) - log(A + eps))``."""
    num_keys = attention.shape[-1]
    return ((math.log(1.0 / num_keys) - torch.log(attention + eps)) / num_keys).mean()


def soft_attention_degree(attention: torch.Tensor, delta: float, temperature: float) -> torch.Tensor:
    """Differentiable attention degree per query: ``sum_j sigmoid((A_ij / delta - 1) / temperature)``."""
    return torch.sigmoid((attention / delta - 1.0) / temperature).sum(dim=-1)


def attention_degree(attention: torch.Tensor, delta: float | None = None) -> torch.Tensor:
    """Hard attention degree per query (sec. C.2): number of keys with weight above ``delta`` (``1/(N-1)`` default)."""
    delta = 1.0 / (attention.shape[-1] - 1) if delta is None else delta
    return (attention > delta).sum(dim=-1)


def degree_regularizer(attention: torch.Tensor, delta: float | None = None, temperature: float = 0.1) -> torch.Tensor:
    """``1 - mean soft degree / N``: in [0, 1], minimised when every query attends to every key above ``delta``."""
    num_keys = attention.shape[-1]
    delta = 1.0 / (num_keys - 1) if delta is None else delta
    return 1.0 - soft_attention_degree(attention, delta, temperature).mean() / num_keys


def attention_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the attention rows (a diagnostic: the regularisers raise it)."""
    return -(attention * torch.log(attention.clamp_min(1e-12))).sum(dim=-1).mean()


class PatchGuardLoss(nn.Module):
    """Patch BCE + weighted attention regulariser (see the module docstring).

    Args:
        attention_weights (Sequence[float]): ``c_l`` per captured attention map, in order; the official
            ``(0.005, 0.01, 0.05)`` by default.
        regularizer (str): ``"kl_uniform"`` (official code, default) or ``"degree"`` (paper's delta threshold).
        degree_delta (float | None): ``delta`` of ``"degree"``; ``None`` gives ``1/(N-1)`` (the paper's 1/255 for
            N = 256).
        degree_temperature (float): Relative temperature of the soft threshold of ``"degree"``.
    """

    def __init__(
        self,
        attention_weights: Sequence[float] = OFFICIAL_ATTENTION_WEIGHTS,
        regularizer: str = "kl_uniform",
        degree_delta: float | None = None,
        degree_temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if regularizer not in REGULARIZERS:
            msg = f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}"
            raise ValueError(msg)
        if any(weight < 0 for weight in attention_weights):
            msg = f"attention_weights must be non-negative, got {tuple(attention_weights)}"
            raise ValueError(msg)
        if degree_delta is not None and not 0 < degree_delta < 1:
            msg = f"degree_delta must be in (0, 1), got {degree_delta}"
            raise ValueError(msg)
        if degree_temperature <= 0:
            msg = f"degree_temperature must be positive, got {degree_temperature}"
            raise ValueError(msg)
        self.attention_weights = tuple(float(weight) for weight in attention_weights)
        self.regularizer = regularizer
        self.degree_delta = degree_delta
        self.degree_temperature = degree_temperature

    def regularization(self, attentions: Sequence[torch.Tensor]) -> torch.Tensor:
        """``sum_l c_l R_l`` over the captured attention maps."""
        if len(attentions) != len(self.attention_weights):
            msg = f"expected {len(self.attention_weights)} attention maps (one per weight), got {len(attentions)}"
            raise ValueError(msg)
        terms = [
            weight
            * (
                kl_uniform_regularizer(attention)
                if self.regularizer == "kl_uniform"
                else degree_regularizer(attention, self.degree_delta, self.degree_temperature)
            )
            for weight, attention in zip(self.attention_weights, attentions, strict=True)
        ]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def forward(
        self,
        patch_logits: torch.Tensor,
        patch_labels: torch.Tensor,
        attentions: Sequence[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "bce", "regularization"}`` for one batch."""
        bce = patch_bce(patch_logits, patch_labels)
        regularization = self.regularization(attentions).to(bce)
        return {"loss": bce + regularization, "bce": bce, "regularization": regularization}
