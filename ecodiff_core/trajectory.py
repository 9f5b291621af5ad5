"""A deterministic Euler trajectory on an x0-predicting denoiser, and its gradient.

Every model family is seen in σ-space: ``denoise(x, sigma)`` returns the x0 prediction (CFG
included).  The gradient of a loss on the final latent is taken either through the whole graph, or
with time-step checkpointing: a no-grad rollout keeps each step's input latent, then each step is
recomputed with grad, one at a time from the last, with one vector-Jacobian product for the
parameters and the step's input together.  Memory is that of one step, whatever the step count.

A batch of several prompts (``x`` of shape (B, …)) runs the same code; ``weights`` (B,) then give
each row's share of the loss, so one batched call equals the weighted sum of one-by-one calls.  No
value is read back to the host inside the step loops (losses stay on the device).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass

import torch

from .errors import SettingsError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepHook = Callable[[int], None]


def euler_step(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x_{σ'} = x + (σ' − σ)·(x − x0)/σ; with σ' = 0 this is exactly x0."""
    return x + (sigma_next - sigma) * ((x - x0) / sigma)


def check_sigmas(sigmas: torch.Tensor) -> None:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise SettingsError(
            f"sigmas must be a 1-D schedule with at least 2 values (1 step); got shape {tuple(sigmas.shape)}"
        )
    if not bool((sigmas[:-1] > 0).all()):
        raise SettingsError("every sigma except the last must be > 0")


def sample(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, before_step: StepHook | None = None
) -> torch.Tensor:
    """Run the trajectory without grad; ``before_step(i)`` runs before step i (e.g. to set gates)."""
    check_sigmas(sigmas)
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            if before_step is not None:
                before_step(i)
            x = euler_step(x, denoise(x, sigmas[i]), sigmas[i], sigmas[i + 1])
    return x


@dataclass
class TrajectoryGradient:
    """``loss_tensor``: the loss as a 0-dim tensor on the device (``loss`` reads it to the host)."""

    loss_tensor: torch.Tensor
    final: torch.Tensor
    grads: list[torch.Tensor]

    @property
    def loss(self) -> float:
        return self.loss_tensor.item()


