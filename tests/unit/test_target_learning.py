"""Target-aware learning: the expected removed cost of the gates, held at the target by learned
Lagrange multipliers; checked against Monte Carlo, on a tiny model, across a resume, and for bad settings."""
import math

import pytest
import torch

from ecodiff_core.archs import find_layout
from ecodiff_core.denoisers import flow_denoiser
from ecodiff_core.distributed import DataParallel
from ecodiff_core.errors import MaskFileError, SettingsError
from ecodiff_core.flops import measure_flops
from ecodiff_core.hard_concrete import GateSettings, open_probability, sample_gate, uniform_noise
from ecodiff_core.learn import CalibrationSample, LearnSettings, MaskLearner
from ecodiff_core.maskfile import load_mask, save_mask
from ecodiff_core.plan import count_parameters
from ecodiff_core.target_constraint import expected_removed_fraction, ramped_target
from ecodiff_core.units import parameter_costs
from tiny_models import build


@pytest.fixture(scope="module")
def flux():
    """(model, layout, samples, sigmas): the tiny FLUX-like transformer, one prompt, a 1-step trajectory."""
    model, inputs = build("flux", torch.float32)
    cond = {k: inputs[k][:1] for k in ("encoder_hidden_states", "pooled_projections")}
    cond.update(img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"])
    denoise = flow_denoiser(model, cond, None, cfg=1.0)
    noise = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(0))
    return model, find_layout(model), [CalibrationSample(denoise, noise)], torch.linspace(1, 0, 2)


def costs_and_total(model, layout, samples, sigmas, mode):
    """The reference prices: parameters removed per unit over all parameters, or FLOPs of one call."""
    if mode == "params":
        return parameter_costs(model, layout), count_parameters(model)
    flops = measure_flops(model, layout, lambda: samples[0].denoise(samples[0].noise, sigmas[0]))
    return flops.per_unit, flops.total


@pytest.mark.parametrize("offset, keep", [(0.0, 0), (0.1, 0), (0.5, 0), (0.0, 2)])
def test_expected_removed_cost_equals_monte_carlo_over_sampled_gates(flux, offset, keep):
    """``keep`` > 0: every group keeps its ``keep`` highest-logit units, as the planner does for min_keep."""
    model, layout, _, _ = flux
    settings = GateSettings(noise_offset=offset)
    g = torch.Generator().manual_seed(3)
    logits = {gr.name: torch.randn(gr.count, generator=g, dtype=torch.float64) * 2 - 1 for gr in layout.groups}
    costs, total = parameter_costs(model, layout), count_parameters(model)
    min_keep = {gr.name: keep for gr in layout.groups}
    exact = expected_removed_fraction(logits, costs, total, settings, min_keep).item()
    draws, sizes = 20_000, [gr.count for gr in layout.groups]
    u = uniform_noise(draws * sum(sizes), g).double().reshape(draws, -1)
    removed = torch.zeros(draws, dtype=torch.float64)
    for gr, part in zip(layout.groups, torch.split(u, sizes, dim=1), strict=True):
        closed = sample_gate(logits[gr.name].expand(draws, -1), part, settings) == 0
        closed[:, torch.topk(logits[gr.name], keep).indices] = False  # kept by the planner whatever the gate
        removed += closed.double().sum(1) * costs[gr.name] / total
    error = removed.std().item() / math.sqrt(draws)
    assert 0.05 < exact < 0.95 * sum(costs[gr.name] * gr.count for gr in layout.groups) / total
    assert abs(removed.mean().item() - exact) < 4 * error, (removed.mean().item(), exact, error)
    if keep:
        assert exact < expected_removed_fraction(logits, costs, total, settings).item()


@pytest.mark.parametrize("offset", [0.0, 0.1, 0.5])
def test_open_probability_is_the_share_of_non_zero_gates(offset):
    settings = GateSettings(noise_offset=offset)
    lam = torch.linspace(-5, 3, 9, dtype=torch.float64)
    u = uniform_noise(200_000, torch.Generator().manual_seed(1)).double()
    share = torch.stack([(sample_gate(torch.full_like(u, v), u, settings) > 0).double().mean() for v in lam])
    torch.testing.assert_close(open_probability(lam, settings), share, rtol=0, atol=5e-3)
    if offset == 0:  # Louizos et al.: sigmoid(λ − β log(−γ/ζ))
        louizos = torch.sigmoid(lam - settings.temperature * math.log(-settings.gamma / settings.zeta))
        torch.testing.assert_close(open_probability(lam, settings), louizos)


