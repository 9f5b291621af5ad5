"""Slicing full-size weight deltas (LoRA factors, diffs, biases, DoRA magnitudes) to a pruned model
== the dense computation: the full model + delta, hard-gated, computes what the pruned model +
sliced delta computes."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from ecodiff_core.archs import find_layout
from ecodiff_core.errors import EcoDiffError, LoraSliceError
from ecodiff_core.lora_slice import WeightCut, silenced_units, weight_cuts
from ecodiff_core.prune import physical_keep, prune_model
from test_prune import gated_output, make_keep, rel_err
from tiny_models import MODEL_NAMES, build, must_keep_layout, run


@functools.cache
def case(name: str):
    model, inputs = build(name)
    return model, inputs, find_layout(model)


def random_deltas(model, cuts, seed: int, rank: int = 3) -> dict[str, tuple]:
    """Per cut Linear: (up, down, bias delta or None), seeded."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, cut in cuts.items():
        lin = model.get_submodule(path)
        up = torch.randn(cut.full[0], rank, generator=g, dtype=torch.float64) * 0.3
        down = torch.randn(rank, cut.full[1], generator=g, dtype=torch.float64) * 0.3
        bias = None if lin.bias is None else torch.randn(cut.full[0], generator=g, dtype=torch.float64) * 0.1
        out[path] = (up, down, bias)
    return out


@torch.no_grad()
def with_full_deltas(model, deltas):
    merged = copy.deepcopy(model)
    for path, (up, down, bias) in deltas.items():
        lin = merged.get_submodule(path)
        lin.weight += up @ down
        if bias is not None:
            lin.bias += bias
    return merged


@torch.no_grad()
def add_sliced_deltas(pruned, cuts, deltas):
    for path, (up, down, bias) in deltas.items():
        cut = cuts[path]
        if cut.removed:  # the owner is gone: a weight delta cannot matter, an out-projection bias still does
            assert cut.empty
            if bias is not None and not cut.bias_cut().empty:
                pruned.get_submodule(path).bias += cut.slice_bias(bias)
            continue
        lin = pruned.get_submodule(path)
        su, sd = cut.slice_factors(up, down)
        assert torch.allclose(su @ sd, cut.slice_matrix(up @ down), atol=1e-12)
        assert tuple(lin.weight.shape) == cut.shape
        lin.weight += su @ sd
        if bias is not None:
            lin.bias += cut.slice_bias(bias)


@pytest.mark.parametrize("mode,seed", [("random", 0), ("random", 1), ("none", 0), ("all", 0)])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_sliced_lora_equals_hard_gated_full_lora(name: str, mode: str, seed: int) -> None:
    model, inputs, layout = case(name)
    keep = make_keep(layout, mode, seed)
    cuts = weight_cuts(model, layout, keep)
    deltas = random_deltas(model, cuts, seed)
    expected = gated_output(with_full_deltas(model, deltas), inputs, layout, keep)
    pruned = prune_model(model, layout, keep)
    add_sliced_deltas(pruned, cuts, deltas)
    assert rel_err(expected, run(pruned, inputs)) <= 1e-5
    if mode != "none":  # the delta matters: without it the outputs differ
        assert rel_err(expected, gated_output(model, inputs, layout, keep)) > 1e-3


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_silenced_units_keep_a_zero_delta(name: str) -> None:
    """Groups that must keep 2 units keep closed ones silenced; their delta features stay zero."""
    model, inputs, layout = case(name)
    strict = must_keep_layout(layout, 2)
    keep = make_keep(layout, "random", 5)
    physical, silenced = physical_keep(strict, keep)
    assert silenced
    silent = {n: physical[n] & ~keep[n] for n in silenced}
    cuts = weight_cuts(model, strict, physical, silent)
    assert any(c.silent_cols.numel() or c.silent_rows.numel() for c in cuts.values())
    deltas = random_deltas(model, cuts, 7)
    expected = gated_output(with_full_deltas(model, deltas), inputs, strict, keep)
    pruned = prune_model(model, strict, keep)
    add_sliced_deltas(pruned, cuts, deltas)
    assert rel_err(expected, run(pruned, inputs)) <= 1e-5


