"""Purification chains: diffuse an image part of the way, then run a reverse diffusion chain back to step 0.

Three samplers in front of a detector, as pure functions of a denoiser ``(x_t, t) -> [eps, v]`` (the AdvRAD U-Net
call, :data:`~anomalib_robust.models.adv_rad.reconstruction.Denoiser`) and a
:class:`~anomalib_robust.models.adv_rad.diffusion.DiffusionSchedule`, on images in [-1, 1]:

- :func:`ddpm_purification` (DiffPure, Nie et al., ICML 2022; the baseline of the AdvRAD paper, sec. 4.2 and
  Table 7): diffuse to the purification level ``p`` with eq. (3), then ancestral DDPM sampling ``p -> 0`` with the
  learned variance. It is the full-shot reconstruction of AdvRAD (Alg. 2) from step ``p``: the last step returns the
  posterior mean at step 1, which equals the predicted ``x_0``; ``p`` U-Net evaluations.
- :func:`ddim_purification` (TMA paper, Blau et al., Alg. 2): diffuse to ``T*``, then stochastic DDIM along the
  sub-sequence ``tau = (T*, T* - stride, ..., stride, 0)`` (eq. 4 of the TMA paper, which writes alpha for alpha-bar):

      x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma_t^2) eps_theta(x_t, t) + sigma_t z,
      sigma_t = eta * sqrt((1 - abar_s) / (1 - abar_t)) * sqrt(1 - abar_t / abar_s)   (Song et al. 2021, eq. 16)

  with ``abar_0 = 1``, so the last step returns ``x0_hat``; ``T* / stride`` U-Net evaluations.
- :func:`guided_ddpm_purification` (AGDM paper, Lin et al., Alg. 1): DiffPure's chain with every reverse mean shifted
  by a guidance gradient, ``x_{t-1} ~ N(mu + s_t Sigma g(x_t), Sigma)``, with ``Sigma`` the learned variance; the
  shift is a :data:`GuidanceShift`: the AGDM paper's fixed scale (:func:`fixed_scale_shift`) or a scale ``s_t`` set at
  every step so that the shift is a given fraction of the step's noise (:func:`guidance_shift`);
  :func:`guidance_to_noise` measures either. The last step returns the shifted mean (no noise), as guided samplers
  do (Dhariwal & Nichol, 2021). Without a shift it is :func:`ddpm_purification` draw for draw.

Steps are counted as in the papers, 1..T (the U-Net is conditioned on ``step - 1``); level 0 returns the input. With
``clip_denoised`` both chains clamp every predicted ``x0_hat`` to [-1, 1] (as ``improved-diffusion``'s samplers; see
:func:`~anomalib_robust.models.adv_rad.reconstruction.arbitrary_shot`).

Example:
    >>> import torch
    >>> from anomalib_robust.models.adv_rad.diffusion import DiffusionSchedule
    >>> schedule = DiffusionSchedule.from_name("linear", 1000)
    >>> def denoiser(x, t):  # predicts zero noise and v = 0
    ...     return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])
    >>> x = torch.zeros(1, 3, 8, 8)
    >>> ddim_purification(denoiser, schedule, x, depth=140, stride=10, eta=1.0).shape
    torch.Size([1, 3, 8, 8])
"""

import itertools
from collections.abc import Callable

import torch

from anomalib_robust.models.adv_rad.diffusion import DiffusionSchedule, p_mean_variance, predict_x0, q_sample
from anomalib_robust.models.adv_rad.reconstruction import Denoiser, arbitrary_shot, uniform_step_schedule


def check_level(name: str, level: int, num_timesteps: int) -> int:
    """``level`` if it is an integer step in ``[0, T]`` (0: no purification).

    Raises:
        ValueError: naming the argument otherwise.
    """
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= num_timesteps:
        msg = f"{name} must be an integer diffusion step with 0 <= {name} <= T = {num_timesteps}, got {level!r}."
        raise ValueError(msg)
    return level


def ddim_timesteps(depth: int, stride: int) -> list[int]:
    """The sub-sequence ``tau = (T*, T* - stride, ..., stride, 0)`` of the TMA paper, sec. 4.

    Raises:
        ValueError: when ``stride`` is not a positive integer dividing ``depth``.
    """
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or depth % stride:
        msg = (
            f"stride must be a positive integer that divides the depth T* = {depth} (tau = T*, T* - stride, ..., 0), "
            f"got {stride!r}."
        )
        raise ValueError(msg)
    return list(range(depth, -1, -stride))


