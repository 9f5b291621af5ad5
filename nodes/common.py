"""Types and small helpers shared by the EcoDiff nodes (no math here: see ``ecodiff_comfy`` and the engine)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from comfy_api.latest import io

from ..ecodiff_comfy.folders import default_prompts
from ..ecodiff_core.mask_checks import closed_fraction
from ..ecodiff_core.maskfile import MaskState
from ..ecodiff_core.prompts import parse_prompts as prompts_of

CATEGORY = "EcoDiff"
MaskType = io.Custom("ECODIFF_MASK")
ReportType = io.Custom("ECODIFF_REPORT")
#: ``control_after_generate`` of seeds: "fixed" where comfy_api can say so (io.ControlAfterGenerate, newer
#: ComfyUI); otherwise the control widget is added and web/ecodiff.js sets it to "fixed" on new nodes.
SEED_CONTROL = io.ControlAfterGenerate.fixed if hasattr(io, "ControlAfterGenerate") else True


def node_schema(node_id: str, display_name: str, description: str, inputs: list, outputs: list,
                **options: Any) -> io.Schema:
    """The schema of an EcoDiff node: ``io.Schema`` in the EcoDiff category (``CATEGORY``);
    ``options`` are the rest of ``io.Schema``'s fields (``is_output_node``, ``hidden``, ...)."""
    return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                     inputs=inputs, outputs=outputs, **options)


def calibration_inputs(clip: str, prompts: str, negative_prompt: str, max_prompts: str) -> list:
    """The calibration inputs Learn Sparsity Mask and LoRA Recover share, in their order: ``clip``
    (optional), ``prompts`` (the shipped set), ``negative_prompt``, ``max_prompts``, ``width`` and
    ``height`` (pixels); the arguments are each node's tooltips of the first four."""
    return [
        io.Clip.Input("clip", optional=True, tooltip=clip),
        io.String.Input("prompts", multiline=True, default=default_prompts(), tooltip=prompts),
        io.String.Input("negative_prompt", multiline=True, default="", tooltip=negative_prompt),
        io.Int.Input("max_prompts", default=0, min=0, max=10000, tooltip=max_prompts),
        io.Int.Input("width", default=1024, min=16, max=8192, step=8,
                     tooltip="Image width of the calibration trajectories, in pixels."),
        io.Int.Input("height", default=1024, min=16, max=8192, step=8,
                     tooltip="Image height of the calibration trajectories, in pixels."),
    ]


def parse_prompts(text: str, limit: int = 0) -> list[str]:
    """The prompts of a text widget (the engine's rule: one per line, # comments), the first ``limit`` if > 0."""
    prompts = prompts_of(text)
    return prompts[:limit] if limit > 0 else prompts


@dataclass
class ReportData:
    """What Apply Pruned Mask hands to the Pruning Report node; every count comes from ``report``."""

    report: Any  # ecodiff_core.report.PruneReport
    mode: str
    target: str
    warnings: list[str] = field(default_factory=list)  # unfinished or mismatched mask, almost emptied kinds/blocks

    @property
    def keep_counts(self) -> dict[str, tuple[int, int]]:
        """group name → (units kept in the model, units before)."""
        return {g.name: (g.units_after, g.units_before) for g in self.report.groups}

    @property
    def blocks(self) -> dict[str, str]:
        return {g.name: g.block for g in self.report.groups}

    @property
    def kinds(self) -> dict[str, str]:
        return {g.name: g.kind for g in self.report.groups}


def mask_summary(state: MaskState) -> str:
    s = state.summary()
    done = "finished" if state.progress.get("finished") else f"stopped ({state.stop_reason or 'unfinished'})"
    loss = f"loss {s['first_loss']:.5g} → {s['last_loss']:.5g}" if s["steps"] else "no steps yet"
    return (f"EcoDiff mask for {state.arch} ({len(state.logits)} unit groups, fingerprint {state.fingerprint}): "
            f"{s['steps']} optimiser steps, {loss}, {closed_fraction(state):.1%} of gates closed, {done}"
            + (f"\n{state.start_note}" if state.start_note else ""))
