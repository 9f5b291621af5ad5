"""Apply Pruned Mask: a physically smaller MODEL (or a soft-gated preview) from a learned mask."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..ecodiff_comfy.pruned_models import build_pruned_model, plan_for_mask
from ..ecodiff_comfy.soft_gates import soft_preview
from ..ecodiff_comfy.weights import refuse_pruned, weights_fingerprint
from ..ecodiff_core.errors import EcoDiffError
from ..ecodiff_core.mask_checks import mask_warnings, plan_warnings
from ..ecodiff_core.maskfile import MaskState
from ..ecodiff_core.plan import MAX_FRACTION, PruneTarget, parse_keep_ratios
from .common import MaskType, ReportData, ReportType, node_schema

TARGETS = ("params", "keep_ratios")
log = logging.getLogger("ecodiff")
MODES = ("prune", "soft")
#: choices of the align widget: "auto" (8 on CUDA, off elsewhere), "off" (1) or a feature multiple
ALIGNS = ("auto", "off", "8", "16", "32", "64")


def align_of(choice: str) -> str:
    """``plan_for_mask``'s ``align`` for a choice of the align widget (``ALIGNS``); EcoDiffError otherwise."""
    if choice not in ALIGNS:
        raise EcoDiffError(f"align must be one of {', '.join(ALIGNS)}, got {choice!r}")
    return choice  # plan_for_mask resolves it for the MODEL's device


class ApplyPrunedMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="EcoDiffApplyMask", display_name="Apply Pruned Mask (EcoDiff)",
            description="Removes the lowest-ranked heads/neurons/channels of the mask until the target is met and "
                        "returns a NEW, physically smaller MODEL that every sampler accepts. The input MODEL is "
                        "not modified. 'soft' mode only multiplies removed units by zero (a preview; same size).",
            inputs=[
                io.Model.Input("model", tooltip="The original (unpruned) model the mask was learned on."),
                MaskType.Input("mask", tooltip="A mask from Learn Sparsity Mask or Load Sparsity Mask, learned on this "
                                               "model."),
                io.Combo.Input("target", options=list(TARGETS), default="params",
                               tooltip="params: remove a fraction of the model's parameters (global ranking of all "
                                       "units); keep_ratios: keep a fraction of each unit kind."),
                io.Float.Input("sparsity", default=0.2, min=0.0, max=MAX_FRACTION, step=0.01,
                               tooltip="Fraction of ALL parameters of the denoiser to remove (0.2 = 20 %), used with "
                                       f"target=params; at most {MAX_FRACTION}."),
                io.String.Input("keep_ratios", default="head=0.8, neuron=0.8, channel=0.8",
                                tooltip="Used with target=keep_ratios: fraction of units to KEEP per kind, e.g. "
                                        "head=0.8, neuron=0.7. Kinds the model does not have (channel on UNets and "
                                        "SD3) are ignored, and the report says so."),
                io.Combo.Input("mode", options=list(MODES), default="prune",
                               tooltip="prune: slice the weights (smaller, faster model); soft: zero the removed units "
                                       "through weight wrappers (same size, for previews)."),
                io.Combo.Input("align", options=list(ALIGNS), default="auto", optional=True,
                               tooltip="Keep every pruned layer's width a multiple of this many features (heads count "
                                       "by head size), so the smaller matrix multiplications stay on fast tensor-core "
                                       "paths on NVIDIA GPUs. Cost: units go in aligned groups, so the target is met "
                                       "to within one such group per layer. auto = 8 when the model runs on CUDA, "
                                       "off otherwise; off = exact unit counts."),
            ],
            outputs=[  # ui text: what was removed, after warnings on an unfinished or mismatched mask
                io.Model.Output(display_name="model",
                                tooltip="The pruned (or soft-gated) model; connect it to KSampler, "
                                        "SamplerCustomAdvanced, LoRA loaders or Save Pruned Model."),
                ReportType.Output(display_name="report", tooltip="What was removed where; connect to Pruning Report."),
            ],
        )

    @classmethod
    def execute(cls, model, mask: MaskState, target: str, sparsity: float, keep_ratios: str, mode: str,
                align: str = "auto") -> io.NodeOutput:
        if mode not in MODES:
            raise EcoDiffError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        if target == "params":
            goal, label = PruneTarget(params=sparsity), f"remove {sparsity:.1%} of parameters"
        elif target == "keep_ratios":
            ratios = parse_keep_ratios(keep_ratios)
            goal, label = PruneTarget(keep_ratios=ratios), f"keep ratios {ratios}"
        else:
            raise EcoDiffError(f"target must be one of {', '.join(TARGETS)}, got '{target}'")
        refuse_pruned(model, "take another mask")
        layout, plan = plan_for_mask(model, mask, goal, align=align_of(align))
        if plan.align > 1:
            label += f"; kept widths aligned to {plan.align} features"
        if plan.ignored_kinds:
            label += f"; ignored {', '.join(plan.ignored_kinds)} ({layout.arch} has no such units)"
        for note in plan.notes:
            label += f"; {note}"
        if mode == "soft":
            out, report = soft_preview(model, layout, plan)
        else:
            out, report = build_pruned_model(model, layout, plan.keep, mask.logits, align=plan.align)
        warnings = mask_warnings(mask, weights_fingerprint(model)) + plan_warnings(layout, plan.keep)
        for warning in warnings:
            log.warning("EcoDiff Apply Pruned Mask: %s", warning)
        data = ReportData(report=report, mode=mode, target=label, warnings=warnings)
        text = "\n".join([*(f"WARNING: {w}" for w in warnings), f"{mode}: {label}; "
                           f"{report.params_before:,} → {report.params_after:,} parameters"])
        return io.NodeOutput(out, data, ui={"text": (text,)})
