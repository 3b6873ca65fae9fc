"""Shared test settings: one torch thread per process (2-core CI), deterministic seeds, a tiny AdvRAD, artefacts built
once per test run and shared by the xdist workers, and the ``anomalib`` command run in-process."""

import logging
import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from shared_artifacts import TINY_ADVRAD

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_advrad() -> dict:
    """Init args of an AdvRAD (32 x 32 images) small enough to fit in a few seconds on a CPU."""
    return dict(TINY_ADVRAD)


@pytest.fixture
def embedded_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """``FashionMNIST(root=None)`` reads the embedded subset even where Debian's full copy is installed (CI has not
    got it), so the examples and commands run here see the same images on every machine."""
    from anomalib_robust.data.fashion_mnist_source import resolve_root

    monkeypatch.setitem(resolve_root.__globals__, "DEBIAN_ROOT", Path("/nonexistent/fashion-mnist"))


class InProcessCLI:
    """``cli(*args, cwd=...)`` runs ``anomalib <args>`` in this process (``AnomalibCLI``, as the console script does,
    with the plugin loaded by its start-up hook) and returns what it printed and logged; ``cli.last_output()`` is that
    text also when the command exited (``SystemExit``, e.g. after ``--print_config``)."""

    def __init__(self, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
        self.capfd, self.caplog, self.monkeypatch = capfd, caplog, monkeypatch
        self.output = ""

    def __call__(self, *args: object, cwd: Path) -> str:
        from anomalib.cli.cli import AnomalibCLI

        arguments = [str(arg) for arg in args]
        self.caplog.set_level(logging.INFO)
        self.capfd.readouterr()
        self.caplog.clear()
        try:
            with self.monkeypatch.context() as patch:
                patch.chdir(cwd)
                patch.setattr("sys.argv", ["anomalib", *arguments])
                AnomalibCLI(args=arguments, run=True)
        finally:
            captured = self.capfd.readouterr()
            self.output = captured.out + captured.err + self.caplog.text
        return self.output

    def last_output(self) -> str:
        return self.output


@pytest.fixture
def anomalib_cli(
    capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> InProcessCLI:
    """The ``anomalib`` command, in-process: see :class:`InProcessCLI`."""
    return InProcessCLI(capfd, caplog, monkeypatch)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def run_example(
    embedded_by_default: None,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., str]:
    """``run_example("demo.py", *argv, cwd=...)`` calls ``examples/demo.py``'s ``main(argv)`` in this process, on the
    embedded Fashion-MNIST subset, and returns what it printed and logged."""
    import importlib.util

    def run(name: str, *argv: object, cwd: Path) -> str:
        spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", EXAMPLES / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        caplog.set_level(logging.INFO)
        capfd.readouterr()
        caplog.clear()
        with monkeypatch.context() as patch:
            patch.chdir(cwd)
            module.main([str(arg) for arg in argv])
        captured = capfd.readouterr()
        return captured.out + captured.err + caplog.text

    return run
