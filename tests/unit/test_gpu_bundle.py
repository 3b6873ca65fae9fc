"""The GPU bundle's check (benchmarks/gpu/bundle.py): what `pip install --no-deps` on the GPU machine does not check."""

import importlib.util
import zipfile
from pathlib import Path

from packaging.version import Version

_SPEC = importlib.util.spec_from_file_location("bundle", Path(__file__).parents[2] / "benchmarks" / "gpu" / "bundle.py")
bundle = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bundle)


def _wheel(directory: Path, filename: str, *requirements: str) -> None:
    name, version = filename.split("-")[:2]
    metadata = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                          *(f"Requires-Dist: {requirement}" for requirement in requirements)])  # fmt: skip
    with zipfile.ZipFile(directory / filename, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", metadata + "\n")


def test_requirements_markers_extras_tags_and_versions_are_checked(tmp_path: Path) -> None:
    _wheel(tmp_path, "a-1.0-py3-none-any.whl", "b>=2", "c[x]", 'd; python_version < "3.10"', 'e; extra == "docs"')
    _wheel(tmp_path, "b-2.1-py3-none-any.whl")
    _wheel(tmp_path, "c-1.0-py3-none-any.whl", 'f>=2; extra == "x"', "g", "imagecodecs")
    _wheel(tmp_path, "h-1.0-cp311-cp311-manylinux_2_17_x86_64.whl")
    problems, notes = bundle.check(tmp_path, {"f": Version("1.0"), "g": None})
    # d (Python < 3.10) and e (an extra nobody asks for) are not needed; c's extra x is asked for by a
    assert sorted(problems) == [
        'c needs f>=2; extra == "x", machine: 1.0',
        "h-1.0-cp311-cp311-manylinux_2_17_x86_64.whl: does not install on CPython 3.12, manylinux x86_64",
    ]
    assert any(note.startswith("c needs imagecodecs: left out") for note in notes)  # deliberately not bundled
    assert notes[-1].startswith("4 wheels")
