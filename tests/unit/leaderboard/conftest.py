"""Leaderboard cells as a job records them, without fitting anything."""

from dataclasses import asdict

import pytest

from anomalib_robust.evaluation.provenance import package_versions
from anomalib_robust.evaluation.report import AttackResult
from anomalib_robust.leaderboard.cache import cell_key


def _cell(
    model: str = "Padim",
    category: str = "trouser",
    norm: str = "Linf",
    eps: float = 2 / 255,
    status: str = "ok",
    results: list[AttackResult] | None = None,
    versions: dict | None = None,
    seed: int = 0,
    settings: dict | None = None,
) -> dict:
    """A finished (or, with ``status="error"``, failed) cell of ``model`` on Fashion-MNIST ``category``."""
    threat = {"norm": norm, "eps": [eps]}
    key = cell_key({"model": model, "category": category, "threat": threat, "seed": seed, **(settings or {})})
    cell = {
        "cell": key, "model": model, "data": "FashionMNIST", "category": category, "seed": seed,
        "threat_model": threat, "model_config": {"class_path": model}, "data_config": {}, "trainer": {},
        "evaluator": {"steps": 2, **(settings or {})}, "status": status, "error": "", "cached": False,
        "versions": versions or package_versions(), "git_commit": None, "fit_seconds": 1.5,
    }  # fmt: skip
    if status != "ok":
        return {**cell, "error": "RuntimeError: out of memory", "fit_seconds": None}
    if results is None:
        results = [AttackResult("EOT-PGD", norm, eps, steps=2, image_auroc=0.4, image_auroc_std=0.05, budget="2 steps")]
    return {
        **cell, "standard_image_auroc": 0.9, "standard_image_auroc_std": 0.01, "standard_pixel_auroc": None,
        "standard_pixel_auroc_std": 0.0, "eot_samples": 8, "eval_repeats": 4, "num_test_images": 50,
        "results": [asdict(result) for result in results], "checks": [], "sanity": "pass", "attack_seconds": 3.0,
    }  # fmt: skip


@pytest.fixture
def make_cell():
    """``make_cell(model=..., category=..., norm=..., eps=..., status=..., results=[AttackResult], versions=...)``."""
    return _cell
