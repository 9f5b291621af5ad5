"""LoRA Recover on tiny real ComfyUI models: the distillation loss falls, the saved file loaded by the
stock LoraLoaderModelOnly gives the node's output model, interrupt/resume, refused inputs."""
from __future__ import annotations

import pytest
import torch

import comfy_tiny as ct
from comfy_checks import random_mask, rel_err, same_weights, weights_snapshot
from scripts.comfy_env import comfy_nodes, sub

RECOVER_ARGS = dict(prompts="a red fox in snow\na lighthouse in a storm", negative_prompt="", max_prompts=0,
                    width=64, height=64, sample_steps=3, cfg=2.0, scheduler="normal", states="pruned", rank=4,
                    alpha=4.0, target_modules="attention_ffn", train_steps=8, learning_rate=1e-2, batch=2, seed=3,
                    resume=True)


@pytest.fixture(scope="module")
def host():
    return sub("ecodiff_comfy.recover")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def lora_dirs(tmp_path_factory):
    """models/loras and models/ecodiff_recover of this test module (never the user's)."""
    import folder_paths

    base = tmp_path_factory.mktemp("recover")
    saved = {}
    for name in ("loras", "ecodiff_recover"):
        saved[name] = folder_paths.folder_names_and_paths.get(name)
        (base / name).mkdir()
        folder_paths.folder_names_and_paths[name] = ([str(base / name)], {".safetensors"})
    yield base
    for name, value in saved.items():
        if value is None:
            folder_paths.folder_names_and_paths.pop(name, None)
        else:
            folder_paths.folder_names_and_paths[name] = value
    folder_paths.filename_list_cache.clear() if hasattr(folder_paths, "filename_list_cache") else None


def pruned_pair(arch: str, nodes, weights, sparsity: float = 0.2, seed: int = 5):
    tiny = ct.tiny(arch, seed=seed)
    layout = weights.model_layout(tiny.model)
    state = random_mask(layout, seed)
    with torch.inference_mode():
        pruned = nodes.ApplyPrunedMask.execute(tiny.model, state, "params", sparsity, "", "prune").args[0]
    return tiny, pruned


def conds(tiny):
    return [(tiny.positive, tiny.negative), (tiny.conditioning(7), tiny.negative)]


def stock_lora_loader():
    return comfy_nodes().LoraLoaderModelOnly()


@pytest.mark.parametrize("arch", ct.ARCHS)
def test_recovery_lowers_distillation_loss(arch, nodes, weights, sampling, host, core):
    tiny, pruned = pruned_pair(arch, nodes, weights)
    snap_o = weights_snapshot(tiny.model.model.diffusion_model)
    snap_p = weights_snapshot(pruned.model.diffusion_model)
    settings = sub("ecodiff_core.recover").RecoverSettings(rank=4, alpha=4.0, steps=12, lr=1e-2, batch=2, seed=0)
    spec = sampling.SamplingSpec(width=64, height=64, steps=3, cfg=2.0, seed=1)
    with torch.inference_mode():
        result = host.recover_lora(tiny.model, pruned, conds(tiny), spec, settings, measure=True)
    assert result.loss_before > 0
    assert result.loss_after < 0.8 * result.loss_before, (result.loss_before, result.loss_after)
    assert result.state.progress == {"step": 12, "finished": True}
    assert same_weights(tiny.model.model.diffusion_model, snap_o)
    assert same_weights(pruned.model.diffusion_model, snap_p)
    assert not pruned.weight_wrapper_patches and not pruned.patches


