"""Pruned MODELs on tiny real ComfyUI SD1.5 / SDXL / FLUX / SD3: KSampler output equals the
hard-gated model's, the input MODEL is untouched, and the tables find the expected units."""
from __future__ import annotations

import re

import pytest
import torch

import comfy_tiny as ct
from comfy_checks import random_keep, random_mask, rel_err, same_weights, weights_snapshot
from pruned_shapes import check_counts_match_shapes
from scripts.comfy_env import sub

EXPECTED = {
    "sd15": ("comfy_unet", {"head", "neuron"}),
    "sdxl": ("comfy_unet", {"head", "neuron"}),
    "flux": ("comfy_flux", {"head", "neuron", "channel"}),
    "sd3": ("comfy_mmdit", {"head", "neuron"}),
}


def _emptied(layout) -> tuple[str, ...]:
    """One head group and one neuron group left with zero units (exercises empty/silenced heads)."""
    heads = [g.name for g in layout.groups if g.kind == "head"]
    neurons = [g.name for g in layout.groups if g.kind == "neuron"]
    return (heads[-1], neurons[0])


@pytest.mark.parametrize("arch", ct.ARCHS)
def test_pruned_model_samples_like_hard_gated(arch, weights, soft_gates, pruned_models):
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        tiny = ct.tiny(arch, seed=3)
        model = tiny.model
        layout = weights.model_layout(model)
        assert layout.arch == EXPECTED[arch][0]
        assert set(layout.kinds()) == EXPECTED[arch][1]
        before = ct.sample(model, tiny.positive, tiny.negative, seed=5)
        snapshot = weights_snapshot(weights.diffusion_module(model))

        keep = random_keep(layout, seed=11, empty=_emptied(layout))
        logits = {g.name: torch.randn(g.count) for g in layout.groups}
        pruned, report = pruned_models.build_pruned_model(model, layout, keep, logits)
        gated = soft_gates.soft_gated_model(model, layout, keep)

        out_pruned = ct.sample(pruned, tiny.positive, tiny.negative, seed=5)
        out_gated = ct.sample(gated, tiny.positive, tiny.negative, seed=5)
        after = ct.sample(model, tiny.positive, tiny.negative, seed=5)

    assert torch.isfinite(out_pruned).all()
    assert rel_err(out_pruned, out_gated) <= 1e-4
    assert rel_err(out_pruned, before) > 1e-3  # pruning did change the model
    assert torch.equal(after, before)  # the input MODEL samples exactly as before
    assert same_weights(weights.diffusion_module(model), snapshot)
    assert weights.diffusion_module(pruned) is not weights.diffusion_module(model)
    assert report.params_after < report.params_before
    n_pruned = sum(p.numel() for p in weights.diffusion_module(pruned).parameters())
    assert n_pruned == report.params_after


def test_silenced_joint_heads_keep_one_zeroed_head(weights, pruned_models):
    tiny = ct.tiny("flux", seed=4)
    layout = weights.model_layout(tiny.model)
    keep = {g.name: torch.ones(g.count, dtype=torch.bool) for g in layout.groups}
    keep["double_blocks.0:heads"][:] = False
    logits = {g.name: torch.zeros(g.count) for g in layout.groups}
    logits["double_blocks.0:heads"][2] = 5.0
    pruned, _ = pruned_models.build_pruned_model(tiny.model, layout, keep, logits)
    block = weights.diffusion_module(pruned).double_blocks[0]
    assert block.num_heads == 1 and block.img_attn.num_heads == 1
    assert torch.count_nonzero(block.img_attn.proj.weight) == 0
    assert weights.pruning_info(pruned)["silenced"] == ["double_blocks.0:heads"]


