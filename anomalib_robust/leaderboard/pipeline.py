"""The leaderboard as an anomalib pipeline: one YAML, a grid of jobs, anomalib's ``SerialRunner`` / ``ParallelRunner``.

:class:`RobustBenchmark` is an ``anomalib.pipelines.components.Pipeline``, built as anomalib's own ``Benchmark``
(``anomalib benchmark --config``): the YAML's ``accelerator`` picks the runners (serial on a CPU or a single GPU, one
job per GPU in parallel where there are several), the job generator expands the ``grid`` lists of the
``robust_benchmark`` section into :class:`~anomalib_robust.leaderboard.job.RobustBenchmarkJob` s, and the job's
``collect``/``save`` write the leaderboard. anomalib's ``Benchmark`` builds only its own ``BenchmarkJob`` (fit, test,
log the test metrics), so the plugin registers this pipeline as a sibling subcommand of ``anomalib benchmark``::

    anomalib robust_benchmark --config configs/benchmark/robust_fashion_mnist.yaml
    anomalib robust_benchmark --merge runs/machine_a runs/machine_b --output_dir runs/merged
    python -m anomalib_robust.leaderboard --config configs/benchmark/robust_tiny.yaml  # the same, no anomalib CLI

Unlike anomalib's ``Pipeline.run``, :meth:`RobustBenchmark.run` validates the whole YAML before any job starts (an
unknown model or datamodule is an error naming its key, not an hour into the run), leaves the process's log handlers
alone (anomalib's pipeline redirects every logger to ``runs/pipeline.log``), and returns the leaderboard's cells.

Example:
    >>> from anomalib_robust.leaderboard import RobustBenchmark
    >>> results = RobustBenchmark().run(config="configs/benchmark/robust_tiny.yaml")  # doctest: +SKIP
    >>> [cell["status"] for cell in results["cells"]]  # doctest: +SKIP
    ['ok', 'ok', 'ok', 'ok', 'ok', 'ok', 'ok', 'ok']
"""

import logging
from collections.abc import Generator
from pathlib import Path

import torch
import yaml
from anomalib.pipelines.components import JobGenerator
from anomalib.pipelines.components.base import Pipeline, Runner
from anomalib.pipelines.components.runners import ParallelRunner, SerialRunner
from anomalib.pipelines.types import PREV_STAGE_RESULT
from jsonargparse import ArgumentParser, Namespace

from anomalib_robust.leaderboard.config import SECTION, parse_config
from anomalib_robust.leaderboard.job import RobustBenchmarkJob
from anomalib_robust.leaderboard.merge import merge_runs

logger = logging.getLogger(__name__)


class RobustBenchmarkJobGenerator(JobGenerator):
    """One :class:`RobustBenchmarkJob` per (model, datamodule cell, seed) of the ``robust_benchmark`` section.

    Args:
        accelerator: ``"cpu"`` or ``"cuda"``, given to every job.
    """

    def __init__(self, accelerator: str) -> None:
        self.accelerator = accelerator

    @property
    def job_class(self) -> type:
        return RobustBenchmarkJob

    def generate_jobs(
        self,
        args: dict | None = None,
        prev_stage_result: PREV_STAGE_RESULT = None,
    ) -> Generator[RobustBenchmarkJob, None, None]:
        """Expand ``args`` (the ``robust_benchmark`` section) into jobs, model by model, in the YAML's order."""
        del prev_stage_result  # the leaderboard is a single stage
        config = parse_config({"accelerator": self.accelerator, SECTION: args or {}})
        for group in config.groups:
            yield RobustBenchmarkJob(
                accelerator=self.accelerator,
                group=group,
                threat_models=config.threat_models,
                evaluator=config.evaluator,
                output_dir=config.output_dir,
                random_init=config.random_init_backbones,
            )


class RobustBenchmark(Pipeline):
    """Robustness leaderboard: fit every model on every category, attack it at every threat model, write the table."""

    @staticmethod
    def _setup_runners(args: dict) -> list[Runner]:
        """A ``SerialRunner`` per accelerator, or a ``ParallelRunner`` with one job per GPU when CUDA has several."""
        accelerators = args.get("accelerator", "cpu")
        runners: list[Runner] = []
        for accelerator in accelerators if isinstance(accelerators, list) else [accelerators]:
            device_count = torch.cuda.device_count()
            if accelerator == "cuda" and device_count > 1:
                runners.append(ParallelRunner(RobustBenchmarkJobGenerator(accelerator), n_jobs=device_count))
            else:
                runners.append(SerialRunner(RobustBenchmarkJobGenerator(accelerator)))
        return runners

    def run(
        self,
        args: Namespace | None = None,
        config: str | Path | dict | None = None,
        output_dir: str | Path | None = None,
    ) -> dict | None:
        """Run the leaderboard of a YAML (``args.config``, or ``config``: a path or the loaded mapping), or merge runs
        (``args.merge``); ``output_dir`` (or ``--output_dir``) overrides the YAML's. Returns the last runner's
        gathered result, ``{"output_dir": ..., "cells": [...]}`` (the merged leaderboard for a merge)."""
        if args is None and config is None:
            args = self.get_parser().parse_args()
        if args is not None:
            if args.get("merge"):
                if args.get("config"):
                    msg = "--merge and --config: give one (merge finished runs, or run a YAML)"
                    raise ValueError(msg)
                if not args.get("output_dir"):
                    msg = "--output_dir: required with --merge (where the merged leaderboard goes)"
                    raise ValueError(msg)
                return merge_runs(args.merge, args.output_dir, allow_mixed=bool(args.get("allow_mixed")))
            if not args.get("config"):
                msg = "--config: required (the leaderboard YAML), or --merge RUN [RUN ...] --output_dir DIR"
                raise ValueError(msg)
            config, output_dir = args.config, args.get("output_dir") or output_dir
        pipeline_args = _load(config)
        if output_dir is not None:
            pipeline_args[SECTION] = {**pipeline_args[SECTION], "output_dir": str(output_dir)}
        parsed = parse_config(pipeline_args)  # every key checked before the first job
        logger.info(
            "Robust benchmark: %d jobs (model x category x seed), %d threat models each, into %s",
            len(parsed.groups), len(parsed.threat_models), parsed.output_dir,
        )  # fmt: skip
        results = None
        for runner in self._setup_runners(pipeline_args):
            results = runner.run(pipeline_args[SECTION], results)
        return results

    @staticmethod
    def get_parser(parser: ArgumentParser | None = None) -> ArgumentParser:
        """``--config`` (the YAML), ``--output_dir``, or ``--merge`` with ``--output_dir`` and ``--allow_mixed``."""
        if parser is None:
            parser = ArgumentParser(description=RobustBenchmark.__doc__)
        parser.add_argument("--config", type=str | None, default=None, help="The leaderboard YAML.")
        parser.add_argument(
            "--output_dir", type=str | None, default=None, help="Run directory (overrides robust_benchmark.output_dir)."
        )
        parser.add_argument(
            "--merge",
            type=str,
            default=None,
            nargs="+",
            help="Merge finished runs: run directories or entries/<model>.json files, into --output_dir.",
        )
        parser.add_argument(
            "--allow_mixed",
            type=bool,
            default=False,
            help="With --merge: accept entries with different threat models or package versions.",
        )
        return parser


def _load(config: str | Path | dict) -> dict:
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if not path.is_file():
        msg = f"--config: no such file {str(path)!r}"
        raise FileNotFoundError(msg)
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        msg = f"--config: {str(path)!r} is not a YAML mapping (expected 'accelerator' and a {SECTION!r} section)"
        raise ValueError(msg)
    return loaded
