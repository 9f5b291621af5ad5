"""diffusers ``UNet2DConditionModel`` (SD1.x, SD2.x, SDXL): attention heads and FFN neurons."""
from __future__ import annotations

from torch import nn

from ..units import UnitGroup
from .diffusers_blocks import attention_group, feedforward_group
from .shared import block_label, has_class

ARCH_ID = "diffusers_unet"
DESCRIPTION = "diffusers UNet2DConditionModel (SD1.x, SD2.x, SDXL)"
# Activation checkpointing inside the recomputed learning step wraps ResNet blocks and the transformer
# blocks inside each Transformer2DModel (outermost modules of these classes; see ecodiff_core.block_checkpoint).
CHECKPOINT_BLOCKS: tuple[str, ...] = ("ResnetBlock2D", "BasicTransformerBlock")


def matches(model: nn.Module) -> bool:
    return has_class(model, "UNet2DConditionModel") and all(
        hasattr(model, a) for a in ("down_blocks", "up_blocks", "conv_in"))


def _block(path: str) -> str:
    return block_label(path, 2 if path.startswith(("down_blocks.", "up_blocks.")) else 1)


def unit_groups(model: nn.Module) -> list[UnitGroup]:
    groups: list[UnitGroup] = []
    for path, module in model.named_modules():
        if has_class(module, "Attention"):
            group = attention_group(module, path, _block(path))
        elif has_class(module, "FeedForward"):
            group = feedforward_group(module, path, _block(path))
        else:
            continue
        if group is not None:
            groups.append(group)
    return groups
