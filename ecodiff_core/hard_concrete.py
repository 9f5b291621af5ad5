"""Hard-concrete gates (Louizos et al. 2018) and the sparsity regularisers."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import SettingsError
from .validation import check_number, known_fields

REGULARIZERS: tuple[str, ...] = ("l1", "sigmoid", "l0")


@dataclass(frozen=True)
class GateSettings:
    """temperature β, stretch interval (γ, ζ), initial logit λ₀ and the noise offset δ.

    δ (the official ``masking_eps``) narrows the logistic noise to ±log((1+δ)/δ); 0 gives the
    textbook hard-concrete distribution.
    """

    temperature: float = 0.83
    gamma: float = -0.1
    zeta: float = 1.1
    init_logit: float = 3.0
    noise_offset: float = 0.5

    def __post_init__(self) -> None:
        check_number("gate temperature", self.temperature, strict=True)
        for name in ("gamma", "zeta", "init_logit"):
            check_number(f"gate {name}", getattr(self, name), low=None)
        if not self.gamma < 0 < 1 < self.zeta:
            raise SettingsError(f"gate stretch needs gamma < 0 and zeta > 1, got ({self.gamma}, {self.zeta})")
        check_number("gate noise_offset", self.noise_offset)

    @classmethod
    def from_dict(cls, data: dict) -> GateSettings:
        """Forward-compatible, like ``LearnSettings.from_dict``: unknown keys ignored, missing ones default."""
        return cls(**known_fields(cls, data))


def _stretch(s: torch.Tensor, settings: GateSettings) -> torch.Tensor:
    return torch.clamp(s * (settings.zeta - settings.gamma) + settings.gamma, 0.0, 1.0)


def sample_gate(logits: torch.Tensor, uniform: torch.Tensor, settings: GateSettings) -> torch.Tensor:
    """A hard-concrete sample for the given uniform noise, so a step can be replayed exactly."""
    d = settings.noise_offset
    noise = torch.log(uniform + d) - torch.log(1 - uniform + d) if d > 0 else torch.logit(uniform)
    return _stretch(torch.sigmoid((noise + logits) / settings.temperature), settings)


def expected_gate(logits: torch.Tensor, settings: GateSettings) -> torch.Tensor:
    """The noise-free gate (u = 1/2): what a unit contributes at its median."""
    return _stretch(torch.sigmoid(logits / settings.temperature), settings)


def open_probability(logits: torch.Tensor, settings: GateSettings) -> torch.Tensor:
    """P(gate ≠ 0) per unit, exactly, for the noise ``sample_gate`` draws (same shape as ``logits``).

    The gate is non-zero iff its noise n exceeds c = β·log(−γ/ζ) − λ.  For the textbook noise (δ = 0)
    this is Louizos' sigmoid(λ − β·log(−γ/ζ)); with δ > 0, n = log(u+δ) − log(1−u+δ) is bounded and
    P = clamp((1 + 2δ)·sigmoid(λ − β·log(−γ/ζ)) − δ, 0, 1): 1 (no gradient) for
    λ ≥ β·log(−γ/ζ) + log((1+δ)/δ), 0 below β·log(−γ/ζ) − log((1+δ)/δ).
    """
    p = torch.sigmoid(logits - settings.temperature * math.log(-settings.gamma / settings.zeta))
    d = settings.noise_offset
    return p if d == 0 else torch.clamp((1 + 2 * d) * p - d, 0.0, 1.0)


def always_open_logit(settings: GateSettings) -> float:
    """The logit above which a gate is never zero (inf for the textbook noise, δ = 0)."""
    d = settings.noise_offset
    return math.inf if d == 0 else settings.temperature * math.log(-settings.gamma / settings.zeta) + \
        math.log((1 + d) / d)


def uniform_noise(count: int, generator: torch.Generator) -> torch.Tensor:
    """u ~ U(ε, 1−ε) on the CPU so it is reproducible across devices."""
    eps = 1e-6
    return torch.rand(count, generator=generator, dtype=torch.float64).clamp_(eps, 1 - eps).float()


def regularizer(logits: list[torch.Tensor], kind: str, settings: GateSettings) -> torch.Tensor:
    """Mean over groups of one unit kind of the per-group penalty.

    l1       mean |λ|                       (official SDXL; pulls λ toward 0)
    sigmoid  mean sigmoid(0.4 λ + 1)        (official FLUX; pulls λ toward −∞)
    l0       mean P(gate ≠ 0) = sigmoid(λ − β log(−γ/ζ))   (Louizos' expected L0, as a fraction)
    """
    if kind == "l1":
        per_group = [lam.abs().mean() for lam in logits]
    elif kind == "sigmoid":
        per_group = [torch.sigmoid(0.4 * lam + 1.0).mean() for lam in logits]
    elif kind == "l0":
        shift = settings.temperature * math.log(-settings.gamma / settings.zeta)
        per_group = [torch.sigmoid(lam - shift).mean() for lam in logits]
    else:
        raise SettingsError(f"unknown regularizer '{kind}'; choose one of {', '.join(REGULARIZERS)}")
    return torch.stack(per_group).mean()
