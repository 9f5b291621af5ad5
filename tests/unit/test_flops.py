"""FLOP accounting: measured savings equal the sum of removed unit costs."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from ecodiff_core.archs import find_layout
from ecodiff_core.flops import measure_flops, total_flops
from ecodiff_core.prune import prune_model
from tiny_models import MODEL_NAMES, build


@functools.cache
def case(name: str):
    model, inputs = build(name)
    return model, inputs, find_layout(model)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_measured_saving_equals_removed_unit_costs(name: str, seed: int) -> None:
    """Exact, not approximate: torch's counter counts matmuls and attention only, and those are
    exactly what unit costs cover (bias adds, norms, activations and the scatter of pruned
    modulation rows are uncounted on both sides)."""
    model, inputs, layout = case(name)
    fc = measure_flops(model, layout, lambda: model(**inputs))
    g = torch.Generator().manual_seed(seed)
    keep = {gr.name: torch.rand(gr.count, generator=g) < 0.5 for gr in layout.groups}
    keep[layout.groups[seed].name][:] = False  # include an emptied owner
    pruned = prune_model(model, layout, keep)
    predicted = sum(fc.per_unit[gr.name] * int((~keep[gr.name]).sum()) for gr in layout.groups)
    measured = fc.total - total_flops(lambda: pruned(**inputs))
    assert predicted > 0
    assert measured == pytest.approx(predicted, rel=1e-9)


def test_attention_is_counted_on_cpu() -> None:
    q = torch.randn(2, 3, 5, 8)
    assert total_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 4 * 2 * 3 * 5 * 5 * 8


def test_head_cost_includes_joint_attention_scores() -> None:
    model, inputs, layout = case("flux")
    fc = measure_flops(model, layout, lambda: model(**inputs))
    group = layout.by_name()["transformer_blocks.0.attn:heads"]
    batch, n_img, n_txt, dim, hd = 2, 16, 5, 24, 8
    linear = 2 * hd * dim * (3 * (n_img + n_txt) + n_img + n_txt)  # q/k/v of both streams + 2 outs
    scores = 4 * batch * (n_img + n_txt) ** 2 * hd
    assert fc.per_unit[group.name] == batch * linear + scores


def test_hooks_are_removed_after_measuring() -> None:
    model, inputs, layout = case("sdxl")
    measure_flops(model, layout, lambda: model(**inputs))
    assert not any(m._forward_pre_hooks for m in model.modules())
