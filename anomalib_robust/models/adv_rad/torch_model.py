"""PyTorch model of AdvRAD: a diffusion U-Net whose robust reconstruction error is the anomaly score.

In training mode the forward pass returns the hybrid diffusion loss (appendix A); in eval mode it reconstructs the
images from diffusion step k (Alg. 1-3) with fresh noise and scores them (Alg. 4), returning an
:class:`anomalib.data.InferenceBatch`, which is what anomalib exports.

Example:
    >>> import torch
    >>> model = AdvRADModel(image_size=(32, 32), base_channels=32, channel_mult=(1, 2), attention_resolutions=())
    >>> losses = model(torch.rand(2, 3, 32, 32))
    >>> sorted(losses)
    ['loss', 'simple', 'vb']
"""

from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch
from diffusers import UNet2DModel
from torch import nn

from anomalib_robust.models.adv_rad.diffusion import DiffusionSchedule, hybrid_loss, q_sample, standard_normal_like
from anomalib_robust.models.adv_rad.reconstruction import (
    RECONSTRUCTION_MODES,
    arbitrary_shot,
    check_diffusion_step,
    check_step_schedule,
    one_shot,
)
from anomalib_robust.models.adv_rad.scoring import (
    DEFAULT_SCALES,
    check_scales,
    deviation_from_normal,
    multiscale_error_map,
)


def build_unet(
    image_size: tuple[int, int],
    in_channels: int,
    base_channels: int,
    channel_mult: Sequence[int],
    layers_per_block: int,
    attention_resolutions: Sequence[int],
    num_heads: int,
    dropout: float,
) -> UNet2DModel:
    """The improved-DDPM U-Net (Nichol & Dhariwal 2021) as a ``diffusers.UNet2DModel``.

    Levels have ``base_channels * mult`` channels and halve the resolution; a level whose resolution is in
    ``attention_resolutions`` gets self-attention, with ``num_heads`` heads (as the middle block). The output has
    ``2 * in_channels`` channels: the predicted noise and the variance interpolation v of eq. (11).
    """
    downsampling = 2 ** (len(channel_mult) - 1)
    if any(size % downsampling for size in image_size):
        msg = (
            f"image_size {image_size} cannot pass through a U-Net with {len(channel_mult)} levels: both sides must be "
            f"divisible by {downsampling} (choose another image_size or fewer channel_mult entries)"
        )
        raise ValueError(msg)
    channels = tuple(base_channels * mult for mult in channel_mult)
    if any(width % 32 for width in channels):
        msg = f"base_channels * channel_mult must be multiples of 32 (group norm), got {channels}"
        raise ValueError(msg)
    resolutions = [image_size[0] // 2**level for level in range(len(channels))]
    with_attention = [resolution in attention_resolutions for resolution in resolutions]
    attention_widths = {width for width, attend in zip(channels, with_attention, strict=True) if attend}
    attention_widths.add(channels[-1])  # the middle block always attends
    if len(attention_widths) != 1 or channels[-1] % num_heads:
        msg = (
            f"num_heads={num_heads} needs all attention levels (and the middle block) to have one width divisible by "
            f"it; attention_resolutions={tuple(attention_resolutions)} gives widths {sorted(attention_widths)}"
        )
        raise ValueError(msg)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=2 * in_channels,
        down_block_types=tuple("AttnDownBlock2D" if attend else "DownBlock2D" for attend in with_attention),
        up_block_types=tuple("AttnUpBlock2D" if attend else "UpBlock2D" for attend in reversed(with_attention)),
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        attention_head_dim=channels[-1] // num_heads,
        resnet_time_scale_shift="scale_shift",
        dropout=dropout,
    )


