"""ComfyUI patches on pruned models: every patch point sees the pruned model's head counts, identity
patches leave the pruned model's output unchanged, and a replace patch on an attention that lost
every head is refused with a message naming the node and the block."""
from __future__ import annotations

import pytest
import torch

import comfy_tiny as ct
from comfy_checks import random_keep, rel_err
from scripts.comfy_env import sub


def identity_attention(q, k, v, extra_options):
    """What a replace patch such as Self-Attention Guidance computes for its record step."""
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, heads=extra_options["n_heads"])


def transformer_blocks(dm) -> list[tuple[str, int, int, torch.nn.Module]]:
    """(block name, block id, transformer index, BasicTransformerBlock) as ComfyUI's UNet keys them."""
    out = []
    for name, blocks in (("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)):
        for i, block in enumerate(blocks):
            for layer in block:
                for t, tb in enumerate(getattr(layer, "transformer_blocks", [])):
                    out.append((name, i, t, tb))
    return out


def unet_keep(layout, seed: int, emptied: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Random keep masks where attn1 and attn2 of the middle block keep different head counts."""
    keep = random_keep(layout, seed=seed, empty=emptied)
    mid1, mid2 = "middle_block.1.transformer_blocks.0.attn1:heads", "middle_block.1.transformer_blocks.0.attn2:heads"
    if mid1 not in emptied:
        keep[mid1] = torch.zeros_like(keep[mid1])
        keep[mid1][-1] = True
    keep[mid2] = torch.ones_like(keep[mid2])
    return keep


def patched(model, arch: str, seen: list):
    """A clone with identity patches at every patch point of ``arch`` that record the head counts
    they are handed."""
    m = model.clone()
    if arch in ("flux", "sd3"):
        dm = model.model.diffusion_model
        n_double = len(dm.double_blocks) if arch == "flux" else len(dm.joint_blocks)
        for i in range(n_double):
            m.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "double_block", i)
        for i in range(len(dm.single_blocks) if arch == "flux" else 0):
            m.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "single_block", i)
        return m

    def record(attn: str):
        def patch(*args):
            extra = args[-1]
            seen.append((attn, extra["block"], extra.get("block_index", 0), extra["n_heads"]))
            return args[0] if len(args) == 2 else args[:3]
        return patch

    for name, i, t, _ in transformer_blocks(model.model.diffusion_model):
        m.set_model_attn1_replace(identity_attention, name, i, t)
        m.set_model_attn2_replace(identity_attention, name, i, t)
    m.set_model_attn1_patch(record("attn1"))
    m.set_model_attn2_patch(record("attn2"))
    m.set_model_attn1_output_patch(record("attn1"))
    m.set_model_attn2_output_patch(record("attn2"))
    return m


@pytest.mark.parametrize("arch", ct.ARCHS)
def test_identity_patches_leave_pruned_output_unchanged(arch, weights, pruned_models):
    tiny = ct.tiny(arch, seed=3)
    layout = weights.model_layout(tiny.model)
    keep = unet_keep(layout, 2) if arch in ("sd15", "sdxl") else \
        random_keep(layout, seed=2, empty=tuple(g.name for g in layout.groups if g.kind == "head")[:1])
    logits = {g.name: torch.zeros(g.count) for g in layout.groups}
    seen: list = []
    with torch.inference_mode():
        pruned = pruned_models.build_pruned_model(tiny.model, layout, keep, logits)[0]
        plain = ct.sample(pruned, tiny.positive, tiny.negative, seed=1)
        with_patches = ct.sample(patched(pruned, arch, seen), tiny.positive, tiny.negative, seed=1)
    assert rel_err(with_patches, plain) <= 1e-5
    if arch in ("sd15", "sdxl"):
        dm = weights.diffusion_module(pruned)
        heads = {(a, (name, i), t): getattr(tb, a).heads
                 for name, i, t, tb in transformer_blocks(dm) for a in ("attn1", "attn2")}
        assert seen and all(n == heads[(a, tuple(block), t)] for a, block, t, n in seen)
        mid = dm.middle_block[1].transformer_blocks[0]
        assert mid.attn1.heads != mid.attn2.heads and mid.n_heads == mid.attn1.heads


def _guidance_node(name: str, scale: float):
    if name == "SelfAttentionGuidance":
        from comfy_extras.nodes_sag import SelfAttentionGuidance

        return lambda m: SelfAttentionGuidance.execute(m, scale, 2.0).args[0]
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    return lambda m: PerturbedAttentionGuidance.execute(m, scale).args[0]


@pytest.mark.parametrize("node", ["SelfAttentionGuidance", "PerturbedAttentionGuidance"])
def test_stock_attention_guidance_on_pruned_unet(node, weights, pruned_models):
    """Stock nodes that replace the middle block's attn1 work where that attention keeps one head
    (scale 0 reproduces the plain output through the patch where the node runs it), and are refused,
    naming the node and the block, where it keeps none."""
    errors = sub("ecodiff_core.errors")
    tiny = ct.tiny("sd15", seed=3)
    layout = weights.model_layout(tiny.model)
    logits = {g.name: torch.zeros(g.count) for g in layout.groups}
    with torch.inference_mode():
        pruned = pruned_models.build_pruned_model(tiny.model, layout, unet_keep(layout, 4), logits)[0]
        plain = ct.sample(pruned, tiny.positive, tiny.negative, seed=1)
        unguided = ct.sample(_guidance_node(node, 0.0)(pruned), tiny.positive, tiny.negative, seed=1)
        assert rel_err(unguided, plain) <= 1e-5
        guided = ct.sample(_guidance_node(node, 0.5)(pruned), tiny.positive, tiny.negative, seed=1)
        assert torch.isfinite(guided).all() and rel_err(guided, plain) > 1e-4

        mid = "middle_block.1.transformer_blocks.0.attn1:heads"
        emptied = pruned_models.build_pruned_model(tiny.model, layout, unet_keep(layout, 4, emptied=(mid,)), logits)[0]
        with pytest.raises(errors.EcoDiffError, match=node + r".*middle_block\.1\.transformer_blocks\.0"):
            ct.sample(_guidance_node(node, 0.5)(emptied), tiny.positive, tiny.negative, seed=1)
        if node == "SelfAttentionGuidance":  # patches that only transform the emptied attention's input run
            seen: list = []
            m = emptied.clone()
            m.set_model_attn1_patch(lambda n, c, v, extra: (seen.append(extra["n_heads"]), (n, c, v))[1])
            out = ct.sample(m, tiny.positive, tiny.negative, seed=1)
            assert rel_err(out, ct.sample(emptied, tiny.positive, tiny.negative, seed=1)) <= 1e-6 and 0 in seen


def test_loaded_pruned_model_hands_patches_its_head_counts(weights, pruned_models, pruned_files, comfy_dirs):
    tiny = ct.tiny("sd15", seed=3)
    layout = weights.model_layout(tiny.model)
    logits = {g.name: torch.zeros(g.count) for g in layout.groups}
    with torch.inference_mode():
        pruned = pruned_models.build_pruned_model(tiny.model, layout, unet_keep(layout, 5), logits)[0]
        path = pruned_files.save_pruned_model(pruned, comfy_dirs / "patch_heads.safetensors")
        loaded = pruned_files.load_pruned_model(path)
        plain = ct.sample(loaded, tiny.positive, tiny.negative, seed=1)
        with_patches = ct.sample(patched(loaded, "sd15", []), tiny.positive, tiny.negative, seed=1)
    assert rel_err(with_patches, plain) <= 1e-5