def respaced_ddim_timesteps(depth: int, denoising_steps: int) -> list[int]:
    """``denoising_steps`` + 1 steps from ``depth`` down to 0, evenly spaced and rounded: the DDIM sub-sequence of a
    chain respaced to fewer U-Net calls (the surrogate process of Lee & Kim, ICCV 2023).

    Raises:
        ValueError: unless ``1 <= denoising_steps <= depth``.
    """
    if isinstance(denoising_steps, bool) or not isinstance(denoising_steps, int) or not 1 <= denoising_steps <= depth:
        msg = f"denoising_steps must be an integer with 1 <= denoising_steps <= {depth}, got {denoising_steps!r}."
        raise ValueError(msg)
    return torch.linspace(depth, 0, denoising_steps + 1).round().long().tolist()


def ddpm_purification(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    x: torch.Tensor,
    level: int,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    denoising_steps: int | None = None,
) -> torch.Tensor:
    """DiffPure: diffuse ``x`` to step ``level`` (eq. 3), then DDPM ancestral sampling ``level -> 0``.

    ``noise`` is the eps of the diffusion (drawn when ``None``); the reverse steps draw fresh noise (``generator``).
    ``denoising_steps`` < ``level`` respaces the reverse chain to that many U-Net calls, evenly spaced from ``level``
    (the schedule respacing of Nichol & Dhariwal, 2021, as AdvRAD's arbitrary shot): the surrogate process that Lee &
    Kim (ICCV 2023) differentiate in place of the full chain.
    """
    check_level("level", level, schedule.num_timesteps)
    if level == 0:
        return x
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    steps = list(range(level, 0, -1)) if denoising_steps is None else uniform_step_schedule(level, denoising_steps)
    return arbitrary_shot(denoiser, schedule, x, steps, noise, generator, clip_denoised)


def ddim_purification(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    x: torch.Tensor,
    depth: int,
    stride: int,
    eta: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    denoising_steps: int | None = None,
) -> torch.Tensor:
    """TMA (TMA paper, Alg. 2): diffuse ``x`` to ``depth`` = T*, then stochastic DDIM along ``(T*, ..., stride, 0)``.

    ``eta`` scales the per-step noise sigma_t (0: deterministic DDIM; 1: the DDPM posterior variance on the
    sub-sequence); ``noise`` is the eps of the diffusion (drawn when ``None``). With ``clip_denoised`` the clamped
    ``x0_hat`` also gives the eps of the step, ``(x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)``, as
    ``improved-diffusion``'s DDIM sampler. ``denoising_steps`` replaces the sub-sequence by
    :func:`respaced_ddim_timesteps` (the surrogate process of Lee & Kim, ICCV 2023).
    """
    check_level("depth", depth, schedule.num_timesteps)
    if eta < 0:
        msg = f"eta must be >= 0 (it scales the DDIM noise sigma_t), got {eta!r}."
        raise ValueError(msg)
    if depth == 0:
        return x
    if denoising_steps is None:
        steps = ddim_timesteps(depth, stride)
    else:
        steps = respaced_ddim_timesteps(depth, denoising_steps)
    alpha_bar = torch.cat([schedule.alphas_cumprod.new_ones(1), schedule.alphas_cumprod])  # alpha_bar[step]

    def timesteps(step: int) -> torch.Tensor:
        return torch.full((x.shape[0],), step - 1, device=x.device, dtype=torch.long)

    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    xt = q_sample(schedule, x, timesteps(depth), noise)
    for step, following in itertools.pairwise(steps):
        eps = denoiser(xt, timesteps(step)).chunk(2, dim=1)[0]
        x0 = predict_x0(schedule, xt, timesteps(step), eps)
        now, then = alpha_bar[step], alpha_bar[following]
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (xt - now.sqrt() * x0) / (1 - now).sqrt()
        sigma = eta * ((1 - then) / (1 - now) * (1 - now / then)).sqrt()
        xt = then.sqrt() * x0 + (1 - then - sigma**2).clamp_min(0).sqrt() * eps
        if following > 0 and eta > 0:
            xt = xt + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return xt


Guidance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x_t, t) -> g``: the gradient with respect to ``x_t`` of the log-guidance (AGDM paper, eq. 2-5)."""


GuidanceShift = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(g, log_variance) -> s_t Sigma g``: the shift of a guided reverse mean (AGDM paper, Alg. 1) from the guidance
gradient ``g`` and the log of the step's learned variance ``Sigma``."""


def step_noise_norm(log_variance: torch.Tensor) -> torch.Tensor:
    """Per image, ``||sqrt(Sigma)||``: the norm of the step's noise ``sqrt(Sigma) z`` up to the draw of ``z``
    (``E||z||^2`` is the pixel count)."""
    return (0.5 * log_variance).exp().flatten(1).norm(dim=1)


