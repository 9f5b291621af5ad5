"""Fitting weight deltas made for the full-size model (LoRA factors, full diffs, biases, DoRA
magnitudes) to a model pruned by ``prune_model``, derived from the unit groups.

``weight_cuts`` says, per Linear that some group cuts, which output rows and input columns of the
full-size weight the pruned weight keeps (producers lose rows, consumers lose columns, modulation
linears lose rows) and which kept features belong to silenced units (kept only because of
``min_keep``, gate closed: their delta must stay zero, as in the hard-gated model).  With it:

- a LoRA ``ΔW = up @ down`` becomes ``up[rows] @ down[:, cols]`` — exactly ``ΔW[rows][:, cols]``,
  so the pruned model + sliced LoRA computes what the hard-gated full model + LoRA computes;
- a LoHa ``(a1 @ b1) ∘ (a2 @ b2)`` slices the same way (rows of a, columns of b);
- any full delta (``diff``, LoKr's Kronecker product) is sliced as a matrix, biases by rows;
- DoRA magnitudes are sliced where the norm they rescale does not span a cut dimension (row norms on
  producers and modulation, column norms on consumers); elsewhere ``LoraSliceError``.

Every function here is plain torch; shapes are (out_features, in_features) of ``nn.Linear``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import LoraSliceError
from .prune import _under, linear_plans
from .units import Layout, get_linear


def _positions(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.long)


@dataclass(frozen=True)
class WeightCut:
    """Where the weight of one Linear of the pruned model sits in the full-size weight.

    full         (out_features, in_features) of the full-size weight.
    rows, cols   kept output rows / input columns, ascending full-size indices.
    silent_rows, silent_cols
                 positions among ``rows`` / ``cols`` (pruned indices) of silenced units' features.
    removed      the Linear's owner was replaced (every unit removed): its weight is gone and a
                 delta on it has no effect on the hard-gated model (its rows or columns are all cut).
    """

    full: tuple[int, int]
    rows: torch.Tensor
    cols: torch.Tensor
    silent_rows: torch.Tensor
    silent_cols: torch.Tensor
    removed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the pruned weight."""
        return int(self.rows.numel()), int(self.cols.numel())

    @property
    def changed(self) -> bool:
        """Whether a full-size delta needs any slicing or zeroing here."""
        return self.shape != self.full or self.silent_rows.numel() > 0 or self.silent_cols.numel() > 0

    @property
    def empty(self) -> bool:
        """No kept feature on one side: a delta has no effect at all."""
        return self.rows.numel() == 0 or self.cols.numel() == 0

    def bias_cut(self) -> WeightCut:
        """The cut of the bias (one column standing for the vector)."""
        one = _positions(1)
        return WeightCut((self.full[0], 1), self.rows, one, self.silent_rows, one[:0], self.removed)

    def narrow(self, dim: int, start: int, length: int) -> tuple[WeightCut, int, int]:
        """The cut of the full-size block ``[start, start+length)`` along ``dim`` (a fused q/k/v or
        ``linear1`` part, as ComfyUI's offset patches address it), and where that block starts and how
        long it is in the pruned weight.  Raises LoraSliceError for a block outside the weight."""
        if dim not in (0, 1) or start < 0 or length < 0 or start + length > self.full[dim]:
            raise LoraSliceError(f"offset (dim {dim}, start {start}, length {length}) lies outside the "
                                 f"full-size weight {self.full}")
        kept = self.rows if dim == 0 else self.cols
        silent = self.silent_rows if dim == 0 else self.silent_cols
        inside = (kept >= start) & (kept < start + length)
        new_start = int((kept < start).sum())
        new_len = int(inside.sum())
        sub = kept[inside] - start
        sub_silent = silent[(silent >= new_start) & (silent < new_start + new_len)] - new_start
        full = (length, self.full[1]) if dim == 0 else (self.full[0], length)
        if dim == 0:
            cut = WeightCut(full, sub, self.cols, sub_silent, self.silent_cols, self.removed)
        else:
            cut = WeightCut(full, self.rows, sub, self.silent_rows, sub_silent, self.removed)
        return cut, new_start, new_len

    # ---- slicing -------------------------------------------------------------------------------
    def _check(self, name: str, got: int, dim: int) -> None:
        if got != self.full[dim]:
            raise LoraSliceError(f"{name} has {got} {'rows' if dim == 0 else 'columns'}, the full-size weight "
                                 f"{self.full[dim]}")

    def slice_up(self, up: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of an up/left factor (full_out, r); silenced rows zero."""
        self._check("the up factor", up.shape[0], 0)
        out = up.index_select(0, self.rows.to(up.device))
        if self.silent_rows.numel():
            out[self.silent_rows.to(up.device)] = 0
        return out

    def slice_down(self, down: torch.Tensor) -> torch.Tensor:
        """Columns ``cols`` of a down/right factor (r, full_in); silenced columns zero."""
        self._check("the down factor", down.shape[1], 1)
        out = down.index_select(1, self.cols.to(down.device))
        if self.silent_cols.numel():
            out[:, self.silent_cols.to(down.device)] = 0
        return out

    def slice_factors(self, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(up[rows], down[:, cols]) with silenced features zero: their product is the sliced
        ``up @ down``.  up: (full_out, r), down: (r, full_in)."""
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraSliceError(f"factors of shapes {tuple(up.shape)} and {tuple(down.shape)} are not a "
                                 "(out, r) @ (r, in) pair")
        return self.slice_up(up), self.slice_down(down)

    def slice_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        """A full-size (out, in) delta reduced to the pruned weight (silenced features zero)."""
        if tuple(delta.shape) != self.full:
            raise LoraSliceError(f"a delta of shape {tuple(delta.shape)} does not fit the full-size weight {self.full}")
        return self.slice_down(self.slice_up(delta))

    def slice_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """A full-size bias delta (out,) reduced to the kept rows (silenced rows zero)."""
        if bias.ndim != 1:
            raise LoraSliceError(f"a bias delta must be a vector, got shape {tuple(bias.shape)}")
        return self.slice_up(bias)

    def slice_dora_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """DoRA magnitude: (out, 1) rescales row norms (the norm runs over the input columns), any
        other shape, (1, in), column norms (over the output rows), as ComfyUI reads it.  A norm that
        runs over a cut or silenced dimension would need the removed weights: LoraSliceError."""
        if scale.shape[0] == self.full[0] and (scale.ndim == 1 or scale.shape[-1] == 1):
            if self.cols.numel() != self.full[1] or self.silent_cols.numel():
                raise LoraSliceError("its DoRA magnitude normalises each output row over all input columns, "
                                     "and input columns were removed (the norm needs the removed weights)")
            return self.slice_up(scale)
        if scale.ndim == 2 and scale.shape[0] == 1 and scale.shape[1] == self.full[1]:
            if self.rows.numel() != self.full[0] or self.silent_rows.numel():
                raise LoraSliceError("its DoRA magnitude normalises each input column over all output rows, "
                                     "and output rows were removed (the norm needs the removed weights)")
            return self.slice_down(scale)
        raise LoraSliceError(f"its DoRA magnitude has shape {tuple(scale.shape)}, which fits neither the rows "
                             f"nor the columns of the full-size weight {self.full}")


def silenced_units(keep: dict[str, torch.Tensor], silenced: list[str]) -> dict[str, torch.Tensor]:
    """Units kept physically with their gate closed, from a pruning record (kept masks + the names
    of silenced groups).  Exact for ``min_keep`` ≤ 1 (every table today): a group is silenced only
    when its gate closes every unit, so every unit it keeps is silenced."""
    return {name: keep[name].clone() for name in silenced}


def weight_cuts(full: nn.Module, layout: Layout, keep: dict[str, torch.Tensor],
                silent: dict[str, torch.Tensor] | None = None) -> dict[str, WeightCut]:
    """Per Linear path cut by ``layout``'s groups: how the pruned weight sits in the full-size one.

    full    the full-size module (the ``meta`` device is enough: only shapes are read).
    keep    per group, the units the pruned model holds physically (bool, length ``count``).
    silent  per group, the units held physically whose gate is closed (see ``silenced_units``).
    """
    silent = silent or {}
    plans = linear_plans(full, layout, keep)
    replaced = [g.owner for g in layout.groups if g.empty is not None and not bool(keep[g.name].any())]
    silent_rows: dict[str, list[torch.Tensor]] = {}
    silent_cols: dict[str, list[torch.Tensor]] = {}
    for g in layout.groups:
        units = silent.get(g.name)
        if units is None or not bool(units.any()):
            continue
        idx = torch.nonzero(units & keep[g.name]).reshape(-1)
        for s in g.gates:
            plan = plans[s.module]
            kept = plan.in_keep if s.side == "in" else plan.out_keep
            pos = (torch.cumsum(kept.long(), 0) - 1)[g.unit_indices(s, idx)]
            (silent_cols if s.side == "in" else silent_rows).setdefault(s.module, []).append(pos)
    cuts = {}
    for path, plan in plans.items():
        lin = get_linear(full, path)

        def _cat(parts: list[torch.Tensor] | None) -> torch.Tensor:
            return torch.unique(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.long)

        cuts[path] = WeightCut(
            full=(int(lin.out_features), int(lin.in_features)),
            rows=torch.nonzero(plan.out_keep).reshape(-1), cols=torch.nonzero(plan.in_keep).reshape(-1),
            silent_rows=_cat(silent_rows.get(path)), silent_cols=_cat(silent_cols.get(path)),
            removed=_under(path, replaced))
    return cuts
