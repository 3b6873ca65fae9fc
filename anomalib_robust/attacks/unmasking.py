"""Gradient unmasking: differentiate through anomalib's ``torch.no_grad()`` blocks and ``.detach()`` calls.

anomalib wraps feature extraction in ``torch.no_grad()`` (Padim, Patchcore, Cfa, the timm feature extractor) and
detaches some inference outputs (Cfa's anomaly map). Neither changes the score's value, only whether autograd sees
it, so an attack that trusted them would report a robustness that is only masked gradients (Athalye et al., 2018).
:func:`unmasked_gradients` lifts both without editing anomalib.

Not every ``detach()`` masks a gradient. The ``.detach()`` calls of anomalib 2.7 are of four kinds:

- **On the scoring path** (the anomaly maps of Cfa, Cflow and UniNet, DSR's image score, SuperSimpleNet's
  stop-gradients into its classification head, the features of Dfkde, FRE, Fuvas and WinCLIP's hooks): the value
  flows on into the score, only autograd is cut. Lifted: they return a view that keeps the graph.
- **Off the scoring path** (the stop-gradients of the Dinomaly, INP-Former and UniNet losses, GANomaly's
  discriminator input, DSR's training branches, the memory banks of Cfa, RAD and MH-PatchCore, Cflow's training
  features, SuperAD's post-processor statistics): never run while a score is differentiated. Lifted, which changes
  nothing.
- **Straight-through estimators**, ``a + (b - a).detach()`` (DSR's vector quantiser; van den Oord et al., 2017,
  VQ-VAE): the value is ``b``, the quantised code, and the gradient w.r.t. ``a`` is the identity. Kept: lifted, the
  two ``a`` cancel and what remains is the gradient of ``b = quantise(a)``, an ``argmin``, exactly zero, a masking
  created by the unmasking. The identity the model's authors chose is the stage's BPDA surrogate (Athalye et al.,
  2018).
- **Copies to NumPy**, ``x.detach().cpu().numpy()`` (AnomalyDINO's background masks, UFlow's binomial test, the
  metrics, the batch dataclasses): kept. NumPy carries no gradient, and ``.numpy()`` raises on a tensor that
  requires one.

A call site's kind is read from its source: Python records the source position of every instruction, so the
``detach()`` call that is running (its caller's code object and instruction) is found, by where it ends, in the syntax
tree of its file, and kept when it is the detached term of ``a + (b - a).detach()`` (either order) or the receiver of
``.numpy()`` (directly or through ``.cpu()``). The answer is cached per call site: a forward pass pays a dictionary
look-up per call. The shape of the expression decides, not a table of known call sites, so an anomalib model that
writes a straight-through estimator this way keeps it without a change here; one written otherwise (the difference
computed on an earlier line), and any call site without source (code built by ``exec``), is lifted. The autograd
graph cannot decide it: when ``detach()`` runs, nothing says whether its result will be added back to ``a``.
"""

import ast
import functools
import linecache
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import CodeType

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
    """``Tensor.detach`` for every caller except anomalib's modules, which get a graph-keeping view instead.

    The straight-through estimators and copies to NumPy of anomalib's modules keep their detach
    (:func:`_kept_detach`).
    """
    caller = sys._getframe(1)
    in_anomalib = caller.f_globals.get("__name__", "").startswith(UNMASKED_PACKAGES)
    lifted = in_anomalib and not _kept_detach(caller.f_code, caller.f_lasti)
    return tensor.view_as(tensor) if lifted else _DETACH(tensor)


@functools.cache
def _kept_detach(code: CodeType, instruction: int) -> bool:
    """Whether the ``detach()`` call at byte ``instruction`` of ``code`` keeps its detach (see the module docstring)."""
    _, end_line, _, end_column = list(code.co_positions())[instruction // 2]
    return (end_line, end_column) in _kept_call_ends(code.co_filename)


@functools.cache
def _kept_call_ends(filename: str) -> frozenset[tuple[int, int]]:
    """Line and column where each kept ``detach()`` call of ``filename``'s source ends; empty without source."""
    try:
        tree = ast.parse("".join(linecache.getlines(filename)))
    except SyntaxError:
        return frozenset()
    return frozenset((call.end_lineno, call.end_col_offset) for call in _kept_calls(tree))


def _kept_calls(tree: ast.Module) -> Iterator[ast.Call]:
    """The ``detach()`` calls of ``tree`` that keep their detach: straight-through terms and copies to NumPy."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            for kept, detached in ((node.left, node.right), (node.right, node.left)):
                if _is_detach(detached) and _subtracts(detached.func.value, kept):
                    yield detached
        elif _is_method_call(node, "numpy"):
            receiver = node.func.value
            if _is_method_call(receiver, "cpu"):
                receiver = receiver.func.value
            if _is_detach(receiver):
                yield receiver


def _is_method_call(node: ast.AST, name: str) -> bool:
    """Whether ``node`` is ``<expression>.name()`` without arguments."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == name
        and not node.args
        and not node.keywords
    )


def _is_detach(node: ast.AST) -> bool:
    """Whether ``node`` is ``<expression>.detach()``."""
    return _is_method_call(node, "detach")


def _subtracts(node: ast.AST, term: ast.AST) -> bool:
    """Whether ``node`` is ``<expression> - term``, ``term`` compared as syntax."""
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub) and ast.dump(node.right) == ast.dump(term)


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
