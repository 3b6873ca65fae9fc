"""Square Attack (Andriushchenko et al., 2020): score-based random search on ``y * A(x)``, L_inf and L_2.

Square needs only scores, no gradients, so it is the sanity check against gradient masking (Carlini et al., 2019):
if it beats white-box PGD, the gradients PGD followed were not informative. It is the random search of
Andriushchenko et al., 2020, Square Attack, Alg. 1, run directly on the objective of the AdvRAD paper, sec. 3,
``L(x, y) = y * A(x)`` (an EOT mean for randomised detectors, :meth:`DetectorScore.objective`):

    x_best <- init(x);  L_best <- L(x_best, y)
    for i = 1 .. n_queries - 1:
        h_i   <- side of the square for the fraction p_i of pixels (schedule below)
        x_new <- P_{x,eps}(x_best + delta),  delta ~ P(eps, h_i, x_best, x)
        if L(x_new, y) > L_best:  x_best, L_best <- x_new, L(x_new, y)

There is no early stop: AUROC depends on the ordering of all scores, not on crossing a threshold, so every sample is
improved for all ``n_queries`` queries (the classification attack stops a sample once it is misclassified).

- L_inf (Alg. 2): the start is ``x`` plus vertical stripes of width 1, each column of each channel ``+eps`` or
  ``-eps`` at random; an update sets one random ``h x h`` window of each channel to ``x +- eps`` (sign per channel),
  redrawn when it would change no pixel.
- L_2 (Alg. 3): the start is a grid of squares (5 x 5 on images of side >= 10), each holding the centre-peaked pattern
  ``eta`` with a random sign per channel, scaled to norm ``eps``; an update draws two windows ``W1``, ``W2``, moves the
  perturbation mass of ``W1 u W2`` (plus the unused budget ``eps^2 - ||x_best - x||^2``) into ``W1`` as the old ``W1``
  content plus a fresh ``+-eta`` per channel, and sets ``W2`` to zero, so the perturbation keeps norm ``eps``.
  ``eta`` is two ``h/2 x h`` halves of opposite sign, each a sum of concentric squares weighted ``1 / (k + 1)^2``
  (ring ``k`` from the centre), randomly transposed.
- p schedule (``p_selection``): ``p = p_init`` for the first 10 of 10 000 queries, halved at queries 10, 50, 200,
  500, 1000, 2000, 4000, 6000 and 8000, the query index rescaled to a budget of ``n_queries``; the side is
  ``h = round(sqrt(p * H * W))``, at least 1 (L_inf) or 2 (L_2) and at most ``min(H, W) - 1``.

Each restart is an independent random search; per sample, the worst case over the clean image and the restarts is
returned (:meth:`Attack.worst_case`, one more query each), so the result is never worse than the clean image for a
deterministic detector. On a randomised detector accepting a candidate on a noisy score favours lucky draws; use
more ``eot_samples`` or a gradient attack there (AutoAttack leaves Square out).

Example:
    >>> from anomalib_robust.attacks import Square
    >>> adversarial = Square(model, eps=2 / 255, n_queries=500)(batch.image, batch.gt_label)  # doctest: +SKIP
"""

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from anomalib_robust.attacks.base import Attack, check_count, check_positive, keep_worst_case
from anomalib_robust.attacks.pgd import project

P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
"""Queries (of a 10 000-query budget) after which ``p`` is halved (Square Attack's ``p_selection``)."""
MAX_REDRAWS = 10
"""Redraws of an L_inf update's signs when it would leave every pixel of its window unchanged."""


def p_selection(p_init: float, query: int, n_queries: int) -> float:
    """Fraction of pixels ``p`` changed at update ``query`` (0-based) of ``n_queries`` (Square Attack schedule)."""
    rescaled = int(query / n_queries * 10000)
    halvings = sum(rescaled > bound for bound in P_HALVINGS)
    return p_init / 2**halvings


def square_side(p: float, height: int, width: int, minimum: int = 1) -> int:
    """Side ``h = round(sqrt(p * H * W))`` of the square, within ``[minimum, min(H, W) - 1]`` (the whole side for
    images too small for that)."""
    largest = max(min(height, width) - 1, minimum)
    return min(max(round(math.sqrt(p * height * width)), minimum), largest, min(height, width))


