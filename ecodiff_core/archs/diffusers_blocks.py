"""Unit groups of diffusers building blocks (``Attention``, ``FeedForward``) used by the diffusers tables.

Matching is by class name and structure only, so diffusers need not be importable here.
"""
from __future__ import annotations

from torch import nn

from ..errors import EcoDiffError
from ..replacements import EmptyAttention
from ..units import Slice, UnitGroup
from .shared import is_linear, join


def reject_fused(attn: nn.Module, path: str) -> None:
    if getattr(attn, "fused_projections", False) or hasattr(attn, "to_qkv"):
        raise EcoDiffError(f"attention '{path}' uses fused q/k/v projections; call "
                           "model.unfuse_qkv_projections() before finding prunable units")


def head_dim_of(attn: nn.Module, path: str) -> int:
    inner, heads = attn.to_q.out_features, int(attn.heads)
    if heads <= 0 or inner % heads:
        raise EcoDiffError(f"attention '{path}': {inner} q features do not split into {heads} heads")
    return inner // heads


def attention_group(attn: nn.Module, path: str, block: str) -> UnitGroup | None:
    """Heads of a diffusers ``Attention`` (self or cross): gate = ``to_out.0`` input columns.

    Returns None for variants whose heads cannot be removed independently with this layout
    (added k/v projections, grouped k/v heads, q/k norms across all heads, no out-projection);
    those stay unpruned.
    """
    reject_fused(attn, path)
    needed = ("to_q", "to_k", "to_v")
    if not all(is_linear(getattr(attn, n, None)) for n in needed):
        return None
    to_out = getattr(attn, "to_out", None)
    if to_out is None or not is_linear(to_out[0]):
        return None
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        return None
    inner = attn.to_q.out_features
    if attn.to_k.out_features != inner or attn.to_v.out_features != inner:
        return None
    head_dim = head_dim_of(attn, path)
    for norm in (getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)):
        weight = getattr(norm, "weight", None)
        if weight is not None and weight.shape[-1] != head_dim:
            return None
    return UnitGroup(
        name=f"{path}:heads", kind="head", count=int(attn.heads), width=head_dim, owner=path,
        gates=(Slice(join(path, "to_out.0"), "in"),),
        producers=(Slice(join(path, "to_q"), "out", role="q"), Slice(join(path, "to_k"), "out", role="k"),
                   Slice(join(path, "to_v"), "out", role="v")),
        counters=((path, "heads"), (path, "sliceable_head_dim")),
        dims=((path, "inner_dim"), (path, "inner_kv_dim")),
        empty=EmptyAttention, block=block,
    )


def feedforward_group(ff: nn.Module, path: str, block: str) -> UnitGroup | None:
    """Neurons of a diffusers ``FeedForward``: gate = ``net.2`` input columns.

    Producers are the rows of ``net.0.proj``; gated variants (GEGLU, SwiGLU) project to
    2 × inner features that ``chunk(2)`` splits, so each neuron owns one row in each half.
    """
    net = getattr(ff, "net", None)
    if net is None or len(net) < 3:
        return None
    proj, down = getattr(net[0], "proj", None), net[2]
    if not (is_linear(proj) and is_linear(down)):
        return None
    inner = down.in_features
    if proj.out_features == inner:
        offsets = (0,)
    elif proj.out_features == 2 * inner:
        offsets = (0, inner)
    else:
        raise EcoDiffError(f"feed-forward '{path}': net.0.proj has {proj.out_features} outputs, "
                           f"expected {inner} or {2 * inner} for a down-projection of {inner} inputs")
    producers = tuple(Slice(join(path, "net.0.proj"), "out", offset=o) for o in offsets)
    return UnitGroup(
        name=f"{path}:neurons", kind="neuron", count=inner, width=1, owner=path,
        gates=(Slice(join(path, "net.2"), "in"),), producers=producers, block=block,
    )


