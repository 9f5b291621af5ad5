"""What the nodes hand to the UI: their ui text (shown in the node by web/ecodiff.js), the report's
warnings first, the seed's control mode, on tiny real ComfyUI models."""
from __future__ import annotations

import pytest
import torch

import comfy_tiny as ct
from comfy_checks import random_mask


@pytest.mark.parametrize(("arch", "keep_ratios"), [("sd15", "head=0.05, neuron=0.05"), ("sd15", "head=0.9"),
                                                   ("sdxl", "head=0.05, neuron=0.05")])
def test_report_text_puts_its_warnings_first(nodes, weights, arch, keep_ratios):
    tiny = ct.tiny(arch, seed=4)
    mask = random_mask(weights.model_layout(tiny.model))
    with torch.inference_mode():
        _, report = nodes.ApplyPrunedMask.execute(tiny.model, mask, "keep_ratios", 0.2, keep_ratios, "prune").args
        out = nodes.PruningReport.execute(report)
    text = out.args[0]
    assert out.ui["text"] == (text,), "the node shows exactly its text output"
    emptied = report.report.emptied
    warnings = [line for line in text.splitlines() if line.startswith("WARNING")]
    if emptied:
        assert text.splitlines()[0] == f"WARNING: {len(emptied)} module(s) lost all their units (named at the end)"
        assert all(name in text.split("lost all their units", 2)[-1] for name in emptied)
    structural = bool(emptied) + bool(report.report.silenced)  # the report's own, then the mask/plan warnings
    assert warnings == warnings[:structural] + [f"WARNING: {w}" for w in report.warnings], warnings
    assert bool(emptied) == ("0.05" in keep_ratios), "keeping 5 % empties some tiny modules, 90 % none"


def test_save_and_load_mask_show_what_they_did(nodes, weights, folders):
    tiny = ct.tiny("sd15", seed=5)
    mask = random_mask(weights.model_layout(tiny.model))
    saved = nodes.SaveSparsityMask.execute(mask, "ui_mask")
    path = saved.args[0]
    assert saved.ui["text"][0].startswith(f"saved ui_mask.safetensors to models/{folders.MASK_FOLDER}\n")
    assert path.endswith("ui_mask.safetensors")
    loaded = nodes.LoadSparsityMask.execute("ui_mask.safetensors")
    summary = loaded.args[1]
    assert loaded.ui["text"] == (summary,) and mask.fingerprint in summary


def test_learn_seed_control_is_fixed_where_the_schema_can_say_so(nodes):
    from comfy_api.latest import io

    seed = next(i for i in nodes.LearnSparsityMask.define_schema().inputs if i.id == "seed")
    if hasattr(io, "ControlAfterGenerate"):  # newer ComfyUI: the frontend reads the mode from the schema
        assert seed.control_after_generate == io.ControlAfterGenerate.fixed
    else:  # ComfyUI 0.3.64: a control widget is added; web/ecodiff.js sets it to fixed on new nodes
        assert seed.control_after_generate is True
