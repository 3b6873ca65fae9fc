"""How much memory a differentiated U-Net call stores, and how much is free: the inputs of the purifiers' choice of
gradient checkpointing (:meth:`~anomalib_robust.defenses.purifiers.DiffusionPurifier.checkpointing_needed`).

Example:
    >>> import torch
    >>> available_memory(torch.device("cpu")) > 0
    True
"""

import os
from pathlib import Path

import torch
from torch import nn

MEMINFO = Path("/proc/meminfo")
"""Where Linux reports the memory available to new allocations (``MemAvailable``)."""

_measured: dict[tuple, int] = {}


def activation_bytes(unet: nn.Module, images: torch.Tensor) -> int:
    """Bytes that one U-Net call on ``images`` keeps for the backward pass to the input (the tensors autograd saves),
    measured once per U-Net, image shape, device and dtype on a single image and scaled by the batch."""
    key = (id(unet), tuple(images.shape[1:]), images.device, images.dtype)
    if key not in _measured:
        saved = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += tensor.numel() * tensor.element_size()
            return tensor

        probe = torch.zeros(1, *images.shape[1:], device=images.device, dtype=images.dtype, requires_grad=True)
        timestep = torch.zeros(1, device=images.device, dtype=torch.long)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            unet(probe, timestep)
        _measured[key] = saved
    return _measured[key] * images.shape[0]


def available_memory(device: torch.device) -> int:
    """Bytes free for new allocations on ``device``: the CUDA driver's free memory, else the host's available memory
    (Linux ``MemAvailable``, else the free physical pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if MEMINFO.is_file():
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
