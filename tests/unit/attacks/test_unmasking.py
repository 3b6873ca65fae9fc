"""``unmasked_gradients`` is re-entrant and always ends with the true ``no_grad`` / ``detach`` restored."""

from contextlib import ExitStack
from pathlib import Path

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


SOURCED_ANOMALIB_CODE = """
def straight_through_and_feature(x):
    return x + (x.round() - x).detach() + (2 * x).detach()


def to_numpy(x):
    return (2 * x).detach().cpu().numpy()
"""


@pytest.fixture
def sourced_anomalib(tmp_path: Path) -> dict:
    """Functions of a module that says it lives in anomalib and, unlike ``exec`` code, has a source file."""
    path = tmp_path / "sourced_anomalib.py"
    path.write_text(SOURCED_ANOMALIB_CODE)
    namespace = {"__name__": "anomalib._unmasking_source_test"}
    exec(compile(SOURCED_ANOMALIB_CODE, str(path), "exec"), namespace)  # noqa: S102 - as anomalib's own modules
    return namespace


def test_straight_through_estimator_keeps_its_detach_and_a_feature_on_its_line_is_lifted(
    sourced_anomalib: dict,
) -> None:
    x = torch.tensor([0.2, 1.7], requires_grad=True)
    with unmasked_gradients():
        value = sourced_anomalib["straight_through_and_feature"](x)
    torch.testing.assert_close(value, torch.tensor([0.4, 5.4]))  # round(x) + 2x
    (grad,) = torch.autograd.grad(value.sum(), x)
    torch.testing.assert_close(grad, torch.full((2,), 3.0))  # identity (straight-through) + 2 (lifted); lifted: 2


def test_copy_to_numpy_keeps_its_detach(sourced_anomalib: dict) -> None:
    x = torch.ones(2, requires_grad=True)
    with unmasked_gradients():
        copy = sourced_anomalib["to_numpy"](x)  # a lifted detach makes .numpy() raise on a tensor requiring grad
    assert copy.tolist() == [2.0, 2.0]


def test_dsr_vector_quantiser_has_the_straight_through_gradient() -> None:
    """anomalib's DSR quantises with ``inputs + (quantized - inputs).detach()`` (VQ-VAE): lifting that detach leaves
    the gradient of the codebook look-up (an argmin), exactly zero."""
    from anomalib.models.image.dsr.torch_model import VectorQuantizer

    torch.manual_seed(0)
    quantiser = VectorQuantizer(num_embeddings=16, embedding_dim=4).requires_grad_(False)
    features = torch.randn(2, 4, 3, 3, requires_grad=True)
    weights = torch.randn(2, 4, 3, 3)
    with unmasked_gradients():
        quantised = quantiser(features)
    (grad,) = torch.autograd.grad((weights * quantised).sum(), features)
    torch.testing.assert_close(grad, weights)  # the identity of the straight-through estimator, not zero
