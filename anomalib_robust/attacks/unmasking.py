"""Gradient unmasking: differentiate through anomalib's ``torch.no_grad()`` blocks and ``.detach()`` calls.

anomalib wraps feature extraction in ``torch.no_grad()`` (Padim, Patchcore, Cfa, the timm feature extractor) and
detaches some inference outputs (Cfa's anomaly map). Neither changes the score's value, only whether autograd sees
it, so an attack that trusted them would report a robustness that is only masked gradients (Athalye et al., 2018).
:func:`unmasked_gradients` lifts both without editing anomalib.
"""

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch


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


_LOCK = threading.Lock()
_depth = 0
"""Number of :func:`unmasked_gradients` contexts currently open (in any thread)."""
_originals: tuple[object, object, object] | None = None
"""``torch.no_grad``, ``torch.autograd.no_grad`` and ``torch.Tensor.detach`` as found by the outermost entry."""


def _install() -> None:
    """Open one context: the first one saves the true originals and installs the replacements."""
    global _depth, _originals
    with _LOCK:
        if _depth == 0:
            _originals = torch.no_grad, torch.autograd.no_grad, torch.Tensor.detach
            torch.no_grad = torch.autograd.no_grad = _GradientPassthrough
            torch.Tensor.detach = _detach_outside_anomalib
        _depth += 1


def _uninstall() -> None:
    """Close one context: the last one puts the originals saved by the first one back."""
    global _depth, _originals
    with _LOCK:
        _depth -= 1
        if _depth == 0 and _originals is not None:
            torch.no_grad, torch.autograd.no_grad, torch.Tensor.detach = _originals
            _originals = None


@contextmanager
def unmasked_gradients() -> Iterator[None]:
    """Record gradients through anomalib's ``torch.no_grad()`` blocks and ``.detach()`` calls inside the context.

    ``with torch.no_grad():`` looks the name up when it runs, so replacing ``torch.no_grad`` (and its alias
    ``torch.autograd.no_grad``) by a no-op makes anomalib's feature extraction differentiable without editing it;
    ``Tensor.detach`` called from a module of :data:`UNMASKED_PACKAGES` returns a view that keeps the graph. Values are
    unchanged; only autograd sees more. Both replacements are process-wide while the context is active; keep the
    context around a single forward pass. Decorators applied at import time (``@torch.no_grad()``) are not affected;
    use BPDA for such stages.

    Re-entrant and exception-safe: contexts are counted, only the outermost entry saves the true ``torch.no_grad``,
    ``torch.autograd.no_grad`` and ``Tensor.detach`` and installs the replacements, and only the last exit puts the
    saved originals back, also when the block raises. A nested context (an ensemble scoring its members, a defense
    scoring the detector it wraps) therefore leaves gradients unmasked for the rest of the enclosing block, and
    contexts closed out of order (``ExitStack``, two generators) still end with the originals restored. Inside every
    context autograd is enabled and inference mode is off, whatever the caller set.
    """
    _install()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        _uninstall()
