"""An interrupted evaluation with ``resume_dir`` resumes from its stored batches, exactly, and only its own."""

from pathlib import Path

import pytest
import torch
from evaluation_toys import ToyDetector, ToyTestSet, loader

from anomalib_robust.evaluation import RobustEvaluator

SETTINGS = {
    "attacks": ["pgd"], "eps": [0.02, 0.05], "steps": 2, "eot_samples": 2, "eval_repeats": 2,
    "targets": ["score", "map"], "num_grid_images": 2, "sanity_checks": True,
}  # fmt: skip
"""A randomised toy with masks: two eps and two targets, the sanity runs, maps and a grid, 24 images in 5 batches."""


class Interrupted(Exception):
    """Stands in for the process being killed."""


@pytest.fixture
def attack_calls(monkeypatch: pytest.MonkeyPatch) -> dict:
    """``{"count": attacked (batch, run) pairs so far, "stop_after": raise Interrupted after that many, or None}``."""
    calls = {"count": 0, "stop_after": None}
    attack_batch = RobustEvaluator._attack_batch

    def counted(*args: object) -> torch.Tensor | None:
        if calls["stop_after"] is not None and calls["count"] == calls["stop_after"]:
            raise Interrupted
        calls["count"] += 1
        return attack_batch(*args)

    monkeypatch.setattr(RobustEvaluator, "_attack_batch", staticmethod(counted))
    return calls


def _evaluate(test_set: ToyTestSet, resume_dir: Path | None = None, detector: ToyDetector | None = None, **override):
    evaluator = RobustEvaluator(**{**SETTINGS, **override}, resume_dir=resume_dir)
    return evaluator.evaluate(detector or ToyDetector(noise=0.1), [loader(test_set)])


def test_an_interrupted_evaluation_resumes_with_the_numbers_of_an_uninterrupted_one(
    test_set: ToyTestSet, tmp_path: Path, attack_calls: dict
) -> None:
    reference, reference_grid = _evaluate(test_set)
    total = attack_calls["count"]
    assert total > 20  # 5 batches x 4 configured runs, then the sanity runs

    attack_calls.update(count=0, stop_after=total - 3)  # killed in the sanity runs, after the configured ones
    with pytest.raises(Interrupted):
        _evaluate(test_set, tmp_path / "partial")
    (stored,) = (tmp_path / "partial").iterdir()
    assert len(list(stored.glob("batch*_run*.pt"))) == total - 3

    attack_calls.update(count=0, stop_after=None)
    resumed, resumed_grid = _evaluate(test_set, tmp_path / "partial")
    assert attack_calls["count"] == 3, "only the (batch, run) pairs not stored are attacked again"
    assert resumed.to_dict() == reference.to_dict()
    assert resumed.results[0].pixel_auroc is not None  # the maps came back from the store too
    for key, value in reference_grid.items():
        assert torch.equal(resumed_grid[key], value) if isinstance(value, torch.Tensor) else resumed_grid[key] == value
    assert not (tmp_path / "partial").exists(), "stored batches are removed once the report is built"


def test_stored_batches_serve_only_the_evaluation_that_wrote_them(
    test_set: ToyTestSet, tmp_path: Path, attack_calls: dict
) -> None:
    _evaluate(test_set)
    total = attack_calls["count"]
    attack_calls.update(count=0, stop_after=total // 2)
    with pytest.raises(Interrupted):
        _evaluate(test_set, tmp_path)
    attack_calls["stop_after"] = None

    heavier = ToyDetector(noise=0.1)
    heavier.model.scale.data.fill_(1.5)  # other weights
    noisier = ToyDetector(noise=0.2)  # another configuration, the same weights
    for run in (
        {"detector": heavier},
        {"detector": noisier},
        {"steps": 3},  # another attack
        {"seed": 1},
        {"test_set": ToyTestSet(seed=1)},  # other images
    ):
        attack_calls["count"] = 0
        _evaluate(**{"test_set": test_set, "resume_dir": tmp_path, **run})
        assert attack_calls["count"] >= total, f"{run}: nothing stored may be reused"
    assert len(list(tmp_path.glob("*/batch*_run*.pt"))) == total // 2, "the interrupted evaluation's batches remain"

    darkened = ToyTestSet()  # the same size and first item: the same store, but one stored batch differs
    darkened.items[7].image.zero_()  # an anomalous image, now the darkest: every run's ranking changes
    expected, _ = _evaluate(darkened)
    resumed, _ = _evaluate(darkened, tmp_path)
    assert resumed.to_dict() == expected.to_dict(), "a stored batch is only reused for the same images"


def test_resume_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.touch()
    with pytest.raises(ValueError, match="resume_dir must be a directory"):
        RobustEvaluator(resume_dir=path)
