"""Pruning report: its numbers equal parameters counted directly in the two models."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from ecodiff_core.archs import find_layout
from ecodiff_core.flops import measure_flops, total_flops
from ecodiff_core.prune import prune_model
from ecodiff_core.report import PruneReport
from pruned_shapes import check_counts_match_shapes
from tiny_models import MODEL_NAMES, build, must_keep_layout


@functools.cache
def case(name: str):
    model, inputs = build(name)
    return model, inputs, find_layout(model)


def count(model, prefix: str = "") -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_report_numbers_equal_counted_parameters(name: str) -> None:
    model, _inputs, layout = case(name)
    g = torch.Generator().manual_seed(5)
    keep = {gr.name: torch.rand(gr.count, generator=g) < 0.7 for gr in layout.groups}
    emptied = next(gr for gr in layout.groups if gr.kind == "head")
    keep[emptied.name][:] = False
    pruned = prune_model(model, layout, keep)
    report = PruneReport.build(model, pruned, layout, keep)

    assert report.params_before == count(model) and report.params_after == count(pruned)
    assert report.emptied == [gr.name for gr in layout.groups if not keep[gr.name].any()]
    assert emptied.name in report.emptied
    for k in report.kinds:
        groups = [gr for gr in layout.groups if gr.kind == k.kind]
        assert k.units_before == sum(gr.count for gr in groups)
        assert k.units_after == sum(int(keep[gr.name].sum()) for gr in groups)
    for b in report.blocks:
        assert (b.params_before, b.params_after) == (count(model, b.block + "."), count(pruned, b.block + "."))
    owners = [gr.owner for gr in layout.groups if gr.kind == "head" and gr.name in report.emptied]
    norms = sum(p.numel() for o in owners for n, p in model.get_submodule(o).named_parameters()
                if n.startswith("norm_"))
    assert report.params_removed_outside_units == norms  # FLUX q/k norms of emptied attention; 0 for UNets

    d = report.to_dict()
    assert json.loads(json.dumps(d))["params_after"] == count(pruned)
    text = report.to_text()
    assert f"{report.params_before:,}" in text and f"{report.params_after:,}" in text
    assert emptied.name in text


def test_report_with_flops() -> None:
    model, inputs, layout = case("flux")
    keep = {gr.name: torch.arange(gr.count) % 3 != 0 for gr in layout.groups}
    pruned = prune_model(model, layout, keep)
    before = measure_flops(model, layout, lambda: model(**inputs)).total
    after = total_flops(lambda: pruned(**inputs))
    report = PruneReport.build(model, pruned, layout, keep, before, after)
    assert "FLOPs per forward" in report.to_text()
    assert report.to_dict()["flops_after"] == after < before


@pytest.mark.parametrize("must_keep", [0, 1])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_report_kept_counts_equal_model_shapes(name: str, must_keep: int) -> None:
    """Per group, kind and block, the report counts the units the pruned model holds: where a mask
    closes a group that must keep a unit, the silenced unit is in the model and in the report."""
    model, _inputs, layout = case(name)
    layout = must_keep_layout(layout, must_keep) if must_keep else layout
    g = torch.Generator().manual_seed(6)
    keep = {gr.name: torch.rand(gr.count, generator=g) < 0.5 for gr in layout.groups}
    closed = [gr for gr in layout.groups if gr.kind == "head"][:2]
    for gr in closed:
        keep[gr.name][:] = False
    pruned = prune_model(model, layout, keep)
    report = PruneReport.build(model, pruned, layout, keep)
    kept = {s.name: s.units_after for s in report.groups}
    check_counts_match_shapes(model, pruned, layout, kept)
    assert [s.name for s in report.groups] == [gr.name for gr in layout.groups]
    for k in report.kinds:
        assert k.units_after == sum(kept[gr.name] for gr in layout.groups if gr.kind == k.kind)
    for b in report.blocks:
        assert b.units_after == sum(kept[gr.name] for gr in layout.groups if gr.block == b.block)
    closed_names = [gr.name for gr in closed]
    closed_all = [gr.name for gr in layout.groups if not keep[gr.name].any()]
    assert set(closed_names) <= set(closed_all)
    assert report.silenced == (closed_all if must_keep else [])
    assert report.emptied == ([] if must_keep else closed_all)
    assert all(kept[n] == must_keep for n in closed_names)
    assert report.params_after == count(pruned)
    assert all(n in report.to_text() for n in closed_names)
