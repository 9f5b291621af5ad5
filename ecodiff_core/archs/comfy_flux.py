"""ComfyUI ``comfy.ldm.flux.model.Flux`` (FLUX.1 dev / schnell).

Double blocks: ONE head set for the joint img+txt attention (rows of both fused ``qkv``, columns of
both ``proj``), ``img_mlp`` / ``txt_mlp`` neurons, ``img_mod.lin`` / ``txt_mod.lin`` channels.
Single blocks: heads = q/k/v rows of the fused ``linear1`` and the first columns of ``linear2``;
MLP neurons = ``linear1`` rows after q/k/v and ``linear2`` columns after the attention features;
``modulation.lin`` channels.  The forwards read ``num_heads`` (both kinds) and, in single blocks,
``hidden_size`` (size of the q/k/v split) and ``mlp_hidden_dim``: counters and dims keep them right.
The attention runs inline in the block (``qkv.view(…, num_heads, -1)``), which cannot run with
zero heads, and is no separate module an ``empty`` factory could replace: head groups say
``min_keep=1``, so planners keep their best head and ``prune_model`` keeps one silenced head where
a keep mask closes them all.
"""
from __future__ import annotations

from torch import nn

from ..errors import EcoDiffError
from ..units import Slice, UnitGroup
from .shared import has_class, join, modulation_group

ARCH_ID = "comfy_flux"
DESCRIPTION = "ComfyUI Flux (FLUX.1 dev / schnell)"
# Activation checkpointing inside the recomputed learning step wraps every double- and single-stream block
# (outermost modules of these classes; see ecodiff_core.block_checkpoint).
CHECKPOINT_BLOCKS: tuple[str, ...] = ("DoubleStreamBlock", "SingleStreamBlock")


def matches(model: nn.Module) -> bool:
    return has_class(model, "Flux") and hasattr(model, "double_blocks") and hasattr(model, "single_blocks") \
        and all(has_class(b, "DoubleStreamBlock") for b in model.double_blocks) \
        and all(has_class(b, "SingleStreamBlock") for b in model.single_blocks)


def _head_dim(features: int, heads: int, path: str) -> int:
    if heads <= 0 or features % heads:
        raise EcoDiffError(f"block '{path}': {features} attention features do not split into {heads} heads")
    return features // heads


def _thirds(module: str, span: int) -> tuple[Slice, ...]:
    return tuple(Slice(module, "out", offset=i * span, role=r) for i, r in enumerate("qkv"))


def _mlp(block_path: str, name: str, seq: nn.Sequential) -> UnitGroup:
    path = join(block_path, name)
    return UnitGroup(
        name=f"{path}:neurons", kind="neuron", count=seq[0].out_features, width=1, owner=path,
        gates=(Slice(join(path, "2"), "in"),), producers=(Slice(join(path, "0"), "out"),), block=block_path,
    )


def double_block_groups(block: nn.Module, path: str) -> list[UnitGroup]:
    heads = int(block.num_heads)
    span = block.img_attn.qkv.out_features // 3
    hd = _head_dim(span, heads, path)
    head_group = UnitGroup(
        name=f"{path}:heads", kind="head", count=heads, width=hd, owner=path,
        gates=(Slice(join(path, "img_attn.proj"), "in"), Slice(join(path, "txt_attn.proj"), "in")),
        producers=_thirds(join(path, "img_attn.qkv"), span) + _thirds(join(path, "txt_attn.qkv"), span),
        counters=((path, "num_heads"), (join(path, "img_attn"), "num_heads"), (join(path, "txt_attn"), "num_heads")),
        block=path, min_keep=1,
    )
    return [
        modulation_group(block.img_mod.lin, join(path, "img_mod.lin"), path),
        modulation_group(block.txt_mod.lin, join(path, "txt_mod.lin"), path),
        head_group,
        _mlp(path, "img_mlp", block.img_mlp),
        _mlp(path, "txt_mlp", block.txt_mlp),
    ]


def single_block_groups(block: nn.Module, path: str) -> list[UnitGroup]:
    heads = int(block.num_heads)
    span = int(block.hidden_size)
    hd = _head_dim(span, heads, path)
    mlp = int(block.mlp_hidden_dim)
    l1, l2 = join(path, "linear1"), join(path, "linear2")
    if block.linear1.out_features != 3 * span + mlp or block.linear2.in_features != span + mlp:
        raise EcoDiffError(f"single block '{path}': linear1/linear2 widths do not match "
                           f"3×{span} + {mlp} / {span} + {mlp}")
    head_group = UnitGroup(
        name=f"{path}:heads", kind="head", count=heads, width=hd, owner=path,
        gates=(Slice(l2, "in", offset=0),), producers=_thirds(l1, span),
        counters=((path, "num_heads"),), dims=((path, "hidden_size"),), block=path, min_keep=1,
    )
    neurons = UnitGroup(
        name=f"{path}:neurons", kind="neuron", count=mlp, width=1, owner=path,
        gates=(Slice(l2, "in", offset=span),), producers=(Slice(l1, "out", offset=3 * span),),
        dims=((path, "mlp_hidden_dim"),), block=path,
    )
    return [modulation_group(block.modulation.lin, join(path, "modulation.lin"), path), head_group, neurons]


def unit_groups(model: nn.Module) -> list[UnitGroup]:
    groups: list[UnitGroup] = []
    for i, block in enumerate(model.double_blocks):
        groups += double_block_groups(block, f"double_blocks.{i}")
    for i, block in enumerate(model.single_blocks):
        groups += single_block_groups(block, f"single_blocks.{i}")
    return groups
