"""Memory preflight of Learn Sparsity Mask on tiny real ComfyUI models: an impossible setting stops
before any compute with the estimate, the free memory and the remedies; "auto" follows the estimate;
block checkpointing through the node learns the same mask."""
from __future__ import annotations

import pytest
import torch

import comfy_tiny as ct
from scripts.comfy_env import sub
from test_nodes import learn


@pytest.fixture(scope="module")
def preflight():
    return sub("ecodiff_comfy.preflight")


def spec_for(sampling, size, cfg=2.0):
    return sampling.SamplingSpec(width=size, height=size, steps=3, cfg=cfg, seed=1)


def test_impossible_setting_stops_before_any_compute(nodes, folders, sampling, preflight, core, monkeypatch):
    import comfy.model_management as mm

    tiny = ct.tiny("sdxl", seed=4)
    free = 10**9
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: free)
    monkeypatch.setattr(tiny.model, "loaded_size", lambda: 0)
    computed = []
    monkeypatch.setattr(sampling, "run_with_denoisers", lambda *a, **k: computed.append(1))
    with pytest.raises(core.errors.EcoDiffError) as info:
        learn(nodes, tiny, "too_big", prompts="a cat", width=4096, height=4096, epochs=1)
    assert not computed
    assert not folders.run_state_path("too_big").exists()
    estimate = preflight.estimate(tiny.model, spec_for(sampling, 4096), [(tiny.positive, tiny.negative)])
    message = str(info.value)
    assert isinstance(info.value, preflight.InsufficientMemoryError)
    assert f"{estimate.total(False) / 1e9:.1f} GB" in message and "1.0 GB are free" in message
    assert f"turn block checkpointing on (then about {estimate.total(True) / 1e9:.1f} GB)" in message
    assert "lower resolution" in message and "fp8" in message


@pytest.mark.parametrize("free_gb, mode, expected", [
    (1000.0, "auto", "off"), (None, "auto", "on"), (None, "off", "off"), (1000.0, "on", "on"),
])
def test_auto_turns_block_checkpointing_on_only_when_the_plain_step_does_not_fit(
        sampling, preflight, core, monkeypatch, free_gb, mode, expected):
    tiny = ct.tiny("flux", seed=4)
    conds = [(tiny.positive, tiny.negative)]
    spec = spec_for(sampling, 1024, cfg=1.0)
    estimate = preflight.estimate(tiny.model, spec, conds)
    assert estimate.activations_blocks < estimate.activations_plain
    # a GPU whose free memory lies between the two totals (or plenty)
    free = int(free_gb * 1e9) if free_gb else (estimate.total(True) + estimate.total(False)) // 2
    monkeypatch.setattr(preflight, "free_memory", lambda model: (free, torch.device("cuda")))
    monkeypatch.setattr(tiny.model, "loaded_size", lambda: 0)
    settings = core.learn.LearnSettings(block_checkpointing=mode)
    if mode == "off" and free < estimate.total(False):
        with pytest.raises(preflight.InsufficientMemoryError, match="turn block checkpointing on"):
            preflight.check(tiny.model, spec, conds, settings)
        return
    assert preflight.check(tiny.model, spec, conds, settings).block_checkpointing == expected


def test_estimate_is_cached_per_layout_and_shape(sampling, preflight, monkeypatch):
    tiny = ct.tiny("sd15", seed=4)
    conds = [(tiny.positive, tiny.negative)]
    memory = sub("ecodiff_core.memory")
    first = preflight.estimate(tiny.model, spec_for(sampling, 96), conds)
    monkeypatch.setattr(preflight, "measure_learning_step", lambda *a, **k: pytest.fail("traced again"))
    assert preflight.estimate(tiny.model, spec_for(sampling, 96), conds) == first
    with memory.no_cache():
        monkeypatch.undo()
        bigger = preflight.estimate(tiny.model, spec_for(sampling, 192), conds)
    assert bigger.activations_plain > 3 * first.activations_plain  # 4× the pixels


def test_learning_with_block_checkpointing_through_the_node_learns_the_same_mask(nodes):
    tiny = ct.tiny("flux", seed=6)
    masks = {}
    for mode in ("off", "on"):
        out = learn(nodes, tiny, f"blocks_{mode}", prompts="a cat", steps=2, epochs=2, cfg=1.0,
                    block_checkpointing=mode, resume=False)
        masks[mode] = out.args[0]
    assert masks["on"].settings.block_checkpointing == "on"
    for name, lam in masks["off"].logits.items():
        torch.testing.assert_close(masks["on"].logits[name], lam, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prompt_batch, prompts, expected", [(1, 3, 1), (2, 3, 2), (4, 3, 3)])
def test_preflight_estimates_the_prompt_batch_actually_run(sampling, preflight, core, monkeypatch,
                                                           prompt_batch, prompts, expected):
    """A step runs min(prompt_batch, prompts) prompts at once: the estimate is the trace of that batch
    (activations grow with it, weights do not), and the stop message names it and the remedy."""
    tiny = ct.tiny("sd15", seed=4)
    conds = [(tiny.positive, tiny.negative)] * prompts
    spec = spec_for(sampling, 128)
    settings = core.learn.LearnSettings(block_checkpointing="off", prompt_batch=prompt_batch)
    assert preflight.prompts_per_step(settings, conds) == expected
    one = preflight.estimate(tiny.model, spec, conds, (False,))
    batch = preflight.estimate(tiny.model, spec, conds, (False,), prompts=expected)
    assert batch.weights == one.weights
    if expected == 1:
        assert batch == one
    else:  # the activations of a step of ``expected`` prompts: about that many times one prompt's
        assert 0.8 * expected < batch.activations_plain / one.activations_plain <= expected * 1.05
    monkeypatch.setattr(preflight, "free_memory", lambda model: ((one.total(False) + batch.total(False)) // 2,
                                                                 torch.device("cuda")))
    monkeypatch.setattr(tiny.model, "loaded_size", lambda: 0)
    if expected == 1:
        assert preflight.check(tiny.model, spec, conds, settings).block_checkpointing == "off"
        return
    with pytest.raises(preflight.InsufficientMemoryError) as info:
        preflight.check(tiny.model, spec, conds, settings)
    message = str(info.value)
    assert f"{expected} prompt(s) per step (prompt_batch)" in message
    assert f"lower prompt_batch (now {expected})" in message
