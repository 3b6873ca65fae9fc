"""The start-up hook loads the plugin when anomalib is imported (anomalib's Python API then sees AdvRAD without an
import of the plugin), and ``ANOMALIB_ROBUST_AUTOLOAD=0`` switches it off."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
CODE = (
    "import sys\n"
    "from anomalib.models import get_model, list_models\n"
    "loaded = 'anomalib_robust' in sys.modules\n"
    "if loaded:\n"
    "    model = get_model('AdvRAD', image_size=(32, 32), base_channels=32, channel_mult=(1, 2))\n"
    "    print(type(model).__module__, 'AdvRAD' in list_models(case='pascal'))\n"
    "print(loaded)\n"
)


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working tree's hook module under its installed name, to go first on ``PYTHONPATH``.

    The installed ``anomalib_robust.pth`` runs ``import anomalib_robust_autoload`` at start-up; ``PYTHONPATH`` comes
    before site-packages, so that import finds this copy and the test checks the source, not the installed copy of
    the last ``pip install``.
    """
    directory = tmp_path_factory.mktemp("hook")
    shutil.copy(REPOSITORY / "anomalib_robust" / "_autoload.py", directory / "anomalib_robust_autoload.py")
    return directory


def _printed(hook_dir: Path, **variables: str) -> list[str]:
    """The lines ``CODE`` prints in a fresh interpreter: the plugin's model seen by anomalib's API, when loaded."""
    environment = {key: value for key, value in os.environ.items() if key != "ANOMALIB_ROBUST_AUTOLOAD"}
    environment.update(OMP_NUM_THREADS="1", PYTHONPATH=str(hook_dir), **variables)
    result = subprocess.run(
        [sys.executable, "-c", CODE],
        capture_output=True,
        text=True,
        env=environment,
        cwd=hook_dir,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()


def test_importing_anomalib_models_loads_the_plugin_for_the_python_api(hook_dir: Path) -> None:
    assert _printed(hook_dir)[-2:] == ["anomalib_robust.models.adv_rad.lightning_model True", "True"]


def test_the_variable_switches_the_hook_off(hook_dir: Path) -> None:
    assert _printed(hook_dir, ANOMALIB_ROBUST_AUTOLOAD="0")[-1:] == ["False"]
