"""Physical pruning: build a new, smaller model from a layout and per-group keep masks.

The input model is never modified and shares no storage with the result.  Instead of deep-copying
the whole model and then slicing (twice the peak memory), the deep copy is given a ``memo`` that
already maps every sliced weight to its sliced copy and every fully pruned owner to its
replacement, so those tensors are never copied at full size.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import EcoDiffError
from .replacements import scatter_rows
from .units import Layout, UnitGroup, get_linear

log = logging.getLogger("ecodiff")


@dataclass
class LinearPlan:
    """Which input columns and output rows of one Linear survive."""

    in_keep: torch.Tensor
    out_keep: torch.Tensor
    scatter: bool = False


def check_keep(layout: Layout, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate ``keep`` (one bool vector of length ``count`` per group) and return it on CPU."""
    groups = layout.by_name()
    missing, unknown = sorted(set(groups) - set(keep)), sorted(set(keep) - set(groups))
    if missing or unknown:
        raise EcoDiffError(f"keep masks do not match the layout '{layout.arch}': missing groups "
                           f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unknown groups "
                           f"{unknown[:5]}{'…' if len(unknown) > 5 else ''}. Use the layout found "
                           "for this very model (archs.find_layout).")
    out = {}
    for name, g in groups.items():
        k = keep[name]
        if not isinstance(k, torch.Tensor) or k.dtype != torch.bool:
            raise EcoDiffError(f"keep['{name}'] must be a torch.bool tensor, got "
                               f"{getattr(k, 'dtype', type(k).__name__)}; threshold logits first")
        if k.shape != (g.count,):
            raise EcoDiffError(f"keep['{name}'] has shape {tuple(k.shape)}, expected ({g.count},)")
        out[name] = k.detach().cpu()
    return out


def emptied_groups(layout: Layout, keep: dict[str, torch.Tensor]) -> list[UnitGroup]:
    """Groups whose gate ``keep`` closes completely (silenced ``min_keep`` groups included)."""
    return [g for g in layout.groups if not bool(keep[g.name].any())]


