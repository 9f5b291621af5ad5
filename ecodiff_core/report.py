"""What pruning removed: parameters in total, per unit kind, per block, per group; emptied modules.

Kept unit counts come from one place, ``prune.physical_keep``: the units the pruned model holds
(silenced units that must stay physically are counted as kept, as the model's shapes show them).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .prune import check_keep, physical_keep
from .units import Layout, parameter_costs


@dataclass
class KindStats:
    kind: str
    units_before: int
    units_after: int
    params_before: int  # parameters held by the units (unit cost × count)
    params_after: int


@dataclass
class BlockStats:
    block: str
    params_before: int  # all parameters under the block's module path, counted in each model
    params_after: int
    units_before: int
    units_after: int


@dataclass
class GroupStats:
    name: str
    kind: str
    block: str
    units_before: int
    units_after: int  # units physically in the pruned model (silenced ones included)


@dataclass
class PruneReport:
    arch: str
    params_before: int
    params_after: int
    kinds: list[KindStats]
    blocks: list[BlockStats]
    emptied: list[str] = field(default_factory=list)  # group names left with zero units
    silenced: list[str] = field(default_factory=list)  # gate closed, min_keep units stay with zero output
    groups: list[GroupStats] = field(default_factory=list)
    flops_before: float | None = None
    flops_after: float | None = None

    @classmethod
    def build(cls, original: nn.Module, pruned: nn.Module, layout: Layout, keep: dict[str, torch.Tensor],
              flops_before: float | None = None, flops_after: float | None = None) -> PruneReport:
        keep, silenced = physical_keep(layout, check_keep(layout, keep))
        costs = parameter_costs(original, layout)
        kinds = []
        for kind in layout.kinds():
            groups = [g for g in layout.groups if g.kind == kind]
            kept = {g.name: int(keep[g.name].sum()) for g in groups}
            kinds.append(KindStats(kind, sum(g.count for g in groups), sum(kept.values()),
                                   sum(costs[g.name] * g.count for g in groups),
                                   sum(costs[g.name] * kept[g.name] for g in groups)))
        before, after = _params_by_prefix(original), _params_by_prefix(pruned)
        blocks = []
        for block in dict.fromkeys(g.block for g in layout.groups):
            groups = [g for g in layout.groups if g.block == block]
            blocks.append(BlockStats(block, _under(before, block), _under(after, block),
                                     sum(g.count for g in groups), sum(int(keep[g.name].sum()) for g in groups)))
        return cls(arch=layout.arch, params_before=sum(before.values()), params_after=sum(after.values()),
                   kinds=kinds, blocks=blocks, emptied=[g.name for g in layout.groups if not keep[g.name].any()],
                   silenced=silenced, flops_before=flops_before, flops_after=flops_after,
                   groups=[GroupStats(g.name, g.kind, g.block, g.count, int(keep[g.name].sum()))
                           for g in layout.groups])

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    @property
    def params_removed_outside_units(self) -> int:
        """Removed parameters not counted in unit costs: per-head q/k norm weights and the like,
        dropped when a whole attention module is emptied."""
        return self.params_removed - sum(k.params_before - k.params_after for k in self.kinds)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params_removed"] = self.params_removed
        d["params_removed_outside_units"] = self.params_removed_outside_units
        return d

    def to_text(self) -> str:
        lines = [f"EcoDiff pruning report ({self.arch})",
                 (f"parameters: {self.params_before:,} -> {self.params_after:,} "
                 f"(-{_pct(self.params_removed, self.params_before)})")]
        if self.flops_before is not None and self.flops_after is not None:
            lines.append(f"FLOPs per forward: {self.flops_before:,.0f} -> {self.flops_after:,.0f} "
                         f"(-{_pct(self.flops_before - self.flops_after, self.flops_before)})")
        lines += ["", _table(["kind", "units", "kept", "removed", "unit params", "removed params"],
                             [[k.kind, f"{k.units_before:,}", f"{k.units_after:,}",
                               _pct(k.units_before - k.units_after, k.units_before), f"{k.params_before:,}",
                               f"{k.params_before - k.params_after:,}"] for k in self.kinds])]
        lines += ["", _table(["block", "params", "after", "removed", "units", "kept"],
                             [[b.block, f"{b.params_before:,}", f"{b.params_after:,}",
                               _pct(b.params_before - b.params_after, b.params_before),
                               f"{b.units_before:,}", f"{b.units_after:,}"] for b in self.blocks])]
        if self.emptied:
            lines += ["", (f"{len(self.emptied)} module(s) lost all their units "
                          "(they now contribute their output bias only):")]
            lines += [f"  {name}" for name in self.emptied]
        if self.silenced:
            lines += ["", (f"{len(self.silenced)} module(s) lost all their units but cannot run without "
                          "one; it stays with its output zeroed (counted as kept above):")]
            lines += [f"  {name}" for name in self.silenced]
        return "\n".join(lines)


def _params_by_prefix(model: nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in model.named_parameters()}


def _under(counts: dict[str, int], prefix: str) -> int:
    return sum(n for name, n in counts.items() if name.startswith(prefix + "."))


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f} %" if whole else "n/a"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def fmt(row: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        cells = zip(row, widths, strict=True)
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(cells))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
