"""Gaussian diffusion for AdvRAD: noise schedules, the forward process and the hybrid training objective.

Everything here follows the DDPM formulation of Ho et al. (2020) with the learned-range variance and hybrid loss of
Nichol & Dhariwal (2021), as used by the AdvRAD paper (Chen et al., sec. 4.1 and appendix A). Functions are pure: they
take the schedule, the model output, the timestep and the sample, and hold no state of their own.

Example:
    >>> import torch
    >>> schedule = DiffusionSchedule.from_name("linear", num_timesteps=1000)
    >>> x0 = torch.zeros(2, 3, 8, 8)
    >>> t = torch.tensor([0, 999])
    >>> q_sample(schedule, x0, t, torch.randn_like(x0)).shape
    torch.Size([2, 3, 8, 8])
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

BETA_SCHEDULES = ("linear", "cosine")


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """Linear schedule of Ho et al. (2020), beta from 1e-4 to 0.02 at T = 1000, rescaled for other T."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal (2021, eq. 17): alpha-bar_t = cos^2(pi/2 (t/T + s) / (1 + s))."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


class DiffusionSchedule(nn.Module):
    """Per-timestep constants of a variance schedule beta_1..beta_T, as (non-persistent) buffers.

    Index ``t`` in ``[0, T)`` addresses the paper's step ``t + 1``; ``alphas_cumprod[t]`` is alpha-bar of eq. (3).
    A schedule can be respaced to a subsequence of its steps (Nichol & Dhariwal 2021, sec. 4), which is what the
    arbitrary-shot reconstruction (Alg. 3) samples with.

    Args:
        betas (torch.Tensor): Variances beta_t of the forward process, shape ``(T,)``.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance: torch.Tensor
    posterior_mean_coef_x0: torch.Tensor
    posterior_mean_coef_xt: torch.Tensor

    def __init__(self, betas: torch.Tensor) -> None:
        super().__init__()
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            msg = f"betas must be a 1-D tensor with values in (0, 1), got shape {tuple(betas.shape)}"
            raise ValueError(msg)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        # beta-tilde_1 is 0; as Nichol & Dhariwal, its log uses beta-tilde_2 so that eq. (11) stays finite. A one-step
        # schedule (a chain respaced to one step) has no beta-tilde_2: its log uses beta_1, the "fixed large" variance.
        first = posterior_variance[1:2] if betas.shape[0] > 1 else betas
        posterior_log_variance = torch.log(torch.cat([first, posterior_variance[1:]]))
        constants = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "posterior_variance": posterior_variance,
            "posterior_log_variance": posterior_log_variance,
            "posterior_mean_coef_x0": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef_xt": (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        }
        for name, value in constants.items():
            self.register_buffer(name, value.float(), persistent=False)

    @classmethod
    def from_name(cls, name: str, num_timesteps: int) -> "DiffusionSchedule":
        """Build the ``"linear"`` (default of the paper, appendix C.1) or ``"cosine"`` schedule with T steps."""
        if name not in BETA_SCHEDULES:
            msg = f"beta_schedule must be one of {BETA_SCHEDULES}, got {name!r}"
            raise ValueError(msg)
        if num_timesteps < 1:
            msg = f"num_timesteps must be >= 1, got {num_timesteps}"
            raise ValueError(msg)
        return cls(linear_betas(num_timesteps) if name == "linear" else cosine_betas(num_timesteps))

    @property
    def num_timesteps(self) -> int:
        """Number of diffusion steps T."""
        return self.betas.shape[0]

    def respaced(self, timesteps: list[int]) -> "DiffusionSchedule":
        """Schedule over the increasing subsequence ``timesteps`` (0-based) of this one.

        The respaced betas are ``1 - alpha-bar_{S_i} / alpha-bar_{S_{i-1}}`` so that the respaced chain has the same
        marginals ``q(x_{S_i} | x_0)`` as the original one (Nichol & Dhariwal 2021, sec. 4). For consecutive steps it
        is the original schedule.
        """
        alphas_cumprod = self.alphas_cumprod.double()[timesteps]
        previous = torch.cat([torch.ones(1, dtype=torch.float64, device=alphas_cumprod.device), alphas_cumprod[:-1]])
        return DiffusionSchedule(1 - alphas_cumprod / previous).to(self.betas.device)


def _gather(constants: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``constants[t]`` shaped to broadcast over a batch of ``ndim``-dimensional samples."""
    return constants[t].reshape(-1, *([1] * (ndim - 1)))


