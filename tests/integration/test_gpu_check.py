"""The GPU check (``benchmarks/gpu/check.sh``) in its ``--smoke`` mode: every measurement of the script at toy sizes on
the CPU, so that the script a GPU session runs once cannot rot in between."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_smoke_mode_runs_every_measurement_and_writes_json_and_markdown(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", "benchmarks/gpu/check.sh", "--smoke"],
        cwd=REPO,
        env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "measurements.json").read_text())
    assert results["environment"]["device"] == "CPU" and results["matmul_peak_gflops"]["fp32"] > 0
    training = results["training"] + results["compile"]
    assert [row["variant"] for row in training] == ["fp32 eager", "bf16 autocast", "torch.compile"]
    assert all(row["images_per_s"] > 0 and row["gflop_per_image"] > 0 for row in training)
    assert results["inference"]["images_per_s"] > 0
    assert [(row["detector"], row["path"], row["eot_draws"]) for row in results["attacks"]] == [
        ("AdvRAD", "batched draws", 2), ("AdvRAD", "one draw per call", 2), ("Padim", "batched draws", 1),
        ("PatchGuard", "batched draws", 1),
    ]  # fmt: skip
    assert all(row["image_steps_per_s"] > 0 for row in results["attacks"])
    cell = results["cell"]
    (attacked,) = [row for row in cell["rows"] if row["attack"] == "EOT-PGD"]
    assert cell["status"] == "ok" and 0 <= float(attacked["robust_image_auroc"]) <= 1
    table = (tmp_path / "measurements.md").read_text()
    assert "| torch.compile |" in table and "| PatchGuard |" in table and "Purified(Padim, DiffPure p=25)" in table
