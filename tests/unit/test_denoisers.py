"""The engine's denoisers and σ schedules: one flow denoiser (FLUX, SD3, the embedded model), the
ε schedule against diffusers' schedulers, and the embedded model's pinned samples."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ecodiff_core._compat import ensure_torchvision_importable
from ecodiff_core.denoisers import EpsSchedule, flow_denoiser, flow_sigmas
from ecodiff_core.errors import SettingsError
from ecodiff_core.trajectory import euler_step

ensure_torchvision_importable()
from diffusers import EulerDiscreteScheduler  # noqa: E402


class LinearVelocity(nn.Module):
    """v = W·x + timestep + the conditioning's mean, batch by batch: a transformer stand-in whose
    output is easy to compute by hand.  Records the timesteps it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
        self.timesteps: list[torch.Tensor] = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=False, **ids):
        self.timesteps.append(timestep)
        ctx = encoder_hidden_states.mean((1, 2)) + pooled_projections.mean(1)
        return (hidden_states @ self.weight.T + timestep[:, None, None] + ctx[:, None, None],)


def reference_x0(net: LinearVelocity, x, sigma, cond, uncond, cfg, scale):
    """x0 = x − σ·v with v guided per branch, each branch computed on its own."""
    def v(c):
        return net(x, (sigma * scale).expand(x.shape[0]), c["encoder_hidden_states"], c["pooled_projections"])[0]

    if uncond is None:
        return x - sigma * v(cond)
    vc, vu = v(cond), v(uncond)
    return x - sigma * (vu + cfg * (vc - vu))


def conditioning(seed: int, batch: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(batch, 5, 8, generator=g),
            "pooled_projections": torch.randn(batch, 8, generator=g),
            "img_ids": torch.zeros(7, 3), "txt_ids": torch.zeros(5, 3)}


@pytest.mark.parametrize("cfg, scale", [(1.0, 1.0), (2.5, 1.0), (4.5, 1000.0), (0.0, 1.0)])
def test_flow_denoiser_is_x_minus_sigma_times_the_guided_velocity(cfg, scale):
    net = LinearVelocity()
    cond, uncond = conditioning(1), (conditioning(2) if cfg != 1.0 else None)
    x, sigma = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(3)), torch.tensor(0.4)
    got = flow_denoiser(net, cond, uncond, cfg, timestep_scale=scale)(x, sigma)
    expected = reference_x0(net, x, sigma, cond, uncond, cfg, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert net.timesteps[0].shape == ((3,) if uncond is None else (6,))
    assert torch.allclose(net.timesteps[0], torch.full_like(net.timesteps[0], 0.4 * scale))
    # guiding the velocity and guiding the two x0 predictions give the same x0
    if uncond is not None:
        x0c, x0u = (reference_x0(net, x, sigma, c, None, 1.0, scale) for c in (cond, uncond))
        torch.testing.assert_close(got, x0u + cfg * (x0c - x0u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_flow_sigmas_are_the_shifted_linear_schedule(steps, shift):
    t = torch.linspace(1.0, 0.0, steps + 1)
    expected = shift * t / (1.0 + (shift - 1.0) * t)
    got = flow_sigmas(steps, shift)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


@pytest.mark.parametrize("steps, shift", [(0, 1.0), (3, 0.0), (3, float("nan"))])
def test_flow_sigmas_refuse_bad_settings(steps, shift):
    with pytest.raises(SettingsError, match="steps|shift"):
        flow_sigmas(steps, shift)


def diffusers_euler(karras: bool = False) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  use_karras_sigmas=karras)


def test_eps_schedule_is_diffusers_scaled_linear_in_float64():
    """The same schedule as diffusers' (which builds it in float32: 1.3e-5 relative apart)."""
    ours = EpsSchedule.scaled_linear().sigmas
    acp = diffusers_euler().alphas_cumprod.double()
    theirs = ((1 - acp) / acp).sqrt()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    assert ((ours - theirs).abs() / ours).max() < 2e-5
    # float64 throughout: the first σ is exact
    beta0 = 0.00085
    assert ours[0].item() == pytest.approx((beta0 / (1 - beta0)) ** 0.5, rel=1e-12)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers on numpy 2
@pytest.mark.parametrize("steps", [2, 5, 20])
def test_karras_sigmas_and_timesteps_match_diffusers(steps):
    schedule = EpsSchedule.scaled_linear()
    scheduler = diffusers_euler(karras=True)
    scheduler.set_timesteps(steps)
    ours = schedule.karras(steps)
    assert ours[-1] == 0 and len(ours) == steps + 1
    assert ((ours[:-1] - scheduler.sigmas[:-1].double()).abs() / ours[:-1]).max() < 2e-5
    timesteps = torch.stack([schedule.timestep(s) for s in ours[:-1]])
    np.testing.assert_allclose(timesteps.numpy(), scheduler.timesteps.double().numpy(), atol=2e-3)


@pytest.fixture(scope="module")
def model():
    from ecodiff_core.embedded import load_default_model

    return load_default_model()


# samples of the shipped weights, computed before the embedded model used the engine's denoiser
PINNED = [
    (dict(prompts=["the digit 3", "a handwritten seven"], steps=4, cfg=1.5, seed=0),
     (-51.59527587890625, 102.47528076171875), [-0.9886109232902527, -0.9061526656150818, -0.9736071825027466]),
    (dict(prompts=["the number 5"], steps=3, cfg=1.0, seed=7, shift=3.0),
     (-27.326555252075195, 45.741676330566406), [-0.9733216762542725, -0.9326333999633789, -0.9894692897796631]),
]


@pytest.mark.parametrize("kwargs, sums, first_row", PINNED)
def test_embedded_model_samples_are_pinned(model, kwargs, sums, first_row):
    x = model.sample_latents(**kwargs)
    assert (x.sum().item(), x.abs().sum().item()) == pytest.approx(sums, abs=1e-4)
    assert x[0, 0, :3].tolist() == pytest.approx(first_row, abs=1e-5)


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_embedded_sampling_is_the_engines_euler_on_its_velocity(model, cfg):
    """sample_latents = Euler steps of x − σ·(guided velocity), the velocity from ``model.velocity``."""
    from ecodiff_core.embedded import initial_noise, sigmas

    prompts = ["the digit 1", "a handwritten four"]
    with torch.no_grad():
        cond, uncond = model.encode(prompts), model.encode([""] * 2)
        x, s = initial_noise(2, 5), sigmas(3)
        for i in range(3):
            v = model.velocity(x, s[i], *cond)
            if cfg != 1.0:
                vu = model.velocity(x, s[i], *uncond)
                v = vu + cfg * (v - vu)
            x = euler_step(x, x - s[i] * v, s[i], s[i + 1])
    torch.testing.assert_close(model.sample_latents(prompts, steps=3, cfg=cfg, seed=5), x, rtol=1e-5, atol=1e-5)