def q_sample(schedule: DiffusionSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Diffuse ``x0`` to step ``t`` in one go, eq. (3): x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps."""
    alpha_bar = _gather(schedule.alphas_cumprod, t, x0.ndim)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def standard_normal_like(x: torch.Tensor) -> torch.Tensor:
    """Fresh N(0, I) noise shaped like ``x`` (the eps of Alg. 1), drawn correctly inside an exported graph too.

    Eager PyTorch draws it with ``randn_like``. While exporting (``torch.compiler.is_exporting()``) it is Box-Muller
    over one uniform draw of shape ``(2, *x.shape)`` (ONNX ``RandomUniformLike``), because OpenVINO converts an
    unseeded ONNX ``RandomNormalLike`` into Box-Muller over two ``RandomUniform`` ops that draw the same numbers: its
    noise was sqrt(-2 ln u) cos(2 pi u), skewed (1st / 99th percentiles -1.2 / 3.0 instead of -2.33 / 2.33, OpenVINO
    2026.4), which raised the exported AdvRAD's scores by about 1.5x. The two halves of one draw are independent.
    """
    if not torch.compiler.is_exporting():
        return torch.randn_like(x)
    uniform = torch.rand_like(x.expand(2, *x.shape))  # a new leading axis: the batch stays dynamic
    return torch.sqrt(-2 * torch.log1p(-uniform[0])) * torch.cos(2 * math.pi * uniform[1])


def predict_x0(schedule: DiffusionSchedule, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Estimate x_0 from x_t and predicted noise (Alg. 1 line 5): (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t)."""
    alpha_bar = _gather(schedule.alphas_cumprod, t, xt.ndim)
    return (xt - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def q_posterior(
    schedule: DiffusionSchedule,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 6-7; Alg. 2 line 10 without noise)."""
    mean = (
        _gather(schedule.posterior_mean_coef_x0, t, xt.ndim) * x0
        + _gather(
            schedule.posterior_mean_coef_xt,
            t,
            xt.ndim,
        )
        * xt
    )
    return mean, _gather(schedule.posterior_log_variance, t, xt.ndim)


@dataclass
class ModelPrediction:
    """The U-Net output split into noise and variance terms, with the reverse-step distribution it implies."""

    eps: torch.Tensor
    x0: torch.Tensor
    mean: torch.Tensor
    log_variance: torch.Tensor


def learned_log_variance(schedule: DiffusionSchedule, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. (11): log Sigma = v log beta_t + (1 - v) log beta-tilde_t, with the network's raw output mapped to [0, 1]."""
    fraction = (v + 1) / 2
    log_beta = _gather(schedule.betas.log(), t, v.ndim)
    return fraction * log_beta + (1 - fraction) * _gather(schedule.posterior_log_variance, t, v.ndim)


def p_mean_variance(
    schedule: DiffusionSchedule,
    model_output: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    clip_denoised: bool = False,
) -> ModelPrediction:
    """Reverse-step distribution p(x_{t-1} | x_t) from the U-Net output ``[eps, v]`` (channels concatenated).

    With ``clip_denoised`` the predicted x_0 is clamped to the data range [-1, 1] before the posterior mean, as the
    samplers of Nichol & Dhariwal (2021, ``improved-diffusion``: ``clip_denoised=True``) do; their training loss, as
    :func:`hybrid_loss` here, does not clamp.
    """
    eps, v = model_output.chunk(2, dim=1)
    x0 = predict_x0(schedule, xt, t, eps)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    mean, _ = q_posterior(schedule, x0, xt, t)
    return ModelPrediction(eps=eps, x0=x0, mean=mean, log_variance=learned_log_variance(schedule, v, t))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL divergence between two diagonal Gaussians, elementwise, in nats."""
    return 0.5 * (-1 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of 8-bit data ``x`` in [-1, 1] under a Gaussian discretised to 256 bins (L_0, eq. 6)."""
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _standard_normal_cdf(inv_std * (centred + 1 / 255))
    cdf_minus = _standard_normal_cdf(inv_std * (centred - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_minus = (1 - cdf_minus).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


def vb_term(
    schedule: DiffusionSchedule,
    prediction: ModelPrediction,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """Per-sample term L_t of the variational bound, eq. (6)-(7), in bits per dimension.

    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL -log p(x_0 | x_1) at t = 0.
    """
    true_mean, true_log_variance = q_posterior(schedule, x0, xt, t)
    kl = normal_kl(true_mean, true_log_variance, prediction.mean, prediction.log_variance).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0, prediction.mean, 0.5 * prediction.log_variance).flatten(1).mean(1)
    return torch.where(t == 0, nll, kl) / math.log(2.0)


def hybrid_loss(
    schedule: DiffusionSchedule,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    vb_weight: float = 1e-3,
) -> dict[str, torch.Tensor]:
    """Hybrid objective L_simple + lambda L_vb of eq. (10), with a stop-gradient on the mean for L_vb (appendix A).

    With t drawn uniformly, T * L_t is an unbiased estimate of L_vb (eq. 5) up to L_T, which has no parameters; so the
    per-batch loss is ``mse + lambda * T * L_t``. At the paper's lambda = 1e-3 and T = 1000 this is ``mse + L_t``.

    Returns:
        dict[str, torch.Tensor]: ``loss`` (scalar to minimise), ``simple`` and ``vb`` (batch means, for logging).
    """
    eps, v = model_output.chunk(2, dim=1)
    simple = ((noise - eps) ** 2).flatten(1).mean(1)
    frozen_mean = p_mean_variance(schedule, torch.cat([eps.detach(), v], dim=1), xt, t)
    vb = vb_term(schedule, frozen_mean, x0, xt, t)
    loss = simple + vb_weight * schedule.num_timesteps * vb
    return {"loss": loss.mean(), "simple": simple.mean(), "vb": vb.mean()}
