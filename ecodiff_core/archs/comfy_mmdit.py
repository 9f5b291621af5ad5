"""ComfyUI MMDiT (``OpenAISignatureMMDITWrapper``: SD3, SD3.5).

Each ``JointBlock`` runs ONE attention over context+x tokens with ``x_block.attn.num_heads`` heads,
so a head is removed from both streams: q/k/v rows of ``context_block.attn.qkv`` and
``x_block.attn.qkv``, columns of both ``attn.proj`` (the last block's context part is ``pre_only``:
no proj, no MLP; its head outputs are discarded anyway).  ``x_block.attn2`` (SD3.5 medium) is its
own head set.  MLP neurons per stream (``mlp.fc1`` rows / ``mlp.fc2`` columns).  ``split_qkv``
infers the head count from ``head_dim``, and the attention call reads ``attn.num_heads``.
``split_qkv`` cannot run with zero heads and the attention is no separate module an ``empty``
factory could replace: head groups say ``min_keep=1`` (planners keep the best head; a keep mask
that closes them all keeps one silenced head).
"""
from __future__ import annotations

from torch import nn

from ..errors import EcoDiffError
from ..units import Slice, UnitGroup
from .shared import has_class, join

ARCH_ID = "comfy_mmdit"
DESCRIPTION = "ComfyUI MMDiT (SD3, SD3.5)"
# Activation checkpointing inside the recomputed learning step wraps every joint block
# (outermost modules of these classes; see ecodiff_core.block_checkpoint).
CHECKPOINT_BLOCKS: tuple[str, ...] = ("JointBlock",)


def matches(model: nn.Module) -> bool:
    return has_class(model, "MMDiT") and hasattr(model, "joint_blocks") \
        and all(has_class(b, "JointBlock") for b in model.joint_blocks)


def _thirds(module: str, span: int) -> tuple[Slice, ...]:
    return tuple(Slice(module, "out", offset=i * span, role=r) for i, r in enumerate("qkv"))


def _attn_parts(attn: nn.Module, path: str) -> tuple[int, int, int]:
    heads, hd = int(attn.num_heads), int(attn.head_dim)
    span = attn.qkv.out_features // 3
    if heads * hd != span:
        raise EcoDiffError(f"attention '{path}': {span} q features are not {heads} heads × {hd}")
    return heads, hd, span


def joint_heads(block: nn.Module, path: str) -> UnitGroup:
    ctx, x = block.context_block, block.x_block
    cpath, xpath = join(path, "context_block.attn"), join(path, "x_block.attn")
    heads, hd, span = _attn_parts(x.attn, xpath)
    if _attn_parts(ctx.attn, cpath) != (heads, hd, span):
        raise EcoDiffError(f"joint block '{path}': context and x attention differ in heads or head size")
    gates = (Slice(join(xpath, "proj"), "in"),)
    if not ctx.pre_only:
        gates += (Slice(join(cpath, "proj"), "in"),)
    return UnitGroup(
        name=f"{path}:heads", kind="head", count=heads, width=hd, owner=path, gates=gates,
        producers=_thirds(join(cpath, "qkv"), span) + _thirds(join(xpath, "qkv"), span),
        counters=((cpath, "num_heads"), (xpath, "num_heads")), block=path, min_keep=1,
    )


def self_heads(attn: nn.Module, path: str, block: str) -> UnitGroup:
    heads, hd, span = _attn_parts(attn, path)
    return UnitGroup(
        name=f"{path}:heads", kind="head", count=heads, width=hd, owner=path,
        gates=(Slice(join(path, "proj"), "in"),), producers=_thirds(join(path, "qkv"), span),
        counters=((path, "num_heads"),), block=block, min_keep=1,
    )


def mlp_group(mlp: nn.Module, path: str, block: str) -> UnitGroup:
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
        producers, gate = (Slice(join(path, "fc1"), "out"),), Slice(join(path, "fc2"), "in")
        count = mlp.fc1.out_features
    elif all(hasattr(mlp, n) for n in ("w1", "w2", "w3")):
        producers = (Slice(join(path, "w1"), "out"), Slice(join(path, "w3"), "out"))
        gate, count = Slice(join(path, "w2"), "in"), mlp.w1.out_features
    else:
        raise EcoDiffError(f"MLP '{path}' is neither fc1/fc2 nor SwiGLU w1/w2/w3")
    return UnitGroup(name=f"{path}:neurons", kind="neuron", count=count, width=1, owner=path,
                     gates=(gate,), producers=producers, block=block)


def unit_groups(model: nn.Module) -> list[UnitGroup]:
    groups: list[UnitGroup] = []
    for i, block in enumerate(model.joint_blocks):
        path = f"joint_blocks.{i}"
        groups.append(joint_heads(block, path))
        if getattr(block.x_block, "x_block_self_attn", False):
            groups.append(self_heads(block.x_block.attn2, join(path, "x_block.attn2"), path))
        if not block.context_block.pre_only:
            groups.append(mlp_group(block.context_block.mlp, join(path, "context_block.mlp"), path))
        groups.append(mlp_group(block.x_block.mlp, join(path, "x_block.mlp"), path))
    return groups
