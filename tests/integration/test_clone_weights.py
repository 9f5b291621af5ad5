"""MODEL clones share one nn.Module and ComfyUI leaves the last loaded clone's weight patches in it.
Pruning, saving and learning must read exactly the weights of the MODEL they are given: after a LoRA
clone of the base sampled, they give on the base what they give on a fresh, never-patched base."""
from __future__ import annotations

import pytest
import torch

import comfy_tiny as ct
from comfy_checks import random_keep, rel_err, wrap_linears


def lora_clone(model, seed: int = 5, rank: int = 4, scale: float = 0.3):
    """A LoRA clone of ``model`` through ComfyUI's own loader, on every Linear of the denoiser."""
    import comfy.sd

    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for name, m in model.model.diffusion_model.named_modules():
        if isinstance(m, torch.nn.Linear):
            lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=gen) * scale
            lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=gen) * scale
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert patched.patches, "the LoRA matched no weight"
    return patched


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def fresh_pruned_state(weights, pruned_models, arch: str, keep, logits) -> dict[str, torch.Tensor]:
    """Reference: the pruned weights of a freshly built base that no clone ever patched."""
    with torch.inference_mode():
        fresh = ct.tiny(arch, seed=3).model
        pruned, _ = pruned_models.build_pruned_model(fresh, weights.model_layout(fresh), keep, logits)
    return state(pruned.model.diffusion_model)


@pytest.mark.parametrize("arch", ct.ARCHS)
def test_pruning_after_a_lora_clone_sampled_reads_the_base_weights(arch, weights, soft_gates, pruned_models):
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        tiny = ct.tiny(arch, seed=3)
        base = tiny.model
        layout = weights.model_layout(base)
        keep = random_keep(layout, seed=11)
        logits = {g.name: torch.randn(g.count, generator=torch.Generator().manual_seed(1)) for g in layout.groups}
        base_before = ct.sample(base, tiny.positive, tiny.negative, seed=2)
        lora = lora_clone(base)
        lora_before = ct.sample(lora, tiny.positive, tiny.negative, seed=2)  # LoRA now patched in the module

        pruned, _ = pruned_models.build_pruned_model(base, layout, keep, logits)
        soft = soft_gates.soft_gated_model(base, layout, keep)
        out_pruned = ct.sample(pruned, tiny.positive, tiny.negative, seed=2)
        out_soft = ct.sample(soft, tiny.positive, tiny.negative, seed=2)

        ct.sample(lora, tiny.positive, tiny.negative, seed=2)  # base weights in the module again? no: LoRA's
        pruned_lora, _ = pruned_models.build_pruned_model(lora, layout, keep, logits)
        out_pruned_lora = ct.sample(pruned_lora, tiny.positive, tiny.negative, seed=2)
        out_soft_lora = ct.sample(soft_gates.soft_gated_model(lora, layout, keep), tiny.positive, tiny.negative, seed=2)

        base_after = ct.sample(base, tiny.positive, tiny.negative, seed=2)
        lora_after = ct.sample(lora, tiny.positive, tiny.negative, seed=2)

    assert_same_state(state(pruned.model.diffusion_model),
                      fresh_pruned_state(weights, pruned_models, arch, keep, logits))
    assert rel_err(out_pruned, out_soft) <= 1e-5
    assert rel_err(out_pruned_lora, out_soft_lora) <= 1e-5
    assert rel_err(out_pruned, out_pruned_lora) > 1e-3  # the LoRA does matter, and only in its own clone
    assert torch.equal(base_after, base_before) and torch.equal(lora_after, lora_before)


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_saved_pruned_model_holds_its_own_weights(arch, weights, pruned_models, pruned_files, tmp_path):
    """Save Pruned Model after clones of the base and of the pruned model sampled with LoRAs."""
    import safetensors.torch

    with torch.inference_mode():
        tiny = ct.tiny(arch, seed=3)
        layout = weights.model_layout(tiny.model)
        keep = random_keep(layout, seed=12)
        logits = {g.name: torch.zeros(g.count) for g in layout.groups}
        ct.sample(lora_clone(tiny.model), tiny.positive, tiny.negative, seed=2)
        pruned, _ = pruned_models.build_pruned_model(tiny.model, layout, keep, logits)
        ct.sample(lora_clone(pruned, seed=6), tiny.positive, tiny.negative, seed=2)  # patches the pruned module
        path = pruned_files.save_pruned_model(pruned, tmp_path / "pruned.safetensors")
    saved = safetensors.torch.load_file(str(path))
    expected = fresh_pruned_state(weights, pruned_models, arch, keep, logits)
    assert_same_state(saved, expected)
    # and those are the base weights, sliced: one attention projection checked by hand
    group = next(g for g in layout.groups if g.kind == "head")
    site = next(s for s in group.slices if s.side == "out")
    base_weight = ct.tiny(arch, seed=3).model.model.diffusion_model.get_submodule(site.module).weight
    rows = torch.ones(base_weight.shape[0], dtype=torch.bool)
    for s in group.slices:  # q, k and v rows of a fused projection are separate slices
        if s.module == site.module and s.side == "out":
            rows[group.unit_indices(s, torch.nonzero(~keep[group.name]).reshape(-1))] = False
    assert torch.equal(saved[f"{site.module}.weight"], base_weight.detach()[rows])


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_learning_after_a_lora_clone_sampled_equals_learning_on_a_fresh_base(arch, sampling, learning, core):
    spec = sampling.SamplingSpec(width=64, height=64, steps=2, cfg=2.0, seed=1)
    settings = core.learn.LearnSettings(epochs=2, accumulate=1, beta=0.1,
                                        lr={"head": 0.5, "neuron": 0.5, "channel": 0.5})

    def learned(sibling_sampled: bool) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            tiny = ct.tiny(arch, seed=3)
            if sibling_sampled:
                ct.sample(lora_clone(tiny.model), tiny.positive, tiny.negative, seed=2)
            mask = learning.learn_mask(tiny.model, [(tiny.positive, tiny.negative)], spec, settings)
        return mask.logits

    fresh, after_sibling = learned(False), learned(True)
    assert set(fresh) == set(after_sibling)
    assert all(torch.equal(fresh[k], after_sibling[k]) for k in fresh)
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in fresh.values())  # it did learn