@pytest.mark.parametrize("arch", ct.ARCHS)
def test_saved_lora_with_stock_loader_equals_node_output(arch, nodes, weights, host, lora_dirs):
    tiny, pruned = pruned_pair(arch, nodes, weights, seed=6)
    name = f"{arch}_recovered"
    with torch.inference_mode():
        model, summary = nodes.LoraRecover.execute(pruned, tiny.model, clip=ct.TinyClip(arch), lora_name=name,
                                                   **RECOVER_ARGS).args
        stock = stock_lora_loader().load_lora_model_only(pruned, f"{name}.safetensors", 1.0)[0]
        a = ct.sample(model, tiny.positive, tiny.negative, seed=4)
        b = ct.sample(stock, tiny.positive, tiny.negative, seed=4)
        plain = ct.sample(pruned, tiny.positive, tiny.negative, seed=4)
    assert rel_err(b, a) <= 1e-5
    assert rel_err(plain, a) > 1e-5  # the LoRA does something
    assert "8 steps" in summary and f"{name}.safetensors" in summary
    from safetensors import safe_open

    with safe_open(str(lora_dirs / "loras" / f"{name}.safetensors"), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["rank"] == "4" and float(meta["alpha"]) == 4.0
    assert meta["layout_fingerprint"] == weights.pruning_info(pruned)["fingerprint"]
    assert meta["base_model"] == type(tiny.model.model.model_config).__name__
    assert all(k.startswith("diffusion_model.") for k in keys)
    ups = [k for k in keys if k.endswith(".lora_up.weight")]
    assert len(ups) == len(keys) // 3 and len(ups) > 0


def test_training_wrappers_compute_what_the_loader_merges(nodes, weights, host):
    """The weight wrappers trained on and the patches of the saved file give the same samples."""
    tiny, pruned = pruned_pair("flux", nodes, weights, seed=9)
    rec = sub("ecodiff_core.recover")
    layout = weights.model_layout(tiny.model)
    with torch.inference_mode(False):
        paths = rec.lora_target_paths(pruned.model.diffusion_model, layout, "all_linear")
        lora = rec.LoraWeights.for_module(pruned.model.diffusion_model, paths, 3, 6.0, seed=1)
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for up in lora.up:
                up.copy_(0.05 * torch.randn(up.shape, generator=gen))
        wrapped = host.lora_patched(pruned, lora)
        patched = host.apply_lora(pruned, lora.tensors())
    with torch.inference_mode():
        a = ct.sample(wrapped, tiny.positive, tiny.negative, seed=5)
        b = ct.sample(patched, tiny.positive, tiny.negative, seed=5)
        c = ct.sample(pruned, tiny.positive, tiny.negative, seed=5)
    assert rel_err(a, b) <= 1e-5 and rel_err(a, c) > 1e-4


def test_interrupt_keeps_state_and_rerun_resumes(nodes, weights, progress, host, lora_dirs, monkeypatch):
    import comfy.model_management

    rec = sub("ecodiff_core.recover")
    tiny, pruned = pruned_pair("sd15", nodes, weights, seed=11)
    real_update = progress.Progress.update
    calls = []

    def interrupting(self, value, total=None):
        calls.append(value)
        if value == 3:
            comfy.model_management.interrupt_current_processing(True)
        return real_update(self, value, total)

    monkeypatch.setattr(progress.Progress, "update", interrupting)
    args = dict(RECOVER_ARGS, lora_name="resume_me")
    with torch.inference_mode(), pytest.raises(comfy.model_management.InterruptProcessingException):
        nodes.LoraRecover.execute(pruned, tiny.model, clip=ct.TinyClip("sd15"), **args)
    comfy.model_management.interrupt_current_processing(False)
    state = rec.load_recover_state(lora_dirs / "ecodiff_recover" / "resume_me.safetensors")
    assert state.progress["step"] == 3 and not state.progress["finished"]
    assert state.optimizer and "interrupted" in state.stop_reason
    monkeypatch.setattr(progress.Progress, "update", real_update)
    with torch.inference_mode():
        resumed = nodes.LoraRecover.execute(pruned, tiny.model, clip=ct.TinyClip("sd15"), **args).args[0]
        fresh = nodes.LoraRecover.execute(pruned, tiny.model, clip=ct.TinyClip("sd15"),
                                          **dict(args, lora_name="no_break")).args[0]
    final = rec.load_recover_state(lora_dirs / "ecodiff_recover" / "resume_me.safetensors")
    assert final.progress == {"step": 8, "finished": True}
    assert [h["step"] for h in final.history] == list(range(1, 9))
    other = rec.load_recover_state(lora_dirs / "ecodiff_recover" / "no_break.safetensors")
    for k, v in other.lora.items():  # resuming continues exactly where the interrupted run stopped
        assert torch.allclose(final.lora[k], v, rtol=1e-5, atol=1e-7), k
    with torch.inference_mode():
        a = ct.sample(resumed, tiny.positive, tiny.negative, seed=1)
        b = ct.sample(fresh, tiny.positive, tiny.negative, seed=1)
    assert rel_err(a, b) <= 1e-5


def test_wrong_inputs_are_refused(nodes, weights, host, core):
    tiny, pruned = pruned_pair("flux", nodes, weights, seed=12)
    other = ct.tiny("sd15", seed=1)
    with torch.inference_mode():
        with pytest.raises(core.errors.EcoDiffError, match="pruned MODEL"):
            nodes.LoraRecover.execute(tiny.model, tiny.model, clip=ct.TinyClip("flux"), lora_name="x", **RECOVER_ARGS)
        with pytest.raises(core.errors.EcoDiffError, match="itself pruned"):
            nodes.LoraRecover.execute(pruned, pruned, clip=ct.TinyClip("flux"), lora_name="x", **RECOVER_ARGS)
        with pytest.raises(core.errors.EcoDiffError):
            nodes.LoraRecover.execute(pruned, other.model, clip=ct.TinyClip("flux"), lora_name="x", **RECOVER_ARGS)
        with pytest.raises(core.errors.SettingsError, match="rank"):
            nodes.LoraRecover.execute(pruned, tiny.model, clip=ct.TinyClip("flux"), lora_name="x",
                                      **dict(RECOVER_ARGS, rank=0))


@pytest.mark.parametrize("change", ["prompts", "rank"])
def test_unfinished_run_for_other_inputs_is_not_resumed(change, nodes, weights, progress, host, lora_dirs, monkeypatch):
    import comfy.model_management

    rec = sub("ecodiff_core.recover")
    tiny, pruned = pruned_pair("sd3", nodes, weights, seed=13)
    real_update = progress.Progress.update

    def interrupting(self, value, total=None):
        if value == 2:
            comfy.model_management.interrupt_current_processing(True)
        return real_update(self, value, total)

    args = dict(RECOVER_ARGS, lora_name=f"changed_{change}", train_steps=4)
    monkeypatch.setattr(progress.Progress, "update", interrupting)
    with torch.inference_mode(), pytest.raises(comfy.model_management.InterruptProcessingException):
        nodes.LoraRecover.execute(pruned, tiny.model, clip=ct.TinyClip("sd3"), **args)
    comfy.model_management.interrupt_current_processing(False)
    monkeypatch.setattr(progress.Progress, "update", real_update)
    changed = dict(args, prompts="a castle on a hill") if change == "prompts" else dict(args, rank=2)
    with torch.inference_mode():
        summary = nodes.LoraRecover.execute(pruned, tiny.model, clip=ct.TinyClip("sd3"), **changed).args[1]
    assert "started afresh" in summary
    state = rec.load_recover_state(lora_dirs / "ecodiff_recover" / f"changed_{change}.safetensors")
    assert [h["step"] for h in state.history] == [1, 2, 3, 4] and state.progress["finished"]


@pytest.mark.parametrize("arch,weight,cast", [("flux", torch.float8_e4m3fn, torch.float32),
                                              ("sd15", torch.float8_e5m2, torch.float32),
                                              ("flux", torch.bfloat16, None)],
                         ids=["flux-fp8e4m3-cast-fp32", "sd15-fp8e5m2-cast-fp32", "flux-bf16"])
def test_recovery_on_low_precision_weights(arch, weight, cast, nodes, weights, sampling, pruned_models, host):
    """fp8 (ComfyUI's manual cast) and bf16 models: recovery trains (the LoRA is merged in float32
    and cast back, as ComfyUI's loader does), lowers the loss and leaves both inputs untouched."""
    _, ctx, pooled = ct.dims(arch)
    positive, negative = ct.make_conditioning(arch, ctx, pooled, 10), ct.make_conditioning(arch, ctx, pooled, 11)
    model = ct.build_model_precision(arch, 5, weight, cast)
    layout = weights.model_layout(model)
    keep = {g.name: torch.rand(g.count, generator=torch.Generator().manual_seed(1)) > 0.3 for g in layout.groups}
    for k in keep.values():
        k[0] = True
    with torch.inference_mode():
        pruned, _ = pruned_models.build_pruned_model(model, layout, keep,
                                                     {g.name: torch.zeros(g.count) for g in layout.groups})
    snap_o = weights_snapshot(model.model.diffusion_model)
    snap_p = weights_snapshot(pruned.model.diffusion_model)
    settings = sub("ecodiff_core.recover").RecoverSettings(rank=4, alpha=4.0, steps=12, lr=1e-2, batch=2, seed=0)
    spec = sampling.SamplingSpec(width=64, height=64, steps=3, cfg=2.0, seed=1)
    with torch.inference_mode():
        result = host.recover_lora(model, pruned, [(positive, negative)], spec, settings, measure=True)
    assert torch.isfinite(torch.tensor(result.loss_after))
    assert result.loss_after < 0.9 * result.loss_before, (result.loss_before, result.loss_after)
    assert same_weights(model.model.diffusion_model, snap_o)
    assert same_weights(pruned.model.diffusion_model, snap_p)