def guidance_to_noise(shift: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """Per image, ``||shift|| / ||sqrt(Sigma)||``: how far a guidance shift moves a reverse step, in units of the
    step's noise (:func:`step_noise_norm`)."""
    return shift.flatten(1).norm(dim=1) / step_noise_norm(log_variance)


def fixed_scale_shift(gradient: torch.Tensor, log_variance: torch.Tensor, scale: float) -> torch.Tensor:
    """The AGDM paper's shift ``s Sigma g`` with a fixed scale ``s`` (Alg. 1; ``s = 1`` in sec. 5.1, a temperature
    on ``p(x' | x_t)^s p(y | x_t)^s``, sec. 3.3).

    How far it moves a step depends on the scale of the guidance network's gradient, which nothing ties to the
    diffusion model's noise: measure it with :func:`guidance_to_noise`.
    """
    return scale * log_variance.exp() * gradient


def guidance_shift(gradient: torch.Tensor, log_variance: torch.Tensor, ratio: float) -> torch.Tensor:
    """The shift ``s_t Sigma g`` of a guided reverse mean (AGDM paper, Alg. 1), with ``s_t`` chosen per image so that
    ``||s_t Sigma g|| = ratio * ||sqrt(Sigma)||``, the norm of the step's noise (:func:`step_noise_norm`); zero where
    ``g`` is.

    Our adaptation of the paper's fixed ``s`` (:func:`fixed_scale_shift`): a fixed ``s`` can leave the chain
    untouched or drown it, depending on the guidance network's gradient scale. ``ratio`` says how strong the guidance
    is in units of the step's own noise, whatever the network; ``s_t = ratio * ||sqrt(Sigma)|| / ||Sigma g||``.
    """
    shift = log_variance.exp() * gradient
    norm = shift.flatten(1).norm(dim=1).clamp_min(torch.finfo(shift.dtype).tiny)
    scale = ratio * step_noise_norm(log_variance) / norm
    return scale.view(-1, *([1] * (shift.ndim - 1))) * shift


def guided_ddpm_purification(
    denoiser: Denoiser,
    schedule: DiffusionSchedule,
    x: torch.Tensor,
    level: int,
    guidance: Guidance,
    shift: GuidanceShift | None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    denoising_steps: int | None = None,
) -> torch.Tensor:
    """AGDM (AGDM paper, Alg. 1): diffuse ``x`` to step ``level`` (eq. 7), then reverse with guided means.

    Each step ``t = level, ..., 1`` samples ``x_{t-1} ~ N(mu + shift(guidance(x_t, t), log Sigma), Sigma)``, where
    ``mu, Sigma`` are the U-Net's reverse-step mean and learned variance and ``shift`` gives ``s_t Sigma g``
    (:func:`fixed_scale_shift`, :func:`guidance_shift`); the step to 0 returns the guided mean. ``shift=None``: no
    guidance (no guidance call). The guidance sees ``t`` as the U-Net does (``step - 1``). ``denoising_steps`` <
    ``level`` respaces the chain to that many guided steps, as :func:`ddpm_purification` does (the surrogate process
    of Lee & Kim, ICCV 2023).
    """
    check_level("level", level, schedule.num_timesteps)
    if level == 0:
        return x
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if denoising_steps is None:
        steps, chain_schedule = list(range(level, 0, -1)), schedule
    else:
        steps = uniform_step_schedule(level, denoising_steps)
        chain_schedule = schedule.respaced([step - 1 for step in reversed(steps)])

    def timesteps(value: int) -> torch.Tensor:
        return torch.full((x.shape[0],), value, device=x.device, dtype=torch.long)

    def guided_step(xt: torch.Tensor, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = timesteps(step - 1)
        prediction = p_mean_variance(chain_schedule, denoiser(xt, t), xt, timesteps(index), clip_denoised)
        if shift is None:
            return prediction.mean, prediction.log_variance
        return prediction.mean + shift(guidance(xt, t), prediction.log_variance), prediction.log_variance

    xt = q_sample(schedule, x, timesteps(level - 1), noise)
    for index, step in zip(range(len(steps) - 1, 0, -1), steps[:-1], strict=True):
        mean, log_variance = guided_step(xt, step, index)
        z = torch.randn(xt.shape, generator=generator, device=xt.device, dtype=xt.dtype)
        xt = mean + torch.exp(0.5 * log_variance) * z
    return guided_step(xt, steps[-1], 0)[0]
