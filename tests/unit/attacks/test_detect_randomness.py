"""``DetectorScore.detect_randomness``: undeclared noise at inference is found, and the caller's RNG is untouched."""

import logging

import pytest
import torch
from anomalib.data import InferenceBatch
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


class _Brightness(nn.Module):
    """Score ``offset + 10 * mean brightness``; optionally ``noise`` (std) on a ``share`` of the calls, drawn from a
    private ``torch.Generator`` (never reseeded by the check) or torch's global RNG, and float32 round-off jitter of a
    few units in the last place (what a GPU's non-deterministic reductions do to a deterministic model)."""

    def __init__(self, offset: float = 0.0, noise: float = 0.0, share: float = 1.0, private: int | None = None,
                 jitter_ulps: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.offset, self.noise, self.share, self.jitter_ulps = offset, noise, share, jitter_ulps
        self.generator = None if private is None else torch.Generator().manual_seed(private)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        score = self.offset + 10 * images.mean(dim=(1, 2, 3))
        if self.noise and float(torch.rand((), generator=self.generator)) < self.share:
            score = score + self.noise * torch.randn(score.shape, generator=self.generator)
        if self.jitter_ulps:
            ulp = torch.finfo(score.dtype).eps * score.abs()
            score = score + ulp * torch.randint(-self.jitter_ulps, self.jitter_ulps + 1, score.shape, generator=self.generator)
        return InferenceBatch(pred_score=score)


def _brightness_detector(**settings: object) -> nn.Module:
    holder = nn.Module()
    holder.model = _Brightness(**settings)
    return holder


def test_noise_under_a_large_offset_is_detected(batch: tuple) -> None:
    """Offset 1000, noise 0.02: a tolerance relative to the largest |score| (1e-4 of it, 0.1) missed it, while AUROC
    moved between scorings; the spread of the scores across images is the scale that matters."""
    assert _detect(DetectorScore(_brightness_detector(offset=1000.0, noise=0.02)), batch[0])


def test_round_off_under_a_large_offset_is_no_alarm(batch: tuple) -> None:
    """A deterministic score whose last bits change from call to call (4 units in the last place at 1000) is not
    randomised."""
    detector = DetectorScore(_brightness_detector(offset=1000.0, private=0, jitter_ulps=4))
    assert not _detect(detector, batch[0])
    assert (detector.stochastic, detector.eot_samples) == (False, 1)


def test_noise_on_one_call_in_ten_is_caught_nearly_always(batch: tuple) -> None:
    """Noise on 10 % of the calls, independent of the seeds (a private generator): caught in at least 95 of 100
    detectors (expected 99; two seeded scorings caught about 19)."""
    caught = sum(
        DetectorScore(_brightness_detector(noise=0.1, share=0.1, private=trial)).detect_randomness(batch[0])
        for trial in range(100)
    )
    assert caught >= 95


def test_noise_on_some_seeds_of_the_global_rng_is_caught(batch: tuple) -> None:
    """Noise drawn on 10 % of the calls from torch's global RNG, which the check reseeds: some seed draws it."""
    assert _detect(DetectorScore(_brightness_detector(noise=0.1, share=0.1)), batch[0])


def test_a_private_generator_is_detected(batch: tuple) -> None:
    assert _detect(DetectorScore(_brightness_detector(noise=0.5, private=0)), batch[0])
