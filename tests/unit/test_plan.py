"""Binarisation: budgets land within one unit's cost, keep ratios are exact, bad targets are rejected."""
from __future__ import annotations

import functools

import pytest
import torch

from ecodiff_core.archs import find_layout
from ecodiff_core.errors import EcoDiffError
from ecodiff_core.flops import measure_flops, total_flops
from ecodiff_core.plan import (
    MAX_FRACTION,
    MIN_KEEP_RATIO,
    PruneTarget,
    max_fraction,
    min_keep_ratio,
    parse_keep_ratios,
    plan_pruning,
    select_by_ratios,
    select_units,
)
from ecodiff_core.prune import prune_model
from ecodiff_core.units import Layout, parameter_costs
from tiny_models import MODEL_NAMES, build, must_keep_layout


@functools.cache
def case(name: str):
    model, inputs = build(name)
    return model, inputs, find_layout(model)


def random_logits(layout: Layout, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {gr.name: torch.randn(gr.count, generator=g) * 2 + 1 for gr in layout.groups}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_param_budget_lands_within_one_unit(name: str, fraction: float) -> None:
    model, _, layout = case(name)
    plan = plan_pruning(model, layout, random_logits(layout), PruneTarget(params=fraction))
    costs = parameter_costs(model, layout)
    biggest_removed = max(costs[g.name] for g in layout.groups if not plan.keep[g.name].all())
    assert plan.budget == pytest.approx(fraction * n_params(model))
    assert plan.budget <= plan.removed_params < plan.budget + biggest_removed
    pruned = prune_model(model, layout, plan.keep)
    assert plan.emptied_owners == [g.owner for g in layout.groups if not plan.keep[g.name].any()]
    # Emptied attention modules also drop their per-head q/k norm weights (FLUX only).
    extra = sum(p.numel() for g in layout.groups if g.owner in plan.emptied_owners and g.kind == "head"
                for n, p in model.get_submodule(g.owner).named_parameters() if n.startswith("norm_"))
    assert n_params(model) - n_params(pruned) == plan.removed_params + extra


def test_removal_order_is_global_and_ascending() -> None:
    model, _, layout = case("flux")
    logits = random_logits(layout, 1)
    costs = parameter_costs(model, layout)
    keep = select_units(layout, logits, costs, 0.25 * n_params(model))
    removed = torch.cat([logits[g.name][~keep[g.name]] for g in layout.groups])
    kept = torch.cat([logits[g.name][keep[g.name]] for g in layout.groups])
    assert removed.max() <= kept.min()
    assert {g.kind for g in layout.groups if not keep[g.name].all()} == {"head", "neuron", "channel"}


def test_ties_break_stably_in_layout_order() -> None:
    _model, _, layout = case("flux")
    logits = {g.name: torch.zeros(g.count) for g in layout.groups}
    costs = {g.name: 1.0 for g in layout.groups}
    keep = select_units(layout, logits, costs, 5)
    first = layout.groups[0].name
    assert (~keep[first]).nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert sum(int((~k).sum()) for k in keep.values()) == 5


def test_flop_budget_lands_within_one_unit_and_matches_measurement() -> None:
    model, inputs, layout = case("flux")
    fc = measure_flops(model, layout, lambda: model(**inputs))
    plan = plan_pruning(model, layout, random_logits(layout), PruneTarget(flops=0.3), flop_costs=fc)
    biggest = max(fc.per_unit[g.name] for g in layout.groups if not plan.keep[g.name].all())
    assert plan.budget == pytest.approx(0.3 * fc.total)
    assert plan.budget <= plan.removed_flops < plan.budget + biggest
    pruned = prune_model(model, layout, plan.keep)
    assert fc.total - total_flops(lambda: pruned(**inputs)) == pytest.approx(plan.removed_flops)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_keep_ratios_per_kind(name: str) -> None:
    model, _, layout = case(name)
    ratios = {"head": 0.7, "neuron": 0.88}
    plan = plan_pruning(model, layout, random_logits(layout), PruneTarget(keep_ratios=ratios))
    for kind, r in ratios.items():
        kept = sum(int(plan.keep[g.name].sum()) for g in layout.groups if g.kind == kind)
        assert kept == round(r * layout.total_units(kind))
    if "channel" in layout.kinds():
        assert all(plan.keep[g.name].all() for g in layout.groups if g.kind == "channel")
    assert plan.budget is None and plan.mode == "keep_ratios"


def test_default_target_is_twenty_percent_params() -> None:
    t = PruneTarget()
    assert (t.mode, t.params) == ("params", 0.2)
    assert PruneTarget(flops=0.3).params is None
    assert PruneTarget(keep_ratios={"head": 0.5}).mode == "keep_ratios"


@pytest.mark.parametrize("kwargs,match", [
    ({"params": 1.5}, r"\[0, 0.95\]"),
    ({"params": 20}, "did you mean 0.2"),
    ({"params": -0.1}, r"\[0, 0.95\]"),
    ({"params": "0.2"}, "must be a number"),
    ({"params": 0.2, "flops": 0.2}, "exactly one"),
    ({"params": None}, "exactly one"),
    ({"params": None, "keep_ratios": {"head": 0.0}}, "KEEP"),
    ({"params": None, "keep_ratios": {"layer": 0.5}}, "unknown unit kind"),
])
def test_bad_targets_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(EcoDiffError, match=match):
        PruneTarget(**kwargs)


def test_unreachable_or_incomplete_requests_are_rejected() -> None:
    model, _, layout = case("sd15")  # only ~36 % of this tiny UNet is in prunable units
    logits = random_logits(layout)
    with pytest.raises(EcoDiffError, match="lower the target to at most 0.36"):
        plan_pruning(model, layout, logits, PruneTarget(params=0.5))
    with pytest.raises(EcoDiffError, match="measure_flops"):
        plan_pruning(model, layout, logits, PruneTarget(flops=0.2))
    with pytest.raises(EcoDiffError, match="only"):
        select_by_ratios(layout, logits, {"channel": 0.5})
    with pytest.raises(EcoDiffError, match="missing"):
        plan_pruning(model, layout, dict(list(logits.items())[1:]), PruneTarget())
    bad = dict(logits)
    bad[layout.groups[0].name] = torch.full((layout.groups[0].count,), float("nan"))
    with pytest.raises(EcoDiffError, match="NaN"):
        plan_pruning(model, layout, bad, PruneTarget())


def advised_maximum(error: EcoDiffError) -> float:
    return float(str(error).rsplit("at most ", 1)[1].rstrip(". "))


@pytest.mark.parametrize("must_keep", [0, 1, 3])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_advised_maximum_is_accepted_and_delivered_within_one_unit(name: str, must_keep: int) -> None:
    """The refusal names the highest accepted target (rounded down); planned at that target, the
    model loses at least the budget and less than one more unit, units that must stay included."""
    model, _, layout = case(name)
    layout = must_keep_layout(layout, must_keep) if must_keep else layout
    logits = random_logits(layout, 3)
    with pytest.raises(EcoDiffError, match="at most") as refused:
        plan_pruning(model, layout, logits, PruneTarget(params=MAX_FRACTION))
    advised = advised_maximum(refused.value)
    with pytest.raises(EcoDiffError, match="at most"):
        plan_pruning(model, layout, logits, PruneTarget(params=round(advised + 0.001, 3)))
    plan = plan_pruning(model, layout, logits, PruneTarget(params=advised))
    costs = parameter_costs(model, layout)
    assert plan.budget <= plan.removed_params < plan.budget + max(costs.values())
    for g in layout.groups:  # the best min_keep units of every group stay
        kept = plan.keep[g.name]
        assert int(kept.sum()) >= g.min_keep
        if g.min_keep:
            top = torch.topk(logits[g.name], g.min_keep).indices
            assert set(top.tolist()) <= set(kept.nonzero().flatten().tolist())
    pruned = prune_model(model, layout, plan.keep)
    extra = sum(p.numel() for g in layout.groups if g.empty is not None and not plan.keep[g.name].any()
                for n, p in model.get_submodule(g.owner).named_parameters() if n.startswith("norm_"))
    assert n_params(model) - n_params(pruned) == plan.removed_params + extra >= plan.budget


def test_advised_flop_maximum_is_accepted_with_must_keep_units() -> None:
    model, inputs, layout = case("flux")
    layout = must_keep_layout(layout, 1)
    fc = measure_flops(model, layout, lambda: model(**inputs))
    logits = random_logits(layout, 4)
    with pytest.raises(EcoDiffError, match="at most") as refused:
        plan_pruning(model, layout, logits, PruneTarget(flops=MAX_FRACTION), flop_costs=fc)
    advised = advised_maximum(refused.value)
    plan = plan_pruning(model, layout, logits, PruneTarget(flops=advised), flop_costs=fc)
    assert plan.budget <= plan.removed_flops
    assert all(plan.keep[g.name].any() for g in layout.groups)
    pruned = prune_model(model, layout, plan.keep)
    assert fc.total - total_flops(lambda: pruned(**inputs)) == pytest.approx(plan.removed_flops)


@pytest.mark.parametrize("prunable,total,expected", [(357.0, 1000.0, 0.357), (356.9, 1000.0, 0.356), (1.0, 3.0, 0.333),
                                                     (0.0, 10.0, 0.0), (999.0, 1000.0, MAX_FRACTION)])
def test_max_fraction_rounds_down_to_an_accepted_value(prunable: float, total: float, expected: float) -> None:
    value = max_fraction(prunable, total)
    assert value == expected and value * total <= prunable


def advised_minimum(note: str) -> float:
    return float(note.rsplit("kept exactly is ", 1)[1].rstrip(")"))


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("kind,must_keep", [("head", 1), ("head", 3), ("neuron", 24)])
def test_keep_ratio_below_the_units_that_must_stay_keeps_them_and_says_so(name, kind, must_keep) -> None:
    """A keep ratio that would need units that must stay keeps exactly those (the best min_keep of
    every group) and the plan says so, naming the smallest ratio kept exactly; that ratio is kept
    exactly (round(ratio × N) units) without a note; 0.001 less gets the note again."""
    model, _, layout = case(name)
    layout = must_keep_layout(layout, must_keep)
    logits = random_logits(layout, 5)
    groups = [g for g in layout.groups if g.kind == kind]
    total, must_stay = sum(g.count for g in groups), sum(g.min_keep for g in groups)
    assert must_stay > round(MIN_KEEP_RATIO * total)  # so the smallest ratio is short
    plan = plan_pruning(model, layout, logits, PruneTarget(keep_ratios={kind: MIN_KEEP_RATIO}))
    assert sum(int(plan.keep[g.name].sum()) for g in groups) == must_stay
    [note] = plan.notes
    assert f"keeps {must_stay} of the {total} {kind}s" in note
    advised = advised_minimum(note)
    assert advised == min_keep_ratio(total, must_stay) and round(advised * total) >= must_stay
    if advised > MIN_KEEP_RATIO:
        assert plan_pruning(model, layout, logits, PruneTarget(keep_ratios={kind: round(advised - 0.001, 3)})).notes
    plan = plan_pruning(model, layout, logits, PruneTarget(keep_ratios={kind: advised}))
    assert not plan.notes
    assert sum(int(plan.keep[g.name].sum()) for g in groups) == round(advised * total)
    for g in groups:
        assert set(torch.topk(logits[g.name], g.min_keep).indices.tolist()) <= set(
            plan.keep[g.name].nonzero().flatten().tolist())


@pytest.mark.parametrize("units,must_stay,expected", [(12, 3, 0.209), (4, 2, 0.375), (28, 0, MIN_KEEP_RATIO),
                                                      (3, 1, 0.167), (7, 7, 0.929), (1000, 1, MIN_KEEP_RATIO),
                                                      (1, 1, 0.501)])
def test_min_keep_ratio_is_the_smallest_delivered_value(units: int, must_stay: int, expected: float) -> None:
    value = min_keep_ratio(units, must_stay)
    assert value == expected and round(value * units) >= must_stay
    assert value == MIN_KEEP_RATIO or round(round(value - 0.001, 3) * units) < must_stay


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_keep_ratios_ignore_kinds_the_model_does_not_have(name: str) -> None:
    """The node's default (every kind) works on every architecture: absent kinds are ignored and
    listed in the plan; every present kind keeps exactly round(ratio × N)."""
    model, _, layout = case(name)
    ratios = {"head": 0.8, "neuron": 0.7, "channel": 0.9}
    plan = plan_pruning(model, layout, random_logits(layout), PruneTarget(keep_ratios=ratios))
    assert plan.ignored_kinds == [k for k in ratios if k not in layout.kinds()]
    for kind in layout.kinds():
        kept = sum(int(plan.keep[g.name].sum()) for g in layout.groups if g.kind == kind)
        assert kept == round(ratios[kind] * layout.total_units(kind))
    absent = [k for k in ratios if k not in layout.kinds()]
    if absent:  # a target made only of absent kinds removes nothing: refused
        with pytest.raises(EcoDiffError, match="names only"):
            plan_pruning(model, layout, random_logits(layout), PruneTarget(keep_ratios={absent[0]: 0.5}))


@pytest.mark.parametrize("text,expected", [
    ("head=0.8, neuron=0.7", {"head": 0.8, "neuron": 0.7}),
    (" head = 0.5 ;", {"head": 0.5}),
    ("channel=1;neuron=0.25,", {"channel": 1.0, "neuron": 0.25}),
    ("head=0.5, head=0.9", "twice"),
    ("head=0.5; neuron=0.5; head=0.5", "twice"),
    ("head", "kind=ratio"),
    ("head=x", "not a number"),
    (" , ;", "empty"),
])
def test_parse_keep_ratios(text: str, expected) -> None:
    if isinstance(expected, dict):
        assert parse_keep_ratios(text) == expected
    else:
        with pytest.raises(EcoDiffError, match=expected):
            parse_keep_ratios(text)


@pytest.mark.parametrize("kwargs,shown", [
    ({"params": 0.9500001}, "got 0.9500001"),
    ({"params": -1e-09}, "got -1e-09"),
    ({"flops": 0.95000000001}, "got 0.95000000001"),
    ({"params": None, "keep_ratios": {"head": 1.0000001}}, "got 1.0000001"),
    ({"params": None, "keep_ratios": {"neuron": 0.0499999}}, "got 0.0499999"),
])
def test_refused_values_are_shown_out_of_range(kwargs: dict, shown: str) -> None:
    """A value just outside the range is shown with every digit, never rounded into the range."""
    with pytest.raises(EcoDiffError, match=shown.replace(".", r"\.")):
        PruneTarget(**kwargs)


# -- alignment: kept features per group at multiples of PruneTarget.align -----------------------------
def aligned_ok(g, kept: int, align: int) -> bool:
    """Kept units of ``g`` are allowed under ``align``: all of them, or a feature width that is a
    multiple of ``align`` and keeps the units that must stay."""
    return kept == g.count or (kept * g.width % align == 0 and kept >= g.min_keep)


def chunk_cost(g, costs: dict, align: int) -> float:
    """The cost of the fewest units whose features are a multiple of ``align`` (the test's own rule)."""
    step = next(n for n in range(1, align + 1) if n * g.width % align == 0)
    return costs[g.name] * step


@pytest.mark.parametrize("mode", ["params", "flops"])
@pytest.mark.parametrize("align", [8, 16])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_aligned_budget_lands_within_one_chunk_and_slicing_equals_masking(name: str, align: int, mode: str) -> None:
    """Every group keeps all its units or an aligned feature width; the budget is met to within one
    aligned chunk; the pruned Linears cut by groups are multiples of ``align`` (tiny models have
    aligned offsets); the pruned model computes what the hard-gated model computes."""
    from pruned_shapes import check_counts_match_shapes
    from test_prune import gated_output, rel_err

    model, inputs, layout = case(name)
    logits = random_logits(layout, 3)
    if mode == "params":
        costs, fc = parameter_costs(model, layout), None
        plan = plan_pruning(model, layout, logits, PruneTarget(params=0.3, align=align))
        removed = plan.removed_params
    else:
        fc = measure_flops(model, layout, lambda: model(**inputs))
        costs = fc.per_unit
        plan = plan_pruning(model, layout, logits, PruneTarget(flops=0.3, align=align), flop_costs=fc)
        removed = plan.removed_flops
    kept = {g.name: int(plan.keep[g.name].sum()) for g in layout.groups}
    assert plan.align == align
    assert all(aligned_ok(g, kept[g.name], align) for g in layout.groups)
    assert any(0 < kept[g.name] < g.count for g in layout.groups)
    biggest = max(chunk_cost(g, costs, align) for g in layout.groups if kept[g.name] < g.count)
    assert plan.budget <= removed < plan.budget + biggest
    for g in layout.groups:  # within a group the lowest logits go
        lam = logits[g.name]
        if 0 < kept[g.name] < g.count:
            assert lam[~plan.keep[g.name]].max() <= lam[plan.keep[g.name]].min()
    pruned = prune_model(model, layout, plan.keep)
    check_counts_match_shapes(model, pruned, layout, kept)
    cut: dict[tuple[str, str], list] = {}
    for g in layout.groups:
        for s in g.slices:
            cut.setdefault((s.module, s.side), []).append(g)
    for (module, side), groups in cut.items():  # Linears whose features are all units of cut groups
        original = model.get_submodule(module).weight.shape[1 if side == "in" else 0]
        if sum(g.count * g.width for g in groups) == original and all(0 < kept[g.name] < g.count for g in groups):
            assert pruned.get_submodule(module).weight.shape[1 if side == "in" else 0] % align == 0, module
    assert rel_err(gated_output(model, inputs, layout, plan.keep), run_model(pruned, inputs)) <= 1e-5


def run_model(model, inputs):
    from tiny_models import run

    return run(model, inputs)


@pytest.mark.parametrize("align", [8, 16])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_aligned_keep_ratios_keep_at_most_one_chunk_less(name: str, align: int) -> None:
    model, _, layout = case(name)
    ratios = {"head": 0.6, "neuron": 0.7, "channel": 0.8}
    plan = plan_pruning(model, layout, random_logits(layout, 4), PruneTarget(keep_ratios=ratios, align=align))
    for kind in layout.kinds():
        groups = [g for g in layout.groups if g.kind == kind]
        kept = sum(int(plan.keep[g.name].sum()) for g in groups)
        step = max(align // __import__("math").gcd(align, g.width) for g in groups)
        asked = round(ratios[kind] * layout.total_units(kind))
        assert asked - step < kept <= asked
        assert all(aligned_ok(g, int(plan.keep[g.name].sum()), align) for g in groups)


@pytest.mark.parametrize("must_keep", [1, 3])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_aligned_plans_keep_the_units_that_must_stay(name: str, must_keep: int) -> None:
    """With min_keep, the smallest aligned count above it stays; the advised maximum is accepted."""
    model, _, layout = case(name)
    layout = must_keep_layout(layout, must_keep)
    logits = random_logits(layout, 6)
    with pytest.raises(EcoDiffError, match="alignment to 8") as err:
        plan_pruning(model, layout, logits, PruneTarget(params=0.9, align=8))
    advised = float(str(err.value).rsplit("at most ", 1)[1])
    plan = plan_pruning(model, layout, logits, PruneTarget(params=advised, align=8))
    for g in layout.groups:
        kept = int(plan.keep[g.name].sum())
        assert aligned_ok(g, kept, 8)
        assert set(torch.topk(logits[g.name], g.min_keep).indices.tolist()) <= set(
            plan.keep[g.name].nonzero().flatten().tolist())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_align_one_is_the_unaligned_plan(name: str) -> None:
    model, _, layout = case(name)
    logits = random_logits(layout, 7)
    plain = plan_pruning(model, layout, logits, PruneTarget(params=0.25))
    one = plan_pruning(model, layout, logits, PruneTarget(params=0.25, align=1))
    assert all(torch.equal(plain.keep[n], one.keep[n]) for n in plain.keep)


@pytest.mark.parametrize("align", [0, -8, 1.5, True, "8", 1000])
def test_bad_alignment_is_rejected(align) -> None:
    with pytest.raises(EcoDiffError, match="PruneTarget.align"):
        PruneTarget(params=0.2, align=align)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_aligned_keep_ratio_below_the_aligned_floor_keeps_it_and_says_so(name: str) -> None:
    """Alignment to 16 with one unit that must stay per group: each group keeps at least one aligned
    chunk; the smallest ratio keeps exactly that and the plan says so."""
    model, _, layout = case(name)
    layout = must_keep_layout(layout, 1)
    plan = plan_pruning(model, layout, random_logits(layout, 8),
                        PruneTarget(keep_ratios={"neuron": MIN_KEEP_RATIO}, align=16))
    groups = [g for g in layout.groups if g.kind == "neuron"]
    floor = sum(min(16, g.count) for g in groups)  # width 1: 16 neurons, or the whole group
    assert sum(int(plan.keep[g.name].sum()) for g in groups) == floor
    [note] = plan.notes
    assert f"keeps {floor} of the" in note and "aligned to 16" in note