def test_a_clone_loaded_inside_own_weights_is_refused(weights, core):
    """The guard of the one weight reader: another clone loaded while it reads is an error."""
    import comfy.model_management

    with torch.inference_mode():
        tiny = ct.tiny("sd15", seed=3)
        lora = lora_clone(tiny.model)
        with pytest.raises(core.errors.EcoDiffError, match="another MODEL clone"):
            with weights.own_weights(tiny.model) as module:
                assert module is tiny.model.model.diffusion_model
                comfy.model_management.load_models_gpu([lora], force_full_load=True)


def wrapped_clone(soft_gates, model, layout, wrapper: str):
    """A clone whose own patches are weight wrappers: TrainLoraNode-style adapters (scaled weights
    and biases on every other Linear), or the soft gates of Apply Pruned Mask's preview."""
    if wrapper == "soft gates":
        return soft_gates.soft_gated_model(model, layout, random_keep(layout, seed=21, p=0.3))
    return wrap_linears(model, scale=1.5, every=2, biases=True)


@pytest.mark.parametrize("wrapper", ["adapters", "soft gates"])
@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_pruning_and_saving_fold_in_weight_wrappers(arch, wrapper, weights, soft_gates, pruned_models, pruned_files,
                                                    tmp_path):
    """Weight wrappers are the MODEL's own patches: the pruned MODEL computes what the soft-gated
    wrapped MODEL computes, Save Pruned Model writes what the MODEL computes with, and the input
    MODELs are unchanged."""
    with torch.inference_mode():
        tiny = ct.tiny(arch, seed=3)
        base = tiny.model
        layout = weights.model_layout(base)
        keep = random_keep(layout, seed=12)
        logits = {g.name: torch.zeros(g.count) for g in layout.groups}
        base_state = state(base.model.diffusion_model)
        wrapped = wrapped_clone(soft_gates, base, layout, wrapper)
        wrappers_before = {k: list(v) for k, v in wrapped.weight_wrapper_patches.items()}
        sample = lambda m: ct.sample(m, tiny.positive, tiny.negative, seed=2)  # noqa: E731
        wrapped_before = sample(wrapped)

        pruned, _ = pruned_models.build_pruned_model(wrapped, layout, keep, logits)
        pruned_base, _ = pruned_models.build_pruned_model(base, layout, keep, logits)
        out_pruned = sample(pruned)
        assert rel_err(out_pruned, sample(soft_gates.soft_gated_model(wrapped, layout, keep))) <= 1e-5
        assert rel_err(out_pruned, sample(pruned_base)) > 1e-3  # the wrappers matter
        assert not getattr(pruned, "weight_wrapper_patches", {})  # folded in, not applied twice

        # Save Pruned Model of a pruned MODEL given its own wrappers; reloaded samples alike
        pruned_wrapped = wrapped_clone(soft_gates, pruned_base, weights.model_layout(pruned_base), wrapper)
        expected = sample(pruned_wrapped)
        path = pruned_files.save_pruned_model(pruned_wrapped, tmp_path / "wrapped.safetensors")
        reloaded = pruned_files.load_pruned_model(path)
        assert rel_err(sample(reloaded), expected) <= 1e-5
        assert rel_err(expected, sample(pruned_base)) > 1e-3

        # the inputs are unchanged: weights, wrappers, what they compute
        assert_same_state(state(base.model.diffusion_model), base_state)
        assert {k: list(v) for k, v in wrapped.weight_wrapper_patches.items()} == wrappers_before
        assert torch.equal(sample(wrapped), wrapped_before)


def test_pruning_a_soft_gated_model_gives_the_hard_masked_model(weights, soft_gates, pruned_models):
    """The preview's gates are weight wrappers: pruning the soft-gated MODEL with the same keep masks
    gives exactly the pruned base (kept units are scaled by 1), not a model ignoring the gates."""
    with torch.inference_mode():
        tiny = ct.tiny("sd15", seed=3)
        layout = weights.model_layout(tiny.model)
        keep = random_keep(layout, seed=12)
        logits = {g.name: torch.zeros(g.count) for g in layout.groups}
        soft = soft_gates.soft_gated_model(tiny.model, layout, keep)
        from_soft, _ = pruned_models.build_pruned_model(soft, layout, keep, logits)
        from_base, _ = pruned_models.build_pruned_model(tiny.model, layout, keep, logits)
        assert_same_state(state(from_soft.model.diffusion_model), state(from_base.model.diffusion_model))
        other = random_keep(layout, seed=13)  # other masks: the gates' zeros stay in the kept weights
        pruned, _ = pruned_models.build_pruned_model(soft, layout, other, logits)
        twice = soft_gates.soft_gated_model(soft, layout, other)
        assert rel_err(ct.sample(pruned, tiny.positive, tiny.negative, seed=2),
                       ct.sample(twice, tiny.positive, tiny.negative, seed=2)) <= 1e-5
