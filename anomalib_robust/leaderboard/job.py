"""The leaderboard's job: fit one model on one datamodule with anomalib's Engine, then attack it at every threat model.

:class:`RobustBenchmarkJob` is an anomalib pipeline ``Job`` (``anomalib.pipelines.components.Job``), so anomalib's
``SerialRunner`` and ``ParallelRunner`` run it exactly as they run anomalib's own ``BenchmarkJob``: in order on a CPU,
one job per GPU in parallel (the runner passes ``task_id``, the job trains on ``cuda:<task_id>``). A job is one model
on one datamodule (category); each of its threat models is a cell, evaluated by
:class:`~anomalib_robust.evaluation.RobustEvaluator` with the YAML's ``robust_eval`` arguments and cached on disk
(:mod:`anomalib_robust.leaderboard.cache`) under a key of its whole configuration and of the code
(:func:`~anomalib_robust.evaluation.provenance.loaded_code_key`: package versions and a digest of the package's source
and configs; every entry also records the git commit and uncommitted changes).
When every cell of a job is cached the model is not even fitted. Fitted models are kept too, in
``<output_dir>/models``: a model entry (class, init args, Engine arguments) fitted on the same data from the same seed
by the same code is fitted once, so a job interrupted during its attacks does not fit again, and a purifier's denoiser
that is the same entry as a model row (the AdvRAD row and DiffPure's denoiser) reuses that row's fit. A kept cell or
fit whose file cannot be read is computed again, with a warning. A cell that fails (a model that cannot be built or
fitted, an evaluator error) is returned with its error, so the runner goes on with the other jobs; a failed cell is not
cached and runs again on resume.

The job holds the configuration, not the models: the ``ParallelRunner`` pickles jobs into spawned processes, and
models are built inside ``run``.
"""

import contextlib
import importlib
import json
import logging
import pickle
import time
import traceback
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch
from anomalib.engine import Engine
from anomalib.pipelines.components import Job
from lightning import seed_everything
from torch import nn

from anomalib_robust.evaluation import RobustEvaluator
from anomalib_robust.evaluation.provenance import loaded_code_identity, loaded_code_key
from anomalib_robust.evaluation.report import RobustReport, format_eps, write_atomic
from anomalib_robust.leaderboard.cache import CellCache, cell_key
from anomalib_robust.leaderboard.config import CellGroup, ThreatModel, data_label, jsonable, model_label
from anomalib_robust.leaderboard.output import write_leaderboard
from anomalib_robust.offline import random_init_backbones

logger = logging.getLogger(__name__)

_UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError)
"""What reading a truncated or otherwise corrupt checkpoint or JSON file raises."""


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def build_model(entry: dict, random_init: bool) -> nn.Module:
    """The model of a (validated) model entry; anomalib's evaluator and visualizer are off (the leaderboard computes
    the AUROCs), and ``image_size`` sets the pre-processor's resize."""
    cls = _import(entry["class_path"])
    kwargs = {"evaluator": False, "visualizer": False, **(entry.get("init_args") or {})}
    if "image_size" in entry:
        kwargs.setdefault("pre_processor", cls.configure_pre_processor(tuple(entry["image_size"])))
    with random_init_backbones() if random_init else contextlib.nullcontext():
        return cls(**kwargs)


def build_datamodule(entry: dict) -> Any:
    """The datamodule of a (validated) data entry."""
    init_args = entry.get("init_args") or {}
    init_args = {key: tuple(value) if isinstance(value, list) else value for key, value in init_args.items()}
    return _import(entry["class_path"])(**init_args)


def _threat_label(threat: ThreatModel) -> str:
    return f"{threat.norm} " + ", ".join(format_eps(eps, threat.norm) for eps in threat.eps)


def sanity_verdict(report: RobustReport, enabled: bool) -> str:
    """``pass``, ``FAIL: <checks>``, ``n/a`` (no check could be evaluated) or ``off``."""
    if not enabled:
        return "off"
    failed = [check.name for check in report.checks if check.passed is False]
    if failed:
        return "FAIL: " + ", ".join(failed)
    return "pass" if any(check.passed for check in report.checks) else "n/a"


