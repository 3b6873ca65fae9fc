"""``examples/patch_guard_python.py`` runs (its ``main(argv)``, in-process) with tiny settings, so that it never rots."""

from collections.abc import Callable
from pathlib import Path

import numpy as np


def test_python_example_trains_attacks_and_saves_anomaly_maps(run_example: Callable[..., str], tmp_path: Path) -> None:
    output = run_example("patch_guard_python.py", "--max-steps", "2", "--num-train", "16", "--num-test", "16",
                         "--adversarial-steps", "1", "--attack-steps", "2", "--results", tmp_path, cwd=tmp_path)  # fmt: skip
    assert "image_AUROC" in output and "robust/" in output
    saved = np.load(tmp_path / "patch_guard_anomaly_maps.npz")
    assert saved["anomaly_maps"].shape == (8, 32, 32) and saved["labels"].shape == (8,)
    assert list(tmp_path.glob("PatchGuard/**/images/**/*.png")), "no anomaly-map visualisation was saved"
    assert list(tmp_path.rglob("robust_eval/linf/report.json"))
