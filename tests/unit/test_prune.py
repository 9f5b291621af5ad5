"""Physical pruning == hard 0/1 gating, the input model is untouched, unit costs are exact."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from ecodiff_core.archs import find_layout
from ecodiff_core.errors import EcoDiffError
from ecodiff_core.prune import physical_keep, prune_model
from ecodiff_core.replacements import (
    EmptyAttention,
    EmptyFluxJointAttention,
    EmptyPreOnlyAttention,
    ScatterLinear,
    scatter_rows,
)
from ecodiff_core.units import Layout, parameter_costs
from pruned_shapes import check_counts_match_shapes
from tiny_models import MODEL_NAMES, TABLE_MODEL_NAMES, build, must_keep_layout, run


@functools.cache
def case(name: str):
    model, inputs = build(name)
    return model, inputs, find_layout(model)


def hard_gate_hooks(model: nn.Module, layout: Layout, keep: dict[str, torch.Tensor]) -> list:
    """The test's own gating, independent of ecodiff_core.gate_hooks: multiply the features named by
    each group's gate slices by its 0/1 keep vector (input columns by a pre-hook, output rows by a
    forward hook)."""
    handles = []
    for g in layout.groups:
        per_feature = keep[g.name].to(torch.float64).repeat_interleave(g.width)
        for s in g.gates:
            module = model.get_submodule(s.module)

            def scale(x: torch.Tensor, s=s, m=per_feature) -> torch.Tensor:
                full = torch.ones(x.shape[-1], dtype=x.dtype)
                full[s.offset:s.offset + m.numel()] = m.to(x.dtype)
                return x * full

            if s.side == "in":
                handles.append(module.register_forward_pre_hook(lambda _m, args, f=scale: (f(args[0]),) + args[1:]))
            else:
                handles.append(module.register_forward_hook(lambda _m, _a, out, f=scale: f(out)))
    return handles


def gated_output(model: nn.Module, inputs: dict, layout: Layout, keep: dict[str, torch.Tensor]) -> torch.Tensor:
    handles = hard_gate_hooks(model, layout, keep)
    try:
        return run(model, inputs)
    finally:
        for h in handles:
            h.remove()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def make_keep(layout: Layout, mode: str, seed: int) -> dict[str, torch.Tensor]:
    """random: each unit kept with p=0.6, and per kind one group emptied and one group full;
    none: every unit removed (every owner emptied); all: nothing removed."""
    g = torch.Generator().manual_seed(seed)
    keep = {gr.name: torch.rand(gr.count, generator=g) < 0.6 for gr in layout.groups}
    if mode == "none":
        return {k: torch.zeros_like(v) for k, v in keep.items()}
    if mode == "all":
        return {k: torch.ones_like(v) for k, v in keep.items()}
    for kind in layout.kinds():
        groups = [gr for gr in layout.groups if gr.kind == kind]
        first, last = groups[seed % len(groups)], groups[(seed + 1) % len(groups)]
        keep[first.name] = torch.zeros(first.count, dtype=torch.bool)
        if last is not first:
            keep[last.name] = torch.ones(last.count, dtype=torch.bool)
    return keep


@pytest.mark.parametrize("mode,seed", [("random", 0), ("random", 1), ("random", 2), ("none", 0), ("all", 0)])
@pytest.mark.parametrize("name", TABLE_MODEL_NAMES)
def test_pruned_equals_hard_gated(name: str, mode: str, seed: int) -> None:
    model, inputs, layout = case(name)
    keep = make_keep(layout, mode, seed)
    expected = gated_output(model, inputs, layout, keep)
    pruned = prune_model(model, layout, keep)
    assert rel_err(expected, run(pruned, inputs)) <= 1e-5
    if mode != "all":
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_counters_dims_and_replacements(name: str) -> None:
    model, _, layout = case(name)
    keep = make_keep(layout, "random", 3)
    pruned = prune_model(model, layout, keep)
    for g in layout.groups:
        kept = int(keep[g.name].sum())
        if kept == 0 and g.empty is not None:
            assert isinstance(pruned.get_submodule(g.owner),
                              (EmptyAttention, EmptyFluxJointAttention, EmptyPreOnlyAttention))
            continue
        for path, attr in g.counters:
            assert getattr(pruned.get_submodule(path), attr) == kept
        for path, attr in g.dims:
            assert getattr(pruned.get_submodule(path), attr) == kept * g.width
        for s in g.producers:
            lin = pruned.get_submodule(s.module)
            assert lin.weight.shape[0] == lin.out_features
        for s in g.gates:
            lin = pruned.get_submodule(s.module)
            if s.side == "out":
                assert isinstance(lin, ScatterLinear) and lin.weight.shape[0] == kept
            else:
                assert lin.weight.shape[1] == lin.in_features


@pytest.mark.parametrize("mode,seed", [("random", 4), ("none", 0)])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_counters_dims_match_weight_shapes(name: str, mode: str, seed: int) -> None:
    model, _, layout = case(name)
    keep = make_keep(layout, mode, seed)
    pruned = prune_model(model, layout, keep)
    check_counts_match_shapes(model, pruned, layout, {n: int(k.sum()) for n, k in keep.items()})


@pytest.mark.parametrize("mode,seed", [("random", 0), ("random", 1), ("none", 0)])
@pytest.mark.parametrize("name", TABLE_MODEL_NAMES)
def test_closed_must_keep_units_stay_silenced(name: str, mode: str, seed: int) -> None:
    """Groups that must keep 2 units (min_keep) keep them physically where the mask closes more,
    with zeroed gate-side weights: slicing still equals hard masking with the mask as given."""
    model, inputs, layout = case(name)
    strict = must_keep_layout(layout, 2)
    keep = make_keep(layout, mode, seed)
    scores = {g.name: torch.randn(g.count, generator=torch.Generator().manual_seed(seed)) for g in layout.groups}
    physical, silenced = physical_keep(strict, keep, scores)
    assert silenced == [g.name for g in strict.groups if int(keep[g.name].sum()) < g.min_keep]
    for g in strict.groups:
        assert int(physical[g.name].sum()) == max(g.min_keep, int(keep[g.name].sum()))
        assert bool((physical[g.name] >= keep[g.name]).all())
        added = physical[g.name] & ~keep[g.name]
        if added.any() and not physical[g.name].all():  # the best-scored removed units stay
            assert scores[g.name][added].min() >= scores[g.name][~physical[g.name]].max()
    pruned = prune_model(model, strict, keep, scores)
    check_counts_match_shapes(model, pruned, strict, {n: int(k.sum()) for n, k in physical.items()})
    assert rel_err(gated_output(model, inputs, layout, keep), run(pruned, inputs)) <= 1e-5


def _storages(model: nn.Module) -> set[int]:
    tensors = list(model.parameters()) + list(model.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0}


@pytest.mark.parametrize("name", TABLE_MODEL_NAMES)
def test_input_model_untouched_and_unshared(name: str) -> None:
    model, inputs, layout = case(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    heads = {n: m.heads for n, m in model.named_modules() if hasattr(m, "heads")}
    out_before = run(model, inputs)
    pruned = prune_model(model, layout, make_keep(layout, "random", 4))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert v.dtype == after[k].dtype and torch.equal(v, after[k]), k
    assert shapes == {n: (m.in_features, m.out_features) for n, m in model.named_modules()
                      if isinstance(m, nn.Linear)}
    assert heads == {n: m.heads for n, m in model.named_modules() if hasattr(m, "heads")}
    assert torch.equal(out_before, run(model, inputs))
    assert not (_storages(model) & _storages(pruned))
    with torch.no_grad():  # writing into the copy never reaches the original
        for p in pruned.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("name", TABLE_MODEL_NAMES)
def test_parameter_cost_is_exact_per_unit(name: str) -> None:
    model, _, layout = case(name)
    costs = parameter_costs(model, layout)
    total = sum(p.numel() for p in model.parameters())
    for g in layout.groups:
        keep = {gr.name: torch.ones(gr.count, dtype=torch.bool) for gr in layout.groups}
        keep[g.name][g.count // 2] = False
        pruned = prune_model(model, layout, keep)
        assert total - sum(p.numel() for p in pruned.parameters()) == costs[g.name], g.name


def test_scatter_linear_equals_masked_rows() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 7).double()
    rows = torch.tensor([0, 3, 6])
    sliced = nn.Linear(5, 3).double()
    with torch.no_grad():
        sliced.weight.copy_(lin.weight[rows])
        sliced.bias.copy_(lin.bias[rows])
    scatter = scatter_rows(sliced, rows, 7)
    assert isinstance(scatter, ScatterLinear) and isinstance(scatter, nn.Linear) and scatter.out_features == 7
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    mask = torch.zeros(7, dtype=torch.float64)
    mask[rows] = 1
    assert torch.allclose(scatter(x), lin(x) * mask)
    assert scatter(x).shape == (2, 4, 7)


def test_bad_keep_masks_are_rejected() -> None:
    model, _, layout = case("flux")
    good = make_keep(layout, "all", 0)
    name = layout.groups[0].name
    with pytest.raises(EcoDiffError, match="missing groups"):
        prune_model(model, layout, {k: v for k, v in good.items() if k != name})
    with pytest.raises(EcoDiffError, match="unknown groups"):
        prune_model(model, layout, {**good, "nope:heads": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(EcoDiffError, match="torch.bool"):
        prune_model(model, layout, {**good, name: good[name].float()})
    with pytest.raises(EcoDiffError, match="shape"):
        prune_model(model, layout, {**good, name: good[name][1:]})


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_weights_to_read_replace_the_modules_own(name: str) -> None:
    """``weights`` (e.g. the host's weight wrappers folded in) is read instead of the module's own
    values, for sliced and unsliced parameters alike: the result equals pruning a model that holds
    those values; the input and the given tensors stay untouched and unshared."""
    import copy

    model, inputs, layout = case(name)
    keep = make_keep(layout, "random", 5)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(3)
    weights = {n: p.detach() * (1 + torch.rand(p.shape, generator=g, dtype=p.dtype))
               for i, (n, p) in enumerate(params.items()) if i % 2 == 0}
    given = {n: t.clone() for n, t in weights.items()}
    holding = copy.deepcopy(model)
    with torch.no_grad():
        for n, t in weights.items():
            holding.get_parameter(n).copy_(t)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_model(model, layout, keep, weights=weights)
    expected = prune_model(holding, layout, keep).state_dict()
    got = pruned.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(weights[n], given[n]) for n in weights)
    assert not (_storages(pruned) & {t.untyped_storage().data_ptr() for t in weights.values()})
    assert rel_err(gated_output(holding, inputs, layout, keep), run(pruned, inputs)) <= 1e-5


def test_bad_weights_to_read_are_rejected() -> None:
    model, _, layout = case(MODEL_NAMES[0])
    keep = make_keep(layout, "all", 0)
    name, p = next(iter(model.named_parameters()))
    for bad, message in [({"no.such.weight": p.detach()}, "not a parameter"),
                         ({name: p.detach()[:1]}, "shape"),
                         ({name: p.detach().half()}, "dtype")]:
        with pytest.raises(EcoDiffError, match=message):
            prune_model(model, layout, keep, weights=bad)
