"""Binarise learned logits into keep masks that hit a parameter or FLOP budget.

One global ranking of all units (lowest score = least important = removed first), across heads,
neurons and channels alike; units are removed in that order until the removed cost reaches the
budget, so the result overshoots the target by less than the cost of one unit.  With the mask's
learning settings, the score of a unit is its logit's displacement from the initial logit λ₀ in
units of its kind's learning rate, (λ − λ₀) / lr_kind (:func:`ranking_scores`): AdamW moves a logit
by at most about one learning rate per step, so this counts the steps' worth of consistent push
towards closing, the same scale for every kind; a kind learned at a 5× higher rate no longer
dominates the removals merely because its logits moved 5× further.  Without settings (baseline
scores, bare logits) the values are ranked as given.  The
``min_keep`` best units of each group are never removed (they are not counted as prunable), so
every plan that is accepted is delivered by ``prune_model`` as planned.

With an alignment (``PruneTarget.align``, e.g. 8 on CUDA) every group keeps a feature width that is
a multiple of it, so pruned GEMMs stay on tensor-core-friendly shapes: units are removed in aligned
chunks of a group (its lowest-logit units first), ranked globally by their mean logit, and the
budget overshoots by less than the cost of one chunk.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import EcoDiffError, SettingsError
from .flops import FlopCosts
from .prune import emptied_groups
from .units import UNIT_KINDS, Layout, UnitGroup, parameter_costs

if TYPE_CHECKING:
    from .learn_settings import LearnSettings

MAX_FRACTION = 0.95
MIN_KEEP_RATIO = 0.05
MAX_ALIGN = 256
log = logging.getLogger("ecodiff")


class _Default(float):
    """The default ``params`` target; dropped silently when ``flops`` or ``keep_ratios`` is given."""


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SettingsError(f"PruneTarget.{name} must be a number, got {value!r}")
    if not 0.0 <= value <= MAX_FRACTION:
        hint = f" (fractions, not percent: did you mean {value / 100:g}?)" if 1 < value <= 95 else ""
        what = "parameters" if name == "params" else "FLOPs"
        raise SettingsError(f"the {name} target is the fraction of {what} to remove and must lie in "
                            f"[0, {MAX_FRACTION}], got {value!r}{hint}")
    return float(value)


@dataclass
class PruneTarget:
    """What to remove: a fraction of all parameters, a fraction of all FLOPs, or a keep ratio per
    unit kind (e.g. ``{"head": 0.7, "neuron": 0.9}``).  Exactly one is set.

    ``align`` (features, ≥ 1; 1 = off) keeps the kept feature width of every unit group at a
    multiple of ``align``: kept neurons and modulation channels (width 1) at multiples of ``align``,
    kept heads at a count whose ``heads × head_dim`` is a multiple (any count when ``head_dim`` is
    already one).  A group may also stay whole, or be emptied when nothing in it must stay.  The
    engine default is 1 (CPU gains nothing); hosts pass 8 on CUDA so pruned GEMMs stay on
    tensor-core paths.  Budgets are then met to within one aligned chunk of units."""

    params: float | None = _Default(0.2)
    flops: float | None = None
    keep_ratios: dict[str, float] | None = None
    align: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.params, _Default) and (self.flops is not None or self.keep_ratios is not None):
            self.params = None
        chosen = [n for n in ("params", "flops", "keep_ratios") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise SettingsError("PruneTarget needs exactly one of params, flops or keep_ratios; got "
                                f"{chosen or 'none'}")
        if self.params is not None:
            self.params = _check_fraction("params", self.params)
        if self.flops is not None:
            self.flops = _check_fraction("flops", self.flops)
        if self.keep_ratios is not None:
            self.keep_ratios = _check_ratios(self.keep_ratios)
        if isinstance(self.align, bool) or not isinstance(self.align, int) or not 1 <= self.align <= MAX_ALIGN:
            raise EcoDiffError(f"PruneTarget.align is the multiple of features every pruned module keeps "
                               f"(1 = off, 8 for CUDA tensor cores) and must be an integer in [1, {MAX_ALIGN}], "
                               f"got {self.align!r}")

    @property
    def mode(self) -> str:
        return "params" if self.params is not None else "flops" if self.flops is not None else "keep_ratios"


def align_for_device(device: torch.device | str | None) -> int:
    """The feature multiple pruned modules should keep when they run on ``device`` (what an
    ``align`` of "auto" means): 8 on CUDA, where GEMMs whose sizes are multiples of 8 stay on
    tensor-core paths; 1 (no alignment) elsewhere and when the device is unknown."""
    return 8 if device is not None and torch.device(device).type == "cuda" else 1


def resolve_align(align: int | str, device: torch.device | str | None) -> int:
    """``PruneTarget.align`` for a user's choice: "auto" (``align_for_device``), "off" (1), or a
    feature multiple as an integer or its digits.  SettingsError for anything else (the range is
    checked by ``PruneTarget``)."""
    if align == "auto":
        return align_for_device(device)
    if align == "off":
        return 1
    if isinstance(align, str) and align.isdigit():
        return int(align)
    if isinstance(align, int) and not isinstance(align, bool):
        return align
    raise SettingsError(f"align is the multiple of features every pruned module keeps: \"auto\" (8 on CUDA, "
                        f"off elsewhere), \"off\" or an integer such as 8, got {align!r}")


def parse_keep_ratios(text: str) -> dict[str, float]:
    """'head=0.8, neuron=0.7' (or ';'-separated) → {'head': 0.8, 'neuron': 0.7}; the kinds and
    ratios are checked by :class:`PruneTarget`.  Raises EcoDiffError on malformed text or a kind
    given twice."""
    out: dict[str, float] = {}
    for part in text.replace(";", ",").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise SettingsError(f"keep_ratios entry '{part.strip()}' must look like kind=ratio, e.g. head=0.8")
        kind, value = (s.strip() for s in part.split("=", 1))
        if kind in out:
            raise SettingsError(f"keep_ratios gives '{kind}' twice ({kind}={out[kind]!r} and {kind}={value}); "
                                "give each unit kind once")
        try:
            out[kind] = float(value)
        except ValueError as exc:
            raise SettingsError(f"keep_ratios: '{value}' is not a number (entry '{part.strip()}')") from exc
    if not out:
        raise SettingsError("keep_ratios is empty; write e.g. head=0.8, neuron=0.7, channel=0.9")
    return out


def _check_ratios(ratios: object) -> dict[str, float]:
    if not isinstance(ratios, dict) or not ratios:
        raise SettingsError(f"PruneTarget.keep_ratios must be a non-empty dict kind → ratio, got {ratios!r}")
    out = {}
    for kind, r in ratios.items():
        if kind not in UNIT_KINDS:
            raise SettingsError(f"PruneTarget.keep_ratios has unknown unit kind '{kind}'; use {list(UNIT_KINDS)}")
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not MIN_KEEP_RATIO <= r <= 1.0:
            raise SettingsError(f"PruneTarget.keep_ratios['{kind}'] is the fraction of {kind}s to KEEP and "
                                f"must lie in [{MIN_KEEP_RATIO}, 1], got {r!r}")
        out[kind] = float(r)
    return out


@dataclass
class PrunePlan:
    """Keep masks plus what they cost; ``emptied_owners`` lists modules left with zero units."""

    keep: dict[str, torch.Tensor]
    removed_params: int
    budget: float | None
    mode: str
    total_params: int
    removed_flops: float | None = None
    total_flops: float | None = None
    emptied_owners: list[str] = field(default_factory=list)
    # keep_ratios kinds the architecture does not have (ignored; see ``select_by_ratios``)
    ignored_kinds: list[str] = field(default_factory=list)
    # where the plan keeps more than asked (keep ratios below the units that must stay), in words
    notes: list[str] = field(default_factory=list)
    align: int = 1  # kept features per group are multiples of this (PruneTarget.align)

    @property
    def removed_fraction(self) -> float:
        if self.mode == "flops" and self.total_flops:
            return (self.removed_flops or 0.0) / self.total_flops
        return self.removed_params / self.total_params if self.total_params else 0.0


def check_logits(layout: Layout, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate one logit vector per group; returns them as float64 on CPU."""
    groups = layout.by_name()
    missing, unknown = sorted(set(groups) - set(logits)), sorted(set(logits) - set(groups))
    if missing or unknown:
        raise EcoDiffError(f"logits do not match the layout '{layout.arch}': missing {missing[:5]}, "
                           f"unknown {unknown[:5]}; was the mask learned on another model?")
    out = {}
    for name, g in groups.items():
        t = torch.as_tensor(logits[name]).detach()
        if t.shape != (g.count,):
            raise EcoDiffError(f"logits['{name}'] has shape {tuple(t.shape)}, expected ({g.count},)")
        t = t.to("cpu", torch.float64)
        if not torch.isfinite(t).all():
            raise EcoDiffError(f"logits['{name}'] contains NaN or infinite values")
        out[name] = t
    return out


