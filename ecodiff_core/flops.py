"""FLOP accounting from one example forward pass.

The caller supplies ``run``, a closure that runs the model once on representative inputs (same
resolution, prompt length and batch as the sampling it cares about).  Costs are forward FLOPs in
the convention of ``torch.utils.flop_counter`` (a multiply-add = 2 FLOPs; bias adds, norms and
element-wise ops are not counted), so removed unit costs and measured totals are comparable.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from .units import Layout, UnitGroup, get_linear

Call = tuple[int, int]  # (batch rows, tokens per row) of one call of a Linear


@dataclass
class FlopCosts:
    """Forward FLOPs of one ``run``: per unit of each group, and for the whole model."""

    per_unit: dict[str, float]
    total: float

    def prunable(self, layout: Layout) -> float:
        """FLOPs a planner may remove (units that must stay, ``min_keep``, excluded)."""
        return sum(self.per_unit[g.name] * g.removable for g in layout.groups)


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict:
    """torch's counter knows the CUDA attention kernels but not the CPU one, which would make
    attention free on CPU; count it with the same formula."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: _sdpa_cpu_flop}


def flop_counter_mode() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_extra_formulas())


def total_flops(run: Callable[[], Any]) -> int:
    """FLOPs counted by torch's FlopCounterMode over one call of ``run``."""
    with torch.no_grad(), flop_counter_mode() as counter:
        run()
    return int(counter.get_total_flops())


def _record_calls(model: nn.Module, paths: set[str], run: Callable[[], Any]) -> tuple[dict[str, list[Call]], int]:
    calls: dict[str, list[Call]] = {p: [] for p in paths}

    def hook_for(path: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            batch = x.shape[0] if x.ndim > 1 else 1
            calls[path].append((batch, math.prod(x.shape[1:-1]) if x.ndim > 1 else 1))
        return hook

    handles = [get_linear(model, p).register_forward_pre_hook(hook_for(p)) for p in sorted(paths)]
    try:
        with torch.no_grad(), flop_counter_mode() as counter:
            run()
    finally:
        for h in handles:
            h.remove()
    return calls, int(counter.get_total_flops())


def _linear_cost(model: nn.Module, group: UnitGroup, calls: dict[str, list[Call]]) -> float:
    total = 0.0
    for s in group.slices:
        lin = get_linear(model, s.module)
        other = lin.in_features if s.side == "out" else lin.out_features
        tokens = sum(b * n for b, n in calls[s.module])
        total += 2.0 * tokens * group.width * other
    return total


def _score_cost(group: UnitGroup, calls: dict[str, list[Call]]) -> float:
    """QKᵀ and attention·V per head: 4 · N_q · N_k · head_dim per batch row and call.

    Joint attention has several q (and k) producers, one per stream; their tokens add up.
    """
    q = [s.module for s in group.producers if s.role == "q"]
    k = [s.module for s in group.producers if s.role == "k"]
    if not q or not k:
        return 0.0
    n_calls = min(len(calls[p]) for p in q + k)
    total = 0.0
    for c in range(n_calls):
        batch = calls[q[0]][c][0]
        n_q = sum(calls[p][c][1] for p in q)
        n_k = sum(calls[p][c][1] for p in k)
        total += 4.0 * batch * n_q * n_k * group.width
    return total


def measure_flops(model: nn.Module, layout: Layout, run: Callable[[], Any]) -> FlopCosts:
    """Per-unit FLOP cost of every group and the model's total, from one call of ``run``.

    Per unit: Linear FLOPs of each slice (2 × tokens × width × the other dimension) plus, for
    head groups, the attention-score FLOPs.  Modules that did not run in ``run`` cost 0.
    """
    paths = {s.module for g in layout.groups for s in g.slices}
    calls, total = _record_calls(model, paths, run)
    per_unit = {}
    for g in layout.groups:
        cost = _linear_cost(model, g, calls)
        if g.kind == "head":
            cost += _score_cost(g, calls)
        per_unit[g.name] = cost
    return FlopCosts(per_unit=per_unit, total=float(total))
