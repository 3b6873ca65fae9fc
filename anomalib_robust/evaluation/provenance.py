"""Which code computed a result: a digest of the package's source and configs, the package versions, and, as a
record, the git commit of the checkout and its uncommitted changes.

The robust evaluation's resume store (:mod:`~anomalib_robust.evaluation.resume`), the leaderboard's caches of cells
and fitted models and the benchmarks' cells key on :func:`loaded_code_key`: the versions of :data:`PACKAGES` and
the SHA-256 of this package's source files and configs as they were imported (:func:`source_digest`). So a result
computed by other code is computed again, while a commit that changes only docs, tests or benchmarks keeps partial
measurements valid, and a git worktree, an install nested in another repository or a locally patched regular install
each get the key its code deserves. The commit and the digest of the uncommitted changes are kept beside every
result (:func:`loaded_code_identity`) as a record of where it came from, never as the key: the commit is read from
the checkout that holds this package (a ``.git`` directory, or the ``.git`` file of a worktree) without running git,
and only when that checkout is this project's (its ``pyproject.toml`` names ``anomalib-robust``); the uncommitted
changes need git (``git diff HEAD``).

Example:
    >>> identity = code_identity()
    >>> sorted(identity)
    ['git_commit', 'git_diff', 'git_dirty', 'source', 'versions']
    >>> sorted(code_key())
    ['source', 'versions']
"""

import functools
import hashlib
import platform
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

PACKAGES = ("anomalib-robust", "anomalib", "torch", "lightning")
"""The packages whose versions an entry records; entries that differ in these are not merged unless asked."""

PROJECT_NAME = "anomalib-robust"
"""The ``[project] name`` of this project's ``pyproject.toml``: a checkout that holds the package is ours only then."""

SOURCE_SUFFIXES = (".py", ".yaml", ".yml", ".pth")
"""The files of the package (and of its configs) whose content makes the code: modules, configs, the start-up hook."""

GIT_TIMEOUT = 10.0
"""Seconds ``git diff`` may take before the changes count as unknown."""

PACKAGE_DIRECTORY = Path(__file__).resolve().parents[1]
"""The imported ``anomalib_robust`` package."""


def package_versions() -> dict[str, str | None]:
    """Versions of :data:`PACKAGES` and of Python (``None`` for a package that is not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def project_root(package: Path | None = None) -> Path | None:
    """The checkout of this project that holds ``package`` (:data:`PACKAGE_DIRECTORY` by default): the nearest
    directory above it whose ``pyproject.toml`` names :data:`PROJECT_NAME`, or ``None`` (a regular install, or one
    nested inside another project's tree)."""
    for parent in (package or PACKAGE_DIRECTORY).resolve().parents:
        pyproject = parent / "pyproject.toml"
        if pyproject.is_file():
            try:
                name = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {}).get("name")
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
                name = None
            if name == PROJECT_NAME:
                return parent
    return None


def source_files(package: Path | None = None) -> list[tuple[str, Path]]:
    """The files that make ``package``'s code (:data:`PACKAGE_DIRECTORY` by default), as ``(name, path)`` sorted by
    name: every :data:`SOURCE_SUFFIXES` file under the package (caches excluded), and the configs: the package's own
    ``configs/`` (a regular install), else the ``configs/`` of the checkout that holds it (:func:`project_root`; an
    editable install reads those)."""
    package = (package or PACKAGE_DIRECTORY).resolve()
    roots = {"package": package}
    if not (package / "configs").is_dir():
        root = project_root(package)
        if root is not None and (root / "configs").is_dir():
            roots["configs"] = root / "configs"
    files = [
        (f"{label}/{path.relative_to(directory).as_posix()}", path)
        for label, directory in roots.items()
        for path in directory.rglob("*")
        if path.suffix in SOURCE_SUFFIXES and path.is_file() and "__pycache__" not in path.parts
    ]
    return sorted(files)


