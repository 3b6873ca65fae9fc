"""Finished batches of an interrupted robust evaluation, kept on disk so that running it again resumes.

A robust evaluation of a slow detector runs for hours: a purifier in front of it multiplies every forward pass by
its U-Net calls, and EOT by its draws (the leaderboard's ``Purified(Padim, DiffPure p=25)`` cells take about 4 h each
on one CPU thread). With ``RobustEvaluator(resume_dir=...)`` every attacked batch's deployed scores are written as
soon as they are computed, one file per (batch, attack run). Each of them has its own seeds
(:func:`~anomalib_robust.evaluation.planning.derive_seed`), so an evaluation that resumes from stored batches gives
exactly the numbers of one that was never interrupted.

Stored batches are only reused by the same evaluation: they sit under a fingerprint of every evaluator setting that
changes an attack or a score, the model's weights and its configuration (every module's scalar attributes, e.g.
DiffPure's level, and every pre-processor's transform, e.g. its resize and normalisation), the test set (its size and
first item) and the code (:func:`~anomalib_robust.evaluation.provenance.loaded_code_key`: package versions and a
digest of the package's source and configs, so that a commit that changes only docs, tests or benchmarks keeps them;
the git commit and uncommitted changes are recorded beside them in ``fingerprint.json``), and each file also records a
digest of its batch (images, labels, masks).
Anything else is computed again, and so is a stored file that cannot be read (with a warning).

Example:
    >>> evaluator = RobustEvaluator(eps=[2 / 255], resume_dir="runs/robust_eval_partial")  # doctest: +SKIP
    >>> report, _ = evaluator.evaluate(model, [datamodule.test_dataloader()])  # killed, run again: resumes
"""

import hashlib
import io
import json
import logging
import pickle
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from anomalib_robust.evaluation.provenance import loaded_code_identity, loaded_code_key
from anomalib_robust.evaluation.report import write_atomic
from anomalib_robust.evaluation.sharding import first_item

logger = logging.getLogger(__name__)


def check_resume_dir(value: str | Path | None) -> Path | None:
    """``resume_dir`` as a path: a directory, or one that does not exist yet (``None`` keeps nothing)."""
    if value is None:
        return None
    path = Path(value)
    if path.exists() and not path.is_dir():
        msg = f"resume_dir must be a directory (or not exist yet), got the file {path}."
        raise ValueError(msg)
    return path


def _sha256_hex(parts: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().cpu()
    return f"{tensor.dtype}{tuple(tensor.shape)}".encode() + tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: nn.Module) -> dict:
    """The model's class, a digest of its weights and buffers, every module's public scalar attributes and the
    ``repr`` of every pre-processor's transform.

    The scalars hold what a state dict does not, such as a purifier's level or AdvRAD's diffusion step; the train/eval
    flag is left out (the evaluator sets it). The transforms (any module's ``transform`` that is a module: anomalib's
    ``PreProcessor``, the detector's pre-processor inside ``Purified``) hold the resize size and the normalisation's
    mean and std, which are lists and so not scalars.
    """
    state = model.state_dict()
    weights = _sha256_hex(name.encode() + _tensor_bytes(value) for name, value in state.items())  # one at a time
    modules = [(name or "<root>", module) for name, module in model.named_modules()]
    scalars = {
        f"{name}.{key}": value
        for name, module in modules
        for key, value in sorted(vars(module).items())
        if not key.startswith("_") and key != "training" and isinstance(value, bool | int | float | str)
    }
    transforms = {
        f"{name}.transform": repr(module.transform)
        for name, module in modules
        if isinstance(getattr(module, "transform", None), nn.Module)  # not a torchvision transform's own method
    }
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "weights": weights,
        "scalars": scalars,
        "transforms": transforms,
    }


def batch_digest(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None) -> str:
    """Digest of one attacked batch: what a stored result of it must have been computed on."""
    tensors = [images, labels] if masks is None else [images, labels, masks]
    return _sha256_hex(_tensor_bytes(tensor) for tensor in tensors)


def dataset_fingerprint(loaders: list[DataLoader]) -> dict:
    """The test loaders' sizes and a digest of their first item: the same on every rank, whatever its shard holds,
    so that every rank of a distributed evaluation shares one store and other test sets get their own."""
    item = first_item(loaders)
    mask = getattr(item, "gt_mask", None)
    first = batch_digest(torch.as_tensor(item.image), torch.as_tensor(item.gt_label), mask)
    return {"sizes": [len(loader.dataset) for loader in loaders], "first_item": first}


class BatchStore:
    """Results of finished (batch, run) pairs as ``<root>/<fingerprint>/batch<first>_run<number>.pt``.

    Args:
        root: the directory the user passed as ``resume_dir`` (created when missing).
        fingerprint: everything the stored results depend on besides the batch itself and the code, which the store
            adds (:func:`~anomalib_robust.evaluation.provenance.loaded_code_key`); JSON-serialisable.
    """

    def __init__(self, root: str | Path, fingerprint: dict) -> None:
        root = check_resume_dir(root)
        canonical = json.dumps({**fingerprint, "code": loaded_code_key()}, sort_keys=True, default=str)
        self.directory = root / hashlib.sha256(canonical.encode()).hexdigest()[:16]
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {**fingerprint, "code": loaded_code_identity()}  # the key, and the commit it was computed at
        readable = json.dumps(record, indent=2, sort_keys=True, default=str)
        write_atomic(self.directory / "fingerprint.json", readable)  # what these results were computed with

    def _path(self, first: int, number: int) -> Path:
        return self.directory / f"batch{first}_run{number}.pt"

    def stored_runs(self) -> int:
        """How many (batch, run) results are stored."""
        return sum(1 for _ in self.directory.glob("batch*_run*.pt"))

    def get(self, first: int, number: int, digest: str) -> dict[str, torch.Tensor | None] | None:
        """The stored result of run ``number`` on the batch starting at ``first``, or ``None`` when there is none for
        a batch with this ``digest`` or its file is unreadable (with a warning)."""
        path = self._path(first, number)
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:  # computed again and overwritten
            logger.warning(
                "RobustEval: the stored batch %s is unreadable (%s); attacking it again", path, type(error).__name__
            )
            return None
        if stored.get("digest") != digest:
            return None
        return stored["tensors"]

    def put(self, first: int, number: int, digest: str, **tensors: torch.Tensor | None) -> None:
        """Keep the result of run ``number`` on the batch starting at ``first`` (written atomically)."""
        buffer = io.BytesIO()
        cpu = {name: None if value is None else value.detach().cpu() for name, value in tensors.items()}
        torch.save({"digest": digest, "tensors": cpu}, buffer)
        write_atomic(self._path(first, number), buffer.getvalue())

    def remove(self) -> None:
        """Delete this evaluation's stored results (once its report is built), and ``root`` if that leaves it empty."""
        shutil.rmtree(self.directory, ignore_errors=True)
        try:
            self.directory.parent.rmdir()
        except OSError:  # other evaluations' results are still there
            pass
