"""Learning for a target: the expected removed cost of the gates held at the target by learned
Lagrange multipliers (Wang et al. 2020, "Structured Pruning of Large Language Models"; CoFi, Xia et
al. 2022).

The expected removed fraction s = Σ_units (1 − P(gate ≠ 0)) · cost / total, with the unit costs of
the unit groups (parameters, or forward FLOPs) and the model's total of the same measure, is held at
the ramped target t by the min over the logits and max over (λ₁, λ₂) of λ₁(s − t) + λ₂(s − t)²;
the multipliers take one gradient-ascent step per optimiser step (λ₂'s much larger, to damp).  t
ramps linearly from 0 to the target over the first ``target_warmup`` fraction of the learning steps.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import MaskFileError
from .flops import FlopCosts, measure_flops
from .hard_concrete import GateSettings, open_probability
from .learn_settings import LearnSettings
from .plan import count_parameters
from .units import Layout, parameter_costs


def expected_removed_fraction(logits: dict[str, torch.Tensor], costs: dict[str, float], total: float,
                              settings: GateSettings, min_keep: dict[str, int] | None = None) -> torch.Tensor:
    """s = Σ_g cost_g · Σ_i (1 − P(z_gi ≠ 0)) / total: the expected fraction of ``total`` (parameters
    or FLOPs) the closed gates remove; ``logits`` per group (shape (count,)), ``costs`` per unit of
    each group in the unit of ``total``.  ``min_keep`` (per group, ``UnitGroup.min_keep``): the
    planner never removes a group's last ``min_keep`` units, so its ``min_keep`` most open gates
    (highest logits) never count as removed.  A scalar tensor with the logits' gradient."""
    parts = []
    for name, lam in logits.items():
        keep = (min_keep or {}).get(name, 0)
        removable = torch.sort(lam, descending=True).values[keep:] if keep else lam
        parts.append((1 - open_probability(removable, settings)).sum() * (float(costs[name]) / total))
    return torch.stack(parts).sum()


def ramped_target(target: float, warmup: float, step: int, total_steps: int) -> float:
    """The target of optimiser step ``step`` (0-based) of ``total_steps``: linear from 0 to ``target``
    over the first ``warmup`` fraction of the steps, then ``target`` (at once when ``warmup`` is 0)."""
    ramp = warmup * total_steps
    return target if ramp <= 0 else target * min(1.0, (step + 1) / ramp)


class TargetConstraint:
    """λ₁(s − t) + λ₂(s − t)² for one learning run; ``multipliers`` (λ₁, λ₂) are its resumable state."""

    def __init__(self, costs: dict[str, float], total: float, settings: LearnSettings,
                 multipliers: tuple[float, float] = (0.0, 0.0), min_keep: dict[str, int] | None = None) -> None:
        self.costs, self.total, self.settings = costs, float(total), settings
        self.min_keep = {name: k for name, k in (min_keep or {}).items() if k > 0}
        self.multipliers = (float(multipliers[0]), float(multipliers[1]))

    @classmethod
    def for_model(cls, model: nn.Module, layout: Layout, settings: LearnSettings, progress: dict[str, Any],
                  run: Callable[[], Any] | None = None, flop_costs: FlopCosts | None = None) -> TargetConstraint:
        """Costs from ``model``: parameters (``units.parameter_costs`` over all its parameters) or,
        for ``target_mode="flops"``, ``flop_costs`` or else FLOPs measured over one call of ``run``;
        multipliers from ``progress`` (0 for a fresh run)."""
        if settings.target_mode == "params":
            costs, total = parameter_costs(model, layout), count_parameters(model)
        else:
            if flop_costs is None:
                flop_costs = measure_flops(model, layout, run)
            costs, total = flop_costs.per_unit, flop_costs.total
        multipliers = progress.get("multipliers", [0.0, 0.0])
        if not (isinstance(multipliers, list) and len(multipliers) == 2 and all(
                isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m) for m in multipliers)):
            raise MaskFileError(f"the saved run's Lagrange multipliers are damaged ({multipliers!r}; expected two "
                                "finite numbers); learn the mask again without resuming")
        return cls(costs, total, settings, (multipliers[0], multipliers[1]),
                   {g.name: g.min_keep for g in layout.groups})

    def term(self, logits: dict[str, torch.Tensor], step: int, total_steps: int) -> tuple[torch.Tensor, float, float]:
        """(λ₁(s − t) + λ₂(s − t)² with the logits' gradient, s, t) at optimiser step ``step``."""
        s = expected_removed_fraction(logits, self.costs, self.total, self.settings.gate, self.min_keep)
        t = ramped_target(self.settings.target, self.settings.target_warmup, step, total_steps)
        gap = s - t
        return self.multipliers[0] * gap + self.multipliers[1] * gap * gap, s.item(), t

    def ascend(self, s: float, t: float) -> tuple[float, float]:
        """One gradient-ascent step of the multipliers on λ₁(s − t) + λ₂(s − t)² (steps
        ``multiplier_lr`` for λ₁, ``penalty_lr`` for λ₂); returns them."""
        gap = s - t
        self.multipliers = (self.multipliers[0] + self.settings.multiplier_lr * gap,
                            self.multipliers[1] + self.settings.penalty_lr * gap * gap)
        return self.multipliers
