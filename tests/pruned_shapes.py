"""What a pruned module says about its units, checked against its weight shapes.

Shared by the unit tests (diffusers models) and the integration tests (ComfyUI models); it reads
only the layout's description and the modules, so it works with any copy of the engine.
"""
from __future__ import annotations

from torch import nn


def _size(lin: nn.Module, side: str) -> int:
    """Features of a (possibly sliced or scatter) Linear on ``side``, read from its weight."""
    return int(lin.weight.shape[1] if side == "in" else lin.weight.shape[0])


def check_counts_match_shapes(original: nn.Module, pruned: nn.Module, layout, kept: dict[str, int]) -> None:
    """Assert that ``kept[group]`` units are what ``pruned`` holds:

    - every counter attribute of a group equals its kept units, every dim attribute kept × width;
    - every Linear cut by a group has its original size minus the removed units' features (several
      groups may cut one Linear), and its ``in_features``/``out_features`` agree with its weight;
    - groups that keep nothing and have an ``empty`` factory have their owner replaced.
    """
    removed: dict[tuple[str, str], int] = {}
    for g in layout.groups:
        replaced = g.empty is not None and kept[g.name] == 0
        for s in g.slices:
            if not (replaced and (s.module + ".").startswith(g.owner + ".")):
                key = (s.module, s.side)
                removed[key] = removed.get(key, 0) + (g.count - kept[g.name]) * g.width
        if replaced:
            assert type(pruned.get_submodule(g.owner)) is not type(original.get_submodule(g.owner)), \
                f"{g.name}: no unit kept, but its owner was not replaced"
            continue
        for path, attr in g.counters:
            value = getattr(pruned.get_submodule(path), attr)
            assert value == kept[g.name], f"{g.name}: {path}.{attr} = {value}, holds {kept[g.name]} units"
        for path, attr in g.dims:
            value = getattr(pruned.get_submodule(path), attr)
            assert value == kept[g.name] * g.width, f"{g.name}: {path}.{attr} = {value}, expected " \
                                                     f"{kept[g.name]} × {g.width}"
    for (path, side), n in removed.items():
        before, after = original.get_submodule(path), pruned.get_submodule(path)
        assert _size(after, side) == _size(before, side) - n, \
            f"{path} ({side}): {_size(after, side)} features, expected {_size(before, side)} - {n}"
        if not hasattr(after, "rows"):  # ScatterLinear keeps its full output width by design
            assert (after.in_features, after.out_features) == (after.weight.shape[1], after.weight.shape[0])
