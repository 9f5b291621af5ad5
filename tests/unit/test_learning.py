"""Time-step checkpointing, learning, resume and bad settings on tiny diffusers models."""
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_map

from ecodiff_core.archs import find_layout
from ecodiff_core.denoisers import EpsSchedule, flow_denoiser, unet_eps_denoiser
from ecodiff_core.errors import SettingsError
from ecodiff_core.gate_hooks import GateController
from ecodiff_core.hard_concrete import GateSettings, sample_gate, uniform_noise
from ecodiff_core.learn import (
    CalibrationSample,
    LearnSettings,
    MaskLearner,
    digest,
    frozen_weights,
    model_response,
    responses_match,
    resume_problem,
    run_inputs,
    weights_digest,
)
from ecodiff_core.maskfile import load_mask, save_mask
from ecodiff_core.memory import meta_copy
from ecodiff_core.trajectory import trajectory_gradient
from tiny_models import MODEL_NAMES, build


def make_problem(name: str, steps: int, cfg: bool, dtype=torch.float64, seed: int = 0, meta: bool = False):
    """(model, layout, denoiser, noise, sigmas) for one prompt of a tiny model (``meta``: a meta-device
    copy of the model and meta inputs of the same shapes, for memory traces)."""
    model, inputs = build(name, dtype)
    if meta:
        model = meta_copy(model)
        inputs = tree_map(lambda t: torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t, inputs)
    half = {k: (v[:1], v[1:]) for k, v in inputs.items()
            if k in ("encoder_hidden_states", "pooled_projections")}
    cond = {k: v[0] for k, v in half.items()}
    uncond = {k: v[1] for k, v in half.items()} if cfg else None
    g = torch.Generator().manual_seed(seed)
    if name == "flux":
        for key in ("img_ids", "txt_ids"):
            cond[key] = inputs[key]
            if uncond is not None:
                uncond[key] = inputs[key]
        denoise = flow_denoiser(model, cond, uncond, cfg=2.5)
        sigmas = torch.linspace(1, 0, steps + 1, dtype=dtype)
        noise = torch.randn(1, 16, 4, generator=g, dtype=dtype)
    else:
        if "added_cond_kwargs" in inputs:
            cond["added_cond_kwargs"] = {k: v[:1] for k, v in inputs["added_cond_kwargs"].items()}
            if uncond is not None:
                uncond["added_cond_kwargs"] = {k: v[1:] for k, v in inputs["added_cond_kwargs"].items()}
        schedule = EpsSchedule.scaled_linear()
        denoise = unet_eps_denoiser(model, schedule, cond, uncond, cfg=2.5)
        sigmas = schedule.karras(steps).to(dtype)
        noise = torch.randn(1, 4, 8, 8, generator=g, dtype=dtype) * sigmas[0]
    if meta:
        noise, sigmas = noise.to("meta"), sigmas.to("meta")
    return model, find_layout(model), denoise, noise, sigmas


