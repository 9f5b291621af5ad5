"""diffusers ``FluxTransformer2DModel`` (FLUX.1 dev/schnell and relatives).

Double blocks: ONE head set for the joint image+text attention, ``ff`` and ``ff_context`` neurons,
AdaLN modulation channels of ``norm1.linear`` and ``norm1_context.linear``.
Single blocks: attention heads and MLP neurons share the fused ``proj_out`` (attention features
first, then MLP features), plus modulation channels of ``norm.linear``.
"""
from __future__ import annotations

from torch import nn

from ..errors import EcoDiffError
from ..replacements import EmptyFluxJointAttention, EmptyPreOnlyAttention
from ..units import Slice, UnitGroup
from .diffusers_blocks import feedforward_group, head_dim_of, reject_fused
from .shared import has_class, join, modulation_group

ARCH_ID = "diffusers_flux"
DESCRIPTION = "diffusers FluxTransformer2DModel (FLUX.1)"
# Activation checkpointing inside the recomputed learning step wraps every double- and single-stream block
# (outermost modules of these classes; see ecodiff_core.block_checkpoint).
CHECKPOINT_BLOCKS: tuple[str, ...] = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


def matches(model: nn.Module) -> bool:
    return has_class(model, "FluxTransformer2DModel") and all(
        hasattr(model, a) for a in ("transformer_blocks", "single_transformer_blocks"))


def _qkv(path: str, prefix: str = "to_") -> tuple[Slice, ...]:
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if prefix == "add_" else ("to_q", "to_k", "to_v")
    return tuple(Slice(join(path, n), "out", role=r) for n, r in zip(names, "qkv", strict=True))


def _require(group: UnitGroup | None, path: str) -> UnitGroup:
    if group is None:
        raise EcoDiffError(f"'{path}' does not have the diffusers feed-forward layout (net.0.proj, net.2)")
    return group


def double_block_groups(block: nn.Module, path: str) -> list[UnitGroup]:
    attn_path = join(path, "attn")
    reject_fused(block.attn, attn_path)
    heads = UnitGroup(
        name=f"{attn_path}:heads", kind="head", count=int(block.attn.heads),
        width=head_dim_of(block.attn, attn_path), owner=attn_path,
        gates=(Slice(join(attn_path, "to_out.0"), "in"), Slice(join(attn_path, "to_add_out"), "in")),
        producers=_qkv(attn_path) + _qkv(attn_path, "add_"),
        counters=((attn_path, "heads"),), dims=((attn_path, "inner_dim"),),
        empty=EmptyFluxJointAttention, block=path,
    )
    return [
        modulation_group(block.norm1.linear, join(path, "norm1.linear"), path),
        modulation_group(block.norm1_context.linear, join(path, "norm1_context.linear"), path),
        heads,
        _require(feedforward_group(block.ff, join(path, "ff"), path), join(path, "ff")),
        _require(feedforward_group(block.ff_context, join(path, "ff_context"), path), join(path, "ff_context")),
    ]


def single_block_groups(block: nn.Module, path: str) -> list[UnitGroup]:
    attn_path, out = join(path, "attn"), join(path, "proj_out")
    reject_fused(block.attn, attn_path)
    attn_features = block.attn.to_q.out_features
    heads = UnitGroup(
        name=f"{attn_path}:heads", kind="head", count=int(block.attn.heads),
        width=head_dim_of(block.attn, attn_path), owner=attn_path,
        gates=(Slice(out, "in", offset=0),), producers=_qkv(attn_path),
        counters=((attn_path, "heads"),), dims=((attn_path, "inner_dim"),),
        empty=EmptyPreOnlyAttention, block=path,
    )
    mlp_path = join(path, "proj_mlp")
    neurons = UnitGroup(
        name=f"{mlp_path}:neurons", kind="neuron", count=block.proj_mlp.out_features, width=1,
        owner=mlp_path, gates=(Slice(out, "in", offset=attn_features),),
        producers=(Slice(mlp_path, "out"),), counters=((path, "mlp_hidden_dim"),), block=path,
    )
    return [modulation_group(block.norm.linear, join(path, "norm.linear"), path), heads, neurons]


def unit_groups(model: nn.Module) -> list[UnitGroup]:
    groups: list[UnitGroup] = []
    for i, block in enumerate(model.transformer_blocks):
        groups += double_block_groups(block, f"transformer_blocks.{i}")
    for i, block in enumerate(model.single_transformer_blocks):
        groups += single_block_groups(block, f"single_transformer_blocks.{i}")
    return groups
