"""x0-predicting denoisers in σ-space for diffusers models (UNet ε-prediction, FLUX and SD3 flow).

Each returns ``denoise(x, sigma) -> x0`` with classifier-free guidance inside, which is what the
trajectory code and the learner need.  The ComfyUI bridge builds the same thing from ComfyUI's own
model sampling; these serve the command line, the benchmarks and the tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import SettingsError
from .trajectory import Denoiser


def guided(cond: torch.Tensor, uncond: torch.Tensor | None, cfg: float) -> torch.Tensor:
    return cond if uncond is None else uncond + cfg * (cond - uncond)


@dataclass(frozen=True)
class EpsSchedule:
    """A discrete DDPM ε schedule seen in σ-space, σ_t = sqrt((1 − ᾱ_t) / ᾱ_t)."""

    sigmas: torch.Tensor

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000) -> "EpsSchedule":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        return cls(((1 - alphas_cumprod) / alphas_cumprod).sqrt())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep by interpolating log σ, as k-diffusion's discrete denoisers do."""
        log_sigmas = self.sigmas.log().to(sigma.device)
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

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        batch = x if uncond is None else torch.cat([x, x])
        c_in = 1.0 / (sigma**2 + 1).sqrt()
        t = schedule.timestep(sigma).to(x.dtype).expand(batch.shape[0])
        eps = unet(batch * c_in, t, return_dict=False, **kwargs)[0]
        x0 = batch - sigma * eps
        return _guide(x0, uncond, cfg)

    return denoise


def flux_flow_denoiser(transformer: nn.Module, cond: dict[str, Any], uncond: dict[str, Any] | None = None,
                       cfg: float = 1.0) -> Denoiser:
    """Rectified flow: x_σ = (1 − σ)·x0 + σ·ε and the model predicts v = ε − x0, so x0 = x − σ·v.

    ``cond`` holds encoder_hidden_states, pooled_projections, img_ids, txt_ids (and guidance); x is
    the packed latent (B, tokens, channels).  The FLUX transformer takes the timestep as σ in [0, 1].
    """
    return _flow_denoiser(transformer, cond, uncond, cfg, time_scale=1.0, shared=("img_ids", "txt_ids"))


def sd3_flow_denoiser(transformer: nn.Module, cond: dict[str, Any], uncond: dict[str, Any] | None = None,
                      cfg: float = 1.0) -> Denoiser:
    """SD3 / SD3.5 rectified flow (x0 = x − σ·v); ``cond`` holds encoder_hidden_states and
    pooled_projections, x is the latent (B, C, H, W); the transformer takes the timestep as 1000·σ."""
    return _flow_denoiser(transformer, cond, uncond, cfg, time_scale=1000.0)


def _flow_denoiser(transformer: nn.Module, cond: dict[str, Any], uncond: dict[str, Any] | None, cfg: float,
                   time_scale: float, shared: tuple[str, ...] = ()) -> Denoiser:
    kwargs = _batch_kwargs(cond, uncond, shared=shared)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        batch = x if uncond is None else torch.cat([x, x])
        t = (sigma * time_scale).to(x.dtype).expand(batch.shape[0])
        v = transformer(hidden_states=batch, timestep=t, return_dict=False, **kwargs)[0]
        return _guide(batch - sigma * v, uncond, cfg)

    return denoise


def _guide(x0: torch.Tensor, uncond: dict | None, cfg: float) -> torch.Tensor:
    if uncond is None:
        return x0
    cond_x0, uncond_x0 = x0.chunk(2)
    return guided(cond_x0, uncond_x0, cfg)


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
