"""``examples/patch_guard_python.py`` runs as a user runs it, with tiny settings, so that it never rots."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[3]


def test_python_example_trains_attacks_and_saves_anomaly_maps(tmp_path: Path) -> None:
    command = [
        sys.executable, str(REPOSITORY / "examples" / "patch_guard_python.py"), "--max-steps", "2", "--num-train", "16",
        "--num-test", "16", "--adversarial-steps", "1", "--attack-steps", "2", "--results", str(tmp_path),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, env=environment, timeout=900, check=False
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    assert "image_AUROC" in result.stdout and "robust/" in result.stdout
    saved = np.load(tmp_path / "patch_guard_anomaly_maps.npz")
    assert saved["anomaly_maps"].shape == (8, 32, 32) and saved["labels"].shape == (8,)
    assert list(tmp_path.glob("PatchGuard/**/images/**/*.png")), "no anomaly-map visualisation was saved"
    assert list(tmp_path.rglob("robust_eval/linf/report.json"))
