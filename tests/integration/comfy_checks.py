"""Shared helpers of the integration tests."""
from __future__ import annotations

import torch

from scripts.comfy_env import sub


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def random_keep(layout, seed: int = 1, p: float = 0.4, empty: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Random keep masks with at least one unit per group, except the groups named in ``empty``."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in layout.groups:
        k = torch.rand(g.count, generator=gen) > p
        if not k.any():
            k[0] = True
        keep[g.name] = torch.zeros(g.count, dtype=torch.bool) if g.name in empty else k
    return keep


def random_mask(layout, seed: int = 0):
    """The pack's ``MaskState`` for ``layout``, standard-normal logits from ``seed`` (stands in for a learned mask)."""
    state = sub("ecodiff_core.maskfile").MaskState.fresh(layout, 0.0)
    gen = torch.Generator().manual_seed(seed)
    state.logits = {g.name: torch.randn(g.count, generator=gen) for g in layout.groups}
    return state


def weights_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_weights(module: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    now = module.state_dict()
    return set(now) == set(snapshot) and all(torch.equal(now[k], snapshot[k]) for k in snapshot)


class ScaleWeight:
    """A weight wrapper (``add_weight_wrapper``) as TrainLoraNode's adapters are: w -> s·w."""

    def __init__(self, s: float) -> None:
        self.s = s

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.s

    def move_to(self, device=None) -> int:
        return 0


def wrap_linears(model, scale: float = 1.5, every: int = 1, biases: bool = False):
    """A clone of ``model`` with a ScaleWeight wrapper on every ``every``-th comfy.ops Linear weight
    (and its bias with ``biases``)."""
    wrapped = model.clone()
    linears = [(name, m) for name, m in model.model.diffusion_model.named_modules()
               if isinstance(m, torch.nn.Linear) and hasattr(m, "weight_function")]
    for name, m in linears[::every]:
        wrapped.add_weight_wrapper(f"diffusion_model.{name}.weight", ScaleWeight(scale))
        if biases and m.bias is not None:
            wrapped.add_weight_wrapper(f"diffusion_model.{name}.bias", ScaleWeight(scale - 1.0))
    return wrapped