def random_logits(layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {gr.name: nn.Parameter(torch.randn(gr.count, generator=g, dtype=dtype) + 1.0) for gr in layout.groups}


def gate_replayer(controller, layout, logits, settings=None):
    settings = settings or GateSettings()
    sizes = [g.count for g in layout.groups]

    def before_step(i):
        u = uniform_noise(sum(sizes), torch.Generator().manual_seed(1000 + i)).double()
        controller.set({g.name: sample_gate(logits[g.name], part, settings)
                        for g, part in zip(layout.groups, torch.split(u, sizes), strict=True)})
    return before_step


def gradients(name, steps, cfg, checkpointing, record=None):
    model, layout, denoise, noise, sigmas = make_problem(name, steps, cfg)
    if record is not None:
        inner = denoise

        def denoise(x, sigma):
            out = inner(x, sigma)
            record.append((sigma.item(), out.detach().clone()))
            return out
    logits = random_logits(layout, torch.float64)
    target = torch.randn_like(noise)
    controller = GateController(model, layout)
    with controller.installed():
        result = trajectory_gradient(denoise, noise, sigmas, target, list(logits.values()),
                                     gate_replayer(controller, layout, logits), checkpointing=checkpointing)
    return result, list(logits.values())


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("steps", [1, 3, 8])
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
def test_checkpointed_gradient_equals_autograd(name, steps, cfg):
    ckpt, _ = gradients(name, steps, cfg, checkpointing=True)
    full, _ = gradients(name, steps, cfg, checkpointing=False)
    a, b = flat(ckpt.grads), flat(full.grads)
    assert b.norm() > 0
    assert ckpt.loss == pytest.approx(full.loss, rel=1e-12)
    assert ((a - b).norm() / b.norm()).item() <= 1e-4  # float64: observed ~1e-15


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_recomputed_step_equals_rollout_step(name):
    calls = []
    gradients(name, 3, True, checkpointing=True, record=calls)
    rollout, recompute = calls[:3], calls[3:][::-1]
    for (s1, a), (s2, b) in zip(rollout, recompute, strict=True):
        assert s1 == s2 and torch.equal(a, b)


def test_plain_gradient_matches_finite_differences():
    result, params = gradients("sd15", 3, True, checkpointing=True)
    model, layout, denoise, noise, sigmas = make_problem("sd15", 3, True)
    logits = random_logits(layout, torch.float64)
    target = torch.randn_like(noise)
    controller = GateController(model, layout)
    name = layout.groups[0].name
    index = 1
    eps = 1e-6

    def loss_at(delta):
        with torch.no_grad():
            logits[name][index] += delta
        with controller.installed():
            out = trajectory_gradient(denoise, noise, sigmas, target, list(logits.values()),
                                      gate_replayer(controller, layout, logits), checkpointing=True)
        with torch.no_grad():
            logits[name][index] -= delta
        return out

    base = loss_at(0.0)
    numeric = (loss_at(eps).loss - loss_at(-eps).loss) / (2 * eps)
    analytic = base.grads[0][index].item()
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-10)
    assert result.loss == pytest.approx(base.loss)


def samples_for(name, n, steps=2, cfg=True):
    model, layout, denoise, _, sigmas = make_problem(name, steps, cfg, dtype=torch.float32)
    noises = [make_problem(name, steps, cfg, dtype=torch.float32, seed=s)[3] for s in range(n)]
    return model, layout, [CalibrationSample(denoise, x) for x in noises], sigmas


FAST = dict(epochs=2, accumulate=2, beta=0.05, lr={"head": 0.5, "neuron": 0.5, "channel": 0.5})


def test_learning_reduces_reconstruction_loss_against_the_initial_mask():
    model, layout, samples, sigmas = samples_for("sd15", 4)
    settings = LearnSettings(**{**FAST, "epochs": 6, "beta": 0.0},
                             gate=GateSettings(init_logit=0.0))
    learner = MaskLearner(model, layout, settings)
    infos = []
    learner.learn(samples, sigmas, callback=infos.append)
    first, last = infos[0].recon, sum(i.recon for i in infos[-2:]) / 2
    assert len(infos) == 12 and last < first


@pytest.mark.parametrize("checkpointing", [True, False])
def test_resume_gives_the_same_result(tmp_path, checkpointing):
    model, layout, samples, sigmas = samples_for("flux", 3)
    settings = LearnSettings(**FAST, checkpointing=checkpointing)
    straight = MaskLearner(model, layout, settings).learn(samples, sigmas)
    first = MaskLearner(model, layout, settings)
    half = first.learn(samples, sigmas, callback=lambda info: info.step < 2)
    assert half.progress["step"] == 2 and "stopped" in half.stop_reason
    path = save_mask(tmp_path / "partial.safetensors", half)
    resumed = MaskLearner(model, layout, settings, resume=load_mask(path, layout)).learn(samples, sigmas)
    assert resumed.progress["finished"] and resumed.progress["step"] == straight.progress["step"] == 4
    for name in straight.logits:
        torch.testing.assert_close(resumed.logits[name], straight.logits[name], rtol=0, atol=1e-6)


