"""Where a leaderboard number comes from: the package versions and the git commit of the checkout, if any.

The commit is read from the ``.git`` directory (``HEAD``, the ref it names, or ``packed-refs``) without running git.
"""

import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("anomalib-robust", "anomalib", "torch", "lightning")
"""The packages whose versions an entry records; entries that differ in these are not merged unless asked."""


def package_versions() -> dict[str, str | None]:
    """Versions of :data:`PACKAGES` and of Python (``None`` for a package that is not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(start: Path | None = None) -> str | None:
    """The commit checked out in the repository that holds ``start`` (this package by default), or ``None``."""
    directory = (start or Path(__file__)).resolve()
    for parent in [directory, *directory.parents]:
        git = parent / ".git"
        if git.is_dir():
            return _resolve_head(git)
    return None


def _resolve_head(git: Path) -> str | None:
    try:
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if not head.startswith("ref: "):
        return head or None
    ref = head.removeprefix("ref: ")
    loose = git / ref
    if loose.is_file():
        return loose.read_text(encoding="utf-8").strip() or None
    packed = git / "packed-refs"
    if packed.is_file():
        for line in packed.read_text(encoding="utf-8").splitlines():
            commit, _, name = line.partition(" ")
            if name == ref:
                return commit
    return None
