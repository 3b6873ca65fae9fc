"""Backward Pass Differentiable Approximation (BPDA) for non-differentiable stages of a detector.

BPDA (Athalye et al., 2018; used against APAE and AdvRAD in the AdvRAD paper, sec. 5.5 and Table 9) keeps the exact
forward pass of a stage ``f`` that has no useful gradient (an optimisation loop, quantisation, a purifier) and replaces
its backward pass by that of a differentiable surrogate ``g`` (the identity by default, ``g(x) = x``):

    forward: f(x)        backward: d g(x) / d x.

This is the straight-through form ``g(x) + stop_gradient(f(x) - g(x))``. Stages are named by their path inside the
anomalib model (``"model.purifier"``, ``"pre_processor"``) and swapped in only while an attack runs.

Example:
    >>> import torch
    >>> from anomalib_robust.attacks.bpda import BPDA
    >>> stage = BPDA(torch.nn.Hardtanh(0.0, 0.5))  # flat, zero-gradient region above 0.5
    >>> x = torch.tensor([0.9], requires_grad=True)
    >>> stage(x), torch.autograd.grad(stage(x).sum(), x)[0]
    (tensor([0.5000], grad_fn=<AddBackward0>), tensor([1.]))
"""

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn


class BPDA(nn.Module):
    """Run ``stage`` forward, differentiate ``surrogate`` (identity when ``None``) backward.

    Args:
        stage: the non-differentiable stage; called on one tensor, returns one tensor.
        surrogate: differentiable approximation of ``stage``; ``None`` means the identity, which requires ``stage`` to
            keep the shape of its input.
    """

    def __init__(self, stage: Callable[[torch.Tensor], torch.Tensor], surrogate: Callable | None = None) -> None:
        super().__init__()
        self.stage = stage
        self.surrogate = surrogate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``surrogate(x) + stop_gradient(stage(x) - surrogate(x))``: value of ``stage``, gradient of ``surrogate``."""
        with torch.set_grad_enabled(False):
            exact = self.stage(x)
        if not isinstance(exact, torch.Tensor):
            name = type(self.stage).__name__
            msg = f"BPDA wraps stages that return one tensor; {name} returned {type(exact).__name__}."
            raise TypeError(msg)
        approximation = x if self.surrogate is None else self.surrogate(x)
        if approximation.shape != exact.shape:
            msg = (
                f"BPDA surrogate must match the output shape of {type(self.stage).__name__}: expected "
                f"{tuple(exact.shape)}, got {tuple(approximation.shape)}"
                + (
                    " (the identity surrogate needs a shape-preserving stage; pass a surrogate)."
                    if self.surrogate is None
                    else "."
                )
            )
            raise ValueError(msg)
        return approximation + (exact - approximation).detach()


def check_stages(root: nn.Module, stages: Mapping[str, object], argument: str = "bpda") -> dict[str, object]:
    """Validate stage paths against ``root``; returns them as a dict.

    Raises:
        ValueError: naming ``argument`` and the path when ``root`` has no such submodule.
    """
    for path in stages:
        try:
            root.get_submodule(path)
        except AttributeError:
            msg = f"{argument}: {type(root).__name__} has no submodule {path!r} (expected a path such as 'model.encoder')."
            raise ValueError(msg) from None
    return dict(stages)


@contextmanager
def swapped_stages(root: nn.Module, replacements: Mapping[str, Callable[[nn.Module], nn.Module]]) -> Iterator[None]:
    """Replace each named submodule of ``root`` by ``replacements[path](original)``, and put the originals back on
    exit."""
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for path, replacement in replacements.items():
            parent_path, _, name = path.rpartition(".")
            parent = root.get_submodule(parent_path)
            original = getattr(parent, name)
            setattr(parent, name, replacement(original))
            replaced.append((parent, name, original))
        yield
    finally:
        for parent, name, original in reversed(replaced):
            setattr(parent, name, original)


def bpda_stages(root: nn.Module, stages: Mapping[str, Callable | None]) -> AbstractContextManager[None]:
    """Replace each named submodule of ``root`` by its :class:`BPDA` wrapper, and put the originals back on exit."""
    wrappers = {path: functools.partial(BPDA, surrogate=surrogate) for path, surrogate in stages.items()}
    return swapped_stages(root, wrappers)