@pytest.mark.parametrize("warmup, step, total, want", [
    (0.5, 0, 10, 0.06), (0.5, 4, 10, 0.3), (0.5, 9, 10, 0.3), (0.0, 0, 10, 0.3), (1.0, 1, 4, 0.15),
])
def test_target_ramps_linearly_over_the_warmup(warmup, step, total, want):
    assert ramped_target(0.3, warmup, step, total) == pytest.approx(want)


TARGET_RUN = dict(epochs=120, accumulate=1, lr={"head": 0.2, "neuron": 0.2, "channel": 0.2}, target_warmup=0.5)


@pytest.mark.parametrize("mode, target", [("params", 0.3), ("flops", 0.4)])
def test_constraint_drives_expected_sparsity_to_the_target(flux, mode, target):
    model, layout, samples, sigmas = flux
    settings = LearnSettings.for_target(target, mode, **TARGET_RUN)
    state = MaskLearner(model, layout, settings).learn(samples, sigmas)
    costs, total = costs_and_total(model, layout, samples, sigmas, mode)
    shift = settings.gate.temperature * math.log(-settings.gate.gamma / settings.gate.zeta)
    expected = sum(costs[n] * (1 - torch.sigmoid(lam.double() - shift)).sum().item()
                   for n, lam in state.logits.items()) / total
    assert state.history[0]["expected_sparsity"] < 0.05  # the gates start open
    assert abs(expected - target) < 0.02, expected
    assert state.history[-1]["expected_sparsity"] == pytest.approx(expected, abs=0.01)  # last step's value
    assert state.history[-1]["target"] == target and state.progress["multipliers"][1] > 0


class SecondOfTwo(DataParallel):
    """Process 1 of 2 without a process group: it owns the odd prompts and sums only its own share."""

    def __init__(self):
        super().__init__(1, 2)

    def all_reduce(self, grads, loss):
        return loss

    def barrier(self):
        pass


def test_flops_target_is_priced_on_a_prompt_this_process_owns(flux):
    """Under data-parallel learning a process holds only its share of the samples (the others are
    None, as the command line passes them): the FLOP prices come from one of its own."""
    model, layout, samples, sigmas = flux
    settings = LearnSettings.for_target(0.3, "flops", **{**TARGET_RUN, "epochs": 1})
    learner = MaskLearner(model, layout, settings, parallel=SecondOfTwo())
    learner.learn([None, samples[0]], sigmas)
    costs, total = costs_and_total(model, layout, samples, sigmas, "flops")
    assert learner.constraint.total == total and learner.constraint.costs == costs


def test_a_process_without_prompts_cannot_price_flops(flux):
    """More processes than prompts: the FLOPs target has nothing to measure on (a clear error); the
    parameter target needs no forward and is built as usual."""
    model, layout, samples, sigmas = flux
    settings = LearnSettings.for_target(0.3, "flops", **{**TARGET_RUN, "epochs": 1})
    with pytest.raises(SettingsError, match="no calibration prompt to measure FLOPs on"):
        MaskLearner(model, layout, settings, parallel=SecondOfTwo()).learn(samples, sigmas)
    learner = MaskLearner(model, layout, LearnSettings.for_target(0.3, "params", **{**TARGET_RUN, "epochs": 1}),
                          parallel=SecondOfTwo())
    learner.learn(samples, sigmas)
    assert learner.constraint.total == count_parameters(model)


def test_resume_gives_the_same_multipliers_and_logits(flux, tmp_path):
    model, layout, samples, sigmas = flux
    settings = LearnSettings.for_target(0.3, **{**TARGET_RUN, "epochs": 6})
    straight = MaskLearner(model, layout, settings).learn(samples, sigmas)
    half = MaskLearner(model, layout, settings).learn(samples, sigmas, callback=lambda info: info.step < 3)
    assert half.progress["step"] == 3 and half.progress["multipliers"] != [0.0, 0.0]
    resumed = MaskLearner(model, layout, settings,
                          resume=load_mask(save_mask(tmp_path / "half.safetensors", half), layout))
    final = resumed.learn(samples, sigmas)
    assert final.progress["multipliers"] == straight.progress["multipliers"]
    assert final.history == straight.history
    for name in straight.logits:
        assert torch.equal(final.logits[name], straight.logits[name]), name


def test_target_settings_round_trip_and_keep_the_official_default():
    assert LearnSettings().regularizer == "l1"  # today's behaviour stays the default
    settings = LearnSettings.for_target(0.4, "flops", gate=GateSettings(init_logit=2.0, noise_offset=0.5))
    assert settings.gate.noise_offset == 0 and settings.gate.init_logit == 2.0
    assert LearnSettings.from_dict(settings.to_dict()) == settings


