"""RAP: the reverse adversarial process in front of any anomalib detector (the RAP paper, sec. 3.2-3.3, Alg. 2).

The RAP paper ("From Malicious to Marvelous: the Art of Adversarial Attack as Diffusion") treats an attack as a
diffusion process (Alg. 1) and learns its reverse: an adapter f~(x_t, t) that predicts the clean image (eq. 8),
trained against the adversaries of the defended system itself (sec. 3.3, Alg. 3). Unlike DiffPure and TMA there is
no Gaussian diffusion and no pre-trained diffusion model: the adapter is trained for one detector with
:class:`~anomalib_robust.models.rap_adapter.RAPAdapter` (``anomalib train --model RAPAdapter``), and its checkpoint goes
where a DiffPure denoiser's goes (``RAP("rap_adapter.ckpt")``, ``defense.init_args.denoiser`` in the CLI config).

Inference (Alg. 2) on a sub-sequence ``tau = (T, ..., 0)`` of ``inference_steps`` reverse steps:

- ``inference_steps = 1`` (default, the one-step mode of sec. 4.5): ``f~(x, T)``, **1 U-Net call per image**; the
  defended detector is deterministic (the paper evaluates with its randomness off, sec. 4.1 "No randomness").
- ``inference_steps = T``: Alg. 2 as written. Each step calls the adapter once, then re-runs Alg. 1 from the estimate
  for ``t - 1`` steps (eq. 9) against the defended detector: **T + T (T - 1) / 2 U-Net calls per image** (210 for T =
  20), plus as many U-Net backward passes and detector forward/backward passes (the inner attack needs gradients).
  The re-run needs Alg. 1's label ``y``, which a test image does not have: it is the detector's own decision on the
  estimate (``y = -1`` where its raw score is above the detector's image threshold, ``+1`` elsewhere;
  :func:`~anomalib_robust.models.rap_adapter.process.decision_direction`), so the detector must have its threshold
  (anomalib sets it in validation). It has no start noise unless ``inference_noise`` (then the defense is randomised
  and attacked with EOT).

Attacks (``RobustEval(defense=RAP(...))``): in one step the full gradient is the adapter's exact gradient. With more
steps it goes through the adapter calls exactly and through each inner Alg. 1 run by BPDA (Athalye et al., 2018,
"Obfuscated Gradients Give a False Sense of Security", sec. 4.1): the run's sign steps and its direction ``y`` enter
the backward pass as constants, so the run's Jacobian is the identity up to its projections (the derivative almost
everywhere of a piecewise-constant step, which says nothing about how the steps depend on the input). BPDA over the
whole purifier (``purifier_gradients: [bpda]``) replaces it by the identity in the backward pass.

Bad input: an untrained adapter is refused; an adapter used in front of another detector than the one it was trained
against triggers a warning naming both (:meth:`RAP.attach`, called by ``Purified``).

Example:
    >>> from anomalib_robust.defenses import RAP, Purified
    >>> defended = Purified(fitted_padim, RAP("rap_adapter.ckpt"))  # doctest: +SKIP
    >>> RAP("rap_adapter.ckpt", inference_steps=20).unet_evaluations  # doctest: +SKIP
    210
"""

import copy
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from anomalib_robust.defenses.purifiers import DiffusionPurifier
from anomalib_robust.models.rap_adapter.lightning_model import (
    ARCHITECTURE_ARGS,
    CHECKPOINT_KEY,
    PROCESS_ARGS,
    RAPAdapter,
    detector_fingerprint,
)
from anomalib_robust.models.rap_adapter.process import (
    defended_objective,
    decision_direction,
    detector_score,
    forward_process,
    reverse_process,
    timesteps,
    unet_calls,
)
from anomalib_robust.models.rap_adapter.torch_model import RAPAdapterModel, check_process_settings


class DetectorMismatchWarning(UserWarning):
    """A RAP adapter defends a detector other than the one it was trained against."""


