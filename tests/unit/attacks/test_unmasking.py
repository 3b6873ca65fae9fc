"""``unmasked_gradients`` is re-entrant and always ends with the true ``no_grad`` / ``detach`` restored."""

from contextlib import ExitStack

import pytest
import torch

from anomalib_robust.attacks.unmasking import unmasked_gradients

NO_GRAD, AUTOGRAD_NO_GRAD, DETACH = torch.no_grad, torch.autograd.no_grad, torch.Tensor.detach

_ANOMALIB_CODE = {"__name__": "anomalib._unmasking_test"}
exec(  # noqa: S102 - a function whose globals say it lives in anomalib, as anomalib's own detach() calls do
    "def anomalib_feature(x):\n    with torch.no_grad():\n        return (2 * x).detach()\n",
    {**_ANOMALIB_CODE, "torch": torch},
    _ANOMALIB_CODE,
)
anomalib_feature = _ANOMALIB_CODE["anomalib_feature"]


def _assert_originals() -> None:
    assert torch.no_grad is NO_GRAD
    assert torch.autograd.no_grad is AUTOGRAD_NO_GRAD
    assert torch.Tensor.detach is DETACH
    x = torch.ones(2, requires_grad=True)
    assert not anomalib_feature(x).requires_grad


def _assert_unmasked() -> None:
    x = torch.ones(2, requires_grad=True)
    feature = anomalib_feature(x)
    assert feature.requires_grad
    (grad,) = torch.autograd.grad(feature.sum(), x)
    torch.testing.assert_close(grad, torch.full((2,), 2.0))


def test_nested_context_keeps_gradients_unmasked_after_the_inner_exit() -> None:
    with NO_GRAD(), unmasked_gradients():
        assert torch.is_grad_enabled()
        assert not torch.ones(2, requires_grad=True).detach().requires_grad  # detach() outside anomalib stays
        with unmasked_gradients():
            _assert_unmasked()
        _assert_unmasked()  # the inner exit must not mask the rest of the outer block
        with unmasked_gradients(), unmasked_gradients():
            pass
        _assert_unmasked()
    _assert_originals()


def test_originals_restored_after_an_exception_nested_or_not() -> None:
    with pytest.raises(ValueError, match="plain"), unmasked_gradients():
        raise ValueError("plain")
    _assert_originals()
    with unmasked_gradients():
        with pytest.raises(ValueError, match="inner"), unmasked_gradients():
            raise ValueError("inner")
        _assert_unmasked()  # the outer block survives an exception in the inner one
    _assert_originals()
    with pytest.raises(ValueError, match="through both"), unmasked_gradients(), unmasked_gradients():
        raise ValueError("through both")
    _assert_originals()


def test_originals_restored_when_contexts_close_out_of_order() -> None:
    first, second = unmasked_gradients(), unmasked_gradients()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    _assert_unmasked()  # one context is still open
    second.__exit__(None, None, None)
    _assert_originals()
    with ExitStack() as stack:
        stack.enter_context(unmasked_gradients())
        stack.enter_context(unmasked_gradients())
        _assert_unmasked()
    _assert_originals()
