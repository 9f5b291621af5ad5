"""Registry of architecture tables: find the unit groups of any supported model.

A table is a module with ``ARCH_ID: str``, ``matches(model) -> bool`` and
``unit_groups(model) -> list[UnitGroup]`` (optionally ``DESCRIPTION: str``).  Tables match by class
name and structure, never by importing the model library.  To add one, append it to ``TABLES``;
the first table whose ``matches`` is true wins.
"""
from __future__ import annotations

import itertools
from types import ModuleType

from torch import nn

from ..errors import EcoDiffError, UnsupportedArchitectureError
from ..units import Layout, get_linear
from . import comfy_flux, comfy_mmdit, comfy_unet, diffusers_flux, diffusers_sd3, diffusers_unet

TABLES: list[ModuleType] = [
    diffusers_unet,
    diffusers_flux,
    diffusers_sd3,
    comfy_unet,
    comfy_flux,
    comfy_mmdit,
]


def supported_architectures() -> list[str]:
    return [getattr(t, "DESCRIPTION", t.ARCH_ID) + f" [{t.ARCH_ID}]" for t in TABLES]


def _table_for(arch_id: str) -> ModuleType:
    for table in TABLES:
        if table.ARCH_ID == arch_id:
            return table
    raise EcoDiffError(f"unknown architecture id '{arch_id}'; known: {[t.ARCH_ID for t in TABLES]}")


def find_layout(model: nn.Module) -> Layout:
    """The unit groups of ``model`` from the first matching table; validated against its weights."""
    for table in TABLES:
        if table.matches(model):
            layout = Layout(arch=table.ARCH_ID, groups=tuple(table.unit_groups(model)))
            if not layout.groups:
                raise EcoDiffError(f"architecture '{table.ARCH_ID}' matched {type(model).__name__} "
                                   "but found no prunable units in it")
            validate_layout(model, layout)
            return layout
    listing = "\n  - ".join(supported_architectures())
    raise UnsupportedArchitectureError(
        f"EcoDiff does not know how to prune a {type(model).__module__}.{type(model).__name__}. "
        f"Supported architectures:\n  - {listing}\n"
        "Pass the denoiser itself (UNet / transformer), not a pipeline or wrapper.")


def validate_layout(model: nn.Module, layout: Layout) -> None:
    """Check that every slice fits its Linear and that no feature is claimed twice."""
    claimed: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    out_kinds: dict[str, set[str]] = {}
    for g in layout.groups:
        if g.count < 1 or g.width < 1 or not g.gates:
            raise EcoDiffError(f"group '{g.name}' needs count ≥ 1, width ≥ 1 and a gate site "
                               f"(got count={g.count}, width={g.width}, {len(g.gates)} gates)")
        if not 0 <= g.min_keep <= g.count or (g.min_keep and g.empty is not None):
            raise EcoDiffError(f"group '{g.name}': min_keep={g.min_keep} must lie in [0, {g.count}] and is "
                               "only for owners without an 'empty' replacement")
        for role, slices in (("gate", g.gates), ("producer", g.producers)):
            for s in slices:
                lin = get_linear(model, s.module)
                size = lin.in_features if s.side == "in" else lin.out_features
                end = s.offset + g.count * g.width
                if s.offset < 0 or end > size:
                    raise EcoDiffError(f"group '{g.name}': slice [{s.offset}, {end}) of '{s.module}' "
                                       f"({s.side} side) exceeds its {size} features")
                claimed.setdefault((s.module, s.side), []).append((s.offset, end, g.name))
                if s.side == "out":
                    out_kinds.setdefault(s.module, set()).add(role)
    for (module, side), spans in claimed.items():
        spans.sort()
        for (_a0, a1, an), (b0, b1, bn) in itertools.pairwise(spans):
            if b0 < a1:
                raise EcoDiffError(f"'{module}' {side} features [{b0}, {min(a1, b1)}) are claimed by "
                                   f"both '{an}' and '{bn}'")
    for module, roles in out_kinds.items():
        if len(roles) > 1:
            raise EcoDiffError(f"'{module}' has output rows that are gated by one group and produced for "
                               "another; a Linear's outputs are either scattered or shrunk, not both")


def checkpoint_block_paths(model: nn.Module, arch_id: str) -> list[str]:
    """Module paths of ``model`` that block checkpointing wraps, from the table's ``CHECKPOINT_BLOCKS``
    (class names); an empty list for a table that names none."""
    from ..block_checkpoint import blocks_of_classes

    return blocks_of_classes(model, getattr(_table_for(arch_id), "CHECKPOINT_BLOCKS", ()))