def load_adapter(adapter: str | Path | RAPAdapter | RAPAdapterModel) -> tuple[RAPAdapterModel, dict | None]:
    """A copy of the adapter behind ``adapter`` and the record of the detector it was trained against (or ``None``).

    Raises:
        FileNotFoundError: for a path that does not exist.
        TypeError: for anything that is not a RAPAdapter checkpoint path, ``RAPAdapter`` or ``RAPAdapterModel``.
    """
    if isinstance(adapter, str | Path):
        path = Path(adapter)
        if not path.is_file():
            msg = f"denoiser checkpoint {str(path)!r} does not exist (expected a RAPAdapter checkpoint, .ckpt)."
            raise FileNotFoundError(msg)
        saved = torch.load(path, map_location="cpu", weights_only=False)
        hparams = saved.get("hyper_parameters", {})
        missing = [name for name in (*ARCHITECTURE_ARGS, *PROCESS_ARGS) if name not in hparams]
        if missing or CHECKPOINT_KEY not in saved:
            msg = f"{str(path)!r} is not a RAPAdapter checkpoint (anomalib train --model RAPAdapter): lacks {missing}."
            raise TypeError(msg)
        model = RAPAdapterModel(**{name: hparams[name] for name in (*ARCHITECTURE_ARGS, *PROCESS_ARGS)})
        weights = {key.removeprefix("model."): value for key, value in saved["state_dict"].items()
                   if key.startswith("model.")}  # fmt: skip
        model.load_state_dict(weights)
        return model, saved[CHECKPOINT_KEY]
    if isinstance(adapter, RAPAdapter):
        record = {"name": adapter.detector_name, "fingerprint": adapter.detector_fingerprint}
        return copy.deepcopy(adapter.model), record
    if isinstance(adapter, RAPAdapterModel):
        return copy.deepcopy(adapter), None
    msg = (
        "denoiser must be a RAPAdapter checkpoint path, a RAPAdapter or a RAPAdapterModel, "
        f"got {type(adapter).__name__}."
    )
    raise TypeError(msg)


