"""The wheel bundle for the GPU machine: download, build, and check it before it travels (``make gpu-bundle``).

The GPU machine has Python 3.12, torch and CUDA but no network and no anomalib, so what anomalib-robust needs beyond
the machine's own packages (``machine.txt``) travels as wheels in an ignored folder and is installed there with
``pip install --no-index --no-deps`` (``install.sh``), where pip checks nothing. This script builds the folder:

1. the wheels of ``requirements.txt`` for CPython 3.12 on manylinux x86_64 (``pip download --no-deps``);
2. wheels built here from the source-only distributions of ``requirements-sdist.txt``;
3. this package's wheel;

and then checks here what pip would have checked there:

- every wheel installs on CPython 3.12, manylinux x86_64, and there is one version of each distribution;
- every requirement of every wheel (its markers evaluated for that interpreter, its extras followed where a bundled
  wheel asks for them) is met by the bundle or by the machine, in the required version where the version is known;
- the bundle fits the travel budget (:data:`BUDGET_MIB`).

It prints one line per finding and exits with status 1 on an unmet requirement, a wheel that cannot install there, two
versions of one distribution or a bundle over the budget.

Example:
    $ python benchmarks/gpu/bundle.py .whl            # what `make gpu-bundle` runs
    $ python benchmarks/gpu/bundle.py .whl --check    # check an existing bundle only
"""

import argparse
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import NormalizedName, canonicalize_name, parse_wheel_filename
from packaging.version import Version

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
PYTHON = (3, 12)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
"""Platforms of the downloaded wheels (the machine's glibc is newer than 2.28)."""
BUDGET_MIB = 50
"""The bundle's share of the 64 MiB that travel with the working tree to the GPU machine."""
NOT_NEEDED = {
    "imagecodecs": "anomalib requires it but never imports it (tifffile's optional codecs), and its wheel is ~40 MiB",
}
"""Requirements deliberately left out of the bundle, with the reason printed by the check."""
ENVIRONMENT = {
    **default_environment(),
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
}
"""Marker environment of the machine's interpreter (Python 3.12.3 on Linux x86_64)."""


def download(directory: Path) -> None:
    """Fill ``directory`` (emptied first, so that no older version stays beside a newer one) with the bundle."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    subprocess.run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
                    "--python-version", ".".join(map(str, PYTHON)), *platforms, "--platform", "any",
                    "-d", directory, "-r", HERE / "requirements.txt"], check=True)  # fmt: skip
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "-w", directory, "-r", HERE / "requirements-sdist.txt"],
                   check=True)  # fmt: skip
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", directory, REPOSITORY],
                   check=True)  # fmt: skip


def machine_packages(path: Path = HERE / "machine.txt") -> dict[NormalizedName, Version | None]:
    """The machine's distributions (``name`` or ``name==version`` per line, ``#`` comments) and known versions."""
    packages = {}
    for line in path.read_text().splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            name, _, version = entry.partition("==")
            packages[canonicalize_name(name)] = Version(version) if version else None
    return packages


def requirements(wheel: Path) -> list[Requirement]:
    """The ``Requires-Dist`` entries of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(archive.read(metadata).decode())
    return [Requirement(line) for line in message.get_all("Requires-Dist") or []]


def applies(requirement: Requirement, extras: set[str]) -> bool:
    """Whether ``requirement`` holds on the machine's interpreter for a wheel installed with ``extras``."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**ENVIRONMENT, "extra": extra}) for extra in {"", *extras})


def check(directory: Path, machine: dict[NormalizedName, Version | None]) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` of the bundle in ``directory`` against the machine's packages (see the module docs)."""
    problems, notes = [], []
    supported = {*cpython_tags(PYTHON, platforms=PLATFORMS), *compatible_tags(PYTHON, f"cp{PYTHON[0]}{PYTHON[1]}",
                                                                             PLATFORMS)}  # fmt: skip
    bundle: dict[NormalizedName, tuple[Version, Path]] = {}
    for wheel in sorted(directory.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if not tags & supported:
            problems.append(f"{wheel.name}: does not install on CPython {PYTHON[0]}.{PYTHON[1]}, manylinux x86_64")
        if name in bundle:
            problems.append(f"{name}: two versions, {bundle[name][0]} and {version}")
        bundle[name] = version, wheel
    needs = {name: requirements(wheel) for name, (_, wheel) in bundle.items()}
    extras: dict[NormalizedName, set[str]] = {name: set() for name in bundle}
    changed = True
    while changed:  # an extra asked for by one wheel can ask for another wheel's extra
        changed = False
        for name, listed in needs.items():
            for requirement in listed:
                target = canonicalize_name(requirement.name)
                if applies(requirement, extras[name]) and target in extras and not requirement.extras <= extras[target]:
                    extras[target] |= requirement.extras
                    changed = True
    for name, listed in needs.items():
        for requirement in filter(lambda requirement: applies(requirement, extras[name]), listed):
            target = canonicalize_name(requirement.name)
            found = bundle[target][0] if target in bundle else machine.get(target)
            if target in NOT_NEEDED:
                notes.append(f"{name} needs {requirement}: left out, {NOT_NEEDED[target]}")
            elif target not in bundle and target not in machine:
                problems.append(f"{name} needs {requirement}: neither in the bundle nor on the machine")
            elif found is not None and not requirement.specifier.contains(found, prereleases=True):
                problems.append(f"{name} needs {requirement}, {'bundled' if target in bundle else 'machine'}: {found}")
            elif found is None and requirement.specifier:
                notes.append(f"{name} needs {requirement}: on the machine, version not known here")
    size_mib = sum(wheel.stat().st_size for _, wheel in bundle.values()) / 2**20
    if size_mib > BUDGET_MIB:
        problems.append(f"the bundle holds {size_mib:.1f} MiB, over the {BUDGET_MIB} MiB budget")
    notes.append(f"{len(bundle)} wheels, {size_mib:.1f} MiB (budget {BUDGET_MIB} MiB)")
    return problems, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="the bundle's folder (ignored by git), e.g. .whl")
    parser.add_argument("--check", action="store_true", help="check the folder as it is, download nothing")
    arguments = parser.parse_args()
    if not arguments.check:
        download(arguments.directory)
    problems, notes = check(arguments.directory, machine_packages())
    for line in notes:
        print(f"note: {line}")
    for line in problems:
        print(f"PROBLEM: {line}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
