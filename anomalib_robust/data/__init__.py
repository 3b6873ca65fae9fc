"""Datasets of anomalib-robust: Fashion-MNIST as an offline one-class anomaly detection benchmark.

Example:
    >>> from anomalib_robust.data import FashionMNIST
    >>> datamodule = FashionMNIST(category="sneaker", protocol="semantic", root="embedded")
    >>> datamodule.category
    'sneaker'
"""

from anomalib_robust.data.fashion_mnist import FashionMNIST
from anomalib_robust.data.fashion_mnist_dataset import FashionMNISTDataset
from anomalib_robust.data.fashion_mnist_source import CLASS_NAMES

__all__ = ["CLASS_NAMES", "FashionMNIST", "FashionMNISTDataset"]
