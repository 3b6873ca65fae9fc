"""The code identity that every cache keys on: a digest of the package's source and configs plus the package versions,
with the git commit and the uncommitted changes kept as a record."""

import shutil
import subprocess
from pathlib import Path

import pytest

from anomalib_robust.evaluation import provenance
from anomalib_robust.evaluation.provenance import (
    code_identity,
    code_key,
    git_commit,
    loaded_code_identity,
    loaded_code_key,
    project_root,
    source_digest,
    uncommitted_changes,
)

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

PYPROJECT = '[project]\nname = "anomalib-robust"\nversion = "0.1.0"\n'


def _git(repository: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(command, cwd=repository, capture_output=True, check=True, text=True).stdout.strip()


def _project(root: Path) -> Path:
    """A checkout-shaped tree of this project: ``pyproject.toml``, the package, its configs, docs, tests and
    benchmarks; returns the package directory."""
    (root / "anomalib_robust" / "models").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "anomalib_robust" / "__init__.py").write_text("")
    (root / "anomalib_robust" / "models" / "attack.py").write_text("EPS = 2 / 255\n")
    (root / "configs" / "model").mkdir(parents=True)
    (root / "configs" / "model" / "adv_rad.yaml").write_text("diffusion_step: 100\n")
    for folder in ("docs", "tests", "benchmarks"):
        (root / folder).mkdir()
        (root / folder / "notes.py").write_text("'''not the package'''\n")
    return root / "anomalib_robust"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A git checkout of a project-shaped tree, all of it committed."""
    repository = tmp_path / "checkout"
    _project(repository)
    _git(repository, "init", "--quiet")
    _git(repository, "add", ".")
    _git(repository, "commit", "--quiet", "-m", "first")
    return repository


def test_the_key_is_the_source_and_configs_not_the_docs_tests_or_benchmarks(tmp_path: Path) -> None:
    package = _project(tmp_path)
    before = source_digest(package)
    for folder in ("docs", "tests", "benchmarks"):
        (tmp_path / folder / "notes.py").write_text("'''changed'''\n")
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "attack.cpython-311.pyc").write_bytes(b"\0")
    assert source_digest(package) == before
    (tmp_path / "configs" / "model" / "adv_rad.yaml").write_text("diffusion_step: 50\n")
    after_config = source_digest(package)
    assert after_config != before, "a config is part of the code"
    (package / "models" / "attack.py").write_text("EPS = 4 / 255\n")
    assert source_digest(package) not in {before, after_config}
    (package / "models" / "new_module.py").write_text("")
    assert len({before, after_config, source_digest(package)}) == 3, "an untracked new module is code too"


def test_a_patched_regular_install_gets_its_own_key(tmp_path: Path) -> None:
    """Two installs with the same version strings: only the source tells them apart. A regular install carries its
    configs inside the package."""
    installs = []
    for name in ("site-a", "site-b"):
        package = tmp_path / name / "anomalib_robust"
        (package / "configs").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "configs" / "adv_rad.yaml").write_text("diffusion_step: 100\n")
        installs.append(package)
    assert project_root(installs[0]) is None
    assert source_digest(installs[0]) == source_digest(installs[1])
    (installs[1] / "__init__.py").write_text("PATCHED = True\n")
    assert source_digest(installs[0]) != source_digest(installs[1])
    (installs[1] / "__init__.py").write_text("")
    (installs[1] / "configs" / "adv_rad.yaml").write_text("diffusion_step: 25\n")
    assert source_digest(installs[0]) != source_digest(installs[1])


@needs_git
def test_a_worktree_records_its_own_commit_and_is_keyed_by_its_code(checkout: Path, tmp_path: Path) -> None:
    first = _git(checkout, "rev-parse", "HEAD")
    (checkout / "docs" / "notes.py").write_text("'''only docs'''\n")
    _git(checkout, "commit", "--quiet", "-am", "docs")
    worktree = tmp_path / "worktree"
    _git(checkout, "worktree", "add", "--quiet", "--detach", str(worktree), first)
    assert (worktree / ".git").is_file(), "a worktree's .git is a file"
    assert git_commit(worktree) == first
    assert git_commit(checkout) == _git(checkout, "rev-parse", "HEAD") != first
    assert project_root(worktree / "anomalib_robust") == worktree.resolve()
    assert source_digest(worktree / "anomalib_robust") == source_digest(checkout / "anomalib_robust"), (
        "a commit that changes only docs keeps the key"
    )
    _git(worktree, "checkout", "--quiet", "-b", "branch")
    assert git_commit(worktree) == first, "a branch's ref lives in the main repository's git directory"
    (worktree / "anomalib_robust" / "models" / "attack.py").write_text("EPS = 8 / 255\n")
    assert source_digest(worktree / "anomalib_robust") != source_digest(checkout / "anomalib_robust")


@needs_git
def test_an_install_nested_in_another_repository_records_no_commit(tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / ".venv" / "lib" / "site-packages" / "anomalib_robust").mkdir(parents=True)
    (other / "pyproject.toml").write_text('[project]\nname = "other-project"\n')
    _git(other, "init", "--quiet")
    _git(other, "add", "pyproject.toml")
    _git(other, "commit", "--quiet", "-m", "other")
    package = other / ".venv" / "lib" / "site-packages" / "anomalib_robust"
    (package / "__init__.py").write_text("")
    assert project_root(package) is None
    assert git_commit(other) == _git(other, "rev-parse", "HEAD"), "the other repository has a commit"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(provenance, "PACKAGE_DIRECTORY", package)
        assert provenance.git_commit() is None, "but it is not this package's"
        assert provenance.uncommitted_changes() is None


@needs_git
def test_uncommitted_changes_are_those_of_tracked_files(checkout: Path) -> None:
    assert git_commit(checkout) == _git(checkout, "rev-parse", "HEAD")
    assert uncommitted_changes(checkout) == b""
    (checkout / "notes.txt").write_text("untracked")
    assert uncommitted_changes(checkout) == b"", "untracked files are not part of the diff"
    (checkout / "anomalib_robust" / "models" / "attack.py").write_text("EPS = 4 / 255\n")
    changed = uncommitted_changes(checkout / "anomalib_robust")  # a directory in the checkout names it too
    assert b"+EPS = 4 / 255" in changed
    _git(checkout, "add", ".")
    assert uncommitted_changes(checkout) != b"", "staged or not, a change is a change"


def test_outside_a_checkout_or_without_git_the_changes_are_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert uncommitted_changes(tmp_path) is None
    assert git_commit(tmp_path) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git
    assert uncommitted_changes() is None


@pytest.mark.parametrize(("changes", "dirty"), [(b"", False), (b"+EPS = 4 / 255\n", True), (None, None)])
def test_the_record_says_whether_the_checkout_is_dirty_and_the_key_does_not(
    monkeypatch: pytest.MonkeyPatch, changes: bytes | None, dirty: bool | None
) -> None:
    monkeypatch.setattr(provenance, "uncommitted_changes", lambda: changes)
    identity = code_identity()
    assert set(identity["versions"]) == {"python", *provenance.PACKAGES}
    assert identity["git_commit"] == git_commit()
    assert identity["git_dirty"] is dirty
    assert (identity["git_diff"] is not None) is bool(dirty)
    assert code_key() == {"versions": identity["versions"], "source": identity["source"]}


def test_the_caches_key_on_the_code_this_process_loaded() -> None:
    """Edits and commits after the first call do not change what a running process says it runs."""
    assert loaded_code_identity() is loaded_code_identity()
    assert loaded_code_key() == code_key()
    assert project_root() is not None, "the suite runs from a checkout"
    assert loaded_code_identity()["git_commit"] == git_commit()
