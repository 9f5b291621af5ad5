"""Several calibration prompts per denoiser call: the λ gradient equals one-by-one accumulation,
unstackable samples fall back to one by one, resume still works, no reads to the host per step."""
from __future__ import annotations

import functools
import logging

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ecodiff_core.archs import find_layout
from ecodiff_core.denoisers import EpsSchedule, flux_flow_batch, unet_eps_batch
from ecodiff_core.learn import CalibrationSample, LearnSettings, MaskLearner
from ecodiff_core.maskfile import load_mask, save_mask
from ecodiff_core.trajectory import per_step_gradient, trajectory_gradient
from tiny_models import MODEL_NAMES, build

CFG = 2.5


@functools.cache
def model_and_layout(name: str):
    model, inputs = build(name, torch.float64)
    return model, inputs, find_layout(model)


def conditioning(name: str, rows: int, seed: int, cfg: bool, tokens: int = 5) -> dict:
    """Random per-prompt conditioning of the tiny model ``name`` (prompt dimension first)."""
    g = torch.Generator().manual_seed(seed)

    def one() -> dict:
        if name == "flux":
            return {"encoder_hidden_states": torch.randn(rows, tokens, 12, generator=g, dtype=torch.float64),
                    "pooled_projections": torch.randn(rows, 10, generator=g, dtype=torch.float64)}
        out = {"encoder_hidden_states": torch.randn(rows, tokens, 24, generator=g, dtype=torch.float64)}
        if name == "sdxl":
            out["added_cond_kwargs"] = {"text_embeds": torch.randn(rows, 12, generator=g, dtype=torch.float64),
                                        "time_ids": torch.randn(rows, 6, generator=g, dtype=torch.float64)}
        return out

    return {"cond": one(), "uncond": one() if cfg else None}