def _flatten(layout: Layout, logits: dict[str, torch.Tensor], kind: str | None = None):
    groups = [g for g in layout.groups if kind is None or g.kind == kind]
    values = torch.cat([logits[g.name] for g in groups]) if groups else torch.zeros(0, dtype=torch.float64)
    return groups, values


def _split(groups, removed_flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-group keep masks from one flat 'removed' vector over ``groups`` in order."""
    keep, start = {}, 0
    for g in groups:
        keep[g.name] = ~removed_flat[start:start + g.count]
        start += g.count
    return keep


def protected_units(groups: Sequence[UnitGroup], logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """Flat mask over ``groups`` in order: the ``min_keep`` highest-logit units of each group
    (ties: lowest index), which no planner removes."""
    parts = []
    for g in groups:
        p = torch.zeros(g.count, dtype=torch.bool)
        if g.min_keep:
            p[torch.sort(logits[g.name], descending=True, stable=True).indices[:g.min_keep]] = True
        parts.append(p)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def _removal_order(groups: Sequence[UnitGroup], values: torch.Tensor,
                   logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """Flat indices of the removable units, lowest logit first (stable)."""
    order = torch.sort(values, stable=True).indices
    return order[~protected_units(groups, logits)[order]]


def unit_step(group: UnitGroup, align: int) -> int:
    """Units per aligned chunk of ``group``: the fewest units whose features (units × width) are a
    multiple of ``align`` (1 for heads whose head_dim is already a multiple)."""
    return align // math.gcd(align, group.width)


def aligned_floor(group: UnitGroup, align: int) -> int:
    """The fewest units ``group`` may keep under ``align``: the smallest multiple of its
    :func:`unit_step` that is ≥ ``min_keep`` (0 when nothing must stay), or all of them."""
    step = unit_step(group, align)
    lowest = -(-group.min_keep // step) * step
    return lowest if lowest <= group.count else group.count


def aligned_removable(group: UnitGroup, align: int = 1) -> int:
    """How many units a planner may remove from ``group`` under ``align`` (``removable`` at 1)."""
    return group.count - aligned_floor(group, align)


def _aligned_chunks(groups: Sequence[UnitGroup], logits: dict[str, torch.Tensor], align: int):
    """Per group: its removable units in removal order (lowest logit first, stable) and the cuts
    between aligned chunks; over all groups, each chunk's (group index, start, stop, score), the
    score being the chunk's mean logit made non-decreasing within the group."""
    protected = protected_units(groups, logits)
    orders, rows, offset = [], [], 0
    for index, g in enumerate(groups):
        lam = logits[g.name]
        order = torch.sort(lam, stable=True).indices
        order = order[~protected[offset:offset + g.count][order]]
        offset += g.count
        orders.append(order)
        step, floor = unit_step(g, align), aligned_floor(g, align)
        if floor >= g.count:
            continue
        kept = [g.count] + list(range((g.count - 1) // step * step, floor - 1, -step))
        cuts = torch.tensor([g.count - k for k in kept])
        sums = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(lam[order], 0)])
        scores = torch.cummax((sums[cuts[1:]] - sums[cuts[:-1]]) / (cuts[1:] - cuts[:-1]), 0).values
        spans = zip(cuts[:-1].tolist(), cuts[1:].tolist(), scores.tolist(), strict=True)
        rows += [(index, a, b, sc) for a, b, sc in spans]
    return orders, rows


def _remove_aligned(groups: Sequence[UnitGroup], logits: dict[str, torch.Tensor], unit_cost: Sequence[float],
                    budget: float, align: int, exceed: str) -> dict[str, torch.Tensor]:
    """Remove aligned chunks, lowest mean logit first (stable; one group's chunks in order), until
    the removed cost ≥ ``budget``; ``exceed`` = "raise" or "clip" when the chunks hold less."""
    orders, rows = _aligned_chunks(groups, logits, align)
    cost = torch.tensor([unit_cost[gi] * (b - a) for gi, a, b, _ in rows], dtype=torch.float64)
    available = float(cost.sum())
    if budget > available * (1 + 1e-12):
        if exceed == "raise":
            raise EcoDiffError(f"budget {budget:,.0f} exceeds the {available:,.0f} held by all removable units "
                               f"aligned to {align} (units that must stay, min_keep, are not removable)")
        budget = available
    removed_count = [0] * len(groups)
    if budget > 0 and rows:
        order = torch.sort(torch.tensor([r[3] for r in rows], dtype=torch.float64), stable=True).indices
        cum = torch.cumsum(cost[order], 0)
        n = int(torch.searchsorted(cum, torch.tensor([budget], dtype=torch.float64) * (1 - 1e-12))) + 1
        for chunk in order[:min(n, order.numel())].tolist():
            gi, _, stop, _ = rows[chunk]
            removed_count[gi] = max(removed_count[gi], stop)
    keep = {}
    for g, units, count in zip(groups, orders, removed_count, strict=True):
        mask = torch.ones(g.count, dtype=torch.bool)
        mask[units[:count]] = False
        keep[g.name] = mask
    return keep


def select_units(layout: Layout, logits: dict[str, torch.Tensor], costs: dict[str, float],
                 budget: float, align: int = 1) -> dict[str, torch.Tensor]:
    """Remove the lowest-logit units (one global ranking, stable) until removed cost ≥ ``budget``;
    the ``min_keep`` best units of each group are never removed.  With ``align`` > 1, units go in
    aligned chunks (see :class:`PruneTarget`) and the cost overshoots by less than one chunk."""
    logits = check_logits(layout, logits)
    groups, values = _flatten(layout, logits)
    missing = [g.name for g in groups if g.name not in costs]
    if missing:
        raise EcoDiffError(f"no unit cost for {len(missing)} group(s), e.g. '{missing[0]}'; compute costs "
                           "for this very layout (units.parameter_costs or flops.measure_flops)")
    if any(float(costs[g.name]) < 0 for g in groups):
        raise EcoDiffError("unit costs must be non-negative")
    if align > 1:
        return _remove_aligned(groups, logits, [float(costs[g.name]) for g in groups], budget, align, "raise")
    unit_cost = torch.cat([torch.full((g.count,), float(costs[g.name]), dtype=torch.float64) for g in groups])
    order = _removal_order(groups, values, logits)
    available = float(unit_cost[order].sum())
    if budget > available * (1 + 1e-12):
        raise EcoDiffError(f"budget {budget:,.0f} exceeds the {available:,.0f} held by all removable units "
                           "(units that must stay, min_keep, are not removable)")
    removed = torch.zeros(values.numel(), dtype=torch.bool)
    if budget > 0:
        cum = torch.cumsum(unit_cost[order], 0)
        n = int(torch.searchsorted(cum, torch.tensor([budget], dtype=torch.float64) * (1 - 1e-12))) + 1
        removed[order[:min(n, order.numel())]] = True
    return _split(groups, removed)


def ignored_ratio_kinds(layout: Layout, keep_ratios: dict[str, float]) -> list[str]:
    """The kinds of ``keep_ratios`` that ``layout`` has no units of (e.g. 'channel' on a UNet): they
    are ignored, so one setting fits every architecture.  Raises EcoDiffError when no kind is left."""
    absent = [kind for kind in keep_ratios if kind not in layout.kinds()]
    if len(absent) == len(keep_ratios):
        raise EcoDiffError(f"keep_ratios names only {absent}, but '{layout.arch}' has only {layout.kinds()} "
                           "units; give a ratio for at least one of those")
    return absent


def min_keep_ratio(kind_units: int, must_stay: int, decimals: int = 3) -> float:
    """The smallest keep ratio with ``decimals`` decimals that keeps at least ``must_stay`` of
    ``kind_units`` units as ``select_by_ratios`` counts them (``round(ratio × N) ≥ must_stay``), so a
    ratio of exactly this value is delivered and 10**-decimals less is not; never below MIN_KEEP_RATIO."""
    if kind_units <= 0:
        return 1.0
    step = 10 ** decimals
    value = max(math.floor((must_stay - 0.5) / kind_units * step) / step, 0.0)
    while value < 1 and round(value * kind_units) < must_stay:
        value = round(value + 1 / step, decimals)
    return min(max(value, MIN_KEEP_RATIO), 1.0)


def select_by_ratios(layout: Layout, logits: dict[str, torch.Tensor],
                     keep_ratios: dict[str, float], align: int = 1) -> dict[str, torch.Tensor]:
    """Keep the top ``round(ratio × N)`` units of each kind, ranked globally within the kind.  Kinds
    the layout does not have are ignored (see :func:`ignored_ratio_kinds`).  The ``min_keep`` best
    units of each group always stay, so a ratio below what they hold keeps them and no more (
    :func:`ratio_shortfalls` says so in words).  With ``align`` > 1 units go in aligned chunks (see
    :class:`PruneTarget`): at most one chunk fewer units are kept.  Raises EcoDiffError for bad ratios."""
    logits = check_logits(layout, logits)
    keep_ratios = _check_ratios(keep_ratios)
    ignored_ratio_kinds(layout, keep_ratios)
    keep = {g.name: torch.ones(g.count, dtype=torch.bool) for g in layout.groups}
    for kind, ratio in keep_ratios.items():
        if kind not in layout.kinds():
            continue
        groups, values = _flatten(layout, logits, kind)
        n_remove = values.numel() - round(ratio * values.numel())
        if align > 1:
            keep.update(_remove_aligned(groups, logits, [1.0] * len(groups), n_remove, align, "clip"))
            continue
        order = _removal_order(groups, values, logits)
        removed = torch.zeros(values.numel(), dtype=torch.bool)
        removed[order[:min(n_remove, order.numel())]] = True
        keep.update(_split(groups, removed))
    return keep


def ratio_shortfalls(layout: Layout, keep_ratios: dict[str, float], align: int = 1) -> list[str]:
    """One sentence per kind whose keep ratio asks for fewer units than its groups' ``min_keep``
    units (e.g. the last head of FLUX/MMDiT joint attentions) or, with ``align`` > 1, than the
    fewest aligned units they may keep: what is kept instead, why, and the smallest ratio that
    keeps no more."""
    notes = []
    for kind, ratio in _check_ratios(keep_ratios).items():
        groups = [g for g in layout.groups if g.kind == kind]
        total, must_stay = sum(g.count for g in groups), sum(aligned_floor(g, align) for g in groups)
        asked = round(ratio * total)
        if asked < must_stay:
            why = (f"{sum(1 for g in groups if g.min_keep)} blocks cannot run without their last {kind}s"
                   if align == 1 else f"with kept features aligned to {align}, each group keeps a multiple of "
                   f"{kind}s that covers the {kind}s it must keep")
            notes.append(f"keep_ratios {kind}={ratio!r} keeps {must_stay} of the {total} {kind}s of '{layout.arch}', "
                         f"not {asked}: {why} (the smallest {kind} ratio kept exactly is "
                         f"{min_keep_ratio(total, must_stay)})")
    return notes


def ranking_scores(layout: Layout, logits: dict[str, torch.Tensor],
                   settings: LearnSettings | None = None) -> dict[str, torch.Tensor]:
    """The values the planners rank (one per unit, shape ``(count,)`` per group).

    ``settings`` is the mask's recorded ``LearnSettings`` (``MaskState.settings``): score =
    (λ − λ₀) / lr[kind] with its per-kind learning rates and ``gate.init_logit`` λ₀; the order inside
    each kind (and so inside each group) is the logits' own.  Without settings (baseline scores), or
    when a kind has no recorded rate, the logits are returned unchanged.  Raises EcoDiffError for bad
    logits or a learning rate ≤ 0."""
    logits = check_logits(layout, logits)
    if settings is None:
        return logits
    init, out = float(settings.gate.init_logit), {}
    for g in layout.groups:
        rate = settings.lr.get(g.kind)
        if rate is None:
            return logits  # a mask recorded without this kind's rate: rank the logits as they are
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise EcoDiffError(f"the mask's learning rate for {g.kind} must be > 0, got {rate!r}")
        out[g.name] = (logits[g.name] - init) / float(rate)
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def plan_pruning(model: nn.Module, layout: Layout, logits: dict[str, torch.Tensor], target: PruneTarget,
                 flop_costs: FlopCosts | None = None, settings: LearnSettings | None = None) -> PrunePlan:
    """Keep masks for ``target``: budget = fraction × the model's total parameters (or FLOPs).
    ``settings`` (the mask's ``MaskState.settings``) puts every kind on one scale before the global
    ranking (see :func:`ranking_scores`)."""
    logits = ranking_scores(layout, logits, settings)
    costs = parameter_costs(model, layout)
    total = count_parameters(model)
    budget: float | None = None
    ignored: list[str] = []
    notes: list[str] = []
    if target.mode == "keep_ratios":
        keep = select_by_ratios(layout, logits, target.keep_ratios, target.align)
        ignored = ignored_ratio_kinds(layout, target.keep_ratios)
        if ignored:
            log.info("EcoDiff keep_ratios: ignored %s ('%s' has no such units; it has %s)",
                     ", ".join(ignored), layout.arch, ", ".join(layout.kinds()))
        notes = ratio_shortfalls(layout, target.keep_ratios, target.align)
        for note in notes:
            log.warning("EcoDiff %s", note)
    elif target.mode == "params":
        budget = target.params * total
        _check_reachable("parameters", budget, total, _prunable(layout, costs, target.align), layout, target.align)
        keep = select_units(layout, logits, costs, budget, target.align)
    else:
        if flop_costs is None:
            raise EcoDiffError("a FLOP target needs flop_costs: measure them with "
                               "ecodiff_core.flops.measure_flops(model, layout, run) first")
        budget = target.flops * flop_costs.total
        _check_reachable("FLOPs", budget, flop_costs.total, _prunable(layout, flop_costs.per_unit, target.align),
                         layout, target.align)
        keep = select_units(layout, logits, flop_costs.per_unit, budget, target.align)
    removed_params = sum(costs[g.name] * int((~keep[g.name]).sum()) for g in layout.groups)
    removed_flops = None
    if flop_costs is not None:
        removed_flops = sum(flop_costs.per_unit[g.name] * int((~keep[g.name]).sum()) for g in layout.groups)
    return PrunePlan(keep=keep, removed_params=removed_params, budget=budget, mode=target.mode,
                     total_params=total, removed_flops=removed_flops,
                     total_flops=None if flop_costs is None else flop_costs.total,
                     emptied_owners=[g.owner for g in emptied_groups(layout, keep)], ignored_kinds=ignored,
                     notes=notes, align=target.align)


def _prunable(layout: Layout, unit_costs: dict[str, float], align: int) -> float:
    """Cost a planner may remove: every group's removable units under ``align`` at their unit cost."""
    return sum(unit_costs[g.name] * aligned_removable(g, align) for g in layout.groups)


def max_fraction(prunable: float, total: float, decimals: int = 3) -> float:
    """The highest fraction with ``decimals`` decimals whose budget (fraction × ``total``) fits in
    ``prunable``: rounded down, so a target of exactly this value is accepted."""
    if total <= 0:
        return 0.0
    step = 10 ** decimals
    value = math.floor(prunable / total * step) / step
    while value > 0 and value * total > prunable:  # float rounding at the boundary
        value = round(value - 1 / step, decimals)
    return min(max(value, 0.0), MAX_FRACTION)


def _check_reachable(what: str, budget: float, total: float, prunable: float, layout: Layout,
                     align: int = 1) -> None:
    if budget > prunable:
        aligned = f", nor units that alignment to {align} features keeps" if align > 1 else ""
        raise EcoDiffError(
            f"the target removes {budget:,.0f} {what} ({budget / total:.1%} of {total:,.0f}), but the "
            f"removable units of '{layout.arch}' hold only {prunable:,.0f} ({prunable / total:.1%}; units "
            f"that must stay are not counted{aligned}); lower the target to at most "
            f"{max_fraction(prunable, total)}")