def physical_keep(layout: Layout, keep: dict[str, torch.Tensor],
                  scores: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The units that stay in the pruned model, and the groups that keep silenced units.

    A group that ``keep`` leaves with fewer than ``min_keep`` units keeps that many physically: its
    removed units with the highest ``scores`` (e.g. logits; without scores, the lowest indices).
    ``prune_model`` zeroes their gate-side weights, so the output equals hard masking with ``keep``.
    Returns (masks of length ``count`` per group, names of the groups holding silenced units).
    This is the one source of the kept counts that reports show.
    """
    out, silenced = {}, []
    for g in layout.groups:
        k = keep[g.name]
        missing = g.min_keep - int(k.sum())
        if missing > 0:
            removed = torch.nonzero(~k).reshape(-1)
            if scores is not None:
                rank = torch.as_tensor(scores[g.name]).detach().cpu().to(torch.float64)[removed]
                removed = removed[torch.sort(rank, descending=True, stable=True).indices]
            k = k.clone()
            k[removed[:missing]] = True
            silenced.append(g.name)
        out[g.name] = k
    return out, silenced


def _under(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def linear_plans(model: nn.Module, layout: Layout, keep: dict[str, torch.Tensor],
                 skip: Sequence[str] = ()) -> dict[str, LinearPlan]:
    """Compose the slices of all groups per Linear (several groups may cut one Linear)."""
    plans: dict[str, LinearPlan] = {}
    for g in layout.groups:
        removed = torch.nonzero(~keep[g.name]).reshape(-1)
        for s in g.slices:
            if _under(s.module, skip):
                continue
            lin = get_linear(model, s.module)
            plan = plans.setdefault(s.module, LinearPlan(torch.ones(lin.in_features, dtype=torch.bool),
                                                         torch.ones(lin.out_features, dtype=torch.bool)))
            mask = plan.in_keep if s.side == "in" else plan.out_keep
            mask[g.unit_indices(s, removed)] = False
            if s.side == "out" and s in g.gates:
                plan.scatter = True
    return plans


def _sliced(lin: nn.Linear, plan: LinearPlan, weight: torch.Tensor,
            bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Copies of the kept rows/columns of ``weight`` / ``bias`` (the values read for ``lin``;
    always new storage; one copy per cut dimension at most)."""
    rows = torch.nonzero(plan.out_keep).reshape(-1).to(weight.device)
    cols = torch.nonzero(plan.in_keep).reshape(-1).to(weight.device)
    source = weight = weight.detach()
    if not plan.out_keep.all():
        weight = weight.index_select(0, rows)
    if not plan.in_keep.all():
        weight = weight.index_select(1, cols)
    if weight.data_ptr() == source.data_ptr():
        weight = weight.clone()
    bias = None if bias is None else bias.detach().index_select(0, rows.to(bias.device))
    return weight, bias, rows


def _check_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """The parameters ``weights`` replaces, by name; EcoDiffError for unknown names or values whose
    shape or dtype differ from the parameter's."""
    params = dict(model.named_parameters())
    for name, value in weights.items():
        p = params.get(name)
        if p is None:
            raise EcoDiffError(f"weights to read name '{name}', which is not a parameter of the model")
        if not isinstance(value, torch.Tensor) or value.shape != p.shape or value.dtype != p.dtype:
            raise EcoDiffError(f"the weight to read for '{name}' must have the parameter's shape "
                               f"{tuple(p.shape)} and dtype {p.dtype}, got "
                               f"{tuple(getattr(value, 'shape', ()))} {getattr(value, 'dtype', type(value).__name__)}")
    return {name: params[name] for name in weights}


def _param(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=like.requires_grad)


@torch.no_grad()
def prune_model(model: nn.Module, layout: Layout, keep: dict[str, torch.Tensor],
                scores: dict[str, torch.Tensor] | None = None,
                weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A new model with the units where ``keep`` is False physically removed.

    ``weights`` (parameter name as in ``model.named_parameters()`` → tensor of that parameter's
    shape and dtype): values to read instead of the module's own for those parameters, sliced or
    not (e.g. the host's compute-time weight functions folded in); the result holds copies of them.
    EcoDiffError for unknown names or a shape/dtype mismatch.

    Groups with zero kept units whose ``empty`` factory is set get their owner replaced (e.g. an
    attention module that returns its out-projection bias).  Groups that must keep ``min_keep``
    units keep them physically with their gate-side weights zeroed (see ``physical_keep``, which
    ``scores`` feeds), so the result always computes what hard masking with ``keep`` computes.
    Unit counters (``heads`` …) and dimensions (``inner_dim`` …) of the copy describe what it holds.
    """
    keep = check_keep(layout, keep)
    weights = dict(weights or {})
    replaced_params = _check_weights(model, weights)
    gate_closed = keep
    keep, silenced = physical_keep(layout, keep, scores)
    replaced = [g for g in emptied_groups(layout, keep) if g.empty is not None]
    skip = [g.owner for g in replaced]
    memo: dict[int, object] = {}
    for g in replaced:
        memo[id(model.get_submodule(g.owner))] = g.empty(model.get_submodule(g.owner))
    for name, p in replaced_params.items():  # unsliced ones; sliced ones are overwritten below
        memo[id(p)] = _param(weights[name].detach().clone(), p)
    plans = linear_plans(model, layout, keep, skip)
    scattered: dict[str, tuple[torch.Tensor, int]] = {}
    for path, plan in plans.items():
        lin = get_linear(model, path)
        weight, bias, rows = _sliced(lin, plan, weights.get(f"{path}.weight", lin.weight),
                                     weights.get(f"{path}.bias", lin.bias) if lin.bias is not None else None)
        memo[id(lin.weight)] = _param(weight, lin.weight)
        if bias is not None:
            memo[id(lin.bias)] = _param(bias, lin.bias)
        scattered[path] = (rows, lin.out_features)
    pruned = copy.deepcopy(model, memo)
    _read_into_replacements(pruned, weights, skip)
    for path, plan in plans.items():
        new = pruned.get_submodule(path)
        if plan.scatter:
            scatter_rows(new, *scattered[path])
        else:
            new.in_features, new.out_features = new.weight.shape[1], new.weight.shape[0]
    _set_counts(pruned, layout, keep, skip)
    _silence(pruned, layout, plans, keep, gate_closed, silenced)
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, pruned))
    log.info("EcoDiff: pruned %s: %d -> %d parameters (%.1f%% removed), %d of %d units kept, %d owners replaced",
             layout.arch, before, after, 100 * (1 - after / before) if before else 0.0,
             sum(int(k.sum()) for k in keep.values()), layout.total_units(), len(replaced))
    return pruned


@torch.no_grad()
def _read_into_replacements(pruned: nn.Module, weights: dict[str, torch.Tensor], owners: Sequence[str]) -> None:
    """Replacements of emptied owners are built from the module's own parameters, under the same
    names (``to_out.0.bias``…): the values to read replace those too."""
    params = dict(pruned.named_parameters())
    for name, value in weights.items():
        if _under(name, owners) and name in params and params[name].shape == value.shape:
            params[name].copy_(value.to(params[name].dtype))


def _silence(pruned: nn.Module, layout: Layout, plans: dict[str, LinearPlan], keep: dict[str, torch.Tensor],
             gate_closed: dict[str, torch.Tensor], silenced: Sequence[str]) -> None:
    """Zero the gate-side weights of units kept only because of ``min_keep``."""
    groups = layout.by_name()
    for name in silenced:
        g = groups[name]
        units = torch.nonzero(keep[name] & ~gate_closed[name]).reshape(-1)
        for s in g.gates:
            lin = pruned.get_submodule(s.module)
            old = g.unit_indices(s, units)
            plan = plans.get(s.module)
            if plan is not None:  # position of the old features among the kept ones
                kept = plan.in_keep if s.side == "in" else plan.out_keep
                old = (torch.cumsum(kept.long(), 0) - 1)[old]
            old = old.to(lin.weight.device)
            if s.side == "in":
                lin.weight[:, old] = 0
            else:
                lin.weight[old] = 0
                if lin.bias is not None:
                    lin.bias[old] = 0


def _set_counts(pruned: nn.Module, layout: Layout, keep: dict[str, torch.Tensor], skip: Sequence[str]) -> None:
    for g in layout.groups:
        kept = int(keep[g.name].sum())
        for path, attr, value in [(p, a, kept) for p, a in g.counters] + \
                                 [(p, a, kept * g.width) for p, a in g.dims]:
            if _under(path, skip):
                continue
            module = pruned.get_submodule(path)
            if not hasattr(module, attr):
                raise EcoDiffError(f"group '{g.name}': '{path}' has no attribute '{attr}' to hold its unit count")
            setattr(module, attr, value)
