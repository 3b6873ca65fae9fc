"""bf16 autocast of the attack's gradient passes: chosen at run time, never for the reported scores."""

import pytest
import torch

from anomalib_robust.attacks import DetectorScore, precision
from anomalib_robust.attacks.precision import gradient_dtype


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_what_the_hardware_computes_natively(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """Whatever this machine's CPU has: the decision is read at run time and can be replaced here."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert gradient_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert gradient_dtype("fp32", cpu) is None
    assert gradient_dtype("bf16", cpu) == torch.bfloat16


def test_bf16_runs_the_gradient_passes_only_and_keeps_scores_fp32(detector: torch.nn.Module, batch: tuple) -> None:
    images, labels = batch
    seen = []
    detector.model.conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    single = DetectorScore(detector, gradient_precision="fp32")
    half = DetectorScore(detector, gradient_precision="bf16")
    with single.prepared():
        objective, gradient = single.objective_and_gradient(images, labels)
        scores = single.predict(images)[0]
    with half.prepared():
        half_objective, half_gradient = half.objective_and_gradient(images, labels)
        half_scores = half.predict(images)[0]
    assert seen == [torch.float32, torch.float32, torch.bfloat16, torch.float32]
    assert half_gradient.dtype == half_objective.dtype == torch.float32
    torch.testing.assert_close(half_scores, scores, rtol=0, atol=0)
    torch.testing.assert_close(half_objective, objective, rtol=0.05, atol=1e-3)
    cosine = torch.nn.functional.cosine_similarity(half_gradient.flatten(1), gradient.flatten(1))
    assert (cosine > 0.95).all(), cosine
    with pytest.raises(ValueError, match="gradient_precision must be one of"):
        DetectorScore(detector, gradient_precision="fp16")
