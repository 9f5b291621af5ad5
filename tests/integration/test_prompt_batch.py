"""Several calibration prompts as one ComfyUI batch (``LearnSettings.prompt_batch``): the host's
samples stack along dim 0, the stacked CFG denoiser gives each prompt's own x0, the λ gradient of the
stacked sample equals the mean of the one-by-one gradients (same gates), and prompts whose token
counts differ run one by one."""
from __future__ import annotations

import logging

import pytest
import torch

import comfy_tiny as ct
from comfy_checks import rel_err

LR = {"head": 0.5, "neuron": 0.5, "channel": 0.5}


def conds_for(arch: str, tokens: tuple[int, ...]) -> list[tuple[list, list]]:
    _, context, pooled = ct.dims(arch)
    return [(ct.make_conditioning(arch, context, pooled, seed=10 + i, tokens=t),
             ct.make_conditioning(arch, context, pooled, seed=20 + i, tokens=t)) for i, t in enumerate(tokens)]


@pytest.mark.parametrize("cfg", [1.0, 2.5], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_stacked_prompts_give_the_one_by_one_x0_and_gradient(arch, cfg, sampling, weights, core):
    spec = sampling.SamplingSpec(width=64, height=64, steps=2, cfg=cfg, seed=1)
    settings = core.learn.LearnSettings(epochs=1, accumulate=2, beta=0.0, prompt_batch=2, lr=LR)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        model = ct.build_model(arch, seed=3)
        layout = weights.model_layout(model)

        def body(session):
            samples, sigmas = session.samples, session.sigmas
            stacked = core.learn.stack_samples(samples)
            assert stacked.noise.shape[0] == 2
            x, sigma = stacked.noise, sigmas[0]
            with torch.no_grad():
                together = stacked.denoise(x, sigma)
                alone = torch.cat([s.denoise(s.noise, sigma) for s in samples])
            learner = core.learn.MaskLearner(session.module, layout, settings, grad_context=sampling.grad_context)
            for g in layout.groups:  # logits away from their start, so every gate matters differently
                learner.logits[g.name].data.normal_(generator=torch.Generator().manual_seed(len(g.name)))
            learner.prepare(samples, sigmas)
            stacked = core.learn.stack_samples(samples)  # with the targets now
            with learner.controller.installed():
                batched = learner._sample_gradient(stacked, sigmas, noise_seed=7)
                singles = [learner._sample_gradient(s, sigmas, noise_seed=7) for s in samples]
            return together, alone, batched, singles

        together, alone, batched, singles = sampling.run_with_denoisers(model, conds_for(arch, (6, 6)), spec, body)
    assert rel_err(together, alone) <= 1e-5
    assert rel_err(alone[0], alone[1]) > 1e-3  # two prompts, two different x0
    got = torch.cat([g.flatten() for g in batched.grads])
    expected = torch.cat([sum(r.grads[i] for r in singles).flatten() / len(singles) for i in range(len(batched.grads))])
    assert expected.norm() > 0
    assert rel_err(got, expected) <= 1e-4  # float32 models
    assert batched.loss == pytest.approx(sum(r.loss for r in singles) / len(singles), rel=1e-4)


def test_prompts_of_different_token_counts_run_one_by_one(sampling, learning, core, caplog):
    spec = sampling.SamplingSpec(width=64, height=64, steps=2, cfg=2.0, seed=1)
    conds = conds_for("sd15", (6, 7))

    def learned(prompt_batch: int):
        settings = core.learn.LearnSettings(epochs=1, accumulate=2, beta=0.1, prompt_batch=prompt_batch, lr=LR)
        with torch.inference_mode():
            return learning.learn_mask(ct.build_model("sd15", seed=3), conds, spec, settings).logits

    alone = learned(1)
    with caplog.at_level(logging.INFO, logger="ecodiff"):
        batched = learned(2)
    assert all(torch.equal(batched[k], alone[k]) for k in alone)
    assert any("one by one" in r.getMessage() and "shapes differ" in r.getMessage() for r in caplog.records)
