"""diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 and 3.5).

Each ``JointTransformerBlock`` runs ONE attention over image+text tokens (``attn``: ``to_q/k/v`` and
``add_q/k/v_proj``), so a head is removed from both streams: gate = input columns of ``to_out.0`` and
``to_add_out`` (the last block's context is ``context_pre_only``: no ``to_add_out``, no
``ff_context``; its head outputs are discarded anyway).  ``attn2`` (SD3.5 dual attention) is its own
head set, ``ff`` / ``ff_context`` neurons per stream.  As in the ComfyUI MMDiT table, the joint
attention has no replacement for zero heads: its head groups say ``min_keep=1``.
"""
from __future__ import annotations

from torch import nn

from ..units import Slice, UnitGroup
from .diffusers_blocks import attention_group, feedforward_group, head_dim_of, reject_fused
from .diffusers_flux import _qkv, _require
from .shared import has_class, join

ARCH_ID = "diffusers_sd3"
DESCRIPTION = "diffusers SD3Transformer2DModel (SD3, SD3.5)"
# Activation checkpointing inside the recomputed learning step wraps every joint block
# (outermost modules of these classes; see ecodiff_core.block_checkpoint).
CHECKPOINT_BLOCKS: tuple[str, ...] = ("JointTransformerBlock",)


def matches(model: nn.Module) -> bool:
    return has_class(model, "SD3Transformer2DModel") and hasattr(model, "transformer_blocks") \
        and all(has_class(b, "JointTransformerBlock") for b in model.transformer_blocks)


def joint_heads(block: nn.Module, path: str) -> UnitGroup:
    """The joint attention's heads, removed from the image and the text stream together."""
    attn_path = join(path, "attn")
    reject_fused(block.attn, attn_path)
    gates = (Slice(join(attn_path, "to_out.0"), "in"),)
    if getattr(block.attn, "to_add_out", None) is not None:
        gates += (Slice(join(attn_path, "to_add_out"), "in"),)
    return UnitGroup(
        name=f"{attn_path}:heads", kind="head", count=int(block.attn.heads),
        width=head_dim_of(block.attn, attn_path), owner=attn_path, gates=gates,
        producers=_qkv(attn_path) + _qkv(attn_path, "add_"),
        counters=((attn_path, "heads"),), dims=((attn_path, "inner_dim"),), block=path, min_keep=1,
    )


def unit_groups(model: nn.Module) -> list[UnitGroup]:
    groups: list[UnitGroup] = []
    for i, block in enumerate(model.transformer_blocks):
        path = f"transformer_blocks.{i}"
        groups.append(joint_heads(block, path))
        if getattr(block, "attn2", None) is not None:
            attn2 = attention_group(block.attn2, join(path, "attn2"), path)
            if attn2 is not None:
                groups.append(attn2)
        groups.append(_require(feedforward_group(block.ff, join(path, "ff"), path), join(path, "ff")))
        if getattr(block, "ff_context", None) is not None:
            groups.append(_require(feedforward_group(block.ff_context, join(path, "ff_context"), path),
                                   join(path, "ff_context")))
    return groups
