"""Apply's warnings on a mask (unfinished, barely learned, other weights) and on a plan (almost emptied
kinds and blocks), and the planner's per-kind ranking on the digits model after a short run."""
from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from ecodiff_core.archs import find_layout
from ecodiff_core.embedded.demo import calibration_samples, learn_mask, official_learn_settings
from ecodiff_core.embedded.model import load_default_model, sigmas
from ecodiff_core.embedded.text import calibration_prompts
from ecodiff_core.mask_checks import ALMOST_EMPTY, closed_fraction, mask_warnings, plan_warnings
from ecodiff_core.maskfile import MaskState
from ecodiff_core.plan import PruneTarget, plan_pruning, ranking_scores


@functools.cache
def digits():
    model = load_default_model()
    return model, find_layout(model.transformer)


@functools.cache
def short_run(lr_heads: float, lr_neurons: float, lr_channels: float) -> MaskState:
    """One trajectory of ten prompts, one epoch, 4 steps: far too short to close any gate."""
    model, layout = digits()
    prompts, _ = calibration_prompts(1)
    samples = calibration_samples(model, prompts, 1.5, 10, 0)
    settings = replace(official_learn_settings(), epochs=1, accumulate=1,
                       lr={"head": lr_heads, "neuron": lr_neurons, "channel": lr_channels})
    return learn_mask(model.transformer, layout, settings, samples, sigmas(4)).state


def removed_per_kind(layout, keep) -> dict[str, float]:
    counts: dict[str, list[int]] = {}
    for g in layout.groups:
        c = counts.setdefault(g.kind, [0, 0])
        c[0] += int((~keep[g.name]).sum())
        c[1] += g.count
    return {kind: removed / total for kind, (removed, total) in counts.items()}


LEARNING_RATES = [(0.5, 0.1, 0.5), (0.1, 0.1, 0.5), (0.1, 0.5, 0.1)]


@pytest.mark.parametrize("lr", LEARNING_RATES, ids=str)
def test_the_ranking_is_not_dominated_by_the_fastest_kind(lr):
    """Raw logits: the kind with the highest rate moved furthest and loses most of its units at 0.3
    (the issue's 96 % of one kind); ranked by (λ − λ₀)/lr every kind keeps most of its units."""
    model, layout = digits()
    state = short_run(*lr)
    fastest = max(zip(lr, ("head", "neuron", "channel"), strict=True))[1]
    raw = removed_per_kind(layout, plan_pruning(model.transformer, layout, state.logits,
                                                PruneTarget(params=0.3)).keep)
    scaled = removed_per_kind(layout, plan_pruning(model.transformer, layout, state.logits,
                                                   PruneTarget(params=0.3), settings=state.settings).keep)
    slowest = min(raw, key=raw.get)
    assert raw[slowest] < 0.05 and max(raw.values()) > 0.45, raw  # the fault this fixes
    assert max(scaled.values()) < 0.6 and min(scaled.values()) > 0.1, (fastest, scaled)


def test_per_kind_scores_are_logit_steps_and_independent_of_the_rates():
    """(λ − λ₀)/lr checked against the formula; after one AdamW step (|Δλ| = lr for every unit with a
    gradient) the scores, and so the plans, do not depend on the per-kind rates."""
    model, layout = digits()
    a, b = short_run(0.5, 0.1, 0.5), short_run(0.1, 0.5, 0.1)
    scores = ranking_scores(layout, a.logits, a.settings)
    for g in layout.groups:
        expected = (a.logits[g.name].double() - a.settings.gate.init_logit) / a.settings.lr[g.kind]
        torch.testing.assert_close(scores[g.name], expected)
    assert ranking_scores(layout, a.logits, None)[layout.groups[0].name].equal(a.logits[layout.groups[0].name].double())
    # plans of 4-step runs at other rates remove similar amounts per kind
    plan_a = plan_pruning(model.transformer, layout, a.logits, PruneTarget(params=0.3), settings=a.settings)
    plan_b = plan_pruning(model.transformer, layout, b.logits, PruneTarget(params=0.3), settings=b.settings)
    ra, rb = removed_per_kind(layout, plan_a.keep), removed_per_kind(layout, plan_b.keep)
    assert all(abs(ra[k] - rb[k]) < 0.25 for k in ra), (ra, rb)


def fake_state(layout, logits: dict, *, finished=True, epochs=4, weights="w1") -> MaskState:
    state = MaskState.fresh(layout, 3.0)
    state.logits = logits
    state.progress = {"epoch": epochs if finished else 1, "position": 0, "step": 7, "finished": finished}
    state.settings = replace(state.settings, epochs=epochs)
    state.inputs = {"weights": weights}
    return state


@pytest.mark.parametrize("finished, closed, weights, expected, count", [
    (True, 0.5, "w1", [], 0),
    (False, 0.5, "w1", ["unfinished: learning stopped after 7 optimiser steps, 1 of 4 epochs"], 1),
    (True, 0.0, "w1", ["almost no gate of the mask closed (0.0% of units"], 1),
    (True, 0.5, "w2", ["learned on other weights", "fingerprint w1, this model w2"], 1),
    (True, 0.5, None, [], 0),
    (False, 0.0, "w2", ["unfinished", "almost no gate", "other weights"], 3),
])
def test_mask_warnings(finished, closed, weights, expected, count):
    _, layout = digits()
    logits = {g.name: torch.where(torch.arange(g.count) < round(closed * g.count), -1.0, 1.0)
              for g in layout.groups}
    state = fake_state(layout, logits, finished=finished)
    assert closed_fraction(state) == pytest.approx(closed, abs=0.05)
    warnings = mask_warnings(state, weights)
    assert len(warnings) == count, warnings
    for part in expected:
        assert any(part in w for w in warnings), (part, warnings)


def test_plan_warnings_name_almost_emptied_kinds_and_blocks():
    _, layout = digits()
    keep = {g.name: torch.ones(g.count, dtype=torch.bool) for g in layout.groups}
    assert plan_warnings(layout, keep) == []
    heads = [g for g in layout.groups if g.kind == "head"]
    for g in heads:  # keep one head in all: 1/N < ALMOST_EMPTY of the heads
        keep[g.name] = torch.zeros(g.count, dtype=torch.bool)
    keep[heads[0].name][0] = True
    total = sum(g.count for g in heads)
    assert 1 / total < ALMOST_EMPTY
    warnings = plan_warnings(layout, keep)
    assert f"pruning removes {1 - 1 / total:.0%} of the heads ({total - 1} of {total})" in warnings[0]
    block = layout.groups[-1].block
    keep = {g.name: torch.full((g.count,), g.block != block, dtype=torch.bool) for g in layout.groups}
    in_block = sum(g.count for g in layout.groups if g.block == block)
    assert plan_warnings(layout, keep) == [f"pruning removes 100% of the units of block {block} ({in_block} of "
                                           f"{in_block}): the model may break; lower the target or use keep_ratios"]
