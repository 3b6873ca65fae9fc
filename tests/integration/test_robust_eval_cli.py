"""The ``anomalib`` command with ``RobustEval``: shorthand, YAML, long form, DDP on 2 CPU processes (with
``CertifyEval``), and examples."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from anomalib.models import Fastflow
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Resize

from anomalib_robust.callbacks import CertifyEval, RobustEval
from anomalib_robust.data import FashionMNIST

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SIZE = 32
DATA = [
    "--data", str(REPO / "configs/data/fashion_mnist.yaml"), "--data.category", "trouser",
    "--data.image_size", str(SIZE), "--data.num_train", "16", "--data.num_test", "16", "--data.root", "embedded",
]  # fmt: skip
RESIZE = json.dumps(
    {
        "class_path": "anomalib.pre_processing.PreProcessor",
        "init_args": {
            "transform": {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [SIZE, SIZE]}}
        },
    }
)
FASTFLOW = ["--model", "Fastflow", "--model.backbone", "resnet18", "--model.pre_trained", "false",
            "--model.flow_steps", "2", "--model.pre_processor", RESIZE]  # fmt: skip
SETTINGS = {"eps": 4 / 255, "steps": 2, "sanity_checks": False, "plots": False}
CERTIFY = {"sigmas": [0.25], "radii": [0.0, 0.05], "n0": 3, "n": 12, "alpha": 0.1, "batch_size": 48}


def _run(command: list[str], cwd: Path, **env: str) -> str:
    environment = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _report(root: Path, norm: str = "linf") -> dict:
    (path,) = root.rglob(f"robust_eval/{norm}/report.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def fastflow(tmp_path_factory: pytest.TempPathFactory) -> tuple[Fastflow, FashionMNIST, Path]:
    """Fastflow fitted for two steps (it does not pin ``devices=1``, unlike the memory-bank models)."""
    torch.manual_seed(0)
    resize = PreProcessor(transform=Resize((SIZE, SIZE)))  # as RESIZE on the command line
    model = Fastflow(backbone="resnet18", pre_trained=False, flow_steps=2, pre_processor=resize)
    datamodule = FashionMNIST(category="trouser", root="embedded", image_size=SIZE, num_train=16, num_test=16)
    root = tmp_path_factory.mktemp("fastflow")
    engine = Engine(default_root_dir=root, max_steps=2, logger=False, enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    return model, datamodule, next(root.rglob("*.ckpt"))


def test_long_form_under_ddp_equals_single_process(fastflow: tuple, tmp_path: Path) -> None:
    """``RobustEval`` and ``CertifyEval`` in one ``anomalib test`` on 2 DDP processes: 10 test images in batches of 2,
    3 batches on rank 0 and 2 on rank 1 (an empty rank: tests/unit/evaluation), with the numbers of one process.
    ``RobustEval`` gathers the ranks' shares; ``CertifyEval`` certifies the whole test set on rank 0."""
    model, _, checkpoint = fastflow
    datamodule = FashionMNIST(category="trouser", root="embedded", image_size=SIZE, num_train=16, num_test=20,
                              eval_batch_size=2)  # fmt: skip
    datamodule.setup()
    single = RobustEval(**SETTINGS).evaluate(model, datamodule.test_dataloader())
    reference = CertifyEval(**CERTIFY)
    Engine(default_root_dir=tmp_path / "single", logger=False, callbacks=[reference]).test(model, datamodule=datamodule)
    callbacks = [
        argument
        for class_path, settings in (("RobustEval", SETTINGS), ("CertifyEval", CERTIFY))
        for argument in [
            f"--trainer.callbacks+=anomalib_robust.callbacks.{class_path}",  # += appends (jsonargparse)
            *(f"--trainer.callbacks.init_args.{key}={json.dumps(value)}" for key, value in settings.items()),
        ]
    ]  # fmt: skip
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    output = _run(
        ["anomalib", "test", *FASTFLOW, *DATA, *callbacks, *ddp, "--trainer.callbacks.init_args.output_dir", "ddp",
         "--data.num_test", "20", "--data.eval_batch_size", "2", "--ckpt_path", str(checkpoint),
         "--default_root_dir", "runs"],
        cwd=tmp_path,
    )  # fmt: skip
    assert "MEMBER: 2/2" in output
    assert output.count("Robust evaluation of Fastflow") == 1  # only rank 0 prints
    report = _report(tmp_path / "runs")
    assert report["num_samples"] == single.num_samples == 10
    assert report["clean_image_auroc"] == pytest.approx(single.clean_image_auroc, abs=1e-6)
    (result,) = report["results"]
    assert result["image_auroc"] == pytest.approx(single.results[0].image_auroc, abs=1e-6)
    assert result["pixel_auroc"] == pytest.approx(single.results[0].pixel_auroc, abs=1e-4)
    certified = json.loads((tmp_path / "ddp" / "certify" / "report.json").read_text())
    assert certified["num_samples"] == reference.report.num_samples == 10
    (smoothed,) = certified["results"]
    expected = reference.report.results[0]
    assert smoothed["smoothed_auroc"] == pytest.approx(expected.smoothed_auroc, abs=1e-9)
    assert any(value > 0 for value in expected.certified_auc.values())  # something is certified: a comparison
    for radius, value in expected.certified_auc.items():
        assert smoothed["certified_auc"][str(radius)] == pytest.approx(value, abs=1e-9)


def test_cli_example_shorthand_and_yaml(run_shell_example: Callable[..., str], tmp_path: Path) -> None:
    """``examples/robust_eval_cli.sh``: ``anomalib train``, then ``anomalib test --callbacks robust_eval`` and YAML."""
    run_shell_example(REPO / "examples/robust_eval_cli.sh", cwd=tmp_path,
                      IMAGE_SIZE=str(SIZE), NUM_TRAIN="16", NUM_TEST="16", STEPS="2", QUERIES="10")  # fmt: skip
    linf, l2 = _report(tmp_path / "results", "linf"), _report(tmp_path / "results", "l2")
    assert [result["attack"] for result in linf["results"] if result["role"] == "attack"] == ["PGD"] * 2 + ["APGD"] * 2
    assert [result["eps"] for result in l2["results"][:2]] == [0.1, 0.2]
    assert all(result["status"] == "ok" for result in linf["results"] + l2["results"])


def test_python_example(run_example: Callable[..., str], tmp_path: Path) -> None:
    output = run_example("robust_eval_python.py", "--image-size", SIZE, "--num-train", "16", "--num-test", "16",
                         "--steps", "2", "--results", "results", cwd=tmp_path)  # fmt: skip
    assert "robust (PGD 2/255)" in output
    assert _report(tmp_path / "results")["model"] == "Padim"
