"""Shared test settings: one torch thread per process (2-core CI), deterministic seeds, the ``device`` a test runs on
(``cuda`` variants deselected where there is no GPU), a tiny AdvRAD, artefacts built once per test run and shared by the
xdist workers, and the ``anomalib`` command run in-process."""

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
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


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device a test runs on: ``cpu``, and ``cuda`` for the tests marked ``cuda`` (``pytest -m cuda`` on a GPU)."""
    return torch.device(request.param)


@pytest.fixture
def generator_devices(monkeypatch: pytest.MonkeyPatch) -> list[torch.device | None]:
    """The ``device`` argument of every ``torch.Generator`` made during the test, ``None`` where none was given.

    The generators made are ordinary CPU ones, so that a test on the CPU checks which device the code asks for: the
    device of the tensors it serves, for the code to run on a GPU.
    """
    devices = []

    class RecordingGenerator(torch.Generator):
        def __init__(self, device: torch.device | str | None = None) -> None:
            devices.append(None if device is None else torch.device(device))
            super().__init__()

    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    return devices


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the ``cuda`` tests where torch sees no CUDA device: they are reported as deselected, never skipped."""
    if torch.cuda.is_available():
        return
    deselected = [item for item in items if item.get_closest_marker("cuda")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]


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


ANOMALIB_SHIM = """\
#!{python} -I
# ``anomalib`` on the PATH of a shell example under test: hands its arguments and working directory to the test
# process (which runs them with ``AnomalibCLI``) and exits with the status that run ended with.
import json, os, socket, sys

client = socket.socket(socket.AF_UNIX)
client.connect(os.environ["ANOMALIB_IN_PROCESS_SOCKET"])
client.sendall(json.dumps({{"args": sys.argv[1:], "cwd": os.getcwd()}}).encode())
client.shutdown(socket.SHUT_WR)
sys.exit(int(client.makefile().read() or 1))
"""


class InProcessShell:
    """``shell("examples/x.sh", cwd=..., VAR="value")`` runs the script with bash, as a user does, while every
    ``anomalib`` command in it runs in this process (:class:`InProcessCLI`): the script's own logic (its variables,
    ``ls``, ``find``, ``set -e``) runs for real, and the test skips one interpreter start (torch and anomalib
    imports) per command. Returns the text that the script and its commands printed and logged."""

    def __init__(self, cli: InProcessCLI):
        self.cli = cli

    def __call__(self, script: Path, cwd: Path, timeout: float = 900, **environment: str) -> str:
        with tempfile.TemporaryDirectory(prefix="anomalib-shim-") as shim:  # short: a socket path has <= 107 bytes
            executable = Path(shim) / "anomalib"
            executable.write_text(ANOMALIB_SHIM.format(python=sys.executable))
            executable.chmod(0o755)
            address = str(Path(shim) / "socket")
            server = socket.socket(socket.AF_UNIX)
            server.bind(address)
            server.listen(1)
            server.settimeout(0.2)
            env = {**os.environ, **environment, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
                   "ANOMALIB_IN_PROCESS_SOCKET": address}  # fmt: skip
            log = Path(shim) / "script.log"
            with log.open("w") as script_output:
                process = subprocess.Popen(["bash", str(script)], cwd=cwd, env=env, stdout=script_output,
                                           stderr=subprocess.STDOUT)  # fmt: skip
                outputs = self._serve(server, process, timeout)
            server.close()
            text = log.read_text() + "".join(outputs)
        assert process.returncode == 0, f"{script} exited with {process.returncode}:\n{text[-6000:]}"
        return text

    def _serve(self, server: socket.socket, process: subprocess.Popen, timeout: float) -> list[str]:
        """Run each ``anomalib`` command the script sends until the script exits (or ``timeout`` seconds pass)."""
        outputs, deadline = [], time.monotonic() + timeout
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                outputs.append(f"timed out after {timeout} s\n")
                break
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                request = json.loads(connection.makefile("rb").read())
                status = self._run(request["args"], Path(request["cwd"]), outputs)
                connection.sendall(str(status).encode())
        return outputs

    def _run(self, args: list[str], cwd: Path, outputs: list[str]) -> int:
        status = 0
        try:
            self.cli(*args, cwd=cwd)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        except Exception as error:  # noqa: BLE001 - reported to the script as a failed command, as a process would be
            status = 1
            outputs.append(f"{type(error).__name__}: {error}\n")
        outputs.append(f"$ anomalib {' '.join(args)}\n{self.cli.last_output()}")
        return status


@pytest.fixture
def run_shell_example(anomalib_cli: InProcessCLI, embedded_by_default: None) -> InProcessShell:
    """A shell example run by bash with its ``anomalib`` commands in-process: see :class:`InProcessShell`."""
    return InProcessShell(anomalib_cli)