def test_flux_single_block_split_sizes_follow_kept_units(weights, pruned_models):
    tiny = ct.tiny("flux", seed=5)
    layout = weights.model_layout(tiny.model)
    keep = {g.name: torch.ones(g.count, dtype=torch.bool) for g in layout.groups}
    keep["single_blocks.0:heads"][1:3] = False
    keep["single_blocks.0:neurons"][:100] = False
    pruned, _ = pruned_models.build_pruned_model(tiny.model, layout, keep,
                                                 {g.name: torch.zeros(g.count) for g in layout.groups})
    block = weights.diffusion_module(pruned).single_blocks[0]
    assert (block.num_heads, block.hidden_size, block.mlp_hidden_dim) == (2, 32, 156)
    assert block.linear1.out_features == 3 * 32 + 156 and block.linear2.in_features == 32 + 156


# Integer attributes that look like sizes of pruned units (name and value) but describe something
# pruning keeps; every other such attribute must be declared as a counter or dim of its group.
SIZE_NAMES = re.compile(r"head|hidden|inner|mlp|dim|channels|features")
NOT_PRUNED = {
    ("CrossAttention", "dim_head"): "head width",
    ("BasicTransformerBlock", "d_head"): "head width",
    ("SelfAttention", "head_dim"): "head width (MMDiT)",
    ("SpatialTransformer", "in_channels"): "residual stream width",
    ("DoubleStreamBlock", "hidden_size"): "residual stream width",
    ("SingleStreamBlock", "hidden_dim"): "residual stream width (hidden_size is the q/k/v split)",
}


def _audited_paths(group) -> list[str]:
    """The group's block, the modules between it and the owner, the owner (descendants come from
    ``named_modules`` of the owner)."""
    parts = group.owner.split(".")
    start = len(group.block.split(".")) if group.block and group.owner.startswith(group.block) else len(parts)
    return [".".join(parts[:i]) for i in range(start, len(parts))]


@pytest.mark.parametrize("arch", ct.ARCHS)
def test_every_size_attribute_is_declared_and_follows_pruning(arch, weights, pruned_models):
    """Audit of ComfyUI's classes: an int attribute of a pruned module (or of the modules around it)
    that equals a group's unit count, or count × width, is a counter/dim of that group, and after
    pruning every counter/dim matches the weight shapes."""
    tiny = ct.tiny(arch, seed=3)
    dm = weights.diffusion_module(tiny.model)
    layout = weights.model_layout(tiny.model)
    declared = {(p, a) for g in layout.groups for p, a in g.counters + g.dims}
    undeclared = []
    for g in layout.groups:
        sizes = {g.count, g.count * g.width} | ({g.width} if g.width > 1 else set())
        paths = _audited_paths(g) + [f"{g.owner}.{n}".rstrip(".") for n, _ in dm.get_submodule(g.owner).named_modules()]
        for path in dict.fromkeys(paths):
            module = dm.get_submodule(path)
            if isinstance(module, torch.nn.Linear):
                continue  # in/out_features follow the sliced weights
            for attr, value in vars(module).items():
                if attr.startswith("_") or isinstance(value, bool) or not isinstance(value, int):
                    continue
                if SIZE_NAMES.search(attr) and value in sizes and (path, attr) not in declared \
                        and (type(module).__name__, attr) not in NOT_PRUNED:
                    undeclared.append(f"{path}.{attr}={value} ({type(module).__name__}, group {g.name})")
    assert not undeclared, "size attributes not declared in the table: " + "; ".join(sorted(set(undeclared)))

    keep = random_keep(layout, seed=9, empty=_emptied(layout))
    with torch.inference_mode():
        pruned, report = pruned_models.build_pruned_model(tiny.model, layout, keep,
                                                          {g.name: torch.zeros(g.count) for g in layout.groups})
    kept = {s.name: s.units_after for s in report.groups}
    check_counts_match_shapes(dm, weights.diffusion_module(pruned), layout, kept)


