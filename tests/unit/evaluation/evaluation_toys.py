"""Toy detectors and a labelled toy test set in anomalib's batch format, for the evaluator's unit tests."""

import torch
from anomalib.data import ImageBatch, ImageItem, InferenceBatch
from torch import nn
from torch.utils.data import DataLoader, Dataset

SIZE = 8


class BrightnessModel(nn.Module):
    """Score = mean brightness (+ Gaussian noise of std ``noise`` per call); map = per-pixel brightness (+ noise).

    ``draws`` records, per forward pass, whether gradients were enabled and the first noise value drawn.
    """

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.noise = noise
        self.stochastic = noise > 0
        self.draws: list[tuple[bool, float]] = []

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        anomaly_map = self.scale * images.mean(dim=1)
        if self.noise:
            noise = torch.randn_like(anomaly_map)
            self.draws.append((torch.is_grad_enabled(), float(noise.flatten()[0])))
            anomaly_map = anomaly_map + self.noise * noise
        return InferenceBatch(pred_score=anomaly_map.mean(dim=(1, 2)), anomaly_map=anomaly_map)


class HighFrequencyModel(BrightnessModel):
    """:class:`BrightnessModel` plus ``mean(sin(frequency * x))``: a term that dominates the gradient and is noise at
    any attack's scale, so a gradient attack does no better than random steps."""

    def __init__(self, frequency: float = 3e3) -> None:
        super().__init__()
        self.frequency = frequency

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        output = super().forward(images)
        return output._replace(pred_score=output.pred_score + torch.sin(self.frequency * images).mean(dim=(1, 2, 3)))


class PrivateNoiseModel(BrightnessModel):
    """:class:`BrightnessModel` with noise drawn from its own ``torch.Generator``, which no reseeding of torch's global
    RNG reaches; it does not declare ``stochastic``."""

    def __init__(self, noise: float = 0.05) -> None:
        super().__init__()
        self.private_noise, self.stochastic = noise, False
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        output = super().forward(images)
        noise = torch.randn(images.shape[0], generator=self.generator).to(images)
        return output._replace(pred_score=output.pred_score + self.private_noise * noise)


class CountingModel(BrightnessModel):
    """:class:`BrightnessModel` that counts the images of every forward pass, and of every backward pass through its
    input (a hook on the input tensor, so only gradients actually computed are counted)."""

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__(noise)
        self.forward_images = 0
        self.backward_images = 0

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        self.forward_images += images.shape[0]
        if images.requires_grad:
            images.register_hook(self._count_backward)
        return super().forward(images)

    def _count_backward(self, gradient: torch.Tensor) -> None:
        self.backward_images += gradient.shape[0]


class ToyDetector(nn.Module):
    """Stands in for an ``AnomalibModule``: ``.pre_processor`` and ``.model``."""

    def __init__(self, noise: float = 0.0, pre_processor: nn.Module | None = None) -> None:
        super().__init__()
        self.pre_processor = pre_processor or nn.Identity()
        self.model = BrightnessModel(noise)


class ToyTestSet(Dataset):
    """Normal images are dark, anomalous ones carry a bright square (their mask)."""

    def __init__(self, count: int = 24, size: int = SIZE, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for index in range(count):
            label = index % 2
            image = 0.3 + 0.2 * torch.rand(3, size, size, generator=generator)
            mask = torch.zeros(size, size, dtype=torch.bool)
            if label:
                mask[2:5, 2:5] = True
                image[:, mask] += 0.2 + 0.1 * torch.rand((), generator=generator)
            self.items.append(ImageItem(image=image.clamp(0, 1), gt_label=torch.tensor(label), gt_mask=mask))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ImageItem:
        return self.items[index]


def loader(dataset: Dataset, batch_size: int = 5) -> DataLoader:
    """A test dataloader as anomalib builds it: the dataset's items collated into an ``ImageBatch``."""
    return DataLoader(dataset, batch_size=batch_size, collate_fn=ImageBatch.collate)