RESUME_CHANGES = {
    "nothing": {},
    "checkpointing only": {"settings": {"checkpointing": False}},  # memory/time only: still resumes
    "other weights": {"weights": True},
    "other prompts": {"conditioning": torch.ones(1, 4, 8)},
    "beta": {"settings": {"beta": 0.1}},
    "learning rate": {"settings": {"lr": {"head": 0.4, "neuron": 0.5, "channel": 0.5}}},
    "epochs": {"settings": {"epochs": 3}},
    "sampling steps": {"sampling": {"steps": 3}},
    "sigma schedule": {"sampling": {"sigmas": torch.linspace(1, 0, 3) ** 2}},
}


@pytest.mark.parametrize("change", list(RESUME_CHANGES))
def test_resume_only_with_the_same_inputs(tmp_path, change, caplog):
    """An unfinished run is continued only for the inputs it recorded; otherwise the result is exactly
    a fresh run's and the state (and the ecodiff log) says why."""
    import copy

    model, layout, samples, sigmas = samples_for("flux", 3)
    settings = LearnSettings(**FAST)
    conditioning = torch.zeros(1, 4, 8)
    sampling = {"steps": 2, "cfg": 2.5, "sigmas": sigmas}
    first = MaskLearner(model, layout, settings, inputs=run_inputs(model, conditioning, settings, sampling))
    half = first.learn(samples, sigmas, callback=lambda info: info.step < 2)
    saved = load_mask(save_mask(tmp_path / "partial.safetensors", half), layout)
    assert saved.inputs == json_round_trip(half.inputs) and not saved.progress["finished"]

    spec = RESUME_CHANGES[change]
    if spec.get("weights"):
        model = copy.deepcopy(model)
        with torch.no_grad():
            next(model.parameters()).mul_(1.001)
    settings = dataclasses_replace(settings, **spec.get("settings", {}))
    conditioning = spec.get("conditioning", conditioning)
    sampling = {**sampling, **spec.get("sampling", {})}
    inputs = run_inputs(model, conditioning, settings, sampling)
    with caplog.at_level("WARNING", logger="ecodiff"):
        resumed = MaskLearner(model, layout, settings, resume=saved, inputs=inputs).learn(samples, sigmas)
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    if change in ("nothing", "checkpointing only"):
        straight = MaskLearner(model, layout, settings).learn(samples, sigmas)
        assert resumed.start_note == "" and not warned
        assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
        for name in straight.logits:
            torch.testing.assert_close(resumed.logits[name], straight.logits[name], rtol=0, atol=1e-6)
        return
    fresh = MaskLearner(model, layout, settings, inputs=inputs).learn(samples, sigmas)
    assert all(torch.equal(resumed.logits[n], fresh.logits[n]) for n in fresh.logits)
    assert resumed.history == fresh.history and resumed.inputs == inputs
    reason = {"other weights": "weights differ", "other prompts": "prompts (conditioning) differ",
              "beta": "beta 0.05 → 0.1",
              "learning rate": "lr ", "epochs": "epochs 2 → 3", "sampling steps": "steps 2 → 3",
              "sigma schedule": "sampling settings changed: sigmas"}[change]
    assert resumed.start_note.startswith("started fresh") and reason in resumed.start_note, resumed.start_note
    assert any(reason in r.getMessage() for r in caplog.records if r.name == "ecodiff")


def test_resume_without_recorded_inputs_starts_fresh(tmp_path):
    model, layout, samples, sigmas = samples_for("sd15", 2)
    settings = LearnSettings(**FAST)
    half = MaskLearner(model, layout, settings).learn(samples, sigmas, callback=lambda info: False)
    assert half.inputs == {}
    inputs = run_inputs(model, None, settings, {})
    learner = MaskLearner(model, layout, settings, resume=half, inputs=inputs)
    assert "does not record" in learner.start_note and learner.progress["step"] == 0


def test_weights_digest_sees_every_tensor_and_is_stable():
    import copy

    model, _ = build("sd15", torch.float32)
    base = weights_digest(model)
    assert weights_digest(copy.deepcopy(model)) == base and len(base) == 16
    for name, p in list(model.named_parameters())[::9]:  # a small dense change of one tensor is seen
        original = p.detach().clone()
        with torch.no_grad():
            p.add_(1e-4)
            assert weights_digest(model) != base, name
            p.copy_(original)
    assert weights_digest(model) == base
    assert weights_digest(copy.deepcopy(model).half()) != base
    with torch.inference_mode():
        fp8 = torch.randn(5000).to(torch.float8_e4m3fn)
    assert digest(fp8, sample=64) == digest(fp8.clone(), sample=64) != digest(fp8[:4999], sample=64)


