"""``RobustEvaluator(processes=2)``: two spawned CPU processes equal one process, resume, and fail cleanly.

The test loaders are those of test_distributed.py: one of a single batch (rank 1 has none of it) and one of five
batches (3 on rank 0, 2 on rank 1).
"""

import json
import logging
import tempfile
from pathlib import Path

import pytest
import torch
from evaluation_toys import ToyDetector, ToyTestSet, loader
from torch import distributed, multiprocessing

from anomalib_robust.callbacks import RobustEval
from anomalib_robust.evaluation import RobustEvaluator, evaluator, execution

SETTINGS = {"attacks": ["pgd"], "eps": [0.5, 1.0], "norm": "L2", "steps": 2, "eot_samples": 2, "eval_repeats": 2,
            "sanity_checks": True, "n_queries": 5, "num_grid_images": 2}  # fmt: skip


class Interrupted(Exception):
    """Stands in for the process being killed."""


class UnreadableImage(ToyTestSet):
    """A :class:`ToyTestSet` whose item ``broken`` cannot be read (it sits in a batch of rank 1 only)."""

    def __init__(self, broken: int) -> None:
        super().__init__(count=20, seed=2)
        self.broken = broken

    def __getitem__(self, index: int) -> object:
        if index == self.broken:
            msg = f"unreadable image {index}"
            raise OSError(msg)
        return super().__getitem__(index)


def _loaders(second: ToyTestSet | None = None) -> list:
    second = ToyTestSet(count=20, seed=2) if second is None else second
    return [loader(ToyTestSet(count=4, seed=1), batch_size=4), loader(second, batch_size=4)]


def _per_image(report: object) -> dict[str, torch.Tensor]:
    scores = report.image_scores
    return {"labels": scores.labels, "clean": scores.clean, **scores.attacked}


def test_two_processes_resume_a_one_process_evaluation_with_its_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    reference, reference_grid = RobustEvaluator(**SETTINGS).evaluate(ToyDetector(noise=0.05), _loaders())
    attack_batch, calls = execution.attack_batch, []

    def interrupted(*args: object) -> torch.Tensor | None:
        if len(calls) == 5:  # the configured runs of the first batches are stored, the rest is not
            raise Interrupted
        calls.append(args)
        return attack_batch(*args)

    monkeypatch.setattr(execution, "attack_batch", interrupted)
    with pytest.raises(Interrupted):
        RobustEvaluator(**SETTINGS, resume_dir=tmp_path / "partial").evaluate(ToyDetector(noise=0.05), _loaders())

    caplog.set_level(logging.INFO, logger="anomalib_robust")  # the workers log at the caller's level, on stderr
    resumed, grid = RobustEvaluator(**SETTINGS, resume_dir=tmp_path / "partial", processes=2).evaluate(
        ToyDetector(noise=0.05), _loaders()
    )
    assert "(process 0): RobustEval: resuming from" in capfd.readouterr().err
    assert json.dumps(resumed.to_dict()) == json.dumps(reference.to_dict())
    for key, scores in _per_image(reference).items():
        assert torch.equal(_per_image(resumed)[key], scores), key
    for key, value in reference_grid.items():
        assert torch.equal(grid[key], value) if isinstance(value, torch.Tensor) else grid[key] == value
    # Rank 0 removes its store once the report is built; a store of another fingerprint (the workers' copies of the
    # model or the loaders seen differently) would have left the interrupted run's behind.
    assert not (tmp_path / "partial").exists(), "the workers resumed from the interrupted run's store"


def test_a_failing_worker_stops_the_other_and_its_error_reaches_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the workers' files go, and torch's error files
    broken = _loaders(UnreadableImage(broken=13))  # the fourth batch of the second loader: rank 1's
    with pytest.raises(OSError, match="unreadable image 13") as raised:
        RobustEvaluator(**SETTINGS, processes=2).evaluate(ToyDetector(noise=0.05), broken)
    assert isinstance(raised.value.__cause__, multiprocessing.ProcessRaisedException)
    assert "Traceback" in str(raised.value.__cause__), "the worker's traceback is chained"
    assert multiprocessing.active_children() == []
    assert list(tmp_path.iterdir()) == [], "the workers' directory and torch's error files are removed"


def test_processes_are_ignored_inside_a_distributed_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    reference, _ = RobustEvaluator(**SETTINGS).evaluate(ToyDetector(noise=0.05), _loaders())

    def spawned(*_: object) -> None:
        pytest.fail("a rank of a distributed run must not spawn processes")

    monkeypatch.setattr(evaluator, "evaluate_in_processes", spawned)
    distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        report, _ = RobustEvaluator(**SETTINGS, processes=2).evaluate(ToyDetector(noise=0.05), _loaders())
    finally:
        distributed.destroy_process_group()
    assert "processes=2 is ignored in a distributed run" in caplog.text
    assert report.to_dict() == reference.to_dict()


@pytest.mark.parametrize("processes", [0, -2, 1.5, True, "2"])
def test_processes_must_be_a_positive_integer(processes: object) -> None:
    with pytest.raises(ValueError, match=r"processes must be an integer >= 1, got"):
        RobustEvaluator(processes=processes)
    with pytest.raises(ValueError, match=r"processes must be an integer >= 1, got"):
        RobustEval(processes=processes)