def source_digest(package: Path | None = None) -> str:
    """The first 16 hex digits of the SHA-256 over the names and contents of :func:`source_files`."""
    digest = hashlib.sha256()
    for name, path in source_files(package):
        content = path.read_bytes()
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()[:16]


def git_directory(checkout: Path) -> Path | None:
    """The git directory of ``checkout``: its ``.git`` directory, or the one a worktree's ``.git`` file points to."""
    git = checkout / ".git"
    if git.is_dir():
        return git
    if git.is_file():
        pointer = git.read_text(encoding="utf-8").strip()
        if pointer.startswith("gitdir: "):
            target = Path(pointer.removeprefix("gitdir: "))
            target = target if target.is_absolute() else checkout / target
            return target if target.is_dir() else None
    return None


def git_commit(start: Path | None = None) -> str | None:
    """The commit checked out in the repository or worktree that holds ``start``, or ``None``.

    By default ``start`` is this project's checkout (:func:`project_root`), so that an install nested inside another
    repository records no commit rather than that repository's.
    """
    if start is None:
        start = project_root()
        if start is None:
            return None
    directory = start.resolve()
    for parent in [directory, *directory.parents]:
        git = git_directory(parent)
        if git is not None:
            return _resolve_head(git)
    return None


def _resolve_head(git: Path) -> str | None:
    """``HEAD`` of the git directory ``git``; a worktree keeps its ``HEAD`` and shares the refs of the main one."""
    try:
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if not head.startswith("ref: "):
        return head or None
    ref = head.removeprefix("ref: ")
    common = git
    if (git / "commondir").is_file():
        common = (git / (git / "commondir").read_text(encoding="utf-8").strip()).resolve()
    for directory in dict.fromkeys([git, common]):
        loose = directory / ref
        if loose.is_file():
            return loose.read_text(encoding="utf-8").strip() or None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text(encoding="utf-8").splitlines():
            commit, _, name = line.partition(" ")
            if name == ref:
                return commit
    return None


def uncommitted_changes(start: Path | None = None) -> bytes | None:
    """The changes to tracked files, staged or not, of the checkout that holds ``start`` (this project's checkout by
    default): ``git diff HEAD``'s output, empty for a clean checkout; ``None`` outside a checkout, without git, or
    when git fails or takes longer than :data:`GIT_TIMEOUT`. Untracked files are not part of it. Takes no lock on
    the index."""
    directory = start if start is not None else project_root()
    if directory is None:
        return None
    directory = directory.resolve()
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


def code_key() -> dict:
    """What a cached result is keyed on: ``versions`` (:func:`package_versions`) and ``source``
    (:func:`source_digest` of the imported package and its configs)."""
    return {"versions": package_versions(), "source": source_digest()}


def code_identity() -> dict:
    """:func:`code_key` and the record of where the code came from: ``git_commit``, ``git_dirty`` (whether tracked
    files have uncommitted changes) and ``git_diff`` (the first 16 hex digits of the SHA-256 of those changes,
    ``None`` for a clean checkout). Without git, or outside this project's checkout, ``git_dirty`` and ``git_diff``
    are ``None``."""
    changes = uncommitted_changes()
    return {
        **code_key(),
        "git_commit": git_commit(),
        "git_dirty": None if changes is None else bool(changes),
        "git_diff": hashlib.sha256(changes).hexdigest()[:16] if changes else None,
    }


@functools.cache
def loaded_code_identity() -> dict:
    """:func:`code_identity` as of its first call in this process.

    Python does not reload a module edited after it was imported, so a long run (a leaderboard of an hour) keeps
    running the code it started with; calling :func:`code_identity` per result would attribute results to commits made
    while it ran (measured: a reduced-leaderboard run recorded a commit made 40 minutes after it started).
    """
    return code_identity()


def loaded_code_key() -> dict:
    """The part of :func:`loaded_code_identity` that caches key on: ``versions`` and ``source``."""
    identity = loaded_code_identity()
    return {"versions": identity["versions"], "source": identity["source"]}
