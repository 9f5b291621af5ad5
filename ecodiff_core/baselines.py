"""Importance scores of the usual pruning baselines, on the same unit groups and budgets as EcoDiff.

Each returns one score per unit (higher = keep), a drop-in for learned logits in ``plan_pruning``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .gate_hooks import GateController
from .learn import frozen_weights
from .trajectory import Denoiser, sample, teacher_steps
from .units import Layout, get_linear


def random_scores(layout: Layout, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {gr.name: torch.rand(gr.count, generator=g) for gr in layout.groups}


@torch.no_grad()
def magnitude_scores(model: nn.Module, layout: Layout) -> dict[str, torch.Tensor]:
    """L2 norm of every weight removed with the unit (its producer rows and consumer columns),
    divided by the square root of their number so that units of different shapes are comparable."""
    scores = {}
    for group in layout.groups:
        total = torch.zeros(group.count, dtype=torch.float64)
        numel = 0
        for s in group.slices:
            weight = get_linear(model, s.module).weight.detach().double()
            if s.side == "in":
                weight = weight.t()
            rows = weight[s.offset:s.offset + group.count * group.width]
            total += rows.reshape(group.count, -1).pow(2).sum(1)
            numel += rows[0:group.width].numel()
        scores[group.name] = (total / max(numel, 1)).sqrt().float()
    return scores


def taylor_scores(model: nn.Module, layout: Layout, denoisers: Sequence[Denoiser], noises: Sequence[torch.Tensor],
                  sigmas: torch.Tensor) -> dict[str, torch.Tensor]:
    """First-order (Taylor) importance, data-free: (∂L/∂m)² at m = 1, summed over prompts and steps.

    L is the model's own denoising loss on its own samples: at every state x_σ of the ungated
    trajectory, the x0 prediction is compared with the trajectory's final sample.  Those states are
    noised the model's own way, whatever its parameterisation (ε, v or flow).
    """
    gates = {g.name: torch.ones(g.count, requires_grad=True) for g in layout.groups}
    scores = {name: torch.zeros_like(t) for name, t in gates.items()}
    controller = GateController(model, layout)
    with controller.installed(), frozen_weights(model):
        for denoise, noise in zip(denoisers, noises, strict=True):
            controller.set(None)
            inputs, x0s = teacher_steps(denoise, noise, sigmas)
            final = sample(denoise, inputs[-1], sigmas[-2:])
            controller.set(gates)
            for x, sigma in zip(inputs, sigmas[:-1], strict=True):
                with torch.enable_grad():
                    loss = torch.nn.functional.mse_loss(denoise(x, sigma), final)
                    grads = torch.autograd.grad(loss, list(gates.values()))
                for name, grad in zip(gates, grads, strict=True):
                    scores[name] += grad.pow(2)
    return scores