def ring_pattern(rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    """Centre-peaked ``rows x cols`` pattern: concentric squares around the centre, ring ``k`` weighted
    ``1 / (k + 1)^2``, so a pixel at Chebyshev distance ``d`` holds ``sum_{k >= d} 1 / (k + 1)^2``; unit L_2 norm."""
    centre_r, centre_c = rows // 2, cols // 2
    rings = max(centre_r, centre_c) + 1
    weights = 1.0 / torch.arange(1, rings + 1, device=device, dtype=torch.float32) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = sum_{k >= d} weights[k]
    r = (torch.arange(rows, device=device) - centre_r).abs()
    c = (torch.arange(cols, device=device) - centre_c).abs()
    pattern = tail[torch.maximum(r[:, None], c[None, :])]
    return pattern / pattern.norm()


def square_pattern(side: int, transpose: bool, device: torch.device | None = None) -> torch.Tensor:
    """The L_2 update pattern ``eta`` on a ``side x side`` square: a ring pattern on the top half and its negative on
    the bottom half (left / right when ``transpose``), unit L_2 norm; a single pixel for ``side == 1``."""
    if side == 1:
        return torch.ones(1, 1, device=device)
    top = ring_pattern(side // 2, side, device)
    bottom = -ring_pattern(side - side // 2, side, device)
    pattern = torch.cat([top, bottom], dim=0)
    pattern = pattern / pattern.norm()
    return pattern.T if transpose else pattern


def _random_windows(images: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-left corners (rows, cols) of one random ``side x side`` window per sample and its mask ``(N, 1, H, W)``."""
    n, _, height, width = images.shape
    rows = torch.randint(0, height - side + 1, (n,), device=images.device)
    cols = torch.randint(0, width - side + 1, (n,), device=images.device)
    row_offset = torch.arange(height, device=images.device) - rows[:, None]
    col_offset = torch.arange(width, device=images.device) - cols[:, None]
    row_in, col_in = (row_offset >= 0) & (row_offset < side), (col_offset >= 0) & (col_offset < side)
    mask = row_in[:, :, None] & col_in[:, None, :]
    return rows, cols, mask[:, None]


def _random_signs(images: torch.Tensor) -> torch.Tensor:
    """``+-1`` per sample and channel, shaped ``(N, C, 1, 1)``."""
    n, channels = images.shape[:2]
    return torch.randint(0, 2, (n, channels, 1, 1), device=images.device).to(images.dtype) * 2 - 1


def _channel_norm(x: torch.Tensor) -> torch.Tensor:
    """L_2 norm per sample and channel, shaped ``(N, C, 1, 1)``."""
    return x.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()


class Square(Attack):
    """Score-based Square Attack on ``y * A(x)``, L_inf or L_2, without early stop.

    Args:
        model: the anomalib detector (or a :class:`~anomalib_robust.attacks.DetectorScore`).
        eps: radius of the ball.
        n_queries: score queries per sample and restart (the start counts as one).
        norm: ``"Linf"`` or ``"L2"``.
        restarts: independent runs; the worst case per sample is kept.
        p_init: initial fraction of pixels changed per query, in (0, 1] (halved along the schedule).
        eot_samples, bpda, seed: see :class:`~anomalib_robust.attacks.base.Attack`.
    """

    name = "Square"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 2 / 255,
        n_queries: int = 1000,
        norm: str = "Linf",
        restarts: int = 1,
        p_init: float = 0.8,
        eot_samples: int | None = None,
        bpda: Mapping[str, Callable | None] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm, eot_samples=eot_samples, bpda=bpda, seed=seed)
        self.n_queries = check_count("n_queries", n_queries)
        self.restarts = check_count("restarts", restarts)
        self.p_init = check_positive("p_init", p_init)
        if self.p_init > 1:
            msg = f"p_init must be a fraction of pixels in (0, 1], got {p_init!r}."
            raise ValueError(msg)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Best point of each random search; worst case per sample over the clean image and the restarts."""
        if min(images.shape[-2:]) < 2:
            msg = f"Square needs images of at least 2 x 2 pixels, got {tuple(images.shape[-2:])}."
            raise ValueError(msg)
        return self.worst_case(images, labels, (self.random_search(images, labels) for _ in range(self.restarts)))

    def random_search(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One run of Alg. 1: ``n_queries`` queries per sample, a candidate kept only if it raises ``y * A(x)``."""
        best = self._init_linf(images) if self.norm == "Linf" else self._init_l2(images)
        best_objective = self.detector.objective(best, labels)
        height, width = images.shape[-2:]
        for query in range(self.n_queries - 1):
            p = p_selection(self.p_init, query, self.n_queries)
            if self.norm == "Linf":
                candidate = self._update_linf(images, best, square_side(p, height, width, minimum=1))
            else:
                candidate = self._update_l2(images, best, square_side(p, height, width, minimum=2))
            objective = self.detector.objective(candidate, labels)
            best, best_objective = keep_worst_case(best, best_objective, candidate, objective)
        return best

    def _init_linf(self, images: torch.Tensor) -> torch.Tensor:
        """``x`` plus vertical stripes: one ``+-eps`` per sample, channel and column."""
        n, channels, _, width = images.shape
        stripes = torch.randint(0, 2, (n, channels, 1, width), device=images.device).to(images.dtype) * 2 - 1
        return (images + self.eps * stripes).clamp(0.0, 1.0)

    def _update_linf(self, images: torch.Tensor, best: torch.Tensor, side: int) -> torch.Tensor:
        """Set a random ``side x side`` window of each channel to ``x +- eps`` (Alg. 2), projected onto the box."""
        delta = best - images
        _, _, window = _random_windows(images, side)
        signs = _random_signs(images)
        candidate = (images + torch.where(window, self.eps * signs, delta)).clamp(0.0, 1.0)
        for _ in range(MAX_REDRAWS):
            unchanged = ~((candidate != best) & window).flatten(1).any(dim=1)
            if not unchanged.any():
                break
            signs = torch.where(unchanged.view(-1, 1, 1, 1), _random_signs(images), signs)
            candidate = (images + torch.where(window, self.eps * signs, delta)).clamp(0.0, 1.0)
        return candidate

    def _init_l2(self, images: torch.Tensor) -> torch.Tensor:
        """A grid of ``eta`` squares with random signs per channel, scaled to L_2 norm ``eps``."""
        _, _, height, width = images.shape
        tile = max(min(height, width) // 5, 1)
        tiles_h, tiles_w = height // tile, width // tile
        top, left = (height - tiles_h * tile) // 2, (width - tiles_w * tile) // 2
        delta = torch.zeros_like(images)
        for i in range(tiles_h):
            for j in range(tiles_w):
                transpose = bool(torch.rand(()) > 0.5)
                pattern = square_pattern(tile, transpose, images.device).to(images.dtype)
                rows = slice(top + i * tile, top + (i + 1) * tile)
                cols = slice(left + j * tile, left + (j + 1) * tile)
                delta[:, :, rows, cols] = pattern * _random_signs(images)
        delta = delta / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (images + self.eps * delta).clamp(0.0, 1.0)

    def _update_l2(self, images: torch.Tensor, best: torch.Tensor, side: int) -> torch.Tensor:
        """Alg. 3: move the mass of windows ``W1 u W2`` and the unused budget into ``W1`` with a fresh ``+-eta``."""
        n, channels = images.shape[:2]
        nu = best - images
        rows, cols, window_1 = _random_windows(images, side)
        _, _, window_2 = _random_windows(images, side)
        union = window_1 | window_2
        pattern = torch.zeros_like(images[:, 0])
        eta = square_pattern(side, transpose=False, device=images.device).to(images.dtype)
        transpose = torch.rand(n, 1, 1, device=images.device) > 0.5
        offsets = torch.arange(side, device=images.device)
        pattern[
            torch.arange(n, device=images.device)[:, None, None],
            (rows[:, None] + offsets)[:, :, None],
            (cols[:, None] + offsets)[:, None, :],
        ] = torch.where(transpose, eta.T, eta)
        pattern = pattern[:, None]
        unused = (self.eps**2 - nu.flatten(1).pow(2).sum(dim=1)).clamp_min(0.0).view(-1, 1, 1, 1)
        nu_window = nu * window_1
        temp = _random_signs(images) * pattern + nu_window / (_channel_norm(nu_window) + 1e-10)
        available = (_channel_norm(nu * union).pow(2) + unused / channels).sqrt()
        new_window = temp / _channel_norm(temp).clamp_min(1e-12) * available
        nu = torch.where(union, torch.zeros_like(nu), nu) + new_window
        return project(images + nu, images, self.eps, "L2")

    def _settings(self) -> dict[str, object]:
        return {**super()._settings(), "n_queries": self.n_queries, "restarts": self.restarts}
