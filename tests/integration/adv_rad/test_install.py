"""`pip install .` (a regular wheel) and `pip install -e .` both load the plugin into anomalib."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import anomalib_robust

REPOSITORY = Path(__file__).resolve().parents[3]


def test_editable_install_loads_the_working_tree() -> None:
    """The test environment is the editable install that `make test` creates."""
    assert Path(anomalib_robust.__file__).resolve().is_relative_to(REPOSITORY)
    site_packages = Path(sysconfig.get_paths()["purelib"])
    assert (site_packages / "anomalib_robust.pth").read_text().strip() == "import anomalib_robust_autoload"


def test_regular_wheel_registers_the_model_and_cli_shorthands(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            wheel_dir,
            REPOSITORY,
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = wheel_dir.glob("anomalib_robust-*.whl")

    # A fresh environment that sees this one's dependencies (torch, anomalib) through a plain path entry, which
    # does not run this environment's own startup hooks, and has the wheel installed into its site-packages.
    environment = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", environment], check=True, timeout=120)
    python = environment / "bin" / "python"
    target = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip(),
    )
    (target / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target, wheel],
        check=True,
        timeout=300,
    )
    assert (target / "anomalib_robust.pth").is_file()

    code = (
        "import sys\n"
        "from anomalib.models import get_model\n"
        "import anomalib_robust\n"
        "print(anomalib_robust.__file__)\n"
        "print(type(get_model('adv_rad', image_size=(32, 32), base_channels=32, channel_mult=(1, 2))).__name__)\n"
        "sys.argv = ['anomalib', 'train', '--model', 'adv_rad', '--data', 'MVTecAD', '--print_config']\n"
        "from anomalib.cli.cli import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert Path(lines[0]).is_relative_to(target)
    assert lines[1] == "AdvRAD"
    assert "class_path: anomalib_robust.models.adv_rad.lightning_model.AdvRAD" in result.stdout
