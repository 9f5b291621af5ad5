"""What ComfyUI's joint-attention blocks need beyond counters: never zero heads.

FLUX double/single blocks and MMDiT joint blocks compute attention inline (``qkv.view(…, heads,
-1)``, ``split_qkv``), which cannot run with zero heads, and the attention is not a separate module
that an ``empty`` factory could replace.  So when a plan removes every head of such a group, one
head (the highest logit) stays physically and its out-projection columns are zeroed: the block then
adds exactly what the hard-gated model adds (no attention output), at the cost of one head.
"""
from __future__ import annotations

import torch
from torch import nn

from ..units import Layout, UnitGroup, get_linear

COMFY_ARCHS: tuple[str, ...] = ("comfy_unet", "comfy_flux", "comfy_mmdit")


def needs_one_unit(group: UnitGroup) -> bool:
    """Head groups without an ``empty`` replacement cannot run with zero units."""
    return group.kind == "head" and group.empty is None


def keep_one_head(layout: Layout, keep: dict[str, torch.Tensor],
                  logits: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep masks where every emptied inline-attention group keeps its best head; returns the
    adjusted masks and the names of the groups whose kept head must be silenced after slicing."""
    out = {name: k.clone() for name, k in keep.items()}
    silenced = []
    for g in layout.groups:
        if needs_one_unit(g) and not bool(out[g.name].any()):
            out[g.name][int(torch.as_tensor(logits[g.name]).argmax())] = True
            silenced.append(g.name)
    return out, silenced


@torch.no_grad()
def silence_heads(pruned: nn.Module, layout: Layout, silenced: list[str]) -> None:
    """Zero the gate-side columns of the single head left in each silenced group of ``pruned``."""
    groups = layout.by_name()
    for name in silenced:
        g = groups[name]
        for site in g.gates:
            lin = get_linear(pruned, site.module)
            lin.weight[:, site.offset:site.offset + g.width] = 0


PROTECTED_LOGIT = 1e9


def protect_one_head(layout: Layout, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logits where the best head of each inline-attention group ranks above everything, so a
    budget planner never empties such a group and meets its target with other units instead."""
    out = {name: torch.as_tensor(t).detach().clone().float() for name, t in logits.items()}
    for g in layout.groups:
        if needs_one_unit(g) and g.name in out:
            out[g.name][int(out[g.name].argmax())] = PROTECTED_LOGIT
    return out
