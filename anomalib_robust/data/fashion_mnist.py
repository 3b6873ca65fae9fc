"""Fashion-MNIST as an anomalib one-class anomaly detection datamodule, offline and CPU-sized.

The data, its two test protocols (``"defect"`` and ``"semantic"``) and the sample selection are described in
:mod:`anomalib_robust.data.fashion_mnist_dataset`; this module serves its training and test splits as an anomalib
datamodule, which carves the validation set out of the test images.

Example:
    >>> from anomalib_robust.data import FashionMNIST
    >>> datamodule = FashionMNIST(category="trouser", root="embedded", num_train=8, num_test=8, image_size=32)
    >>> datamodule.setup()
    >>> batch = next(iter(datamodule.test_dataloader()))
    >>> batch.image.shape, batch.gt_mask.shape, batch.gt_label.tolist()
    (torch.Size([4, 3, 32, 32]), torch.Size([4, 32, 32]), [True, True, False, False])
"""

import logging
from pathlib import Path

from anomalib.data import AnomalibDataModule
from anomalib.data.utils import TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

from anomalib_robust.data.fashion_mnist_dataset import (
    FashionMNISTDataset,
    Protocol,
    check_num_images,
    check_options,
    max_images,
)
from anomalib_robust.data.fashion_mnist_source import CLASS_NAMES, class_index, load_split, resolve_root

logger = logging.getLogger(__name__)


class FashionMNIST(AnomalibDataModule):
    """Fashion-MNIST one-class anomaly detection datamodule (protocols in :mod:`.fashion_mnist_dataset`).

    The validation set is carved out of the test images by anomalib (``val_split_mode``, default ``"from_test"``:
    a label-stratified ``val_split_ratio`` of them, drawn with ``seed``), so it holds normal and anomalous images for
    the post-processor's threshold; ``num_test`` counts test and validation images together.

    Args:
        category: Class index ``0``-``9`` or name (``"t_shirt_top"``, ``"trouser"``, ``"pullover"``, ``"dress"``,
            ``"coat"``, ``"sandal"``, ``"shirt"``, ``"sneaker"``, ``"bag"``, ``"ankle_boot"``; official names such as
            ``"T-shirt/top"`` work too). Defaults to ``0``.
        protocol: ``"defect"`` (small synthetic defects on held-out images of the class, with masks) or
            ``"semantic"`` (other classes are the anomalies). Defaults to ``"defect"``.
        root: Directory with the official ``*-ubyte.gz`` files, ``"embedded"`` for the subset shipped in the package
            (first 200 training and 100 test images per class), or ``None``: ``/usr/share/datasets/fashion-mnist``
            (Debian package ``dataset-fashion-mnist``) when it holds the files, else the embedded subset.
            Defaults to ``None``.
        image_size: Side of the square images, at least 32 for ``defect`` (anomalib's Perlin noise needs it), 8 for
            ``semantic``. Defaults to ``64``.
        num_train: Number of training images; ``None`` for all of the class. Defaults to ``200``.
        num_test: Number of test plus validation images, at least 2, half of them anomalous (rounded down);
            ``None`` for all held-out images of the class (``defect``) or the whole test file (``semantic``).
            Defaults to ``100``.
        seed: Seed of the defects, of which test images get them and of anomalib's validation split.
            Defaults to ``0``.
        cache_dir: Where the PNG copies read by anomalib's visualizer go.
            Defaults to ``<temp dir>/anomalib_robust/fashion_mnist``.
        train_batch_size: Training batch size. Defaults to ``32``.
        eval_batch_size: Validation and test batch size. Defaults to ``32``.
        num_workers: Dataloader workers; the data is in memory, so ``0`` is usually fastest. Defaults to ``0``.
        train_augmentations: Augmentations of training images. Defaults to ``None``.
        val_augmentations: Augmentations of validation images. Defaults to ``None``.
        test_augmentations: Augmentations of test images. Defaults to ``None``.
        augmentations: Augmentations of every subset without its own. Defaults to ``None``.
        val_split_mode: How anomalib makes the validation set (``"from_test"``, ``"same_as_test"``,
            ``"from_train"``, ``"synthetic"`` or ``"none"``). Defaults to ``"from_test"``.
        val_split_ratio: Fraction of the test (or training) images moved to the validation set. Defaults to ``0.5``.

    Example:
        >>> from anomalib_robust.data import FashionMNIST
        >>> datamodule = FashionMNIST(category=0, protocol="semantic", root="embedded", num_test=40)
        >>> datamodule.setup()
        >>> len(datamodule.train_data), len(datamodule.val_data), len(datamodule.test_data)
        (200, 20, 20)
        >>> datamodule.category, datamodule.task
        ('t_shirt_top', <TaskType.CLASSIFICATION: 'classification'>)
    """

    def __init__(
        self,
        category: int | str = 0,
        protocol: Protocol = "defect",
        root: str | Path | None = None,
        image_size: int = 64,
        num_train: int | None = 200,
        num_test: int | None = 100,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        val_split_mode: ValSplitMode | str = ValSplitMode.FROM_TEST,
        val_split_ratio: float = 0.5,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=TestSplitMode.FROM_DIR,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        check_options(protocol=protocol, image_size=image_size, seed=seed)
        self.class_index = class_index(category)
        self.category = CLASS_NAMES[self.class_index]
        self.root = resolve_root(root)
        if root is None:
            logger.info("Fashion-MNIST: reading %s", self.root)
        for split, name, value, minimum in (("train", "num_train", num_train, 1), ("test", "num_test", num_test, 2)):
            maximum = max_images(load_split(self.root, split), self.class_index, protocol, split)
            check_num_images(value, name=name, minimum=minimum, maximum=maximum)
        self.protocol = protocol
        self.image_size = image_size
        self.num_train = num_train
        self.num_test = num_test
        self.cache_dir = cache_dir

    def _setup(self, _stage: str | None = None) -> None:
        """Create the training and test datasets; anomalib's ``setup`` then carves the validation set."""
        options = {
            "category": self.class_index,
            "protocol": self.protocol,
            "root": self.root,
            "image_size": self.image_size,
            "seed": self.seed,
            "cache_dir": self.cache_dir,
        }
        self.train_data = FashionMNISTDataset("train", num_images=self.num_train, **options)
        self.test_data = FashionMNISTDataset("test", num_images=self.num_test, **options)
