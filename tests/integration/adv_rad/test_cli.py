"""The anomalib CLI with the plugin installed, run as a user types it (subprocess)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ANOMALIB = str(Path(sys.executable).with_name("anomalib"))
TINY_MODEL_ARGS = [
    "--model.image_size=[32,32]",
    "--model.base_channels=32",
    "--model.channel_mult=[1,2]",
    "--model.attention_resolutions=[]",
    "--model.layers_per_block=1",
    "--model.num_timesteps=100",
    "--model.diffusion_step=10",
]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=environment, check=False, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result


def data_args(root: Path) -> list[str]:
    return [
        "--data",
        "MVTecAD",
        f"--data.root={root}",
        "--data.category=disc",
        "--data.train_batch_size=4",
        "--data.eval_batch_size=4",
        "--data.num_workers=0",
    ]


@pytest.fixture(scope="module")
def trained_checkpoint(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``anomalib train --model AdvRAD ...`` exactly as in the README."""
    workdir = tmp_path_factory.mktemp("cli")
    run(ANOMALIB, "train", "--model", "AdvRAD", *TINY_MODEL_ARGS, *data_args(mvtec_root),
        "--trainer.max_steps=3", "--default_root_dir=results", cwd=workdir)  # fmt: skip
    checkpoints = sorted(workdir.glob("results/**/*.ckpt"))
    assert checkpoints, "anomalib train wrote no checkpoint"
    return checkpoints[-1]


@pytest.mark.parametrize("name", ["adv_rad", "anomalib_robust.models.AdvRAD"])
def test_train_accepts_snake_case_and_class_path(name: str, mvtec_root: Path, tmp_path: Path) -> None:
    result = run(ANOMALIB, "train", "--model", name, *TINY_MODEL_ARGS, *data_args(mvtec_root), "--print_config",
                 cwd=tmp_path)  # fmt: skip
    assert re.search(r"class_path: anomalib_robust\.models\.(adv_rad\.lightning_model\.)?AdvRAD\n", result.stdout)


def test_test_from_checkpoint_without_repeating_the_architecture(
    trained_checkpoint: Path,
    mvtec_root: Path,
    tmp_path: Path,
) -> None:
    result = run(ANOMALIB, "test", "--model", "AdvRAD", *data_args(mvtec_root), f"--ckpt_path={trained_checkpoint}",
                 "--default_root_dir=results", cwd=tmp_path)  # fmt: skip
    assert "image_AUROC" in result.stdout + result.stderr


def test_predict_from_checkpoint(trained_checkpoint: Path, mvtec_root: Path, tmp_path: Path) -> None:
    images = mvtec_root / "disc" / "test" / "scratch"
    run(ANOMALIB, "predict", "--model", "AdvRAD", f"--data={images}", f"--ckpt_path={trained_checkpoint}",
        "--default_root_dir=results", cwd=tmp_path)  # fmt: skip
    assert list(tmp_path.glob("results/**/*.png")), "anomalib predict saved no visualisation"


def test_python_api_sees_the_model_without_importing_the_plugin() -> None:
    """The startup hook imports the plugin as soon as anomalib.models is imported."""
    code = (
        "from anomalib.models import get_model, list_models\n"
        "model = get_model('AdvRAD', image_size=(32, 32), base_channels=32, channel_mult=(1, 2))\n"
        "print(type(model).__module__, 'AdvRAD' in list_models(case='pascal'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.split()[-2:] == ["anomalib_robust.models.adv_rad.lightning_model", "True"]


def test_unrelated_processes_do_not_import_anomalib() -> None:
    code = "import sys; print(any(name.split('.')[0] in {'anomalib', 'anomalib_robust', 'torch'} for name in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "False"
