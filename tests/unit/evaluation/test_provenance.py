"""The code identity that every cache keys on: package versions, the git commit and the uncommitted changes."""

import shutil
import subprocess
from pathlib import Path

import pytest

from anomalib_robust.evaluation import provenance
from anomalib_robust.evaluation.provenance import code_identity, git_commit, loaded_code_identity, uncommitted_changes

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repository: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(command, cwd=repository, capture_output=True, check=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A git checkout with one committed file, ``module.py``."""
    repository = tmp_path / "checkout"
    repository.mkdir()
    _git(repository, "init", "--quiet")
    (repository / "module.py").write_text("EPS = 2 / 255\n")
    _git(repository, "add", "module.py")
    _git(repository, "commit", "--quiet", "-m", "first")
    return repository


@needs_git
def test_uncommitted_changes_are_those_of_tracked_files(checkout: Path) -> None:
    assert git_commit(checkout) == _git(checkout, "rev-parse", "HEAD")
    assert uncommitted_changes(checkout) == b""
    (checkout / "notes.txt").write_text("untracked")
    assert uncommitted_changes(checkout) == b"", "untracked files are not part of the code"
    (checkout / "module.py").write_text("EPS = 4 / 255\n")
    changed = uncommitted_changes(checkout / "module.py")  # a file in the checkout names it too
    assert b"+EPS = 4 / 255" in changed
    _git(checkout, "add", "module.py")
    assert uncommitted_changes(checkout) == changed, "staged or not, a change is a change"


def test_outside_a_checkout_or_without_git_the_changes_are_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert uncommitted_changes(tmp_path) is None
    assert git_commit(tmp_path) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git
    assert uncommitted_changes() is None


@pytest.mark.parametrize(("changes", "dirty"), [(b"", False), (b"+EPS = 4 / 255\n", True), (None, None)])
def test_code_identity_says_whether_the_checkout_is_dirty(
    monkeypatch: pytest.MonkeyPatch, changes: bytes | None, dirty: bool | None
) -> None:
    monkeypatch.setattr(provenance, "uncommitted_changes", lambda: changes)
    identity = code_identity()
    assert set(identity["versions"]) == {"python", *provenance.PACKAGES}
    assert identity["git_commit"] == git_commit()
    assert identity["git_dirty"] is dirty
    assert (identity["git_diff"] is not None) is bool(dirty)


def test_other_uncommitted_changes_are_other_code(monkeypatch: pytest.MonkeyPatch) -> None:
    digests = set()
    for changes in (b"+EPS = 4 / 255\n", b"+EPS = 8 / 255\n"):
        monkeypatch.setattr(provenance, "uncommitted_changes", lambda changes=changes: changes)
        digests.add(code_identity()["git_diff"])
    assert len(digests) == 2


def test_the_caches_key_on_the_code_this_process_loaded() -> None:
    """Edits and commits after the first call do not change what a running process says it runs."""
    assert loaded_code_identity() is loaded_code_identity()
    assert loaded_code_identity()["git_commit"] == git_commit()
