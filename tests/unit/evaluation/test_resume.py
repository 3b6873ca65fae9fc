"""An interrupted evaluation with ``resume_dir`` resumes from its stored batches, exactly, and only its own."""

import json
import logging
from pathlib import Path

import pytest
import torch
from anomalib.pre_processing import PreProcessor
from evaluation_toys import ToyDetector, ToyTestSet, loader
from torch import nn
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_robust.evaluation import RobustEvaluator, execution, resume
from anomalib_robust.evaluation.resume import BatchStore, model_fingerprint

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
    attack_batch = execution.attack_batch

    def counted(*args: object) -> torch.Tensor | None:
        if calls["stop_after"] is not None and calls["count"] == calls["stop_after"]:
            raise Interrupted
        calls["count"] += 1
        return attack_batch(*args)

    monkeypatch.setattr(execution, "attack_batch", counted)
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


def test_an_unreadable_stored_batch_is_attacked_again_with_a_warning(
    test_set: ToyTestSet, tmp_path: Path, attack_calls: dict, caplog: pytest.LogCaptureFixture
) -> None:
    reference, _ = _evaluate(test_set)
    total = attack_calls["count"]
    attack_calls.update(count=0, stop_after=total - 3)
    with pytest.raises(Interrupted):
        _evaluate(test_set, tmp_path / "partial")
    truncated = next((tmp_path / "partial").glob("*/batch0_run0.pt"))
    truncated.write_bytes(truncated.read_bytes()[:100])  # a file cut short (a full disk, a copy interrupted)

    attack_calls.update(count=0, stop_after=None)
    with caplog.at_level(logging.WARNING, logger=resume.__name__):
        resumed, _ = _evaluate(test_set, tmp_path / "partial")
    assert attack_calls["count"] == 3 + 1, "the unreadable batch is attacked again with the ones not stored"
    assert resumed.to_dict() == reference.to_dict()
    assert str(truncated) in caplog.text and "attacking it again" in caplog.text


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # not a zip archive: RuntimeError
        lambda _: b"not a checkpoint",  # not a pickle either: pickle.UnpicklingError
        lambda _: b"",  # EOFError
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_a_damaged_batch_file_reads_as_missing_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage
) -> None:
    store = BatchStore(tmp_path, {"seed": 0})
    store.put(0, 0, "digest", scores=torch.ones(2))
    assert torch.equal(store.get(0, 0, "digest")["scores"], torch.ones(2))
    path = store.directory / "batch0_run0.pt"
    path.write_bytes(damage(path.read_bytes()))
    with caplog.at_level(logging.WARNING, logger=resume.__name__):
        assert store.get(0, 0, "digest") is None
    assert str(path) in caplog.text


def test_other_code_is_another_store(test_set: ToyTestSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a fix to an attack or a sanity check (other source or configs, another anomalib or torch), stored batches
    are not reused; another commit that leaves the package's code as it was (docs, tests, benchmarks) keeps them."""
    evaluator = RobustEvaluator(**SETTINGS, resume_dir=tmp_path)
    detector = ToyDetector(noise=0.1)
    directory = evaluator._store(detector, [loader(test_set)]).directory
    assert evaluator._store(detector, [loader(test_set)]).directory == directory
    identity = resume.loaded_code_identity()
    monkeypatch.setattr(resume, "loaded_code_identity", lambda: {**identity, "git_commit": "0" * 40})
    assert evaluator._store(detector, [loader(test_set)]).directory == directory, "a docs-only commit"
    assert json.loads((directory / "fingerprint.json").read_text())["code"]["git_commit"] == "0" * 40, "recorded"
    key = resume.loaded_code_key()
    for other in ({**key, "source": "0123456789abcdef"}, {**key, "versions": {**key["versions"], "torch": "0.0.1"}}):
        monkeypatch.setattr(resume, "loaded_code_key", lambda other=other: other)
        assert evaluator._store(detector, [loader(test_set)]).directory != directory, other


def _pre_processed(size: int = 8, mean: float = 0.5) -> ToyDetector:
    transform = Compose([Resize((size, size), antialias=True), Normalize(mean=[mean] * 3, std=[0.25] * 3)])
    return ToyDetector(pre_processor=PreProcessor(transform=transform))


def test_another_pre_processing_is_another_model() -> None:
    fingerprint = model_fingerprint(_pre_processed())
    assert model_fingerprint(_pre_processed()) == fingerprint
    assert model_fingerprint(_pre_processed(size=16)) != fingerprint
    assert model_fingerprint(_pre_processed(mean=0.4)) != fingerprint
    wrapped = nn.ModuleDict({"detector": _pre_processed()})  # as Purified holds the detector's pre-processor
    assert model_fingerprint(nn.ModuleDict({"detector": _pre_processed(mean=0.4)})) != model_fingerprint(wrapped)