def _read_fit(path: Path) -> tuple[dict, float] | None:
    """The state dict of the fit kept in ``path`` and the seconds it took (from ``path``'s ``.json``), or ``None``
    with a warning when either file is missing or unreadable: the model is then fitted again and both are rewritten."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        seconds = float(json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["fit_seconds"])
    except _UNREADABLE as error:
        logger.warning(
            "Leaderboard: the kept fit %s or its .json is unreadable (%s); fitting again", path, type(error).__name__
        )
        return None
    return state_dict, seconds


class RobustBenchmarkJob(Job):
    """Fit one model on one datamodule, then evaluate every threat model not yet cached.

    Args:
        accelerator: ``"cpu"`` or ``"cuda"``.
        group: the model, datamodule, seed and Engine arguments
            (:class:`~anomalib_robust.leaderboard.config.CellGroup`).
        threat_models: the cells of this job.
        evaluator: ``RobustEvaluator`` arguments other than ``norm`` and ``eps``.
        output_dir: the run directory (cells are cached in ``<output_dir>/cells``).
        random_init: build backbones from random initialisation (nothing is downloaded).
    """

    name = "robust_benchmark"

    def __init__(
        self,
        accelerator: str,
        group: CellGroup,
        threat_models: list[ThreatModel],
        evaluator: dict,
        output_dir: Path,
        random_init: bool = True,
    ) -> None:
        super().__init__()
        self.accelerator = accelerator
        self.group = group
        self.threat_models = threat_models
        self.evaluator = evaluator
        self.output_dir = Path(output_dir)
        self.random_init = random_init

    def _trainer(self, entry: dict) -> dict:
        return {**self.group.trainer, **(entry.get("trainer") or {})}

    def _key(self, threat: ThreatModel) -> str:
        group = self.group
        return cell_key({
            "model": group.model, "data": group.data, "seed": group.seed, "trainer": self._trainer(group.model),
            "threat_model": threat.to_dict(), "evaluator": self.evaluator, "random_init": self.random_init,
            "code": loaded_code_key(),
        })  # fmt: skip

    def _base_record(self, threat: ThreatModel, key: str) -> dict:
        data, category = data_label(self.group.data)
        return {
            "cell": key, "model": model_label(self.group.model), "data": data, "category": category,
            "seed": self.group.seed, "threat_model": threat.to_dict(), "model_config": jsonable(self.group.model),
            "data_config": jsonable(self.group.data), "trainer": self._trainer(self.group.model),
            "evaluator": jsonable(self.evaluator), "status": "ok", "error": "", "cached": False,
            **loaded_code_identity(),
        }  # fmt: skip

    def _fitted_path(self, entry: dict) -> Path:
        """Where the fit of ``entry`` on this job's data and seed by this code is kept (a label and a defense are not
        part of it)."""
        fitted = {key: value for key, value in entry.items() if key not in {"name", "defense"}}
        key = cell_key({
            "model": fitted, "trainer": self._trainer(entry), "data": self.group.data, "seed": self.group.seed,
            "random_init": self.random_init, "code": loaded_code_key(),
        })  # fmt: skip
        return self.output_dir / "models" / f"{key}.ckpt"

    def _fit(self, entry: dict, datamodule: Any, devices: str | list[int], directory: str) -> tuple[nn.Module, float]:
        """The model of ``entry`` fitted on ``datamodule`` from the job's seed, and the seconds its fit took: loaded
        when that fit is kept in ``<output_dir>/models`` and readable, else fitted now and kept (written atomically)."""
        model = build_model(entry, self.random_init)
        path = self._fitted_path(entry)
        kept = _read_fit(path) if path.is_file() else None
        if kept is not None:
            state_dict, seconds = kept
            model.load_state_dict(state_dict)
            datamodule.setup()
            logger.info("Leaderboard: %s reused from %s", model_label(entry), path)
            return model.to(self._device(devices)).eval(), seconds
        seed_everything(self.group.seed, workers=True)
        engine = Engine(
            accelerator=self.accelerator, devices=devices, default_root_dir=directory, logger=False,
            enable_progress_bar=False, enable_model_summary=False, **self._trainer(entry),
        )  # fmt: skip
        started = time.perf_counter()
        engine.fit(model, datamodule=datamodule)
        seconds = time.perf_counter() - started
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path.with_suffix(".json"), json.dumps({"fit_seconds": seconds}))
        partial = path.with_suffix(".partial")
        engine.trainer.save_checkpoint(partial, weights_only=True)
        partial.replace(path)  # the checkpoint appears complete or not at all
        return model.to(self._device(devices)).eval(), seconds  # Lightning's teardown leaves the model on the CPU

    def _device(self, devices: str | list[int]) -> torch.device:
        if self.accelerator == "cuda" and isinstance(devices, list):
            return torch.device(f"cuda:{devices[0]}")
        return torch.device(self.accelerator)

    def _defense(
        self, datamodule: Any, devices: str | list[int], directory: str
    ) -> tuple[nn.Module | None, float]:
        """The purifier of the model entry's ``defense``, its denoiser fitted on the same datamodule, and the seconds
        that fit took."""
        defense = self.group.model.get("defense")
        if defense is None:
            return None, 0.0
        denoiser, seconds = self._fit(defense["denoiser"], datamodule, devices, directory)
        return _import(defense["class_path"])(denoiser, **(defense.get("init_args") or {})), seconds

    def _evaluate(self, model: nn.Module, purifier: nn.Module | None, datamodule: Any, threat: ThreatModel) -> dict:
        settings = {"resume_dir": self.output_dir / "partial", **self.evaluator}  # a stopped cell resumes its batches
        evaluator = RobustEvaluator(norm=threat.norm, eps=list(threat.eps), defense=purifier, **settings)
        started = time.perf_counter()
        report, _ = evaluator.evaluate(model, [datamodule.test_dataloader()])
        report_dict = report.to_dict()
        return {
            "standard_image_auroc": report.clean_image_auroc,
            "standard_image_auroc_std": report.clean_image_auroc_std,
            "standard_pixel_auroc": report.clean_pixel_auroc,
            "standard_pixel_auroc_std": report.clean_pixel_auroc_std,
            "eot_samples": report.eot_samples,
            "eval_repeats": report.eval_repeats,
            "num_test_images": report.num_samples,
            "results": report_dict["results"],
            "checks": report_dict["checks"],
            "sanity": sanity_verdict(report, evaluator.sanity_checks),
            "attack_seconds": time.perf_counter() - started,
        }

    def run(self, task_id: int | None = None) -> dict:
        """Return ``{"output_dir": ..., "cells": [...]}``: cached cells as they were, the others evaluated now."""
        cache = CellCache(self.output_dir / "cells")
        cells, pending = [], []
        for threat in self.threat_models:
            key = self._key(threat)
            cached = cache.get(key)
            if cached is not None:
                cells.append({**cached, "cached": True})
            else:
                pending.append((threat, key))
        if not pending:
            return {"output_dir": str(self.output_dir), "cells": cells}
        devices: str | list[int] = [task_id or 0] if self.accelerator == "cuda" else "auto"  # one device per job
        label = model_label(self.group.model)
        try:
            with TemporaryDirectory() as directory:
                seed_everything(self.group.seed, workers=True)
                datamodule = build_datamodule(self.group.data)
                model, model_seconds = self._fit(self.group.model, datamodule, devices, directory)
                purifier, defense_seconds = self._defense(datamodule, devices, directory)
                fit_seconds = model_seconds + defense_seconds
        except Exception as error:  # noqa: BLE001 - a failed cell is recorded and the run goes on
            logger.exception("Leaderboard: fitting %s (%s) failed", label, self.group.key)
            cells += [self._failed(threat, key, error) for threat, key in pending]
            return {"output_dir": str(self.output_dir), "cells": cells}
        for threat, key in pending:
            record = self._base_record(threat, key)
            try:
                record |= self._evaluate(model, purifier, datamodule, threat)
            except Exception as error:  # noqa: BLE001
                logger.exception("Leaderboard: evaluating %s at %s failed", label, _threat_label(threat))
                cells.append(self._failed(threat, key, error, fit_seconds))
                continue
            record["fit_seconds"] = fit_seconds
            cache.put(key, record)
            cells.append(record)
        return {"output_dir": str(self.output_dir), "cells": cells}

    def _failed(self, threat: ThreatModel, key: str, error: Exception, fit_seconds: float | None = None) -> dict:
        record = self._base_record(threat, key)
        record.update(
            status="error",
            error=f"{type(error).__name__}: {error}",
            traceback=traceback.format_exc(limit=8),
            fit_seconds=fit_seconds,
        )
        return record

    @staticmethod
    def collect(results: list[dict]) -> dict:
        """All jobs' cells, in job order, and the run directory."""
        cells = [cell for result in results for cell in result["cells"]]
        return {"output_dir": results[0]["output_dir"] if results else None, "cells": cells}

    @staticmethod
    def save(results: dict) -> None:
        """Write the leaderboard (CSV, Markdown, JSON entries, plots) into the run directory and print it."""
        if results["output_dir"] is not None:
            write_leaderboard(results["cells"], Path(results["output_dir"]), show=True)
