"""Which code computed a result: the package versions, the git commit of the checkout and its uncommitted changes.

The robust evaluation's resume store (:mod:`~anomalib_robust.evaluation.resume`) and the leaderboard's caches of cells
and fitted models key on :func:`loaded_code_identity`, so that a result computed by other code is computed again,
and every leaderboard entry records it. The commit is read from the ``.git`` directory (``HEAD``, the ref it names, or
``packed-refs``) without running git; the uncommitted changes need git (``git diff HEAD``).

Example:
    >>> identity = code_identity()
    >>> sorted(identity)
    ['git_commit', 'git_diff', 'git_dirty', 'versions']
"""

import functools
import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("anomalib-robust", "anomalib", "torch", "lightning")
"""The packages whose versions an entry records; entries that differ in these are not merged unless asked."""

GIT_TIMEOUT = 10.0
"""Seconds ``git diff`` may take before the changes count as unknown."""


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


def uncommitted_changes(start: Path | None = None) -> bytes | None:
    """The changes to tracked files, staged or not, of the checkout that holds ``start`` (this package by default):
    ``git diff HEAD``'s output, empty for a clean checkout; ``None`` outside a checkout, without git, or when git
    fails or takes longer than :data:`GIT_TIMEOUT`. Untracked files are not part of it. Takes no lock on the index."""
    directory = (start or Path(__file__)).resolve()
    command = ["git", "--no-optional-locks", "diff", "HEAD", "--binary", "--no-color", "--no-ext-diff", "--no-textconv"]
    try:
        result = subprocess.run(
            command,
            cwd=directory if directory.is_dir() else directory.parent,
            capture_output=True,
            timeout=GIT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):  # git missing, or a checkout too slow to diff
        return None
    return result.stdout if result.returncode == 0 else None


def code_identity() -> dict:
    """The code that computes a result now: ``versions`` (:func:`package_versions`), ``git_commit``, ``git_dirty``
    (whether tracked files have uncommitted changes) and ``git_diff`` (the first 16 hex digits of the SHA-256 of those
    changes, ``None`` for a clean checkout).

    A clean checkout is identified by its commit. A dirty one is identified by its commit and the digest of its
    changes, which misses only untracked files (a new module not yet added to git). Without git (or outside a
    checkout) ``git_dirty`` and ``git_diff`` are ``None``, and a result is keyed by the commit and versions only.
    """
    changes = uncommitted_changes()
    return {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "git_dirty": None if changes is None else bool(changes),
        "git_diff": hashlib.sha256(changes).hexdigest()[:16] if changes else None,
    }


@functools.cache
def loaded_code_identity() -> dict:
    """:func:`code_identity` as of its first call in this process, which is what the caches key on.

    Python does not reload a module edited after it was imported, so a long run (a leaderboard of an hour) keeps
    running the code it started with; calling :func:`code_identity` per result would attribute results to commits made
    while it ran (measured: a reduced-leaderboard run recorded a commit made 40 minutes after it started).
    """
    return code_identity()