@pytest.mark.parametrize("arch", ct.ARCHS)
def test_advised_maximum_is_accepted_and_delivered(arch, nodes, weights, core):
    """Apply Pruned Mask at the value its own refusal advises: accepted, at least that fraction
    removed (units that must stay were never counted as removable), and the report's kept counts
    are the pruned model's."""
    tiny = ct.tiny(arch, seed=6)
    layout = weights.model_layout(tiny.model)
    mask = random_mask(layout, 8)
    with torch.inference_mode():
        with pytest.raises(core.errors.EcoDiffError, match="at most") as refused:
            nodes.ApplyPrunedMask.execute(tiny.model, mask, "params", 0.95, "", "prune")
        advised = float(str(refused.value).rsplit("at most ", 1)[1].rstrip(". "))
        pruned, data = nodes.ApplyPrunedMask.execute(tiny.model, mask, "params", advised, "", "prune").args
        soft = nodes.ApplyPrunedMask.execute(tiny.model, mask, "params", advised, "", "soft").args[0]
        out, out_soft = (ct.sample(m, tiny.positive, tiny.negative, seed=2) for m in (pruned, soft))
    report = data.report
    removed = report.params_removed / report.params_before
    assert advised <= removed < advised + 0.02
    assert rel_err(out, out_soft) <= 1e-4
    kept = {name: k for name, (k, _total) in data.keep_counts.items()}
    check_counts_match_shapes(weights.diffusion_module(tiny.model), weights.diffusion_module(pruned), layout, kept)
    assert all(kept[g.name] >= g.min_keep for g in layout.groups)
    rows = sub("nodes.report").chart_rows(data)
    assert sum(k for _, stats in rows for kind, (k, _) in stats.items() if kind == "head") == \
        sum(s.units_after for s in report.kinds if s.kind == "head")


@pytest.mark.parametrize("arch", ["sd15", "flux"])
@pytest.mark.parametrize("align,device,expected", [(8, "cpu", 8), ("auto", "cpu", 1), ("auto", "cuda", 8),
                                                   (None, "cpu", 1), (4, "cuda", 4)])
def test_plan_for_mask_aligns_kept_features(arch, align, device, expected, weights, pruned_models, core):
    """``align`` reaches the engine's planner ("auto": 8 on a CUDA load device, 1 elsewhere): the plan
    is the engine's plan for that alignment, every group keeps a multiple of ``expected`` features
    (or stays whole), and the parameter budget holds to within one aligned chunk per group."""
    with torch.inference_mode():
        model = ct.tiny(arch, seed=3).model.clone()
        model.load_device = torch.device(device)  # only what the device is read from; nothing runs there
        assert pruned_models.device_align(model) == (8 if device == "cuda" else 1)
        layout = weights.model_layout(model)
        mask = random_mask(layout, seed=5)
        target = core.plan.PruneTarget(params=0.3)
        _, plan = pruned_models.plan_for_mask(model, mask, target, align=align)
        reference = core.plan.plan_pruning(model.model.diffusion_model, layout, mask.logits,
                                           core.plan.PruneTarget(params=0.3, align=expected), settings=mask.settings)
    assert plan.align == expected
    assert all(torch.equal(plan.keep[k], reference.keep[k]) for k in reference.keep)
    for g in layout.groups:
        kept = int(plan.keep[g.name].sum())
        assert kept == g.count or (kept * g.width) % expected == 0, (g.name, kept, g.width)
    assert plan.removed_params >= plan.budget > 0


def test_plan_for_mask_refuses_an_unknown_align(weights, pruned_models, core):
    with torch.inference_mode():
        model = ct.tiny("sd15", seed=3).model
        mask = random_mask(weights.model_layout(model))
        with pytest.raises(core.errors.EcoDiffError, match="auto"):
            pruned_models.plan_for_mask(model, mask, core.plan.PruneTarget(params=0.3), align="fast")
        with pytest.raises(core.errors.EcoDiffError, match="align"):
            pruned_models.plan_for_mask(model, mask, core.plan.PruneTarget(params=0.3), align=0)
