"""``CertifyEval`` on a tiny trained AdvRAD through anomalib's Engine, and the certification example."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from statistics import NormalDist

import pytest
from anomalib.engine import Engine
from shared_artifacts import mvtec_datamodule

from anomalib_robust import AdvRAD
from anomalib_robust.callbacks import CertifyEval
from anomalib_robust.registry import CALLBACKS

N = 40
"""Estimation draws per image: enough to certify something at small radii (12 draws with alpha = 0.1 certify nothing)."""


def test_callback_reports_table_11_shape(mvtec_root: Path, advrad_checkpoint: Path, tmp_path: Path) -> None:
    datamodule = mvtec_datamodule(mvtec_root)
    model = AdvRAD.load_from_checkpoint(advrad_checkpoint)
    callback = CertifyEval(
        sigmas=(0.125, 0.25), radii=(0.0, 0.05, 0.5), n0=3, n=N, alpha=0.1, batch_size=100, output_dir=tmp_path
    )
    engine = Engine(default_root_dir=tmp_path, logger=False, callbacks=[callback], enable_progress_bar=False)
    results = engine.test(model, datamodule=datamodule)

    report = callback.report
    assert report is not None and report.num_samples == 8
    assert [result.sigma for result in report.results] == [0.125, 0.25]
    for result in report.results:
        values = [result.certified_auc[radius] for radius in report.radii]
        assert values == sorted(values, reverse=True), "certified AUC cannot grow with the radius"
        assert values[0] <= result.smoothed_auroc + 1e-9, "certification only removes pairs from the smoothed AUROC"
        # n draws certify at most p = alpha ** (1 / n) (all draws on one side): radius sigma * Phi^-1(p)
        largest = result.sigma * NormalDist().inv_cdf(0.1 ** (1 / N))
        assert all(value == 0 for radius, value in zip(report.radii, values) if radius > largest)
        assert results[0][f"certify/sigma{result.sigma:g}/radius0.05/AUC"] == pytest.approx(values[1])
    assert max(result.certified_auc[0.0] for result in report.results) > 0, "something must be certified at radius 0"
    directory = tmp_path / "certify"
    saved = json.loads((directory / "report.json").read_text())
    assert saved["n"] == N and len(saved["results"]) == 2
    assert len((directory / "report.csv").read_text().splitlines()) == 1 + 2 * 3
    assert (directory / "certified_auc_vs_radius.png").stat().st_size > 0
    assert CALLBACKS["certify"] == "anomalib_robust.callbacks.CertifyEval"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"sigmas": (0.0,)}, "sigma"), ({"radii": (-0.1,)}, "radius"), ({"n0": 0}, "n0"), ({"alpha": 1.5}, "alpha")],
)
def test_callback_rejects_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CertifyEval(**kwargs)


def test_example_runs_with_tiny_settings(run_example: Callable[..., str], tmp_path: Path) -> None:
    output = run_example("certify_adv_rad.py", "--tiny", "--output", tmp_path, cwd=tmp_path)
    assert "Certified AUC" in output
    assert (tmp_path / "certify" / "certified_auc_vs_radius.png").is_file()


def test_ddp_run_equals_single_process(
    mvtec_root: Path, advrad_checkpoint: Path, tiny_advrad: dict, tmp_path: Path
) -> None:
    """``anomalib test --callbacks certify`` on 2 DDP processes: rank 0 certifies the whole test set (batches of 3,
    so Lightning's own sharding is uneven), with the numbers of a single-process run."""
    datamodule = mvtec_datamodule(mvtec_root, eval_batch_size=3)
    checkpoint = advrad_checkpoint
    settings = {"sigmas": [0.25], "radii": [0.0, 0.05], "n0": 3, "n": 12, "alpha": 0.1, "batch_size": 48}
    reference = CertifyEval(**settings)  # one process, the model rebuilt from the checkpoint as the CLI does
    Engine(default_root_dir=tmp_path / "single", logger=False, callbacks=[reference]).test(
        AdvRAD(diffusion_step=tiny_advrad["diffusion_step"]), datamodule=datamodule, ckpt_path=checkpoint
    )
    single = reference.report
    callback = [f"--trainer.callbacks.init_args.{key}={json.dumps(value)}" for key, value in settings.items()]
    command = [
        str(Path(sys.executable).parent / "anomalib"), "test", "--model", "AdvRAD", "--ckpt_path", str(checkpoint),
        "--model.diffusion_step", str(tiny_advrad["diffusion_step"]),  # an inference option: not in the checkpoint
        "--data", "anomalib.data.MVTecAD", "--data.root", str(mvtec_root), "--data.category", "disc",
        "--data.eval_batch_size", "3", "--data.num_workers", "0",
        "--trainer.callbacks", "anomalib_robust.callbacks.CertifyEval", *callback,
        "--trainer.callbacks.init_args.output_dir", str(tmp_path / "ddp"),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--default_root_dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    saved = json.loads((tmp_path / "ddp" / "certify" / "report.json").read_text())
    assert saved["num_samples"] == single.num_samples == 8
    (result,) = saved["results"]
    assert result["smoothed_auroc"] == pytest.approx(single.results[0].smoothed_auroc, abs=1e-9)
    for radius, value in single.results[0].certified_auc.items():
        assert result["certified_auc"][str(radius)] == pytest.approx(value, abs=1e-9)
