"""On-disk cache of finished leaderboard cells, so that an interrupted run resumes where it stopped.

A cell (one model, one datamodule, one seed, one threat model, one evaluator configuration, and the code that
computes it: :func:`~anomalib_robust.evaluation.provenance.loaded_code_key`) is keyed by the SHA-256 of its
canonical JSON: changing any setting of a cell, or the code, makes it a new cell. Only finished cells are cached; a
failed cell is run again on resume, and so is a cached cell whose file cannot be read (with a warning).

Example:
    >>> from pathlib import Path
    >>> cache = CellCache(Path("runs/robust_benchmark/cells"))  # doctest: +SKIP
    >>> cache.get(cell_key({"model": "Padim"})) is None  # doctest: +SKIP
    True
"""

import hashlib
import json
import logging
from pathlib import Path

from anomalib_robust.evaluation.report import write_atomic
from anomalib_robust.leaderboard.config import jsonable

logger = logging.getLogger(__name__)


def cell_key(description: dict) -> str:
    """Stable identifier of a cell: the first 16 hex digits of the SHA-256 of its sorted JSON."""
    canonical = json.dumps(jsonable(description), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class CellCache:
    """Finished cells as ``<directory>/<key>.json``, each written atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The finished cell ``key``, or ``None`` when it has not finished or its file is unreadable (a warning)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:  # a truncated file is not JSON (or not even UTF-8): computed again
            logger.warning("Leaderboard: the cached cell %s is unreadable (%s); computing it again", path, error)
            return None

    def put(self, key: str, record: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path(key), json.dumps(jsonable(record), indent=2, allow_nan=True))
