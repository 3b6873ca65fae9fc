"""The test set of an evaluation: evenly spaced selection, per-rank shards under DDP, and the gather back.

Every rank reads its share of the test dataloaders itself (raw [0, 1] images, before the model's pre-processor): the
batches are those of one process, and rank ``r`` takes every ``world_size``-th of them, so a rank can have more batches
than another, or none. Each sample carries its index in the whole test set, so the gathered values are put back in
single-process order and the numbers equal a single-process run.

Example:
    >>> from anomalib_robust.evaluation.sharding import evenly_spaced
    >>> evenly_spaced(10, 4)
    [0, 3, 6, 9]
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import distributed
from torch.utils.data import DataLoader, Dataset, default_collate


def evenly_spaced(size: int, max_samples: int | None) -> list[int]:
    """All indices of a dataset of ``size`` items, or ``max_samples`` evenly spaced ones."""
    if max_samples is None or max_samples >= size:
        return list(range(size))
    return torch.linspace(0, size - 1, max_samples).round().long().tolist()


class IndexedSubset(Dataset):
    """Items ``indices`` of ``dataset``, each returned with its index in the whole test set (``offset`` + index)."""

    def __init__(self, dataset: Dataset, indices: list[int], offset: int, collate_fn: Callable | None) -> None:
        self.dataset = dataset
        self.indices = indices
        self.offset = offset
        self.collate_fn = collate_fn or default_collate

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, object]:
        index = self.indices[position]
        return self.offset + index, self.dataset[index]

    def collate(self, items: list[tuple[int, object]]) -> tuple[torch.Tensor, object]:
        """Collate with the test loader's own ``collate_fn``, plus the tensor of sample indices."""
        return torch.tensor([index for index, _ in items]), self.collate_fn([item for _, item in items])


def rank_shards(
    loaders: list[DataLoader],
    rank: int = 0,
    world_size: int = 1,
    max_samples: int | None = None,
    caller: str = "RobustEval",
    selections: list[list[int]] | None = None,
) -> list[DataLoader]:
    """This rank's share of every test loader: every ``world_size``-th batch, batches as in one process.

    ``selections`` gives the dataset indices to take from each loader instead of ``max_samples`` evenly spaced ones.

    Raises:
        ValueError: when the loaders hold no data at all.
    """
    shards, offset = [], 0
    for number, loader in enumerate(loaders):
        size = len(loader.dataset)
        selected = evenly_spaced(size, max_samples) if selections is None else list(selections[number])
        batches = _positions(len(selected), loader.batch_size or 1)
        subset = IndexedSubset(loader.dataset, selected, offset, loader.collate_fn)
        shards.append(DataLoader(subset, batch_sampler=batches[rank::world_size], collate_fn=subset.collate))
        offset += size
    if offset == 0:
        msg = f"{caller} found no test data: the trainer has no test dataloader, or it is empty."
        raise ValueError(msg)
    return shards


def _positions(count: int, batch_size: int) -> list[list[int]]:
    """Positions ``0 .. count - 1`` in batches of ``batch_size`` (the last one shorter)."""
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


def test_batches(loaders: list[DataLoader], max_samples: int | None = None) -> list[list[int]]:
    """The test-set indices of every batch of :func:`rank_shards` (all ranks, in order).

    Any union of whole batches, given back to :func:`rank_shards` as ``selections``, is batched into the same batches:
    only a loader's last batch can be shorter.
    """
    batches, offset = [], 0
    for loader in loaders:
        selected = evenly_spaced(len(loader.dataset), max_samples)
        positions = _positions(len(selected), loader.batch_size or 1)
        batches += [[offset + selected[position] for position in batch] for batch in positions]
        offset += len(loader.dataset)
    return batches


def first_item(loaders: list[DataLoader]) -> object:
    """The first test item of the first non-empty loader (the same on every rank, whatever its shard holds)."""
    return next(loader.dataset[0] for loader in loaders if len(loader.dataset))


def gather_by_index(indices: list[torch.Tensor], *values: list[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """Concatenate per-batch ``values`` of every rank, ordered by sample index; ``None`` where a list is empty.

    A rank without batches contributes nothing; a value that some rank with batches did not produce (no anomaly maps)
    is ``None``.
    """
    local = [torch.cat(items) if items else None for items in (indices, *values)]
    if distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1:
        parts = [None] * distributed.get_world_size()
        distributed.all_gather_object(parts, local)
    else:
        parts = [local]
    parts = [part for part in parts if part[0] is not None]
    order = torch.cat([part[0] for part in parts]).argsort()
    return tuple(
        None if any(part[position] is None for part in parts) else torch.cat([part[position] for part in parts])[order]
        for position in range(1, len(local))
    )


def images_and_labels(batch: object, device: torch.device, caller: str = "RobustEval") -> tuple[torch.Tensor, ...]:
    """[0, 1] images and ``gt_label`` of an anomalib test batch, on ``device``.

    Raises:
        ValueError: when the batch has no ``image`` tensor or no ``gt_label``.
    """
    images, labels = getattr(batch, "image", None), getattr(batch, "gt_label", None)
    if not isinstance(images, torch.Tensor) or labels is None:
        msg = (
            f"{caller} needs labelled test batches: anomalib batches with `image` and `gt_label` (0 normal, "
            f"1 anomalous); got a {type(batch).__name__} with image={type(images).__name__}, "
            f"gt_label={type(labels).__name__}."
        )
        raise ValueError(msg)
    return images.to(device), torch.as_tensor(labels).reshape(-1).long().to(device)


def check_both_classes(labels: torch.Tensor, caller: str = "RobustEval") -> None:
    """Raise a clear error when ``labels`` lack normal or anomalous samples (AUROC is undefined)."""
    normal, anomalous = int((labels == 0).sum()), int((labels == 1).sum())
    if normal == 0 or anomalous == 0:
        msg = (
            f"{caller}: the test set has {normal} normal and {anomalous} anomalous images; AUROC is undefined with "
            "a single class. Use a test split that contains both normal and anomalous images."
        )
        raise ValueError(msg)


def resize_masks(masks: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Ground-truth masks at the anomaly-map resolution (nearest neighbour), as booleans ``(N, H, W)``."""
    masks = masks.reshape(masks.shape[0], 1, *masks.shape[-2:]).float()
    return F.interpolate(masks, size=tuple(size), mode="nearest")[:, 0].bool().cpu()


def cuda_devices(device: torch.device) -> list[torch.device]:
    """``[device]`` for a CUDA device (whose RNG ``torch.random.fork_rng`` must save too), else ``[]``."""
    return [device] if device.type == "cuda" else []
