"""x0-predicting denoisers in σ-space for diffusers models (UNet ε-prediction, FLUX / SD3 / the
embedded model's rectified flow), and their σ schedules.

Each returns ``denoise(x, sigma) -> x0`` with classifier-free guidance inside, which is what the
trajectory code and the learner need; ``x`` may hold several prompts (B, …) with conditioning of
batch B.  The ``*_batch`` builders make batchable calibration samples
(``CalibrationSample.batchable``): conditioning ``{"cond": kwargs, "uncond": kwargs or None}``.  The
ComfyUI host builds the same thing from ComfyUI's own model sampling; these serve the command line,
the embedded model, the benchmarks and the tests.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._compat import ensure_torchvision_importable
from .errors import SettingsError
from .trajectory import Denoiser


def guided(cond: torch.Tensor, uncond: torch.Tensor | None, cfg: float) -> torch.Tensor:
    return cond if uncond is None else uncond + cfg * (cond - uncond)


@dataclass(frozen=True)
class EpsSchedule:
    """A discrete DDPM ε schedule seen in σ-space, σ_t = sqrt((1 − ᾱ_t) / ᾱ_t); ``sigmas`` (1000,)
    float64, ascending in t.

    Computed here in float64, as ComfyUI's ``ModelSamplingDiscrete`` and k-diffusion do, rather than
    with diffusers' ``EulerDiscreteScheduler``: that one builds the betas in float32, so its σ table
    for SD's scaled-linear schedule (0.00085, 0.012) is off by up to 1.3e-5 relative (the 1000-term
    cumulative product in float32), its Karras schedule for 1 step is [σ_min, 0] instead of
    [σ_max, 0], and σ → t (log-σ interpolation) is only a private numpy method there
    (``_sigma_to_t``; its timesteps differ from these by up to 1.3e-3).  These values are the ones the
    ComfyUI bridge samples with; ``tests/unit/test_learning.py`` checks them against diffusers'
    within those bounds.
    """

    sigmas: torch.Tensor

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000) -> EpsSchedule:
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        return cls(((1 - alphas_cumprod) / alphas_cumprod).sqrt())

    def timestep(self, sigma: torch.Tensor, log_sigmas: torch.Tensor | None = None) -> torch.Tensor:
        """Fractional timestep by interpolating log σ, as k-diffusion's discrete denoisers do
        (``log_sigmas``: ``self.sigmas.log()`` already on σ's device, to spare a copy per call)."""
        log_sigmas = self.sigmas.log().to(sigma.device) if log_sigmas is None else log_sigmas
        log_sigma = sigma.double().log().clamp(log_sigmas[0], log_sigmas[-1])
        high = torch.searchsorted(log_sigmas, log_sigma.reshape(1)).clamp(1, len(log_sigmas) - 1)
        low = high - 1
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        return (low + w).reshape(())

    def karras(self, steps: int, rho: float = 7.0) -> torch.Tensor:
        """Karras et al. σ schedule between this schedule's σ_max and σ_min, ending at 0."""
        if steps < 1:
            raise SettingsError(f"steps must be >= 1, got {steps}")
        lo, hi = self.sigmas[0].item() ** (1 / rho), self.sigmas[-1].item() ** (1 / rho)
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def unet_eps_denoiser(unet: nn.Module, schedule: EpsSchedule, cond: dict[str, Any],
                      uncond: dict[str, Any] | None = None, cfg: float = 1.0) -> Denoiser:
    """``cond``/``uncond`` hold the UNet's conditioning kwargs (encoder_hidden_states, added_cond_kwargs)."""
    kwargs = _batch_kwargs(cond, uncond)
    log_sigmas: dict[torch.device, torch.Tensor] = {}  # per device, copied there once

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        batch = x if uncond is None else torch.cat([x, x])
        c_in = 1.0 / (sigma**2 + 1).sqrt()
        if sigma.device not in log_sigmas:
            log_sigmas[sigma.device] = schedule.sigmas.log().to(sigma.device)
        t = schedule.timestep(sigma, log_sigmas[sigma.device]).to(x.dtype).expand(batch.shape[0])
        eps = unet(batch * c_in, t, return_dict=False, **kwargs)[0]
        x0 = batch - sigma * eps
        return _guide(x0, uncond, cfg)

    return denoise


def flow_denoiser(transformer: nn.Module, cond: dict[str, Any], uncond: dict[str, Any] | None = None,
                  cfg: float = 1.0, timestep_scale: float = 1.0) -> Denoiser:
    """Rectified flow: x_σ = (1 − σ)·x0 + σ·ε and the model predicts v = ε − x0, so x0 = x − σ·v.

    ``transformer`` is called as diffusers' FLUX / SD3 transformers are: ``hidden_states`` (the
    latent x, CFG batch 2B), ``timestep`` σ·``timestep_scale`` of shape (2B,) (1 for FLUX, which
    scales by 1000 itself; 1000 for SD3), and ``cond``: encoder_hidden_states, pooled_projections
    (and FLUX's img_ids, txt_ids, guidance).  ``uncond`` (same keys) is batched after ``cond``; the
    ids are shared.  Guidance acts on the velocity, v = v_u + cfg·(v_c − v_u), then x0 = x − σ·v
    (the same x0 as guiding the two x0 predictions).  ``sigma`` is a scalar tensor.
    """
    kwargs = _batch_kwargs(cond, uncond, shared=("img_ids", "txt_ids"))

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        batch = x if uncond is None else torch.cat([x, x])
        t = (sigma * timestep_scale).to(x.dtype).expand(batch.shape[0])
        v = transformer(hidden_states=batch, timestep=t, return_dict=False, **kwargs)[0]
        return x - sigma * _guide(v, uncond, cfg)

    return denoise


def unet_eps_batch(unet: nn.Module, schedule: EpsSchedule, cfg: float = 1.0) -> Callable[[dict], Denoiser]:
    """A ``batch_denoiser`` for :func:`unet_eps_denoiser`: conditioning ``{"cond": kwargs, "uncond":
    kwargs or None}`` → denoiser.  Use one builder for all samples that may share a batch."""
    def build(conditioning: dict) -> Denoiser:
        return unet_eps_denoiser(unet, schedule, conditioning["cond"], conditioning["uncond"], cfg)

    return build


def flux_flow_batch(transformer: nn.Module, img_ids: torch.Tensor, txt_ids: torch.Tensor,
                    cfg: float = 1.0) -> Callable[[dict], Denoiser]:
    """A ``batch_denoiser`` for :func:`flow_denoiser`: conditioning ``{"cond": kwargs,
    "uncond": kwargs or None}`` without the position ids, which all prompts share (given here)."""
    ids = {"img_ids": img_ids, "txt_ids": txt_ids}

    def build(conditioning: dict) -> Denoiser:
        uncond = conditioning["uncond"]
        return flow_denoiser(transformer, {**conditioning["cond"], **ids},
                                  None if uncond is None else {**uncond, **ids}, cfg)

    return build


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` float32 noise levels from 1 to 0: linear in t, then the FLUX/SD3 time shift
    σ = shift·t / (1 + (shift − 1)·t), applied by diffusers' ``FlowMatchEulerDiscreteScheduler``."""
    if steps < 1:
        raise SettingsError(f"steps must be >= 1, got {steps}")
    if not (math.isfinite(shift) and shift > 0):
        raise SettingsError(f"shift must be a finite number > 0, got {shift}")
    ensure_torchvision_importable()
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, steps + 1)[:-1].numpy())
    return scheduler.sigmas


def _guide(pred: torch.Tensor, uncond: dict | None, cfg: float) -> torch.Tensor:
    """The guided prediction from a CFG batch (cond first, then uncond); ``pred`` itself without uncond."""
    if uncond is None:
        return pred
    cond_pred, uncond_pred = pred.chunk(2)
    return guided(cond_pred, uncond_pred, cfg)


def _batch_kwargs(cond: dict[str, Any], uncond: dict[str, Any] | None, shared: tuple[str, ...] = ()) -> dict[str, Any]:
    """Concatenate cond and uncond kwargs along the batch (nested dicts too); ``shared`` ones stay."""
    if uncond is None:
        return cond
    out = {}
    for key, value in cond.items():
        if key in shared or value is None:
            out[key] = value
        elif isinstance(value, dict):
            out[key] = _batch_kwargs(value, uncond[key])
        else:
            out[key] = torch.cat([value, uncond[key]])
    return out