def trajectory_loss(final: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE(final, target) over all elements; with ``weights`` (B,), Σ_b weights[b] · MSE of row b
    (a batch of prompts weighted as their one-by-one losses would be).  0-dim tensor."""
    if weights is None:
        return torch.nn.functional.mse_loss(final, target)
    return (_row_weights(weights, final) * (final - target) ** 2).sum()


def _row_weights(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``weights`` (B,) as per-element factors of ``like`` (B, …): weights[b] / elements per row."""
    if weights.shape != like.shape[:1]:
        raise SettingsError(f"loss weights have shape {tuple(weights.shape)}, expected ({like.shape[0]},): one per row")
    return (weights / like[0].numel()).to(like).reshape(-1, *[1] * (like.ndim - 1))


def _accumulate(total: list[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    for acc, g in zip(total, grads, strict=True):
        if g is not None:
            acc.add_(g)


def trajectory_gradient(
    denoise: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    target: torch.Tensor,
    params: Sequence[torch.Tensor],
    before_step: StepHook,
    checkpointing: bool = True,
    grad_context: Callable[[], ContextManager] = contextlib.nullcontext,
    step_context: Callable[[], ContextManager] = contextlib.nullcontext,
    weights: torch.Tensor | None = None,
) -> TrajectoryGradient:
    """Gradient of MSE(final latent, target) w.r.t. ``params`` (``weights``: see :func:`trajectory_loss`).

    ``before_step(i)`` must make step ``i`` a deterministic function of ``params`` (e.g. install gates
    sampled from replayed noise): the checkpointed path calls it twice per step and relies on the
    recomputed step being the one of the rollout.  ``step_context`` is entered around every forward
    with grad and its backward (e.g. ``block_checkpoint.checkpointed_blocks``).
    """
    check_sigmas(sigmas)
    if checkpointing:
        return _checkpointed(denoise, noise, sigmas, target, params, before_step, grad_context, step_context, weights)
    return _through_graph(denoise, noise, sigmas, target, params, before_step, grad_context, step_context, weights)


def _through_graph(denoise, noise, sigmas, target, params, before_step, grad_context,
                   step_context=contextlib.nullcontext, weights=None) -> TrajectoryGradient:
    with torch.enable_grad(), grad_context(), step_context():
        x = noise
        for i in range(len(sigmas) - 1):
            before_step(i)
            x = euler_step(x, denoise(x, sigmas[i]), sigmas[i], sigmas[i + 1])
        loss = trajectory_loss(x, target, weights)
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    total = [torch.zeros_like(p) for p in params]
    _accumulate(total, grads)
    return TrajectoryGradient(loss.detach(), x.detach(), total)


def _checkpointed(denoise, noise, sigmas, target, params, before_step, grad_context,
                  step_context=contextlib.nullcontext, weights=None) -> TrajectoryGradient:
    inputs: list[torch.Tensor] = []
    x = noise
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            inputs.append(x)
            before_step(i)
            x = euler_step(x, denoise(x, sigmas[i]), sigmas[i], sigmas[i + 1])
    final = x
    loss = trajectory_loss(final, target, weights)
    if weights is None:
        upstream = 2.0 * (final - target) / final.numel()
    else:
        upstream = 2.0 * _row_weights(weights, final) * (final - target)
    total = [torch.zeros_like(p) for p in params]
    for i in reversed(range(len(sigmas) - 1)):
        x_grad, grads = step_vjp(denoise, inputs[i], sigmas, i, upstream, params, before_step, i > 0,
                                 grad_context, step_context)
        if i > 0:
            upstream = x_grad
        _accumulate(total, grads)
    return TrajectoryGradient(loss, final, total)


def step_vjp(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    i: int,
    upstream: torch.Tensor,
    params: Sequence[torch.Tensor],
    before_step: StepHook,
    input_grad: bool = True,
    grad_context: Callable[[], ContextManager] = contextlib.nullcontext,
    step_context: Callable[[], ContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor | None, Sequence[torch.Tensor | None]]:
    """One recomputed step: Euler step ``i`` from ``x`` with grad, then one vector-Jacobian product
    of ``upstream`` (shape of x) for the step's input (if ``input_grad``) and ``params``.

    Returns (gradient w.r.t. x or None, gradients w.r.t. params, None where unused).  This is the
    unit of work — and of memory — of time-step checkpointing; the memory preflight traces it.
    """
    with torch.enable_grad(), grad_context(), step_context():
        x = x.detach().requires_grad_(input_grad)
        before_step(i)
        out = euler_step(x, denoise(x, sigmas[i]), sigmas[i], sigmas[i + 1])
        wrt = ([x] if input_grad else []) + list(params)
        grads = torch.autograd.grad(out, wrt, upstream, allow_unused=True)
    if input_grad:
        return grads[0], grads[1:]
    return None, grads


def teacher_steps(
    denoise: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each step's input and x0 prediction along the ungated model's own trajectory."""
    inputs, x0s = [], []
    x = noise
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            x0 = denoise(x, sigmas[i])
            inputs.append(x)
            x0s.append(x0)
            x = euler_step(x, x0, sigmas[i], sigmas[i + 1])
    return inputs, x0s


def per_step_gradient(
    denoise: Denoiser,
    sigmas: torch.Tensor,
    teacher: tuple[list[torch.Tensor], list[torch.Tensor]],
    params: Sequence[torch.Tensor],
    before_step: StepHook,
    grad_context: Callable[[], ContextManager] = contextlib.nullcontext,
    step_context: Callable[[], ContextManager] = contextlib.nullcontext,
    weights: torch.Tensor | None = None,
) -> TrajectoryGradient:
    """The local baseline: mean over steps of MSE(gated x0, ungated x0) on the teacher's own inputs
    (``weights``: see :func:`trajectory_loss`)."""
    inputs, x0s = teacher
    steps = len(inputs)
    total = [torch.zeros_like(p) for p in params]
    loss = torch.zeros((), dtype=x0s[-1].dtype, device=x0s[-1].device)
    for i in range(steps):
        with torch.enable_grad(), grad_context(), step_context():
            before_step(i)
            step_loss = trajectory_loss(denoise(inputs[i], sigmas[i]), x0s[i], weights) / steps
            grads = torch.autograd.grad(step_loss, list(params), allow_unused=True)
        _accumulate(total, grads)
        loss += step_loss.detach()
    return TrajectoryGradient(loss, x0s[-1], total)
