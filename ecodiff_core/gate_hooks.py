"""Multiply features at each group's gate sites by a gate vector, through temporary hooks."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import EcoDiffError
from .units import Layout, Slice, UnitGroup, get_linear


class GateController:
    """Holds the current gate vector of every group and applies it while installed.

    One hook per gated Linear composes all groups that gate it (e.g. FLUX's single-block output
    projection, whose input columns hold both attention heads and MLP neurons).  ``set(None)``
    turns gating off, giving the original model.
    """

    def __init__(self, model: nn.Module, layout: Layout) -> None:
        self.model = model
        self.layout = layout
        self._values: dict[str, torch.Tensor] | None = None
        self._sites: dict[tuple[str, str], list[tuple[UnitGroup, Slice]]] = defaultdict(list)
        for group in layout.groups:
            for site in group.gates:
                self._sites[(site.module, site.side)].append((group, site))

    def set(self, values: dict[str, torch.Tensor] | None) -> None:
        if values is not None:
            missing = [g.name for g in self.layout.groups if g.name not in values]
            if missing:
                raise EcoDiffError(f"no gate values for {len(missing)} groups, e.g. {missing[0]}; give one "
                                   "value tensor per unit group of the layout")
        self._values = values

    def current(self) -> dict[str, torch.Tensor] | None:
        """The gate tensors in use now (the same objects, not copies); None when gating is off."""
        return self._values

    @contextmanager
    def replaying(self, values: dict[str, torch.Tensor] | None) -> Iterator[None]:
        """Use exactly ``values`` (as returned by ``current()``) inside, then put back what was set:
        a block recomputed during the backward sees the gates of its forward, not the latest ones."""
        saved = self._values
        self._values = values
        try:
            yield
        finally:
            self._values = saved

    def _scale(self, module: nn.Linear, side: str, entries: list[tuple[UnitGroup, Slice]],
               like: torch.Tensor) -> torch.Tensor:
        width = module.in_features if side == "in" else module.out_features
        scale = torch.ones(width, dtype=like.dtype, device=like.device)
        for group, site in entries:
            gate = self._values[group.name].to(device=like.device, dtype=like.dtype)
            start = site.offset
            stop = start + group.count * group.width
            scale = torch.cat([scale[:start], gate.repeat_interleave(group.width), scale[stop:]])
        return scale

    def _pre_hook(self, entries: list[tuple[UnitGroup, Slice]]):
        def hook(module: nn.Linear, args: tuple) -> tuple | None:
            if self._values is None:
                return None
            x = args[0]
            return (x * self._scale(module, "in", entries, x),) + tuple(args[1:])
        return hook

    def _post_hook(self, entries: list[tuple[UnitGroup, Slice]]):
        def hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._values is None:
                return None
            return output * self._scale(module, "out", entries, output)
        return hook

    @contextmanager
    def installed(self) -> Iterator[GateController]:
        """Hooks live only inside this block: modules may be shared with other model copies."""
        handles = []
        try:
            for (path, side), entries in self._sites.items():
                module = get_linear(self.model, path)
                if side == "in":
                    handles.append(module.register_forward_pre_hook(self._pre_hook(entries)))
                else:
                    handles.append(module.register_forward_hook(self._post_hook(entries)))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._values = None


@contextmanager
def hard_gates(model: nn.Module, layout: Layout, keep: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run ``model`` as if the units with ``keep == False`` were removed (a soft-pruning preview)."""
    controller = GateController(model, layout)
    with controller.installed():
        controller.set({name: k.float() for name, k in keep.items()})
        yield


def gate_scales(module: nn.Module, layout: Layout,
                values: dict[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """Per (Linear path, side "in"/"out"): the float32 CPU feature scale vector (length in_features
    or out_features) built from the ``values`` (one per unit, e.g. a keep mask) of every group
    gating it; features no group gates stay 1.  What ``GateController`` multiplies, as weights."""
    scales: dict[tuple[str, str], torch.Tensor] = {}
    for g in layout.groups:
        for site in g.gates:
            lin = get_linear(module, site.module)
            width = lin.in_features if site.side == "in" else lin.out_features
            scale = scales.setdefault((site.module, site.side), torch.ones(width))
            stop = site.offset + g.count * g.width
            scale[site.offset:stop] = values[g.name].float().cpu().repeat_interleave(g.width)
    return scales
