"""``ANOMALIB_ROBUST_AUTOLOAD=0`` switches off the start-up hook that loads the plugin when anomalib is imported."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
CODE = "import sys; import anomalib.models; print('anomalib_robust' in sys.modules)"


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


def _plugin_loaded(hook_dir: Path, **variables: str) -> bool:
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
    return result.stdout.strip().splitlines()[-1] == "True"


def test_importing_anomalib_models_loads_the_plugin(hook_dir: Path) -> None:
    assert _plugin_loaded(hook_dir)


def test_the_variable_switches_the_hook_off(hook_dir: Path) -> None:
    assert not _plugin_loaded(hook_dir, ANOMALIB_ROBUST_AUTOLOAD="0")
