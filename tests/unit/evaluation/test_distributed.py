"""The evaluator under torch.distributed (gloo, 2 CPU processes) equals a single-process run.

Two test loaders: one of a single batch (so rank 1 has no batch of it, and no batch at all in the first shard, where
the L_2 sanity check used to read its image size) and one of five batches (3 on rank 0, 2 on rank 1).
"""

import json
import os
from pathlib import Path

import torch
from evaluation_toys import ToyDetector, ToyTestSet, loader
from torch import distributed, multiprocessing

from anomalib_robust.evaluation import RobustEvaluator

SETTINGS = {"attacks": ["pgd"], "eps": [0.5, 1.0], "norm": "L2", "steps": 2, "eot_samples": 2, "eval_repeats": 2,
            "sanity_checks": True, "n_queries": 5, "num_grid_images": 0}  # fmt: skip


def _loaders() -> list:
    return [loader(ToyTestSet(count=4, seed=1), batch_size=4), loader(ToyTestSet(count=20, seed=2), batch_size=4)]


def _rank(rank: int, world_size: int, init_file: str, output: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        report, _ = RobustEvaluator(**SETTINGS).evaluate(ToyDetector(noise=0.05), _loaders(), rank, world_size)
        Path(f"{output}.{rank}").write_text(json.dumps(report.to_dict()))
    finally:
        distributed.destroy_process_group()


def test_two_ranks_with_uneven_and_empty_shards_equal_one_process(tmp_path: Path) -> None:
    single, _ = RobustEvaluator(**SETTINGS).evaluate(ToyDetector(noise=0.05), _loaders())
    output = str(tmp_path / "report")
    multiprocessing.spawn(_rank, args=(2, str(tmp_path / "init"), output), nprocs=2, join=True)
    for rank in range(2):
        assert json.loads(Path(f"{output}.{rank}").read_text()) == json.loads(json.dumps(single.to_dict()))
    assert single.num_samples == 24
