"""The AdvRAD examples with tiny settings, so that they never rot: the Python ones in-process (their ``main(argv)``),
the shell script run by bash with its ``anomalib`` commands in-process (``run_shell_example``)."""

from collections.abc import Callable
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[3]


def test_python_example(run_example: Callable[..., str], tmp_path: Path) -> None:
    output = run_example("adv_rad_python.py", "--epochs", "1", "--num-train", "16", "--num-test", "16",
                         "--results", tmp_path, cwd=tmp_path)  # fmt: skip
    assert "image_AUROC" in output
    assert list(tmp_path.glob("AdvRAD/**/images/**/*.png")), "no anomaly-map visualisation was saved"


def test_cli_example(run_shell_example: Callable[..., str], tmp_path: Path) -> None:
    run_shell_example(REPOSITORY / "examples/adv_rad_cli.sh", cwd=REPOSITORY, EPOCHS="1", NUM_TRAIN="8", NUM_TEST="8",
                      RESULTS=str(tmp_path))  # fmt: skip
    assert list(tmp_path.glob("AdvRAD/**/*.ckpt"))
    assert list(tmp_path.glob("AdvRAD/**/images/**/*.png"))


def test_demo(run_example: Callable[..., str], tmp_path: Path) -> None:
    """`make demo` with tiny settings: both models trained, attacked and put in one table."""
    output = run_example("demo.py", "--epochs", "1", "--num-train", "16", "--num-test", "16", "--attack-steps", "2",
                         "--eot-samples", "2", "--results", tmp_path, cwd=tmp_path)  # fmt: skip
    assert "AdvRAD (CPU preset)" in output
    assert "Padim (undefended)" in output
    assert list(tmp_path.glob("*/robust_eval/**/report.json"))
