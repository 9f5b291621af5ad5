"""The one abstraction: a unit group describes a set of prunable units of one module.

A unit is an attention head, an FFN neuron or a modulation channel.  A group says where its gate
multiplies features (``gates``) and which rows of upstream weights belong to each unit
(``producers``).  Gating, cost accounting and physical slicing are all derived from this description.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .errors import EcoDiffError

UnitKind = Literal["head", "neuron", "channel"]
UNIT_KINDS: tuple[str, ...] = ("head", "neuron", "channel")
Side = Literal["in", "out"]


@dataclass(frozen=True)
class Slice:
    """Unit ``i`` owns features ``offset + i*width … offset + (i+1)*width`` of a Linear.

    ``side="out"`` means output rows (weight rows and bias entries); ``side="in"`` means input
    columns.  ``role`` tags q/k producers so attention-score FLOPs can be counted.
    """

    module: str
    side: Side
    offset: int = 0
    role: str = ""


@dataclass(frozen=True)
class UnitGroup:
    """``count`` units of one ``kind`` in the module at ``owner``.

    gates      where the gate multiplies features during learning; input columns of a consumer
               (out-projection, FFN down-projection) or output rows of a modulation linear.
    producers  weight rows that only feed this group's units and are removed with them.
    counters   (module path, attribute) pairs holding the unit count, e.g. ("…attn1", "heads").
    dims       (module path, attribute) pairs holding count × width, e.g. ("…attn1", "inner_dim").
    empty      builds the replacement of ``owner`` when every unit is removed; None when the
               sliced module already behaves correctly with zero units.
    block      a coarse label for reports (transformer block path).
    min_keep   units that must stay physically because the owner cannot run with fewer (an inline
               joint attention cannot run with zero heads).  Planners never remove the ``min_keep``
               best units; a keep mask that closes more of them is honoured by ``prune_model`` by
               keeping that many units physically with their gate-side weights zeroed ("silenced"),
               which computes exactly what the hard-gated model computes.
    """

    name: str
    kind: UnitKind
    count: int
    width: int
    owner: str
    gates: tuple[Slice, ...]
    producers: tuple[Slice, ...] = ()
    counters: tuple[tuple[str, str], ...] = ()
    dims: tuple[tuple[str, str], ...] = ()
    empty: Callable[[nn.Module], nn.Module] | None = field(default=None, compare=False)
    block: str = ""
    min_keep: int = 0

    @property
    def removable(self) -> int:
        """How many units a planner may remove."""
        return self.count - self.min_keep

    @property
    def slices(self) -> tuple[Slice, ...]:
        return self.gates + self.producers

    def unit_indices(self, slice_: Slice, units: torch.Tensor) -> torch.Tensor:
        """Feature indices along ``slice_`` owned by the given unit indices."""
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1, 1)
        return (slice_.offset + units * self.width + torch.arange(self.width)).reshape(-1)


@dataclass(frozen=True)
class Layout:
    """Every unit group of one model, found by an architecture table."""

    arch: str
    groups: tuple[UnitGroup, ...]

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise EcoDiffError(f"architecture table '{self.arch}' produced duplicate group names; each unit "
                               "group needs its own name (fix the table)")

    def by_name(self) -> dict[str, UnitGroup]:
        return {g.name: g for g in self.groups}

    def kinds(self) -> list[str]:
        return [k for k in UNIT_KINDS if any(g.kind == k for g in self.groups)]

    def total_units(self, kind: str | None = None) -> int:
        return sum(g.count for g in self.groups if kind is None or g.kind == kind)

    def fingerprint(self) -> str:
        """Hash of group names, kinds, counts and widths: two models share masks iff this matches."""
        rows = [[g.name, g.kind, g.count, g.width] for g in self.groups]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def get_linear(model: nn.Module, path: str) -> nn.Linear:
    """The ``nn.Linear`` at ``path`` of ``model``; EcoDiffError when there is none."""
    try:
        module = model.get_submodule(path)
    except AttributeError as exc:
        raise EcoDiffError(f"unit table points at '{path}', which {type(model).__name__} does not have ({exc}); "
                           "the table does not fit this model") from exc
    if not isinstance(module, nn.Linear):
        raise EcoDiffError(f"unit table points at '{path}', a {type(module).__name__}, expected nn.Linear; "
                           "the table does not fit this model")
    return module


def parameter_cost(model: nn.Module, group: UnitGroup) -> int:
    """Parameters removed with one unit of ``group``: weight rows/columns plus bias entries."""
    total = 0
    for s in group.slices:
        lin = get_linear(model, s.module)
        if s.side == "out":
            total += group.width * (lin.in_features + (1 if lin.bias is not None else 0))
        else:
            total += group.width * lin.out_features
    return total


def parameter_costs(model: nn.Module, layout: Layout) -> dict[str, int]:
    return {g.name: parameter_cost(model, g) for g in layout.groups}
