"""Pruning report: its numbers equal parameters counted directly in the two models."""
from __future__ import annotations

import functools
import json

import pytest
import torch
from tiny_models import MODEL_NAMES, build

from ecodiff_core.archs import find_layout
from ecodiff_core.flops import measure_flops, total_flops
from ecodiff_core.prune import prune_model
from ecodiff_core.report import PruneReport


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
