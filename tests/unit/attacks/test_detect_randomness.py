"""``DetectorScore.detect_randomness``: undeclared noise at inference is found, and the caller's RNG is untouched."""

import logging

import pytest
import torch
from torch import nn

from anomalib_robust.attacks import DetectorScore
from anomalib_robust.attacks.eot import DEFAULT_EOT_SAMPLES


@pytest.fixture
def undeclared_detector(stochastic_detector: nn.Module) -> nn.Module:
    """``stochastic_detector``, which draws noise at every inference call, without its declaration."""
    del stochastic_detector.model.stochastic
    return stochastic_detector


def _detect(detector: DetectorScore, images: torch.Tensor) -> bool:
    """``detector.detect_randomness(images)``, asserting that the global RNG state is the same after the call."""
    state = torch.get_rng_state()
    found = detector.detect_randomness(images)
    assert torch.equal(torch.get_rng_state(), state)
    return found


def test_undeclared_noise_is_detected_with_a_warning(
    undeclared_detector: nn.Module, batch: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    undeclared_detector.train()
    detector = DetectorScore(undeclared_detector)
    assert (detector.stochastic, detector.eot_samples) == (False, 1)
    with caplog.at_level(logging.WARNING, logger="anomalib_robust.attacks.detector"):
        assert _detect(detector, batch[0])
    assert (detector.stochastic, detector.eot_samples) == (True, DEFAULT_EOT_SAMPLES)
    (record,) = caplog.records
    assert "ToyDetector draws noise at inference" in record.getMessage()
    assert undeclared_detector.training  # scored in eval mode inside prepared(), then restored
    assert not hasattr(undeclared_detector.model, "stochastic")  # the model is left as found


def test_detected_noise_keeps_an_explicit_eot_budget(undeclared_detector: nn.Module, batch: tuple) -> None:
    detector = DetectorScore(undeclared_detector, eot_samples=3)
    assert _detect(detector, batch[0])
    assert (detector.stochastic, detector.eot_samples) == (True, 3)


def test_deterministic_detector_is_not_flagged(
    detector: nn.Module, batch: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    detector.model.dropout.train()  # eval mode inside prepared(): training-only noise is not inference noise
    scorer = DetectorScore(detector)
    with caplog.at_level(logging.WARNING):
        assert not _detect(scorer, batch[0])
    assert (scorer.stochastic, scorer.eot_samples) == (False, 1)
    assert not caplog.records


def test_declared_randomised_detector_is_not_scored(stochastic_detector: nn.Module, batch: tuple) -> None:
    scorer = DetectorScore(stochastic_detector)
    calls = []
    stochastic_detector.model.register_forward_pre_hook(lambda *_: calls.append(1))
    assert _detect(scorer, batch[0])
    assert not calls
    assert (scorer.stochastic, scorer.eot_samples) == (True, DEFAULT_EOT_SAMPLES)