def json_round_trip(obj):
    import json

    return json.loads(json.dumps(obj))


def dataclasses_replace(settings, **changes):
    import dataclasses

    return dataclasses.replace(settings, **changes)


def test_non_finite_loss_stops_with_last_good_state():
    model, layout, samples, sigmas = samples_for("sd15", 4)
    calls = {"n": 0}
    inner = samples[0].denoise

    def poisoned(x, sigma):
        calls["n"] += 1
        out = inner(x, sigma)
        return out * float("nan") if calls["n"] > 20 else out

    for s in samples:
        s.denoise = poisoned
    learner = MaskLearner(model, layout, LearnSettings(**FAST))
    snapshots = []
    state = learner.learn(samples, sigmas, callback=lambda info: snapshots.append(learner.state))
    assert "non-finite" in state.stop_reason and not state.progress["finished"]
    assert snapshots, "at least one good step before the poison"
    for name, lam in state.logits.items():
        assert torch.equal(lam, snapshots[-1].logits[name]) and torch.isfinite(lam).all()


@pytest.mark.parametrize("change, message", [
    (dict(epochs=0), "epochs"), (dict(accumulate=0), "accumulate"), (dict(beta=-1.0), "beta"),
    (dict(beta=math.inf), "beta"), (dict(regularizer="l7"), "regularizer"),
    (dict(lr={"head": 0.0}), "learning rate"), (dict(lr={"blob": 0.1}), "unknown unit kind"),
    (dict(objective="local"), "objective"),
])
def test_bad_settings_rejected_before_compute(change, message):
    model, layout, _, _ = samples_for("sd15", 1)
    with pytest.raises(SettingsError, match=message):
        MaskLearner(model, layout, LearnSettings(**change))


def test_empty_prompts_and_zero_steps_rejected():
    model, layout, samples, sigmas = samples_for("sd15", 1)
    learner = MaskLearner(model, layout, LearnSettings(**FAST))
    with pytest.raises(SettingsError, match="no calibration samples"):
        learner.learn([], sigmas)
    with pytest.raises(ValueError, match="at least 2 values"):
        learner.learn(samples, sigmas[:1])


def test_every_kind_gets_sparsity_pressure():
    """With no reconstruction signal (identical targets), the regulariser alone lowers every λ."""
    model, layout, samples, sigmas = samples_for("flux", 1, steps=1)
    assert set(layout.kinds()) == {"head", "neuron", "channel"}
    settings = LearnSettings(epochs=3, accumulate=1, beta=1.0, regularizer="sigmoid",
                             gate=GateSettings(init_logit=20.0))
    state = MaskLearner(model, layout, settings).learn(samples, sigmas)
    for name, lam in state.logits.items():
        assert (lam < 20.0).all(), name


def test_per_step_objective_runs_and_learns():
    model, layout, samples, sigmas = samples_for("sd15", 2)
    state = MaskLearner(model, layout, LearnSettings(**FAST, objective="per_step")).learn(samples, sigmas)
    assert state.progress["finished"] and len(state.history) == 2


def test_frozen_weights_restores_flags_of_inference_tensors():
    """ComfyUI loads weights under torch.inference_mode(); freezing for learning must hand them back as found."""
    with torch.inference_mode():
        model, _ = build("sd15", torch.float32)
    model.conv_in.weight.requires_grad_(False)
    with frozen_weights(model):
        assert not any(p.requires_grad for p in model.parameters())
    assert not model.conv_in.weight.requires_grad
    assert all(p.requires_grad and p.is_inference() for n, p in model.named_parameters() if n != "conv_in.weight")