def test_silenced_units_from_a_record() -> None:
    keep = {"a": torch.tensor([False, True, False]), "b": torch.tensor([True, True])}
    out = silenced_units(keep, ["a"])
    assert set(out) == {"a"} and torch.equal(out["a"], keep["a"])


def toy_cut() -> WeightCut:
    """A 12×10 weight keeping rows 1,2,5,6,7,9,11 (row 6 silenced) and columns 0,3,4,8."""
    return WeightCut(full=(12, 10), rows=torch.tensor([1, 2, 5, 6, 7, 9, 11]), cols=torch.tensor([0, 3, 4, 8]),
                     silent_rows=torch.tensor([3]), silent_cols=torch.zeros(0, dtype=torch.long))


def dense_slice(delta: torch.Tensor, cut: WeightCut) -> torch.Tensor:
    out = delta[cut.rows][:, cut.cols].clone()
    out[cut.silent_rows] = 0
    out[:, cut.silent_cols] = 0
    return out


@pytest.mark.parametrize("rank", [1, 4])
def test_factor_slicing_equals_dense(rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    cut = toy_cut()
    up, down = torch.randn(12, rank, generator=g), torch.randn(rank, 10, generator=g)
    su, sd = cut.slice_factors(up, down)
    assert su.shape == (7, rank) and sd.shape == (rank, 4)
    assert torch.allclose(su @ sd, dense_slice(up @ down, cut), atol=1e-6)
    assert torch.allclose(cut.slice_matrix(up @ down), dense_slice(up @ down, cut))
    bias = torch.randn(12, generator=g)
    expected = bias[cut.rows].clone()
    expected[3] = 0
    assert torch.equal(cut.slice_bias(bias), expected)


@pytest.mark.parametrize("start,length", [(0, 12), (0, 4), (4, 4), (8, 4), (3, 2), (10, 0)])
def test_narrow_addresses_the_pruned_block(start: int, length: int) -> None:
    """An offset patch into a fused weight (q/k/v thirds): the sub-cut slices the block's delta to
    exactly the rows the pruned fused weight holds at the translated offset."""
    g = torch.Generator().manual_seed(start)
    cut = toy_cut()
    delta = torch.randn(12, 10, generator=g)
    sub, new_start, new_len = cut.narrow(0, start, length)
    whole = dense_slice(delta, cut)
    block = sub.slice_matrix(delta[start:start + length]) if length else torch.zeros(0, 4)
    assert sub.shape == (new_len, 4)
    assert torch.equal(whole[new_start:new_start + new_len], block)
    with pytest.raises(LoraSliceError):
        cut.narrow(0, 8, 5)


def test_dora_scale_slices_only_along_uncut_norms() -> None:
    rows_cut = WeightCut(full=(6, 4), rows=torch.tensor([0, 2, 5]), cols=torch.arange(4),
                         silent_rows=torch.zeros(0, dtype=torch.long), silent_cols=torch.zeros(0, dtype=torch.long))
    cols_cut = WeightCut(full=(6, 4), rows=torch.arange(6), cols=torch.tensor([1, 3]),
                         silent_rows=torch.zeros(0, dtype=torch.long), silent_cols=torch.zeros(0, dtype=torch.long))
    row_scale, col_scale = torch.arange(6.0).reshape(6, 1), torch.arange(4.0).reshape(1, 4)
    assert torch.equal(rows_cut.slice_dora_scale(row_scale), row_scale[[0, 2, 5]])
    assert torch.equal(cols_cut.slice_dora_scale(col_scale), col_scale[:, [1, 3]])
    for cut, scale in ((rows_cut, col_scale), (cols_cut, row_scale)):
        with pytest.raises(LoraSliceError, match="norm"):
            cut.slice_dora_scale(scale)
    with pytest.raises(LoraSliceError, match="fits neither"):
        rows_cut.slice_dora_scale(torch.ones(5, 1))


def test_wrong_shapes_are_clear_errors() -> None:
    cut = toy_cut()
    with pytest.raises(LoraSliceError, match="rows"):
        cut.slice_factors(torch.ones(11, 2), torch.ones(2, 10))
    with pytest.raises(LoraSliceError, match="full-size weight"):
        cut.slice_matrix(torch.ones(7, 4))
    assert issubclass(LoraSliceError, EcoDiffError)
