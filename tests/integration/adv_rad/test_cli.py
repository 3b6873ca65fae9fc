"""The anomalib CLI with the plugin installed: its commands in-process (``AnomalibCLI``, as the console script runs\nit), the start-up hook in fresh interpreters (subprocess)."""

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

TINY_MODEL_ARGS = [
    "--model.image_size=[32,32]",
    "--model.base_channels=32",
    "--model.channel_mult=[1,2]",
    "--model.attention_resolutions=[]",
    "--model.layers_per_block=1",
    "--model.num_timesteps=100",
    "--model.diffusion_step=10",
]


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


@pytest.mark.parametrize("name", ["adv_rad", "anomalib_robust.models.AdvRAD"])
def test_train_accepts_snake_case_and_class_path(
    name: str, mvtec_root: Path, tmp_path: Path, anomalib_cli: Callable[..., str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:  # --print_config prints, then exits like the console script
        anomalib_cli("train", "--model", name, *TINY_MODEL_ARGS, *data_args(mvtec_root), "--print_config", cwd=tmp_path)
    assert not exit_info.value.code
    output = anomalib_cli.last_output()
    assert re.search(r"class_path: anomalib_robust\.models\.(adv_rad\.lightning_model\.)?AdvRAD\n", output)


def test_test_from_checkpoint_without_repeating_the_architecture(
    advrad_checkpoint: Path, mvtec_root: Path, tmp_path: Path, anomalib_cli: Callable[..., str]
) -> None:
    output = anomalib_cli("test", "--model", "AdvRAD", *data_args(mvtec_root), f"--ckpt_path={advrad_checkpoint}",
                          "--default_root_dir=results", cwd=tmp_path)  # fmt: skip
    assert "image_AUROC" in output and "pixel_AUROC" in output


def test_predict_from_checkpoint(
    advrad_checkpoint: Path, mvtec_root: Path, tmp_path: Path, anomalib_cli: Callable[..., str]
) -> None:
    images = mvtec_root / "disc" / "test" / "scratch"
    anomalib_cli("predict", "--model", "AdvRAD", f"--data={images}", f"--ckpt_path={advrad_checkpoint}",
                 "--default_root_dir=results", cwd=tmp_path)  # fmt: skip
    saved = list(tmp_path.glob("results/**/*.png"))
    assert len(saved) == len(list(images.glob("*.png"))), "anomalib predict saves one visualisation per image"


def test_unrelated_processes_do_not_import_anomalib() -> None:
    code = (
        "import sys; print(any(name.split('.')[0] in {'anomalib', 'anomalib_robust', 'torch'} for name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "False"