def test_model_responses_compare_with_a_relative_tolerance():
    """The model's response (the sampler's derivative at the first and a middle σ) is compared to
    RESPONSE_RTOL of its norm: run-to-run noise still resumes, a patch's change does not."""
    from ecodiff_core.learn import RESPONSE_RTOL, RESPONSE_SAMPLE
    from ecodiff_core.maskfile import MaskState

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g, dtype=torch.float64)
    sigmas = torch.tensor([10.0, 5.0, 1.0, 0.0], dtype=torch.float64)
    eps = torch.randn(1, 4, 16, 16, generator=g, dtype=torch.float64)

    def response(change: torch.Tensor | float = 0.0):
        return model_response(lambda x_, s: x_ - s * (eps + change), x, sigmas)

    base = response()
    assert base["sigmas"] == [10.0, 5.0] and len(base["probes"][0]["values"]) == RESPONSE_SAMPLE
    # the derivative itself: eps, sampled evenly
    index = torch.linspace(0, eps.numel() - 1, RESPONSE_SAMPLE, dtype=torch.float64).long()
    torch.testing.assert_close(torch.tensor(base["probes"][1]["values"], dtype=torch.float64),
                               eps.reshape(-1)[index], rtol=1e-12, atol=1e-12)
    assert math.isclose(base["probes"][0]["norm"], eps.norm().item(), rel_tol=1e-12)
    noise = torch.randn(eps.shape, generator=g, dtype=torch.float64)
    assert responses_match(base, response(noise * eps.norm() / noise.norm() * RESPONSE_RTOL * 0.1))
    assert not responses_match(base, response(noise * eps.norm() / noise.norm() * RESPONSE_RTOL * 10))
    assert not responses_match(base, response(eps * RESPONSE_RTOL * 3))  # a uniform scale: the norm
    for damaged in [{}, {"sigmas": base["sigmas"], "probes": "x"}, {**base, "sigmas": [10.0]},
                    {**base, "probes": [{**p, "values": [float("nan")] * RESPONSE_SAMPLE} for p in base["probes"]]},
                    {**base, "probes": [{**p, "shape": [1]} for p in base["probes"]]}]:
        assert not responses_match(damaged, base) and not responses_match(base, damaged)

    def state(response_):
        inputs = {"weights": "w", "conditioning": "c", "learning": {}, "sampling": {}}
        if response_ is not None:
            inputs["response"] = response_
        return MaskState(arch="a", fingerprint="f", logits={}, kinds={}, inputs=inputs)

    patched = response(noise * eps.norm() / noise.norm() * 0.01)
    assert resume_problem(state(base), state(base).inputs) == ""
    assert resume_problem(state(base), state(patched).inputs) == (
        "the model's output differs from the saved run's: patches, model options or sampling changed")
    assert "does not record the model's output" in resume_problem(state(None), state(base).inputs)


def test_learning_pruning_and_mask_files_log_one_line_each(tmp_path, caplog):
    """The ``ecodiff`` logger: learn start and finish, mask save and load, prune (as ComfyUI core logs)."""
    from ecodiff_core.plan import PruneTarget, plan_pruning
    from ecodiff_core.prune import prune_model

    model, layout, samples, sigmas = samples_for("sd15", 2)
    with caplog.at_level(logging.INFO, logger="ecodiff"):
        state = MaskLearner(model, layout, LearnSettings(**{**FAST, "epochs": 1})).learn(samples, sigmas)
        path = save_mask(tmp_path / "m.safetensors", state)
        load_mask(path, layout)
        plan = plan_pruning(model, layout, state.logits, PruneTarget(params=0.1))
        prune_model(model, layout, plan.keep)
    lines = [r.getMessage() for r in caplog.records if r.name == "ecodiff" and r.levelno == logging.INFO]
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, prune_model(model, layout, plan.keep)))
    for prefix in (f"EcoDiff: mask learning started: diffusers_unet, {len(layout.groups)} unit groups, "
                   "2 prompts, 1 steps",
                   "EcoDiff: mask learning finished after 1 steps", f"EcoDiff: saved mask for diffusers_unet to {path}",
                   f"EcoDiff: loaded mask for diffusers_unet from {path}",
                   f"EcoDiff: pruned diffusers_unet: {before} -> {after} parameters"):
        assert sum(line.startswith(prefix) for line in lines) == 1, (prefix, lines)