@pytest.mark.parametrize("change, message", [
    (dict(target=0.0), "target"), (dict(target=1.5), "fraction"), (dict(target=30), "did you mean 0.3"),
    (dict(target=math.nan), "target"), (dict(target_mode="bytes"), "target_mode"),
    (dict(target_warmup=1.5), "target_warmup"), (dict(target_warmup=-0.1), "target_warmup"),
    (dict(multiplier_lr=0.0), "multiplier_lr"), (dict(penalty_lr=-1.0), "penalty_lr"),
    (dict(gate=GateSettings()), "noise_offset to 0"),
])
def test_bad_target_settings_raise_settings_error(change, message):
    with pytest.raises(SettingsError, match=message):
        LearnSettings(**{"regularizer": "target", "gate": GateSettings(noise_offset=0.0), **change})


@pytest.mark.parametrize("multipliers", ["x", [1.0], [1.0, math.inf], [True, 0.0]])
def test_damaged_saved_multipliers_are_refused(flux, multipliers):
    model, layout, samples, sigmas = flux
    settings = LearnSettings.for_target(0.3, epochs=1)
    saved = MaskLearner(model, layout, settings).state
    saved.progress["multipliers"] = multipliers
    with pytest.raises(MaskFileError, match="multipliers are damaged"):
        MaskLearner(model, layout, settings, resume=saved).learn(samples, sigmas)


def _fresh(flux):
    """The tiny run's samples without the targets and teachers an earlier run cached on them, on a
    2-step trajectory (with one step the per-step and end-to-end losses are the same)."""
    model, layout, samples, _ = flux
    return model, layout, [CalibrationSample(s.denoise, s.noise) for s in samples], torch.linspace(1, 0, 3)


@pytest.mark.parametrize("regularizer", ["sigmoid", "target"])
def test_warm_start_learns_per_step_first_then_with_the_objective(flux, regularizer):
    model, layout, samples, sigmas = _fresh(flux)
    base = dict(epochs=4, lr={"head": 0.3, "neuron": 0.3, "channel": 0.3}, beta=0.5, objective="end_to_end")
    make = (lambda **f: LearnSettings.for_target(0.3, **{**base, **f})) if regularizer == "target" else \
        (lambda **f: LearnSettings(regularizer=regularizer, **{**base, **f}))
    warm = MaskLearner(model, layout, make(warm_start=0.5)).learn(samples, sigmas)
    per_step = MaskLearner(model, layout, make(objective="per_step", warm_start=0.0)).learn(samples, sigmas)
    end_to_end = MaskLearner(model, layout, make(warm_start=0.0)).learn(samples, sigmas)
    steps = len(warm.history) // 4 * 2  # optimiser steps of the two warm-start epochs
    assert warm.history[:steps] == per_step.history[:steps]  # the same per-step updates, step for step
    assert warm.history[steps]["recon"] != per_step.history[steps]["recon"]  # then the end-to-end loss
    assert warm.history[steps]["recon"] != end_to_end.history[steps]["recon"]
    assert samples[0].target is not None and samples[0].teacher is not None  # both objectives prepared


def test_warm_start_resumes_into_the_end_to_end_epochs(flux, tmp_path):
    model, layout, samples, sigmas = _fresh(flux)
    settings = LearnSettings(epochs=4, warm_start=0.5, beta=0.5, objective="end_to_end")
    assert settings.warm_start_epochs == 2
    straight = MaskLearner(model, layout, settings).learn(samples, sigmas)
    half = MaskLearner(model, layout, settings).learn(samples, sigmas, callback=lambda info: info.step < 3)
    saved = load_mask(save_mask(tmp_path / "half.safetensors", half), layout)
    resumed = MaskLearner(model, layout, settings, resume=saved)
    final = resumed.learn(_fresh(flux)[2], sigmas)
    assert final.history == straight.history
    for name in straight.logits:
        assert torch.equal(final.logits[name], straight.logits[name]), name


@pytest.mark.parametrize("value, message", [(-0.1, "warm_start"), (1.5, "must lie in"), (math.nan, "warm_start"),
                                            ("half", "warm_start")])
def test_bad_warm_start_raises_settings_error(value, message):
    with pytest.raises(SettingsError, match=message):
        LearnSettings(epochs=4, warm_start=value, objective="end_to_end")


@pytest.mark.parametrize("warm_start, epochs, want", [(0.5, 8, 4), (0.5, 1, 0), (0.5, 3, 1), (1.0, 3, 3), (0.0, 5, 0),
                                                       (0.3, 10, 3)])
def test_warm_start_epochs_are_the_floor_of_the_fraction(warm_start, epochs, want):
    assert LearnSettings(epochs=epochs, warm_start=warm_start, objective="end_to_end").warm_start_epochs == want


def test_a_warm_start_needs_the_end_to_end_objective():
    with pytest.raises(SettingsError, match="set objective 'end_to_end' or warm_start 0"):
        LearnSettings(warm_start=0.5, objective="per_step")
