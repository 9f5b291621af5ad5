"""ComfyUI ``UNetModel`` (SD1.x, SD2.x, SDXL): ``CrossAttention`` heads and ``FeedForward`` neurons.

Paths are relative to the diffusion model (``ModelPatcher.model.diffusion_model``).
``CrossAttention.forward`` reads only ``self.heads`` (head_dim follows from q's width), so slicing
q/k/v rows and ``to_out.0`` columns plus the ``heads`` counter is the whole surgery.  With every
head removed the module is replaced by one that adds ``to_out.0``'s bias, as the gated model does.

Attributes describing a pruned dimension (audited against ComfyUI 0.3.64): ``CrossAttention.heads``
and the enclosing ``BasicTransformerBlock.n_heads``, which the block hands to attention patches as
``extra_options["n_heads"]``.  A block has one ``n_heads`` for two attentions: it follows attn1
(the self-attention, which Self-Attention Guidance patches); the host hands attn2 patches attn2's
count (``ecodiff_comfy.attention_patches``).  Unchanged by pruning: ``CrossAttention.dim_head`` and
``BasicTransformerBlock.d_head`` (head width), ``FeedForward`` has no size attributes.
"""
from __future__ import annotations

from torch import nn

from ..errors import EcoDiffError
from ..replacements import EmptyAttention
from ..units import Slice, UnitGroup
from .shared import has_class, join

ARCH_ID = "comfy_unet"
DESCRIPTION = "ComfyUI UNetModel (SD1.x, SD2.x, SDXL)"
# Activation checkpointing inside the recomputed learning step wraps ResNet blocks and the transformer
# blocks inside each SpatialTransformer (outermost modules of these classes; see ecodiff_core.block_checkpoint).
CHECKPOINT_BLOCKS: tuple[str, ...] = ("ResBlock", "BasicTransformerBlock")


def matches(model: nn.Module) -> bool:
    return has_class(model, "UNetModel") and all(
        hasattr(model, a) for a in ("input_blocks", "middle_block", "output_blocks"))


def _block(path: str) -> str:
    """'input_blocks.4.1.transformer_blocks.0.attn1' → 'input_blocks.4'."""
    parts = path.split(".")
    return ".".join(parts[:1] if parts[0] == "middle_block" else parts[:2])


def attention_group(attn: nn.Module, path: str, n_heads_of: str | None = None) -> UnitGroup:
    """Heads of ``attn``; ``n_heads_of``: the ``BasicTransformerBlock`` whose ``n_heads`` follows it."""
    heads = int(attn.heads)
    inner = attn.to_q.out_features
    if heads <= 0 or inner % heads or attn.to_k.out_features != inner or attn.to_v.out_features != inner:
        raise EcoDiffError(f"attention '{path}': q/k/v widths {inner}/{attn.to_k.out_features}/"
                           f"{attn.to_v.out_features} do not split into {heads} equal heads")
    return UnitGroup(
        name=f"{path}:heads", kind="head", count=heads, width=inner // heads, owner=path,
        gates=(Slice(join(path, "to_out.0"), "in"),),
        producers=tuple(Slice(join(path, n), "out", role=r) for n, r in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"))),
        counters=((path, "heads"),) + (((n_heads_of, "n_heads"),) if n_heads_of is not None else ()),
        empty=EmptyAttention, block=_block(path),
    )


def feedforward_group(ff: nn.Module, path: str) -> UnitGroup:
    """GEGLU (``net.0.proj`` value and gate halves) or GELU (``net.0.0``) feed-forward."""
    first = ff.net[0]
    down = ff.net[2]
    inner = down.in_features
    if has_class(first, "GEGLU"):
        producers = (Slice(join(path, "net.0.proj"), "out", 0), Slice(join(path, "net.0.proj"), "out", inner))
    elif isinstance(first, nn.Sequential) and isinstance(first[0], nn.Linear):
        producers = (Slice(join(path, "net.0.0"), "out"),)
    else:
        raise EcoDiffError(f"feed-forward '{path}' has an unknown first layer {type(first).__name__}")
    return UnitGroup(
        name=f"{path}:neurons", kind="neuron", count=inner, width=1, owner=path,
        gates=(Slice(join(path, "net.2"), "in"),), producers=producers, block=_block(path),
    )


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _transformer_block(model: nn.Module, path: str) -> str | None:
    """The path of the ``BasicTransformerBlock`` whose ``n_heads`` describes the attention at ``path``
    (its attn1), or None."""
    if not path.endswith(".attn1"):
        return None
    parent = model.get_submodule(_parent(path))
    return _parent(path) if has_class(parent, "BasicTransformerBlock") and hasattr(parent, "n_heads") else None


def unit_groups(model: nn.Module) -> list[UnitGroup]:
    groups: list[UnitGroup] = []
    for path, module in model.named_modules():
        if has_class(module, "CrossAttention") and all(hasattr(module, n) for n in ("to_q", "to_k", "to_v", "to_out")):
            groups.append(attention_group(module, path, _transformer_block(model, path)))
        elif has_class(module, "FeedForward") and hasattr(module, "net"):
            groups.append(feedforward_group(module, path))
    return groups
