"""A robustness leaderboard for anomalib: models x categories x threat models from one YAML, on anomalib's pipelines.

The YAML has the shape of anomalib's ``anomalib benchmark --config`` file, with a ``robust_benchmark`` section
(:mod:`~anomalib_robust.leaderboard.config`). Each model is fitted once per category with anomalib's ``Engine`` and
attacked at every threat model by :class:`~anomalib_robust.evaluation.RobustEvaluator` (PGD with EOT for randomised
detectors, the sanity checks with their Square cross-check); jobs run through anomalib's ``SerialRunner`` or, one per
GPU, its ``ParallelRunner`` (:mod:`~anomalib_robust.leaderboard.pipeline`). Finished cells are cached, so a rerun
resumes; a failed cell is recorded with its error. The run directory gets ``leaderboard.csv``, ``leaderboard.md``,
``entries/<model>.json`` (a fixed, validated schema), two plots and a rich table; entries of several runs merge into
one leaderboard (:mod:`~anomalib_robust.leaderboard.merge`).

Example:
    $ anomalib robust_benchmark --config configs/benchmark/robust_fashion_mnist.yaml
    $ anomalib robust_benchmark --merge runs/a runs/b --output_dir runs/merged
    $ python -m anomalib_robust.leaderboard --config configs/benchmark/robust_tiny.yaml

    >>> from anomalib_robust.leaderboard import RobustBenchmark
    >>> RobustBenchmark().run(config="configs/benchmark/robust_tiny.yaml")  # doctest: +SKIP
"""

from anomalib_robust.leaderboard.config import LeaderboardConfigError, load_config, parse_config
from anomalib_robust.leaderboard.job import RobustBenchmarkJob
from anomalib_robust.leaderboard.merge import MergeError, merge_runs
from anomalib_robust.leaderboard.output import ENTRY_SCHEMA, validate_entry, write_leaderboard
from anomalib_robust.leaderboard.pipeline import RobustBenchmark, RobustBenchmarkJobGenerator

__all__ = [
    "ENTRY_SCHEMA",
    "LeaderboardConfigError",
    "MergeError",
    "RobustBenchmark",
    "RobustBenchmarkJob",
    "RobustBenchmarkJobGenerator",
    "load_config",
    "merge_runs",
    "parse_config",
    "validate_entry",
    "write_leaderboard",
]
