"""Why a learned mask may prune badly: the warnings Apply Pruned Mask shows beside its result.

A mask is *unfinished* when learning stopped before its epochs were done, or when almost no gate
closed (logit λ < 0: the gate is closed more often than not) so the ranking rests on tiny logit
differences; it is *mismatched* when it was learned on other weights of the same architecture
(the weights fingerprint of ``learn.run_inputs`` differs); a plan *almost empties* a unit kind or a
block when it keeps less than ``ALMOST_EMPTY`` of its units.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .maskfile import MaskState
from .units import Layout

ALMOST_EMPTY = 0.1  # a kind or block keeping less than this fraction of its units is almost emptied
FEW_CLOSED = 0.01  # fewer closed gates than this fraction of all units: learning has barely started


def closed_fraction(state: MaskState) -> float:
    """Fraction of all units whose logit is below 0 (as the learner's ``sparsity`` counts them)."""
    values = [torch.as_tensor(v).flatten() for v in state.logits.values()]
    total = sum(v.numel() for v in values)
    return sum(int((v < 0).sum()) for v in values) / total if total else 0.0


def mask_warnings(state: MaskState, weights: str | None = None) -> list[str]:
    """Sentences on an unfinished mask and on one learned on other weights.

    ``weights`` is ``learn.weights_digest`` of the model the mask is applied to (None: not checked;
    masks recorded without a fingerprint are not checked either)."""
    out = []
    progress, asked = state.progress, state.settings.epochs
    if not progress.get("finished"):
        done = f"{progress.get('epoch', 0)} of {asked} epochs" if asked else "not all epochs"
        why = f" ({state.stop_reason})" if state.stop_reason else ""
        out.append(f"the mask is unfinished: learning stopped after {progress.get('step', 0)} optimiser steps, "
                   f"{done}{why}; finish it (ComfyUI: queue Learn again with the same run_name; command line: "
                   "learn --resume)")
    closed = closed_fraction(state)
    if closed < FEW_CLOSED:
        out.append(f"almost no gate of the mask closed ({closed:.1%} of units have a negative logit): the ranking "
                   "rests on tiny differences and the pruned model may lose quality; learn longer (more epochs "
                   "or prompts) or with a larger beta")
    learned_on = state.inputs.get("weights") if isinstance(state.inputs, Mapping) else None
    if weights is not None and learned_on and learned_on != weights:
        out.append(f"the mask was learned on other weights of {state.arch} (weights fingerprint {learned_on}, this "
                   f"model {weights}: another checkpoint, or LoRA/patches changed); its ranking may not fit "
                   "this model, learn a mask on it")
    return out


def plan_warnings(layout: Layout, keep: Mapping[str, torch.Tensor]) -> list[str]:
    """Sentences for every unit kind and every block the keep masks leave with less than
    ``ALMOST_EMPTY`` of its units (e.g. "removes 96% of the heads")."""
    out = []
    for per_kind in (True, False):
        totals: dict[str, list[int]] = {}
        for g in layout.groups:
            counts = totals.setdefault(g.kind if per_kind else g.block, [0, 0])
            counts[0] += int(keep[g.name].sum())
            counts[1] += g.count
        for name, (kept, total) in totals.items():
            if total and kept / total < ALMOST_EMPTY:
                label = f"{name}s" if per_kind else f"units of block {name}"
                out.append(f"pruning removes {1 - kept / total:.0%} of the {label} ({total - kept} of {total}): "
                           "the model may break; lower the target or use keep_ratios")
    return out
