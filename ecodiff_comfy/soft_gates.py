"""Soft gates: a preview MODEL that multiplies removed units by 0 without changing any shape.

Facts this relies on (ComfyUI 0.3.64): ``ModelPatcher.add_weight_wrapper`` registers a function
that ``comfy.ops`` layers apply to their weight at compute time (scoped to that patcher; the shared
module is not touched), and ``move_to`` moves what it holds with the model.
"""
from __future__ import annotations

from typing import Any

import torch

from ..ecodiff_core.gate_hooks import gate_scales
from ..ecodiff_core.plan import PrunePlan
from ..ecodiff_core.prune import check_keep
from ..ecodiff_core.report import PruneReport
from ..ecodiff_core.units import Layout, get_linear
from .weights import diffusion_module


class _GateWeight:
    """Patcher-scoped soft gate: scales a Linear's input columns or output rows."""

    def __init__(self, scale: torch.Tensor, side: str) -> None:
        self.scale, self.side = scale, side

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(device=weight.device, dtype=weight.dtype)
        if weight.ndim == 1:
            return weight * scale
        return weight * (scale[None, :] if self.side == "in" else scale[:, None])

    def move_to(self, device: Any = None) -> int:
        if device is not None:
            self.scale = self.scale.to(device)
        return self.scale.numel() * self.scale.element_size()


def is_soft_gated(model: Any) -> bool:
    """Whether ``model`` carries soft gates (Apply Pruned Mask in soft mode): full-size weights."""
    return any(isinstance(f, _GateWeight) for fs in getattr(model, "weight_wrapper_patches", {}).values() for f in fs)


def soft_gated_model(model: Any, layout: Layout, keep: dict[str, torch.Tensor]) -> Any:
    """A clone of ``model`` that multiplies removed units by 0 through weight wrappers (preview)."""
    keep = check_keep(layout, keep)
    patcher = model.clone()
    module = diffusion_module(model)
    for (path, side), scale in gate_scales(module, layout, keep).items():
        rows = getattr(get_linear(module, path), "rows", None)  # a pruned ScatterLinear holds only these
        if side == "out" and isinstance(rows, torch.Tensor):
            scale = scale[rows.cpu()]
        patcher.add_weight_wrapper(f"diffusion_model.{path}.weight", _GateWeight(scale, side))
        if side == "out" and get_linear(module, path).bias is not None:
            patcher.add_weight_wrapper(f"diffusion_model.{path}.bias", _GateWeight(scale, side))
    return patcher


def soft_preview(model: Any, layout: Layout, plan: PrunePlan) -> tuple[Any, PruneReport]:
    """The soft-gated MODEL and the report of what pruning would remove (weights keep their size,
    so "after" is the plan's count)."""
    module = diffusion_module(model)
    report = PruneReport.build(module, module, layout, plan.keep)
    report.params_after = report.params_before - plan.removed_params
    return soft_gated_model(model, layout, plan.keep), report
