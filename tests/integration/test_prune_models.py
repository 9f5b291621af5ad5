"""Pruned MODELs on tiny real ComfyUI SD1.5 / SDXL / FLUX / SD3: KSampler output equals the
hard-gated model's, the input MODEL is untouched, and the tables find the expected units."""
from __future__ import annotations

import comfy_tiny as ct
import pytest
import torch
from comfy_checks import random_keep, rel_err, same_weights, weights_snapshot

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
def test_pruned_model_samples_like_hard_gated(arch, bridge):
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        tiny = ct.tiny(arch, seed=3)
        model = tiny.model
        layout = bridge.model_layout(model)
        assert layout.arch == EXPECTED[arch][0]
        assert set(layout.kinds()) == EXPECTED[arch][1]
        before = ct.sample(model, tiny.positive, tiny.negative, seed=5)
        snapshot = weights_snapshot(bridge.diffusion_module(model))

        keep = random_keep(layout, seed=11, empty=_emptied(layout))
        logits = {g.name: torch.randn(g.count) for g in layout.groups}
        pruned, report = bridge.build_pruned_model(model, layout, keep, logits)
        gated = bridge.soft_gated_model(model, layout, keep)

        out_pruned = ct.sample(pruned, tiny.positive, tiny.negative, seed=5)
        out_gated = ct.sample(gated, tiny.positive, tiny.negative, seed=5)
        after = ct.sample(model, tiny.positive, tiny.negative, seed=5)

    assert torch.isfinite(out_pruned).all()
    assert rel_err(out_pruned, out_gated) <= 1e-4
    assert rel_err(out_pruned, before) > 1e-3  # pruning did change the model
    assert torch.equal(after, before)  # the input MODEL samples exactly as before
    assert same_weights(bridge.diffusion_module(model), snapshot)
    assert bridge.diffusion_module(pruned) is not bridge.diffusion_module(model)
    assert report.params_after < report.params_before
    n_pruned = sum(p.numel() for p in bridge.diffusion_module(pruned).parameters())
    assert n_pruned == report.params_after


def test_silenced_joint_heads_keep_one_zeroed_head(bridge):
    tiny = ct.tiny("flux", seed=4)
    layout = bridge.model_layout(tiny.model)
    keep = {g.name: torch.ones(g.count, dtype=torch.bool) for g in layout.groups}
    keep["double_blocks.0:heads"][:] = False
    logits = {g.name: torch.zeros(g.count) for g in layout.groups}
    logits["double_blocks.0:heads"][2] = 5.0
    pruned, _ = bridge.build_pruned_model(tiny.model, layout, keep, logits)
    block = bridge.diffusion_module(pruned).double_blocks[0]
    assert block.num_heads == 1 and block.img_attn.num_heads == 1
    assert torch.count_nonzero(block.img_attn.proj.weight) == 0
    assert bridge.pruning_info(pruned)["silenced"] == ["double_blocks.0:heads"]


def test_flux_single_block_split_sizes_follow_kept_units(bridge):
    tiny = ct.tiny("flux", seed=5)
    layout = bridge.model_layout(tiny.model)
    keep = {g.name: torch.ones(g.count, dtype=torch.bool) for g in layout.groups}
    keep["single_blocks.0:heads"][1:3] = False
    keep["single_blocks.0:neurons"][:100] = False
    pruned, _ = bridge.build_pruned_model(tiny.model, layout, keep, {g.name: torch.zeros(g.count) for g in layout.groups})
    block = bridge.diffusion_module(pruned).single_blocks[0]
    assert (block.num_heads, block.hidden_size, block.mlp_hidden_dim) == (2, 32, 156)
    assert block.linear1.out_features == 3 * 32 + 156 and block.linear2.in_features == 32 + 156
