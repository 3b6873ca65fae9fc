"""Tiny detectors with the anomalib anatomy (``.pre_processor``, ``.model`` returning ``InferenceBatch``)."""

from collections.abc import Callable

import pytest
import torch
from anomalib.data import InferenceBatch
from torch import nn


class ToyModel(nn.Module):
    """Score = mean squared conv response, computed under ``torch.no_grad()`` like anomalib's feature extractors."""

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        for parameter in self.conv.parameters():
            parameter.requires_grad_(False)
        self.dropout = nn.Dropout(0.5)
        self.noise = noise
        if noise:
            self.stochastic = True

    def forward(self, images: torch.Tensor) -> InferenceBatch | torch.Tensor:
        with torch.no_grad():
            features = self.conv(images)
        if self.training:
            return features
        if self.noise:
            features = features + self.noise * torch.randn_like(features)
        anomaly_map = (features**2).mean(dim=1)
        return InferenceBatch(pred_score=anomaly_map.mean(dim=(1, 2)), anomaly_map=anomaly_map)


class ToyDetector(nn.Module):
    """Stands in for an ``AnomalibModule``."""

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre_processor = nn.Identity()
        self.model = ToyModel(noise)


class LinearModel(nn.Module):
    """Score ``A(x) = <w, x> + noise * N(0, 1)``: the optimum of ``y * A`` in an eps-ball is known in closed form."""

    def __init__(self, weights: torch.Tensor, noise: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weights", weights)
        self.noise = noise
        if noise:
            self.stochastic = True

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        weighted = images * self.weights
        score = weighted.flatten(1).sum(dim=1)
        if self.noise:
            score = score + self.noise * torch.randn_like(score)
        return InferenceBatch(pred_score=score, anomaly_map=weighted.sum(dim=1))


class LinearDetector(nn.Module):
    """Linear detector with the anomalib anatomy."""

    def __init__(self, weights: torch.Tensor, noise: float = 0.0) -> None:
        super().__init__()
        self.pre_processor = nn.Identity()
        self.model = LinearModel(weights, noise)


@pytest.fixture
def linear_detector() -> Callable[..., LinearDetector]:
    """Factory: ``linear_detector(weights, noise=0.0)``."""
    return LinearDetector


@pytest.fixture
def detector() -> ToyDetector:
    return ToyDetector()


@pytest.fixture
def stochastic_detector() -> ToyDetector:
    return ToyDetector(noise=0.5)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(6, 3, 8, 8, generator=generator), torch.tensor([0, 1, 0, 1, 0, 1])