class AdvRADModel(nn.Module):
    """Diffusion model + robust reconstruction + Alg. 4 scoring.

    Args:
        image_size (tuple[int, int]): Input size of the U-Net. Defaults to ``(256, 256)``.
        in_channels (int): Image channels. Defaults to ``3``.
        base_channels (int): Channels of the first U-Net level. Defaults to ``128`` (appendix C.1).
        channel_mult (Sequence[int]): Channel multiplier per level. Defaults to ``(1, 1, 2, 2, 4, 4)``.
        layers_per_block (int): Residual blocks per level. Defaults to ``2``.
        attention_resolutions (Sequence[int]): Resolutions with self-attention. Defaults to ``(16,)``.
        num_heads (int): Attention heads. Defaults to ``1``.
        dropout (float): Dropout in residual blocks. Defaults to ``0.0``.
        num_timesteps (int): Diffusion steps T. Defaults to ``1000``.
        beta_schedule (str): ``"linear"`` or ``"cosine"``. Defaults to ``"linear"``.
        vb_weight (float): lambda of the hybrid loss, eq. (10). Defaults to ``0.001``.
        diffusion_step (int): Step k the test image is diffused to. Defaults to ``100``.
        reconstruction (str): ``"one_shot"`` (Alg. 1), ``"arbitrary_shot"`` (Alg. 3) or ``"full_shot"`` (Alg. 2).
            Defaults to ``"one_shot"``.
        step_schedule (Sequence[int] | None): Denoising steps S for ``"arbitrary_shot"``, starting at k and strictly
            decreasing. Defaults to ``None``.
        scales (Sequence[float]): Scale schedule L of Alg. 4. Defaults to ``(1, 1/2, 1/4, 1/8)``.
        mean_filter_size (int): s of the mean filter in Alg. 4 (the paper does not state it). Defaults to ``3``.
        num_noise_draws (int): Error maps averaged over this many noise draws per image. Defaults to ``1``.
        clip_denoised (bool): Clamp every predicted x_0 of the multi-step reconstructions (arbitrary and full shot)
            to [-1, 1], as ``improved-diffusion``'s samplers do; one shot has no chain to clamp. Defaults to ``False``
            (measured: no change in AUROC, see :func:`~anomalib_robust.models.adv_rad.reconstruction.arbitrary_shot`).
    """

    stochastic = True
    """Fresh diffusion noise at every call: attacks must use EOT (AdvRAD paper, sec. 5.6)."""

    normal_error_map: torch.Tensor
    is_fitted: torch.Tensor

    def __init__(
        self,
        image_size: Sequence[int] = (256, 256),
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4, 4),
        layers_per_block: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 1,
        dropout: float = 0.0,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        vb_weight: float = 1e-3,
        diffusion_step: int = 100,
        reconstruction: str = "one_shot",
        step_schedule: Sequence[int] | None = None,
        scales: Sequence[float] = DEFAULT_SCALES,
        mean_filter_size: int = 3,
        num_noise_draws: int = 1,
        clip_denoised: bool = False,
    ) -> None:
        super().__init__()
        image_size = tuple(image_size)
        check_scales(scales, image_size)
        self.image_size = image_size
        self.in_channels = in_channels
        self.vb_weight = vb_weight
        self.scales = tuple(scales)
        self.clip_denoised = clip_denoised
        self.set_scoring(mean_filter_size, num_noise_draws)
        self.unet = build_unet(
            image_size,
            in_channels,
            base_channels,
            channel_mult,
            layers_per_block,
            attention_resolutions,
            num_heads,
            dropout,
        )
        self.schedule = DiffusionSchedule.from_name(beta_schedule, num_timesteps)
        self.set_reconstruction(diffusion_step, reconstruction, step_schedule)
        self.register_buffer("normal_error_map", torch.zeros(1, 1, *image_size))
        self.register_buffer("is_fitted", torch.tensor(False))

    def set_reconstruction(
        self,
        diffusion_step: int,
        reconstruction: str = "one_shot",
        step_schedule: Sequence[int] | None = None,
    ) -> None:
        """Choose k and the reconstruction algorithm; no retraining needed (the U-Net is shared by all)."""
        check_diffusion_step(diffusion_step, self.schedule.num_timesteps)
        if reconstruction not in RECONSTRUCTION_MODES:
            msg = f"reconstruction must be one of {RECONSTRUCTION_MODES}, got {reconstruction!r}"
            raise ValueError(msg)
        if reconstruction == "arbitrary_shot":
            if step_schedule is None:
                msg = "reconstruction='arbitrary_shot' needs a step_schedule (e.g. uniform_step_schedule(k, 10))"
                raise ValueError(msg)
            step_schedule = check_step_schedule(step_schedule, diffusion_step)
        elif reconstruction == "full_shot":
            step_schedule = list(range(diffusion_step, 0, -1))
        self.diffusion_step = diffusion_step
        self.reconstruction = reconstruction
        self.step_schedule = step_schedule

    def set_scoring(self, mean_filter_size: int, num_noise_draws: int) -> None:
        """Choose the mean filter size s of Alg. 4 and the noise draws averaged per image (no retraining).

        The normal error map (:meth:`set_normal_error_map`) depends on s: recompute it after changing s.
        """
        if not _is_count(mean_filter_size) or mean_filter_size % 2 == 0:
            msg = f"mean_filter_size must be a positive odd integer, got {mean_filter_size!r}"
            raise ValueError(msg)
        if not _is_count(num_noise_draws):
            msg = f"num_noise_draws must be an integer >= 1, got {num_noise_draws!r}"
            raise ValueError(msg)
        self.mean_filter_size = mean_filter_size
        self.num_noise_draws = num_noise_draws

    def denoise(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """U-Net output ``[eps, v]`` for diffused images ``xt`` at 0-based steps ``t``."""
        return self.unet(xt, t).sample

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            msg = f"images must be (B, {self.in_channels}, H, W) to match in_channels, got {tuple(images.shape)}"
            raise ValueError(msg)
        if tuple(images.shape[-2:]) != self.image_size:
            msg = f"images must be {self.image_size} (the model's image_size), got {tuple(images.shape[-2:])}"
            raise ValueError(msg)
        if not torch.compiler.is_exporting() and not torch.isfinite(images).all():  # data-dependent: eager only
            msg = "images contain NaN or inf values"
            raise ValueError(msg)

    def training_loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hybrid loss (eq. 10) at uniformly drawn steps for images in [0, 1]."""
        self._check_images(images)
        x0 = images * 2 - 1
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        xt = q_sample(self.schedule, x0, t, noise)
        return hybrid_loss(self.schedule, self.denoise(xt, t), x0, xt, t, noise, self.vb_weight)

    def reconstruct(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Robust reconstruction of images in [0, 1] (returned in the same scale, not clipped).

        ``noise`` is the eps of Alg. 1 (drawn here when ``None``). Without a generator it is drawn by
        :func:`standard_normal_like`, which an exported graph keeps as an in-graph random op (ONNX
        ``RandomUniformLike`` and Box-Muller).
        """
        x0 = images * 2 - 1
        if noise is None:
            noise = (
                standard_normal_like(x0)
                if generator is None
                else torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            )
        if self.reconstruction == "one_shot":
            reconstruction = one_shot(self.denoise, self.schedule, x0, self.diffusion_step, noise)
        else:
            reconstruction = arbitrary_shot(
                self.denoise, self.schedule, x0, self.step_schedule, noise, generator, self.clip_denoised
            )
        return (reconstruction + 1) / 2

    def error_map(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Err_ms of Alg. 4, averaged over ``num_noise_draws`` reconstructions; ``(B, 1, H, W)``.

        ``noise`` fixes the diffusion noise: ``(num_noise_draws, B, C, H, W)``, one eps per draw (``None`` draws it).
        """
        self._check_images(images)
        if noise is not None and noise.shape != (self.num_noise_draws, *images.shape):
            msg = (
                f"noise must be (num_noise_draws, *images.shape) = {(self.num_noise_draws, *images.shape)}, "
                f"got {tuple(noise.shape)}"
            )
            raise ValueError(msg)
        maps = [
            multiscale_error_map(
                images,
                self.reconstruct(images, generator, None if noise is None else noise[draw]),
                self.scales,
                self.mean_filter_size,
            )
            for draw in range(self.num_noise_draws)
        ]
        return torch.stack(maps).mean(0)

    def check_fitted(self) -> None:
        """Raise a clear error when the training error statistics of Alg. 4 have not been computed."""
        if not bool(self.is_fitted):
            msg = (
                "AdvRAD has no training error statistics yet: fit the model (Engine.fit / anomalib train) or load a "
                "trained checkpoint before testing, predicting or exporting"
            )
            raise RuntimeError(msg)

    def set_normal_error_map(self, error_map: torch.Tensor) -> None:
        """Store the mean Err_ms of the normal training images (Alg. 4 line 9); marks the model as fitted."""
        self.normal_error_map.copy_(error_map.reshape(self.normal_error_map.shape))
        self.is_fitted.fill_(True)

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor] | InferenceBatch:
        """Training: hybrid loss terms. Eval: ``InferenceBatch(pred_score, anomaly_map)`` for images in [0, 1].

        ``noise`` (eval only) fixes the diffusion noise, see :meth:`error_map`.
        """
        if self.training:
            return self.training_loss(images)
        error_map = self.error_map(images, generator, noise)
        anomaly_map, score = deviation_from_normal(error_map, self.normal_error_map)
        return InferenceBatch(pred_score=score, anomaly_map=anomaly_map)


def _is_count(value: object) -> bool:
    """An integer >= 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
