"""Build anomalib models offline, with random-init backbones.

Some anomalib constructors ask for pretrained weights with no way to opt out (Stfpm's teacher and Cfa's backbone call
``timm.create_model(..., pretrained=True)`` or torchvision's default weights), which means a download. Within
:func:`random_init_backbones`, those requests build the same architectures from random initialisation instead, so
that such models can be built, tested and benchmarked on a machine without network. Pass real weights to a model the
usual way when you have them.

Example:
    >>> from anomalib.models import Stfpm
    >>> with random_init_backbones():
    ...     model = Stfpm(backbone="resnet18")
"""

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import timm
import torchvision


class _NoWeights:
    """What ``torchvision.models.get_model_weights`` returns inside the context: no default weights."""

    DEFAULT = None


@contextmanager
def random_init_backbones() -> Iterator[None]:
    """Make ``timm.create_model`` and torchvision's default weights build random-init backbones in this context."""
    create_model = timm.create_model

    def create_random_init_model(*args: object, **kwargs: object) -> object:
        return create_model(*args, **{**kwargs, "pretrained": False})

    with (
        mock.patch.object(timm, "create_model", create_random_init_model),
        mock.patch.object(torchvision.models, "get_model_weights", lambda name: _NoWeights),
    ):
        yield