class RAP(DiffusionPurifier):
    """The RAP paper's reverse adversarial process (Alg. 2) with a trained adapter, in front of any detector.

    Args:
        denoiser: the trained adapter: a RAPAdapter checkpoint path, ``RAPAdapter`` or ``RAPAdapterModel`` (named as
            DiffPure's denoiser, so that configs swap one for the other).
        inference_steps: reverse steps of Alg. 2, in ``[1, T]``: 1 (one adapter call, default) to T (Alg. 2 as
            written); see the module docstring for the cost.
        steps: T of the re-runs of Alg. 1; ``None``: the T the adapter was trained with.
        eps, step_size, start_noise: eps, lambda and c of the re-runs of Alg. 1; ``None``: the trained values.
        inference_noise: draw Alg. 1's start noise in the re-runs (the defense becomes randomised); off by default.
        gradient_checkpointing: recompute the adapter's activations in the backward pass of an attack.
    """

    def __init__(
        self,
        denoiser: str | Path | RAPAdapter | RAPAdapterModel,
        inference_steps: int = 1,
        steps: int | None = None,
        eps: float | None = None,
        step_size: float | None = None,
        start_noise: float | None = None,
        inference_noise: bool = False,
        gradient_checkpointing: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        adapter, trained_against = load_adapter(denoiser)
        if int(adapter.trained_steps) == 0:
            msg = (
                "the RAP adapter is untrained (0 optimisation steps): train it against the detector first, "
                "anomalib train --model RAPAdapter --model.detector <detector.ckpt> --model.detector_model <class>."
            )
            raise ValueError(msg)
        self.steps = adapter.steps if steps is None else steps
        self.eps = adapter.eps if eps is None else eps
        self.step_size = adapter.step_size if step_size is None else step_size
        self.start_noise = min(adapter.start_noise, self.eps) if start_noise is None else start_noise
        check_process_settings(self.steps, self.eps, self.step_size, self.start_noise)
        timesteps(self.steps, inference_steps)
        self.inference_steps = inference_steps
        self.inference_noise = bool(inference_noise)
        self.adapter = adapter
        self.trained_against = trained_against
        self.image_size, self.in_channels = tuple(adapter.image_size), adapter.in_channels
        self.gradient_checkpointing = gradient_checkpointing
        # (pre-processor, torch model, post-processor) of the defended detector; a tuple: not registered as submodules
        self._detector: tuple[nn.Module | None, nn.Module, nn.Module | None] | None = None
        self.requires_grad_(False)
        self.eval()

    @property
    def stochastic(self) -> bool:
        """Randomised only with ``inference_noise`` and more than one reverse step (Alg. 1's start noise)."""
        return self.inference_noise and self.inference_steps > 1

    @property
    def unet_evaluations(self) -> int:
        """U-Net calls per image: 1 in one step, ``T + T (T - 1) / 2`` for Alg. 2 in full (module docstring)."""
        return unet_calls(self.steps, self.inference_steps)

    def attach(self, detector: nn.Module) -> None:
        """Defend ``detector`` (an ``AnomalibModule``): the inner Alg. 1 runs of Alg. 2 attack it through the adapter,
        in the direction of its decision (its post-processor's image threshold, read when the runs need it).

        Warns (:class:`DetectorMismatchWarning`) when it is not the detector the adapter was trained against.
        """
        model = detector.model
        self._detector = (getattr(detector, "pre_processor", None), model, getattr(detector, "post_processor", None))
        if self.trained_against is None:
            return
        fingerprint = detector_fingerprint(model)
        if fingerprint != self.trained_against["fingerprint"]:
            name = getattr(detector, "name", type(detector).__name__)
            msg = (
                f"RAP adapter trained against {self.trained_against['name']} (weights "
                f"{self.trained_against['fingerprint']}) now defends {name} (weights {fingerprint}): the adapter "
                "learnt to undo attacks on the other detector; retrain it (anomalib train --model RAPAdapter) for "
                "this one."
            )
            warnings.warn(msg, DetectorMismatchWarning, stacklevel=2)

    def _adapter(self, images: torch.Tensor, t: int) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled() and images.requires_grad:
            return checkpoint(self.adapter, images, t, use_reentrant=False)
        return self.adapter(images, t)

    def _attack(self, estimate: torch.Tensor, t: int) -> torch.Tensor:
        """Alg. 1 from ``estimate`` for ``t`` steps against the attached detector behind the one-step adapter, in the
        direction of the detector's decision on ``estimate``."""
        if self._detector is None:
            msg = (
                f"RAP with inference_steps={self.inference_steps} re-runs Alg. 1 against the defended detector: put it "
                "in front of one with Purified(detector, RAP(...)) (or call rap.attach(detector))."
            )
            raise RuntimeError(msg)
        pre_processor, model, post_processor = self._detector
        threshold = getattr(post_processor, "image_threshold", None)
        if threshold is None or not torch.isfinite(torch.as_tensor(threshold)):
            msg = (
                f"RAP with inference_steps={self.inference_steps} attacks in the direction of the detector's decision, "
                "but the detector has no image threshold: fit it with anomalib's Engine (validation sets it)."
            )
            raise RuntimeError(msg)
        with torch.no_grad():
            direction = decision_direction(detector_score(pre_processor, model, estimate), float(threshold))
        objective = defended_objective(self.adapter, self.steps, pre_processor, model, direction)
        noise = self.start_noise if self.inference_noise else 0.0
        return forward_process(objective, estimate, t, self.eps, self.step_size, noise)

    def purify(self, images: torch.Tensor) -> torch.Tensor:
        """Alg. 2 on ``images`` in [0, 1] (treated as ``x_T``), clamped to [0, 1]."""
        self.check_images(images)
        if self.inference_steps > 1:
            with torch.inference_mode(False):
                images = images.clone() if images.is_inference() else images
                return reverse_process(self._adapter, self._attack, images, self.steps, self.inference_steps)
        return reverse_process(self._adapter, None, images, self.steps, 1)

    def chain(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`purify` on images in [-1, 1] (the interface of the diffusion purifiers)."""
        return self.purify((x + 1) / 2) * 2 - 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Purified ``images`` (``(N, C, H, W)`` in [0, 1])."""
        return self.purify(images)

    def extra_repr(self) -> str:
        noise = ", inference_noise=True" if self.inference_noise else ""
        return f"steps={self.steps}, inference_steps={self.inference_steps}{noise}"