def problem(name: str, rows: list[int], cfg: bool, steps: int = 3, tokens: list[int] | None = None):
    """(model, layout, batchable samples with ``rows[i]`` prompts each, sigmas) on one builder."""
    model, inputs, layout = model_and_layout(name)
    if name == "flux":
        builder = flux_flow_batch(model, inputs["img_ids"], inputs["txt_ids"], CFG if cfg else 1.0)
        sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        shape = (16, 4)
    else:
        schedule = EpsSchedule.scaled_linear()
        builder = unet_eps_batch(model, schedule, CFG if cfg else 1.0)
        sigmas = schedule.karras(steps).to(torch.float64)
        shape = (4, 8, 8)
    samples = []
    for i, r in enumerate(rows):
        noise = torch.randn(r, *shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
        cond = conditioning(name, r, i, cfg, tokens[i] if tokens else 5)
        samples.append(CalibrationSample.batchable(builder, cond, noise * sigmas[0]))
    return model, layout, samples, sigmas


class Recorder:
    """Wraps a learner: records each trajectory's noise seed and the gradient given to AdamW."""

    def __init__(self, learner: MaskLearner) -> None:
        self.seeds: list[int] = []
        self.grads: list[list[torch.Tensor]] = []
        setter, step = learner._gate_setter, learner.optimizer.step

        def gate_setter(noise_seed, steps=1):
            self.seeds.append(noise_seed)
            return setter(noise_seed, steps)

        def optimizer_step(*a, **k):
            self.grads.append([p.grad.clone() for p in learner.logits.values()])
            return step(*a, **k)

        learner._gate_setter, learner.optimizer.step = gate_setter, optimizer_step


def one_by_one(learner: MaskLearner, samples, sigmas, noise_seed: int, settings: LearnSettings):
    """Σ over samples of 1/n × each sample's own gradient and loss, all with the gates of ``noise_seed``."""
    params = list(learner.logits.values())
    total, loss = [torch.zeros_like(p) for p in params], 0.0
    with learner.controller.installed():
        for s in samples:
            gates = learner._gate_setter(noise_seed, len(sigmas) - 1)
            if settings.objective == "per_step":
                r = per_step_gradient(s.denoise, sigmas, s.teacher, params, gates)
            else:
                r = trajectory_gradient(s.denoise, s.noise, sigmas, s.target, params, gates, settings.checkpointing)
            loss += r.loss / len(samples)
            for acc, g in zip(total, r.grads, strict=True):
                acc.add_(g / len(samples))
    return total, loss


END_TO_END = {"objective": "end_to_end"}
MODES = {"checkpointed": END_TO_END, "through graph": {**END_TO_END, "checkpointing": False},
         "per step": {"objective": "per_step"}}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("rows", [[1, 1], [1, 2, 1]], ids=["batch2", "batch3"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_batched_gradient_equals_one_by_one_accumulation(name: str, rows: list[int], cfg: bool, mode: str) -> None:
    """One optimiser step over all samples as one batch: the λ gradient and the reconstruction loss
    equal the mean over samples of their one-by-one gradients and losses (float64), with one denoiser
    call per step for the whole batch."""
    model, layout, samples, sigmas = problem(name, rows, cfg)
    settings = LearnSettings(epochs=1, accumulate=len(rows), beta=0.0, prompt_batch=len(rows), **MODES[mode])
    learner = MaskLearner(model, layout, settings)
    recorder = Recorder(learner)
    calls = []
    handle = model.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    try:
        learner.learn(samples, sigmas)
    finally:
        handle.remove()
    [seed] = recorder.seeds  # one trajectory for all samples
    steps = len(sigmas) - 1
    rollout = {"checkpointed": 2 * steps, "through graph": steps, "per step": steps}[mode]
    targets = len(rows) * steps  # prepare(): each sample's ungated trajectory or teacher, one by one
    assert len(calls) == targets + rollout
    fresh = MaskLearner(model, layout, settings)  # the same initial logits
    expected, loss = one_by_one(fresh, samples, sigmas, seed, settings)
    [got] = recorder.grads
    a, b = torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in expected])
    assert b.norm() > 0
    assert ((a - b).norm() / b.norm()).item() <= 1e-6  # float64: observed ~1e-7 (float32 logits)
    assert learner.history[0]["recon"] == pytest.approx(loss, rel=1e-9)


def test_prompt_batch_one_keeps_each_samples_own_gate_noise() -> None:
    model, layout, samples, sigmas = problem("sd15", [1, 1, 1], cfg=False, steps=2)
    learner = MaskLearner(model, layout, LearnSettings(epochs=1, accumulate=3, prompt_batch=1))
    recorder = Recorder(learner)
    learner.learn(samples, sigmas)
    assert len(set(recorder.seeds)) == 3


@pytest.mark.parametrize("why", ["token counts", "no batch builder", "another builder"])
def test_samples_that_do_not_stack_run_one_by_one(why: str, caplog) -> None:
    """Samples whose conditioning shapes differ, that have no batch builder or different builders
    run one by one, exactly as with prompt_batch=1, and the log says why (once)."""
    tokens = [5, 6, 5, 6] if why == "token counts" else None
    model, layout, samples, sigmas = problem("sdxl", [1, 1, 1, 1], cfg=True, steps=2, tokens=tokens)
    if why == "no batch builder":
        samples = [CalibrationSample(s.denoise, s.noise) for s in samples]
    if why == "another builder":
        other = problem("sdxl", [1], cfg=True, steps=2)[2][0]
        samples = [CalibrationSample.batchable(other.batch_denoiser if i % 2 else s.batch_denoiser,
                                               s.conditioning, s.noise) for i, s in enumerate(samples)]

    def run(prompt_batch: int):
        for s in samples:
            s.target = None
        settings = LearnSettings(epochs=1, accumulate=4, prompt_batch=prompt_batch)
        return MaskLearner(model, layout, settings).learn(samples, sigmas)

    alone = run(1)
    with caplog.at_level(logging.INFO, logger="ecodiff"):
        batched = run(2)
    assert all(torch.equal(batched.logits[n], alone.logits[n]) for n in alone.logits)
    notes = [r.getMessage() for r in caplog.records if "one by one" in r.getMessage()]
    assert len(notes) == 1 and "prompt_batch=2" in notes[0]
    assert {"token counts": "shapes differ", "no batch builder": "batch_denoiser",
            "another builder": "batch_denoiser"}[why] in notes[0]


@pytest.mark.parametrize("checkpointing", [True, False])
def test_batched_learning_resumes_to_the_same_result(tmp_path, checkpointing: bool) -> None:
    model, layout, samples, sigmas = problem("flux", [1, 2, 1, 1], cfg=True, steps=2)
    settings = LearnSettings(epochs=2, accumulate=4, prompt_batch=2, checkpointing=checkpointing,
                             lr={"head": 0.5, "neuron": 0.5, "channel": 0.5})
    straight = MaskLearner(model, layout, settings).learn(samples, sigmas)
    half = MaskLearner(model, layout, settings).learn(samples, sigmas, callback=lambda info: info.step < 1)
    assert half.progress["step"] == 1
    path = save_mask(tmp_path / "half.safetensors", half)
    resumed = MaskLearner(model, layout, settings, resume=load_mask(path, layout)).learn(samples, sigmas)
    assert resumed.progress["finished"] and resumed.progress["step"] == straight.progress["step"] == 2
    for name in straight.logits:
        torch.testing.assert_close(resumed.logits[name], straight.logits[name], rtol=0, atol=1e-6)


class HostReads(TorchFunctionMode):
    """Counts tensor reads back to the host (item, tolist, cpu, numpy, bool/float/int of a tensor)."""

    NAMES = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("objective", ["end_to_end", "per_step"])
@pytest.mark.parametrize("prompt_batch", [1, 2])
def test_no_reads_to_the_host_inside_the_step_loop(objective: str, prompt_batch: int) -> None:
    """The learner's reads back to the host do not grow with the number of steps (targets prepared
    first, outside the count): none happens per denoising step."""
    def reads(steps: int) -> int:
        model, layout, samples, sigmas = problem("flux", [1, 1], cfg=True, steps=steps)
        settings = LearnSettings(epochs=1, accumulate=2, prompt_batch=prompt_batch, objective=objective)
        learner = MaskLearner(model, layout, settings)
        learner.prepare(samples, sigmas)
        with HostReads() as counter:
            learner.learn(samples, sigmas)
        return counter.count

    assert reads(2) == reads(5)


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
def test_bad_prompt_batch_is_rejected(value) -> None:
    from ecodiff_core.errors import SettingsError

    model, layout, _, _ = problem("sd15", [1], cfg=False)
    with pytest.raises(SettingsError, match="prompt_batch"):
        MaskLearner(model, layout, LearnSettings(prompt_batch=value))
