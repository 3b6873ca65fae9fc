"""One evaluation sharded over several processes on one CPU, as a DDP run shards it over ranks.

A robust evaluation on a CPU spends its time in small convolutions (a 32 x 32 U-Net of a purifier, forward and
backward, over a few images and EOT draws at a time), which do not scale fully over threads (1.5x on two cores,
docs/benchmarks.md, "Both cores"). Processes can, once their start (importing torch and anomalib) is paid: on runs of
under a minute two processes were still slower than two threads, so measure before choosing them. An evaluation
already knows how to split into independent parts: under torch.distributed each rank attacks every ``world_size``-th test batch, every
batch and run has its own seeds, and the scores are gathered before the AUROC
(:mod:`~anomalib_robust.evaluation.sharding`), so the report equals a single-process run's. This module gives a
single-process caller (the Python API, or ``RobustEval`` in a Lightning run on one device, which memory-bank models
such as Padim require) that sharding: :func:`evaluate_in_processes` spawns the workers, joins them in a gloo process
group, lets each run the evaluator's sharded path with its rank on its share of the threads, and returns rank 0's
report. A worker that raises stops the others, and its exception reaches the caller.

Spawned workers import the caller's main module again, so a script that evaluates with ``processes > 1`` keeps its
work under ``if __name__ == "__main__":``, as any script using ``multiprocessing`` does; each worker also pays the
import of torch and anomalib (seconds) before it starts.

Example:
    >>> from anomalib_robust.evaluation import RobustEvaluator
    >>> evaluator = RobustEvaluator(attacks=["pgd"], eps=[2 / 255], processes=2)
    >>> report, _ = evaluator.evaluate(model, [datamodule.test_dataloader()])  # doctest: +SKIP
"""

import logging
import pickle
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import distributed, multiprocessing
from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

_JOB, _RESULT, _INIT = "job.pickle", "result.pickle", "init"


def evaluate_in_processes(
    evaluate: Callable, model: torch.nn.Module, loaders: Sequence[DataLoader], processes: int, show_progress: bool
) -> object:
    """``evaluate(model, loaders, rank, world_size, show_progress)`` in ``processes`` spawned ranks of a gloo process
    group, each on ``1 / processes`` of this process's threads; returns rank 0's result.

    The evaluation, the model and the test data travel to the workers as one pickle in a temporary directory, which
    also holds the process group's rendezvous file and the result, and is removed afterwards.

    Raises:
        Exception: the first exception raised in a worker (its traceback is in the chained exception), after the
            other workers were stopped.
    """
    threads = max(1, torch.get_num_threads() // processes)
    level = logging.getLogger("anomalib_robust").getEffectiveLevel()
    with tempfile.TemporaryDirectory(prefix="robust_eval_processes_") as name:
        directory = Path(name)
        job = (evaluate, model, [_portable(loader) for loader in loaders])
        (directory / _JOB).write_bytes(pickle.dumps(job))
        logger.info("RobustEval: evaluating in %d processes of %d thread(s) each", processes, threads)
        workers = multiprocessing.start_processes(
            _worker, args=(processes, str(directory), threads, show_progress, level), nprocs=processes, join=False
        )
        try:
            while not workers.join():
                pass
        except multiprocessing.ProcessRaisedException as failure:
            raised = _first_error(directory)
            if raised is None:
                raise
            raise raised from failure
        finally:
            for worker in workers.processes:
                if worker.is_alive():
                    worker.kill()
                worker.join()
            for error_file in workers.error_files:  # torch's record of a worker's traceback
                Path(error_file).unlink(missing_ok=True)
        return pickle.loads((directory / _RESULT).read_bytes())


def _portable(loader: DataLoader) -> DataLoader:
    """What the evaluation reads of a test loader (dataset, batch size, collate function), without its sampler or
    worker processes, which need not survive a pickle."""
    return DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)


def _worker(rank: int, world_size: int, directory: str, threads: int, show_progress: bool, level: int) -> None:
    """Rank ``rank``: evaluate its shard in the process group; rank 0 writes the result, a failing rank its error."""
    torch.set_num_threads(threads)
    _log_to_stderr(rank, level)
    evaluate, model, loaders = pickle.loads((Path(directory) / _JOB).read_bytes())
    distributed.init_process_group(
        "gloo", init_method=f"file://{Path(directory) / _INIT}", rank=rank, world_size=world_size
    )
    try:
        result = evaluate(model, loaders, rank, world_size, show_progress and rank == 0)
        if rank == 0:
            (Path(directory) / _RESULT).write_bytes(pickle.dumps(result))
    except Exception as error:
        _record_error(Path(directory) / f"error{rank}.pickle", error)
        raise
    finally:
        distributed.destroy_process_group()


def _log_to_stderr(rank: int, level: int) -> None:
    """The package's log records of this worker on stderr, at the caller's level (only warnings from ranks > 0,
    whose records repeat rank 0's)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(levelname)s %(name)s (process {rank}): %(message)s"))
    package = logging.getLogger("anomalib_robust")
    package.addHandler(handler)
    package.setLevel(level if rank == 0 else max(level, logging.WARNING))
    package.propagate = False


def _record_error(path: Path, error: Exception) -> None:
    """Keep ``error`` with the time it was raised, so that the caller re-raises the first one (a rank that loses its
    peer in a collective raises too, later); an exception that cannot be pickled is left to torch's traceback."""
    try:
        path.write_bytes(pickle.dumps((time.monotonic(), error)))
    except (pickle.PicklingError, TypeError, AttributeError):
        pass


def _first_error(directory: Path) -> Exception | None:
    """The exception raised first by any worker, or ``None`` when none could be read back."""
    raised = []
    for path in directory.glob("error*.pickle"):
        try:
            raised.append(pickle.loads(path.read_bytes()))
        except (pickle.UnpicklingError, TypeError, AttributeError, EOFError):
            continue
    return min(raised, key=lambda item: item[0])[1] if raised else None
