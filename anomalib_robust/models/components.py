"""What the plugin's Lightning modules share: a CPU preset, checkpoints that carry their own architecture, and
validation, test and predict steps that score a batch with the torch model."""

import inspect
import logging
from typing import Any, ClassVar, Self

from anomalib.data import Batch
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

logger = logging.getLogger(__name__)


class CheckpointArchitectureMixin:
    """A Lightning module whose torch model is built from its init args, and rebuilt from a checkpoint's.

    Mixed in before :class:`~anomalib.models.components.AnomalibModule` (``class AdvRAD(CheckpointArchitectureMixin,
    AnomalibModule)``), so that the model stays a direct subclass of ``AnomalibModule``: that is how anomalib's
    ``get_model``, ``list_models`` and CLI find models.

    The weights define the architecture: :meth:`on_load_checkpoint` rebuilds the torch model with the checkpoint's
    :attr:`ARCHITECTURE_ARGS` (and :attr:`RESTORED_ARGS`) when they differ from the constructor's, so
    ``anomalib test --model <Model> --ckpt_path ...`` works without repeating the training configuration. Every other
    init arg (inference-time settings such as AdvRAD's k) stays as given.
    """

    TORCH_MODEL: ClassVar[type[nn.Module]]
    """The torch model, built from those init args that its constructor takes."""
    ARCHITECTURE_ARGS: ClassVar[tuple[str, ...]] = ()
    """Init args that shape the weights; every checkpoint has them, and its values win over the constructor's."""
    RESTORED_ARGS: ClassVar[tuple[str, ...]] = ()
    """Further init args restored with the architecture when the checkpoint has them (e.g. those of buffers)."""
    CPU_PRESET: ClassVar[dict[str, Any]] = {}
    """Init args of a small variant that trains in minutes on a CPU."""

    @classmethod
    def cpu_preset(cls, **overrides: Any) -> Self:
        """The model with the :attr:`CPU_PRESET` settings and ``overrides``, e.g. ``cls.cpu_preset(noise_seed=0)``."""
        return cls(**{**cls.CPU_PRESET, **overrides})

    @classmethod
    def _build_model(cls, hparams: dict[str, Any]) -> nn.Module:
        """:attr:`TORCH_MODEL` built from the entries of ``hparams`` that it takes."""
        names = inspect.signature(cls.TORCH_MODEL).parameters
        return cls.TORCH_MODEL(**{name: hparams[name] for name in names if name in hparams})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the torch model with the checkpoint's architecture when it differs from the constructor's."""
        super().on_load_checkpoint(checkpoint)
        name = type(self).__name__
        saved = checkpoint.get("hyper_parameters", {})
        missing = [arg for arg in self.ARCHITECTURE_ARGS if arg not in saved]
        if missing:
            msg = f"checkpoint is not a checkpoint of {name}: its hyper_parameters lack {missing}"
            raise ValueError(msg)
        changed = {
            arg: saved[arg]
            for arg in (*self.ARCHITECTURE_ARGS, *self.RESTORED_ARGS)
            if arg in saved and _as_list(saved[arg]) != _as_list(self.hparams[arg])
        }
        if changed:
            logger.warning("Rebuilding %s with the checkpoint's architecture: %s", name, changed)
            self.hparams.update(changed)
            self._rebuild(changed)

    def _rebuild(self, changed: dict[str, Any]) -> None:
        """Rebuild the torch model from the updated hparams; a subclass also rebuilds what depends on ``changed``."""
        del changed  # the torch model depends on all of them
        self.model = self._build_model(self.hparams).to(self.device)


class ScoringStepsMixin:
    """Validation, test and predict steps that all score the batch with :meth:`_predict`: the batch updated with the
    torch model's ``InferenceBatch`` (scores and maps), which anomalib's post-processor and evaluator then read. The
    model class defines ``_predict(batch) -> Batch``; mixed in before ``AnomalibModule``, as
    :class:`CheckpointArchitectureMixin` is."""

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score the validation images (for the post-processor's threshold and normalisation)."""
        del args, kwargs  # These variables are not used.
        return self._predict(batch)

    def test_step(self, batch: Batch, batch_idx: int, *args, **kwargs) -> STEP_OUTPUT:
        """Score the test images."""
        del args, kwargs, batch_idx  # These variables are not used.
        return self._predict(batch)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> STEP_OUTPUT:
        """Score images to predict."""
        del batch_idx, dataloader_idx  # These variables are not used.
        return self._predict(batch)


def _as_list(value: Any) -> Any:
    """Compare hyper-parameters saved as tuples or lists alike."""
    return list(value) if isinstance(value, tuple | list) else value
