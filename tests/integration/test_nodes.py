"""Every EcoDiff node's execute on tiny real ComfyUI models, as ComfyUI's executor calls them
(under torch.inference_mode), plus interrupt/resume and save/load round trips."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import comfy_tiny as ct
from comfy_checks import random_mask, rel_err, same_weights, weights_snapshot, wrap_linears
from pruned_shapes import check_counts_match_shapes
from scripts.comfy_env import sub

LEARN_ARGS = dict(prompts="a red fox in snow\na lighthouse in a storm\na bowl of ramen", negative_prompt="",
                  max_prompts=0, width=64, height=64, steps=3, cfg=2.0, sampler_name="euler", scheduler="normal",
                  seed=7, epochs=2, accumulate=1, beta=0.1, regularizer="l1", lr_heads=0.5, lr_neurons=0.5,
                  lr_channels=0.5, checkpointing=True, resume=True)


def interrupt_processing(value: bool = True) -> None:
    """Ask ComfyUI to interrupt (as POST /interrupt does)."""
    import comfy.model_management

    comfy.model_management.interrupt_current_processing(value)


def learn(nodes, tiny, run_name: str, **overrides):
    args = dict(LEARN_ARGS, run_name=run_name)
    args.update(overrides)
    with torch.inference_mode():
        return nodes.LearnSparsityMask.execute(model=tiny.model, clip=ct.TinyClip(tiny.arch), **args)


@pytest.fixture(scope="module")
def flux_run(nodes):
    tiny = ct.tiny("flux", seed=1)
    snapshot = weights_snapshot(tiny.model.model.diffusion_model)
    out = learn(nodes, tiny, "flux_main")
    return tiny, out, snapshot


def test_learn_reduces_loss_and_leaves_model_untouched(flux_run, folders):
    tiny, out, snapshot = flux_run
    mask, summary = out.args
    losses = [h["loss"] for h in mask.history]
    assert len(losses) == 6  # 3 prompts × 2 epochs, one prompt per optimiser step
    assert losses[-1] < losses[0]
    assert mask.progress["finished"] and mask.arch == "comfy_flux"
    assert "6 optimiser steps" in summary
    assert same_weights(tiny.model.model.diffusion_model, snapshot)
    assert folders.run_state_path("flux_main").is_file()
    assert folders.run_state_path("flux_main").parent.name == ".runs"
    assert not any("flux_main" in name for name in folders.list_files(folders.MASK_FOLDER)), \
        "run states stay out of the masks list"


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd3"])
def test_learn_runs_on_every_architecture(arch, nodes):
    tiny = ct.tiny(arch, seed=2)
    out = learn(nodes, tiny, f"{arch}_smoke", prompts="a cat", steps=2, epochs=2)
    mask = out.args[0]
    assert mask.arch == {"sd15": "comfy_unet", "sdxl": "comfy_unet", "sd3": "comfy_mmdit"}[arch]
    losses = [h["loss"] for h in mask.history]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert all(torch.isfinite(t).all() for t in mask.logits.values())


@pytest.mark.parametrize("reason, saved_reason", [("", "interrupted after step 3"), ("converged", "converged")])
@pytest.mark.parametrize("kind", ["mask", "recover"])
def test_the_latest_state_is_handed_over_when_a_run_stops(progress, weights, kind, reason, saved_reason):
    """Learning and LoRA Recover share one save-on-interrupt helper: the error goes on, ``on_stop``
    gets the latest state with its stop reason (its own, else "interrupted after step N")."""
    layout = weights.model_layout(ct.tiny("sd15", seed=1).model)
    state = sub("ecodiff_core.maskfile").MaskState.fresh(layout, 1.0) if kind == "mask" else \
        sub("ecodiff_core.recover").RecoverState("a", "f", {}, sub("ecodiff_core.recover").RecoverSettings())
    state.progress["step"], state.stop_reason = 3, reason
    saved = []
    with pytest.raises(KeyboardInterrupt):
        with progress.state_kept_on_stop(lambda: state, saved.append):
            raise KeyboardInterrupt
    assert saved == [state] and state.stop_reason == saved_reason
    with progress.state_kept_on_stop(lambda: state, saved.append):  # no error: nothing handed over
        pass
    with pytest.raises(RuntimeError), progress.state_kept_on_stop(lambda: state, None):
        raise RuntimeError
    assert saved == [state]


def test_interrupt_keeps_mask_and_rerun_resumes(flux_run, nodes, folders, progress, monkeypatch):
    tiny = flux_run[0]
    interrupted_run(nodes, progress, monkeypatch, tiny, "flux_interrupt")

    path = folders.run_state_path("flux_interrupt")
    saved = sub("ecodiff_core.maskfile").load_mask(path)
    assert saved.progress["step"] == 2 and not saved.progress["finished"]
    assert "interrupted" in saved.stop_reason

    mask, summary = learn(nodes, tiny, "flux_interrupt").args
    assert mask.progress["finished"] and mask.progress["step"] == 6
    assert [h["step"] for h in mask.history] == [1, 2, 3, 4, 5, 6]
    assert "started fresh" not in summary
    straight = flux_run[1].args[0]  # the same inputs, uninterrupted: resuming changes nothing
    for name in straight.logits:
        torch.testing.assert_close(mask.logits[name], straight.logits[name], rtol=0, atol=1e-6)


def interrupted_run(nodes, progress, monkeypatch, tiny, run_name, **overrides):
    """Learn until the second progress update, then interrupt as POST /interrupt does."""
    import comfy.model_management

    calls = {"n": 0}
    original = progress.Progress.update

    def interrupting_update(self, value, total=None):
        calls["n"] += 1
        if calls["n"] == 2:
            interrupt_processing(True)
        original(self, value, total)

    monkeypatch.setattr(progress.Progress, "update", interrupting_update)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            learn(nodes, tiny, run_name, **overrides)
    finally:
        interrupt_processing(False)
        monkeypatch.setattr(progress.Progress, "update", original)


RESUME_ARGS = dict(steps=2, epochs=1)
CHANGED_INPUTS = {
    "other checkpoint": ("checkpoint", "weights differ"),
    "other architecture": ("architecture", "different model layout"),
    "other prompts": (dict(prompts="a castle\na ship"), "prompts (conditioning) differ"),
    "beta": (dict(beta=0.3), "beta 0.1 → 0.3"),
    "sampling steps": (dict(steps=3), "steps 2 → 3"),
    "size": (dict(width=48), "width 64 → 48"),
    "prompt batch": (dict(prompt_batch=2, accumulate=2), "prompt_batch 1 → 2"),
}


@pytest.mark.parametrize("change", list(CHANGED_INPUTS))
def test_rerun_with_changed_inputs_starts_fresh(nodes, progress, monkeypatch, change, caplog):
    """An unfinished run under run_name is not continued for another checkpoint of the same
    architecture, other prompts or other settings: the result is a fresh run's and the summary says why."""
    tiny = ct.tiny("flux", seed=11)
    run_name = f"changed_{change.replace(' ', '_')}"
    interrupted_run(nodes, progress, monkeypatch, tiny, run_name, **RESUME_ARGS)
    overrides, reason = CHANGED_INPUTS[change]
    if overrides in ("checkpoint", "architecture"):
        tiny, overrides = ct.tiny("flux" if overrides == "checkpoint" else "sd15", seed=12), {}
    with caplog.at_level("WARNING", logger="ecodiff"):
        mask, summary = learn(nodes, tiny, run_name, **{**RESUME_ARGS, **overrides}).args
    fresh = learn(nodes, tiny, run_name + "_fresh", **{**RESUME_ARGS, **overrides}).args[0]
    assert all(torch.equal(mask.logits[k], fresh.logits[k]) for k in fresh.logits)
    assert mask.history == fresh.history and mask.progress == fresh.progress
    assert "started fresh" in summary and reason in summary, summary
    assert any(reason in r.getMessage() for r in caplog.records if r.name == "ecodiff")


def patched_model(model, patch: str):
    """``model`` changed by a stock node in a way that leaves its weights alone."""
    from comfy_extras.nodes_freelunch import FreeU_V2
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete, RescaleCFG

    if patch == "RescaleCFG":
        return RescaleCFG().patch(model, 1.0)[0]
    if patch == "v_prediction":
        return ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    if patch == "FreeU_V2":
        return FreeU_V2().patch(model, 1.3, 1.4, 0.9, 0.2)[0]
    assert patch == "weight wrapper"
    return wrap_linears(model)


@pytest.mark.parametrize("before,after", [(None, "RescaleCFG"), (None, "v_prediction"), (None, "FreeU_V2"),
                                          (None, "weight wrapper"), ("FreeU_V2", None), ("FreeU_V2", "FreeU_V2")])
def test_rerun_after_model_patches_changed_starts_fresh(nodes, progress, monkeypatch, before, after, caplog):
    """Patches that leave the weights alone (CFG functions, model_sampling object patches, model
    patches, weight wrappers) change what the model computes: a rerun resumes only when the model
    responds alike, and then to the uninterrupted run's result."""
    tiny = ct.tiny("sd15", seed=13)
    base = tiny.model
    run_name = f"patched_{before}_{after}".replace(" ", "_")
    tiny.model = patched_model(base, before) if before else base
    interrupted_run(nodes, progress, monkeypatch, tiny, run_name, **RESUME_ARGS)
    tiny.model = patched_model(base, after) if after else base
    with caplog.at_level("WARNING", logger="ecodiff"):
        mask, summary = learn(nodes, tiny, run_name, **RESUME_ARGS).args
    reason = "the model's output differs from the saved run's: patches, model options or sampling changed"
    if before == after:
        straight = learn(nodes, tiny, run_name + "_straight", **RESUME_ARGS).args[0]
        assert "started fresh" not in summary and not caplog.records, summary
        for name in straight.logits:
            torch.testing.assert_close(mask.logits[name], straight.logits[name], rtol=0, atol=1e-6)
        return
    assert [h["step"] for h in mask.history] == [1, 2, 3] and mask.progress["finished"]
    assert "started fresh" in summary and reason in summary, summary
    assert any(reason in r.getMessage() for r in caplog.records if r.name == "ecodiff")


def test_apply_prune_and_soft_sample_alike(flux_run, nodes):
    tiny, out, snapshot = flux_run
    mask = out.args[0]
    with torch.inference_mode():
        before = ct.sample(tiny.model, tiny.positive, tiny.negative, seed=3)
        pruned, report = nodes.ApplyPrunedMask.execute(tiny.model, mask, "params", 0.25, "", "prune").args
        soft, _ = nodes.ApplyPrunedMask.execute(tiny.model, mask, "params", 0.25, "", "soft").args
        a = ct.sample(pruned, tiny.positive, tiny.negative, seed=3)
        b = ct.sample(soft, tiny.positive, tiny.negative, seed=3)
        after = ct.sample(tiny.model, tiny.positive, tiny.negative, seed=3)
    assert rel_err(a, b) <= 1e-4
    assert torch.equal(before, after)
    assert same_weights(tiny.model.model.diffusion_model, snapshot)
    assert report.report.params_removed >= 0.25 * report.report.params_before
    n = sum(p.numel() for p in pruned.model.diffusion_model.parameters())
    assert n == report.report.params_after < report.report.params_before

    text, chart = nodes.PruningReport.execute(report).args
    assert "parameters:" in text and chart.ndim == 4 and chart.shape[-1] == 3

    ratios = nodes.ApplyPrunedMask.execute(tiny.model, mask, "keep_ratios", 0.0,
                                           "head=0.75, neuron=0.5, channel=0.9", "prune").args[1]
    kinds = {k.kind: k for k in ratios.report.kinds}
    assert kinds["neuron"].units_after == kinds["neuron"].units_before // 2


def test_pruned_model_takes_lora_patches(flux_run, nodes):
    """ComfyUI's LoRA machinery (add_patches) applies to a pruned MODEL's remaining weights."""
    tiny, out, _ = flux_run
    with torch.inference_mode():
        pruned = nodes.ApplyPrunedMask.execute(tiny.model, out.args[0], "params", 0.2, "", "prune").args[0]
        key = "diffusion_model.final_layer.linear.weight"
        weight = pruned.model.diffusion_model.final_layer.linear.weight
        patched = pruned.clone()
        patched.add_patches({key: ("diff", (torch.ones_like(weight),))}, 0.01)
        a = ct.sample(pruned, tiny.positive, tiny.negative, seed=2)
        b = ct.sample(patched, tiny.positive, tiny.negative, seed=2)
        c = ct.sample(pruned, tiny.positive, tiny.negative, seed=2)
    assert rel_err(a, b) > 1e-6 and torch.equal(a, c)


def test_mask_save_load_round_trip(flux_run, nodes, folders):
    mask = flux_run[1].args[0]
    path = nodes.SaveSparsityMask.execute(mask, "round trip").args[0]
    assert path.endswith("round_trip.safetensors")
    assert "round_trip.safetensors" in folders.list_files(folders.MASK_FOLDER)
    loaded, summary = nodes.LoadSparsityMask.execute("round_trip.safetensors").args
    assert loaded.fingerprint == mask.fingerprint
    assert all(torch.equal(loaded.logits[k], mask.logits[k]) for k in mask.logits)


@pytest.mark.parametrize("arch", ct.ARCHS)
def test_pruned_model_save_load_gives_identical_samples(arch, nodes, weights):
    tiny = ct.tiny(arch, seed=8)
    layout = weights.model_layout(tiny.model)
    state = random_mask(layout)
    with torch.inference_mode():
        pruned = nodes.ApplyPrunedMask.execute(tiny.model, state, "params", 0.15, "", "prune").args[0]
        nodes.SavePrunedModel.execute(pruned, f"{arch}_pruned")
        loaded = nodes.LoadPrunedModel.execute(f"{arch}_pruned.safetensors").args[0]
        a = ct.sample(pruned, tiny.positive, tiny.negative, seed=4)
        b = ct.sample(loaded, tiny.positive, tiny.negative, seed=4)
    assert torch.equal(a, b)
    assert weights.pruning_info(loaded)["kept"] == weights.pruning_info(pruned)["kept"]


def test_compare_node_stitches_and_passes_images(nodes):
    a, b = torch.rand(2, 32, 40, 3), torch.rand(1, 24, 32, 3)
    out = nodes.CompareImages.execute(a, b, "original", "pruned")
    stitched, a_out, b_out = out.args
    assert stitched.shape[0] == 2 and stitched.shape[2] > 40 + 32 and stitched.shape[-1] == 3
    assert a_out is a and b_out is b
    ui = out.ui if isinstance(out.ui, dict) else out.ui.as_dict()
    assert len(ui["images"]) == 2 and len(ui["a_images"]) == 2 and len(ui["b_images"]) == 1


# ---------------------------------------------------------------------------------------- bad inputs
def test_mask_from_another_model_is_refused(flux_run, nodes, core):
    sd3 = ct.tiny("sd3")
    with pytest.raises(core.errors.MaskFileError, match="different model layout"):
        nodes.ApplyPrunedMask.execute(sd3.model, flux_run[1].args[0], "params", 0.2, "", "prune")


@pytest.mark.parametrize("sparsity", [-0.1, 0.99, 20.0])
def test_sparsity_out_of_range_is_refused(flux_run, nodes, core, sparsity):
    tiny, out, _ = flux_run
    with pytest.raises(core.errors.EcoDiffError, match="fraction of parameters"):
        nodes.ApplyPrunedMask.execute(tiny.model, out.args[0], "params", sparsity, "", "prune")


@pytest.mark.parametrize("text,match", [("heads 0.5", "kind=ratio"), ("head=0.5, head=0.9", "twice"),
                                        ("heads=0.5", "unknown unit kind 'heads'"), ("head=1.0000001", "1.0000001")])
def test_bad_keep_ratios_are_refused(flux_run, nodes, core, text, match):
    tiny, out, _ = flux_run
    with pytest.raises(core.errors.EcoDiffError, match=match):
        nodes.ApplyPrunedMask.execute(tiny.model, out.args[0], "keep_ratios", 0.2, text, "prune")


def test_unsupported_architecture_names_the_supported_ones(nodes, core):
    from types import SimpleNamespace

    fake = SimpleNamespace(model=SimpleNamespace(diffusion_model=torch.nn.Sequential(torch.nn.Linear(4, 4))))
    state = core.maskfile.MaskState(arch="x", fingerprint="y", logits={}, kinds={})
    with pytest.raises(core.errors.UnsupportedArchitectureError) as info:
        nodes.ApplyPrunedMask.execute(fake, state, "params", 0.2, "", "prune")
    for name in ("ComfyUI UNetModel", "ComfyUI Flux", "ComfyUI MMDiT"):
        assert name in str(info.value)


def test_empty_prompts_are_refused(nodes, core):
    tiny = ct.tiny("flux")
    with pytest.raises(core.errors.EcoDiffError, match="no calibration prompts"):
        learn(nodes, tiny, "empty", prompts="\n  \n# only a comment\n")


def test_unsupported_sampler_is_refused(nodes, core):
    tiny = ct.tiny("flux")
    with pytest.raises(core.errors.EcoDiffError, match="deterministic trajectory"):
        learn(nodes, tiny, "bad_sampler", sampler_name="dpmpp_2m")


@pytest.mark.parametrize("node", ["apply", "learn"])
def test_an_already_pruned_model_is_refused(flux_run, nodes, core, node):
    tiny, out, _ = flux_run
    with torch.inference_mode():
        pruned = nodes.ApplyPrunedMask.execute(tiny.model, out.args[0], "params", 0.1, "", "prune").args[0]
    with pytest.raises(core.errors.EcoDiffError, match="already pruned.*original model"):
        if node == "apply":
            nodes.ApplyPrunedMask.execute(pruned, out.args[0], "params", 0.1, "", "prune")
        else:
            learn(nodes, dataclasses.replace(tiny, model=pruned), "learn_on_pruned")


def test_save_pruned_model_explains_soft_mode(flux_run, nodes, core, folders):
    tiny, out, _ = flux_run
    with torch.inference_mode():
        soft = nodes.ApplyPrunedMask.execute(tiny.model, out.args[0], "params", 0.1, "", "soft").args[0]
        with pytest.raises(core.errors.EcoDiffError, match="soft mode keeps the full-size weights.*'prune'"):
            nodes.SavePrunedModel.execute(soft, "from_soft")
        with pytest.raises(core.errors.EcoDiffError, match="needs a MODEL from Apply Pruned Mask"):
            nodes.SavePrunedModel.execute(tiny.model, "from_original")
    assert not (folders.folder(folders.PRUNED_FOLDER) / "from_soft.safetensors").exists()


def _run_node(cls, legacy_method: str, *args):
    """Call a stock node on ComfyUI versions with V1 classes (method) or V3 classes (execute)."""
    if hasattr(cls, legacy_method):
        return getattr(cls(), legacy_method)(*args)
    return cls.execute(*args).args


def test_pruned_model_runs_through_sampler_custom_advanced(flux_run, nodes):
    """The pruned MODEL in SamplerCustomAdvanced (guider/sampler/sigmas/noise nodes) equals KSampler's path."""
    from comfy_extras import nodes_custom_sampler as custom

    tiny, out, _ = flux_run
    with torch.inference_mode():
        pruned = nodes.ApplyPrunedMask.execute(tiny.model, out.args[0], "params", 0.2, "", "prune").args[0]
        channels = pruned.model.latent_format.latent_channels
        latent = {"samples": torch.zeros(1, channels, 8, 8)}
        noise = _run_node(custom.RandomNoise, "get_noise", 3)[0]
        guider = _run_node(custom.CFGGuider, "get_guider", pruned, tiny.positive, tiny.negative, 2.0)[0]
        sampler = _run_node(custom.KSamplerSelect, "get_sampler", "euler")[0]
        sigmas = _run_node(custom.BasicScheduler, "get_sigmas", pruned, "normal", 3, 1.0)[0]
        result = _run_node(custom.SamplerCustomAdvanced, "sample", noise, guider, sampler, sigmas, latent)[0]
        reference = ct.sample(pruned, tiny.positive, tiny.negative, seed=3, steps=3, cfg=2.0)
    samples = result["samples"]
    assert samples.shape == reference.shape and torch.isfinite(samples).all()
    assert rel_err(samples, reference) <= 1e-4


def _random_mask(weights, model, seed: int = 0):
    layout = weights.model_layout(model)
    return layout, random_mask(layout, seed)


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "flux", "sd3"])
def test_default_keep_ratios_work_on_every_architecture(nodes, weights, arch):
    """The node's default keep_ratios names every kind; kinds the architecture lacks are ignored and
    the report says so; every present kind keeps exactly round(ratio × N) units."""
    default = next(i for i in nodes.ApplyPrunedMask.define_schema().inputs if i.id == "keep_ratios").default
    ratios = nodes.apply.parse_keep_ratios(default)
    tiny = ct.tiny(arch, seed=2)
    layout, mask = _random_mask(weights, tiny.model)
    with torch.inference_mode():
        _, report = nodes.ApplyPrunedMask.execute(tiny.model, mask, "keep_ratios", 0.2, default, "prune").args
    text = nodes.PruningReport.execute(report).args[0]
    absent = [k for k in ratios if k not in layout.kinds()]
    assert (f"ignored {', '.join(absent)}" in text) == bool(absent) and (arch == "flux") == (not absent)
    kinds = {k.kind: k for k in report.report.kinds}
    for kind in layout.kinds():
        assert kinds[kind].units_after == round(ratios[kind] * kinds[kind].units_before)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_keep_ratio_below_heads_that_must_stay_keeps_them_and_says_so(nodes, weights, arch):
    """FLUX/SD3 attentions keep at least one head: head=0.05 keeps one head per block and the report
    says so, naming the smallest ratio kept exactly; that ratio keeps exactly round(ratio × N) heads."""
    tiny = ct.tiny(arch, seed=2)
    _, mask = _random_mask(weights, tiny.model)
    with torch.inference_mode():
        _, short = nodes.ApplyPrunedMask.execute(tiny.model, mask, "keep_ratios", 0.2, "head=0.05", "prune").args
    assert "blocks cannot run without their last heads" in short.target
    advised = float(short.target.rsplit("kept exactly is ", 1)[1].split(")")[0])
    kept = next(k for k in short.report.kinds if k.kind == "head").units_after
    with torch.inference_mode():
        pruned, report = nodes.ApplyPrunedMask.execute(tiny.model, mask, "keep_ratios", 0.2, f"head={advised}",
                                                       "prune").args
    heads = next(k for k in report.report.kinds if k.kind == "head")
    assert heads.units_after == round(advised * heads.units_before) == kept < heads.units_before
    assert "cannot run" not in report.target
    assert torch.isfinite(ct.sample(pruned, tiny.positive, tiny.negative, seed=1, steps=1)).all()


def test_learn_at_the_largest_seed_wraps_per_prompt_seeds(nodes):
    """seed = 2**64-1 (the schema's maximum) with several prompts: prompt i uses (seed + i) mod 2**64,
    so prompt 1 starts from the noise of seed 0 instead of overflowing."""
    import comfy.sample

    tiny = ct.tiny("sd15", seed=3)
    seen = []
    original = comfy.sample.prepare_noise
    comfy.sample.prepare_noise = lambda latent, seed, *a, **k: (seen.append(seed), original(latent, seed, *a, **k))[1]
    try:
        out = learn(nodes, tiny, "largest_seed", seed=0xFFFFFFFFFFFFFFFF, prompts="a fox\na ship", steps=2, epochs=1,
                    width=32, height=32, checkpointing=False, resume=False)
    finally:
        comfy.sample.prepare_noise = original
    assert seen[-2:] == [0xFFFFFFFFFFFFFFFF, 0], seen  # the noise of prompts 0 and 1
    assert len(out.args[0].history) == 2


@pytest.mark.parametrize("model_seed, other_weights", [(1, False), (2, True)])
def test_apply_warns_when_the_mask_was_learned_on_other_weights(flux_run, nodes, model_seed, other_weights):
    """flux_run learned on tiny FLUX seed 1; seed 2 is the same architecture with other weights."""
    mask = flux_run[1].args[0]
    target = flux_run[0] if model_seed == 1 else ct.tiny("flux", seed=model_seed)
    with torch.inference_mode():
        out = nodes.ApplyPrunedMask.execute(target.model, mask, "params", 0.1, "", "prune")
        report_text = nodes.PruningReport.execute(out.args[1]).args[0]
    warned = [w for w in out.args[1].warnings if "learned on other weights" in w]
    assert bool(warned) == other_weights, out.args[1].warnings
    assert (mask.inputs["weights"] in warned[0]) if warned else True
    ui_text = out.ui["text"][0]
    for warning in out.args[1].warnings:  # every warning is shown in the node and in the report
        assert f"WARNING: {warning}" in ui_text and f"WARNING: {warning}" in report_text
    assert "remove 10.0% of parameters" in ui_text


def test_apply_warns_on_an_unfinished_mask_and_an_almost_emptied_kind(flux_run, nodes, core):
    tiny, out, _ = flux_run
    mask = dataclasses.replace(out.args[0], progress=dict(out.args[0].progress, finished=False, epoch=1))
    with torch.inference_mode():
        data = nodes.ApplyPrunedMask.execute(tiny.model, mask, "keep_ratios", 0.0, "neuron=0.05", "prune").args[1]
    assert any(w.startswith("the mask is unfinished") and "1 of 2 epochs" in w for w in data.warnings), data.warnings
    kept = sum(g.units_after for g in data.report.groups if g.kind == "neuron")
    total = sum(g.units_before for g in data.report.groups if g.kind == "neuron")
    assert kept / total < core.mask_checks.ALMOST_EMPTY, (kept, total)
    assert f"pruning removes {1 - kept / total:.0%} of the neurons ({total - kept} of {total})" in "\n".join(
        data.warnings), data.warnings


def test_learn_settings_node_defaults_are_the_engines(nodes, core):
    """One source of defaults: the settings node's widgets and Learn's epochs/beta read LearnSettings."""
    engine = core.learn.LearnSettings()
    schema = nodes.LearnSettingsNode.define_schema()
    defaults = {i.id: i.default for i in schema.inputs}
    assert defaults == {"accumulate": engine.accumulate, "regularizer": engine.regularizer,
                        "lr_heads": engine.lr["head"], "lr_neurons": engine.lr["neuron"],
                        "lr_channels": engine.lr["channel"], "weight_decay": engine.weight_decay,
                        "gate_temperature": engine.gate.temperature, "init_logit": engine.gate.init_logit,
                        "noise_offset": engine.gate.noise_offset, "checkpointing": engine.checkpointing,
                        "block_checkpointing": engine.block_checkpointing, "prompt_batch": engine.prompt_batch,
                        "objective": engine.objective, "warm_start": engine.warm_start}
    learn_defaults = {i.id: getattr(i, "default", None) for i in nodes.LearnSparsityMask.define_schema().inputs}
    assert (learn_defaults["epochs"], learn_defaults["beta"]) == (engine.epochs, engine.beta) == (4, 0.5)
    assert not set(defaults) & set(learn_defaults), "an expert setting is on both nodes"
    assert nodes.LearnSettingsNode.execute().args[0] == engine
    changed = nodes.LearnSettingsNode.execute(lr_channels=0.2, gate_temperature=0.5, accumulate=2).args[0]
    assert changed.lr == {**engine.lr, "channel": 0.2} and changed.gate.temperature == 0.5
    assert changed.accumulate == 2 and changed.gate.init_logit == engine.gate.init_logit
    official = nodes.LearnSettingsNode.execute(objective="end_to_end", lr_heads=0.5, lr_channels=0.5,
                                               regularizer="sigmoid").args[0]  # official FLUX objective, rates
    assert official == core.learn.LearnSettings(objective="end_to_end", regularizer="sigmoid",
                                                lr={"head": 0.5, "neuron": 0.1, "channel": 0.5})
    warm = nodes.LearnSettingsNode.execute(warm_start=0.5, objective="end_to_end").args[0]
    assert warm.warm_start_epochs == engine.epochs // 2
    with pytest.raises(core.errors.SettingsError, match="set objective 'end_to_end' or warm_start 0"):
        nodes.LearnSettingsNode.execute(warm_start=0.5)  # the per-step default has nothing to warm up
    with pytest.raises(core.errors.SettingsError, match="accumulate must be >= 1"):
        nodes.LearnSettingsNode.execute(accumulate=0)
    with pytest.raises(core.errors.SettingsError, match="objective must be one of"):
        nodes.LearnSettingsNode.execute(objective="final_image")
    with pytest.raises(core.errors.SettingsError, match="unknown learn setting.*lr_head"):
        nodes.LearnSparsityMask.execute(model=ct.tiny("sd15").model, clip=None, **dict(LEARN_ARGS, lr_head=0.1),
                                        run_name="typo")


@pytest.mark.parametrize("arch", ["sd15", "flux"])
@pytest.mark.parametrize("align, device_align, expected", [("8", 1, 8), ("16", 1, 16), ("off", 1, 1), ("auto", 1, 1),
                                                           ("auto", 8, 8), ("off", 8, 1)])
def test_apply_align_reaches_the_plan_the_shapes_and_the_record(arch, align, device_align, expected, nodes, weights,
                                                                core, pruned_models, monkeypatch):
    """Apply Pruned Mask's align widget: the kept units are the engine's plan for that alignment
    ("auto" = the host's ``device_align``: 8 on CUDA, off elsewhere, stood in for here since a
    CUDA load device cannot be loaded on CPU; the rule itself is in test_prune_models), the pruned
    module's widths hold exactly those units (multiples of ``expected`` features, or the whole
    group), the record and the report say the alignment, and the parameter budget holds."""
    monkeypatch.setattr(pruned_models, "device_align", lambda model: device_align)
    tiny = ct.tiny(arch, seed=2)
    model = tiny.model
    layout, mask = _random_mask(weights, model)
    with torch.inference_mode():
        pruned, data = nodes.ApplyPrunedMask.execute(model, mask, "params", 0.3, "", "prune", align).args
        plan = core.plan.plan_pruning(model.model.diffusion_model, layout, mask.logits,
                                      core.plan.PruneTarget(params=0.3, align=expected), settings=mask.settings)
    kept = {g.name: int(plan.keep[g.name].sum()) for g in layout.groups}
    assert {g.name: g.units_after for g in data.report.groups} == kept
    record = weights.pruning_info(pruned)
    assert record["align"] == expected
    assert all(record["kept"][k] == torch.nonzero(plan.keep[k]).reshape(-1).tolist() for k in kept)
    check_counts_match_shapes(model.model.diffusion_model, pruned.model.diffusion_model, layout, kept)
    for g in layout.groups:
        assert kept[g.name] == g.count or (kept[g.name] * g.width) % expected == 0, (g.name, kept[g.name], g.width)
    if expected > 1:
        assert any(0 < kept[g.name] < g.count for g in layout.groups), "nothing cut inside a group"
    assert data.report.params_removed == plan.removed_params >= 0.3 * data.report.params_before
    assert (f"kept widths aligned to {expected} features" in data.target) == (expected > 1), data.target


def test_apply_align_changes_the_plan_and_survives_save_load(nodes, weights):
    """align=8 and align=off on one mask give other kept units (so a changed widget re-plans), and a
    saved aligned model loads with its record's alignment."""
    tiny = ct.tiny("sd15", seed=4)
    _, mask = _random_mask(weights, tiny.model, seed=3)
    with torch.inference_mode():
        aligned = nodes.ApplyPrunedMask.execute(tiny.model, mask, "params", 0.25, "", "prune", "8").args[0]
        exact = nodes.ApplyPrunedMask.execute(tiny.model, mask, "params", 0.25, "", "prune", "off").args[0]
        nodes.SavePrunedModel.execute(aligned, "sd15_aligned8")
        loaded = nodes.LoadPrunedModel.execute("sd15_aligned8.safetensors").args[0]
        a = ct.sample(aligned, tiny.positive, tiny.negative, seed=4, steps=2)
        b = ct.sample(loaded, tiny.positive, tiny.negative, seed=4, steps=2)
    assert weights.pruning_info(aligned)["kept"] != weights.pruning_info(exact)["kept"]
    assert weights.pruning_info(exact)["align"] == 1
    assert weights.pruning_info(loaded)["align"] == 8 and torch.equal(a, b)


def test_apply_refuses_an_unknown_align(flux_run, nodes, core):
    with pytest.raises(core.errors.EcoDiffError, match="align must be one of auto, off, 8"):
        nodes.ApplyPrunedMask.execute(flux_run[0].model, flux_run[1].args[0], "params", 0.2, "", "prune", "7")


def test_prompt_batch_reaches_the_engine(nodes, sampling, learning, core):
    """EcoDiff Learn Settings' prompt_batch is in the run state's settings, and Learn's mask is the
    engine's for those settings; two prompts in one batch share each step's gate sample, so the
    mask differs from one by one (the widget was not dropped on the way)."""
    tiny = ct.tiny("sd15", seed=5)
    args = dict(prompts="a red fox in snow\na lighthouse in a storm", steps=2, epochs=1, accumulate=2,
                resume=False)
    spec = sampling.SamplingSpec(width=64, height=64, steps=2, cfg=LEARN_ARGS["cfg"], sampler_name="euler",
                                 scheduler="normal", seed=LEARN_ARGS["seed"])
    with torch.inference_mode():
        conds = sampling.encode_prompts(ct.TinyClip("sd15"), args["prompts"].splitlines(), "")
    masks = {}
    for batch in (1, 2):
        settings = nodes.LearnSettingsNode.execute(prompt_batch=batch, block_checkpointing="off").args[0]
        mask = learn(nodes, tiny, f"prompt_batch_{batch}", settings=settings, **args).args[0]
        expected = core.learn.LearnSettings(epochs=1, accumulate=2, beta=LEARN_ARGS["beta"], regularizer="l1",
                                            lr={"head": 0.5, "neuron": 0.5, "channel": 0.5}, checkpointing=True,
                                            block_checkpointing="off", seed=LEARN_ARGS["seed"], prompt_batch=batch)
        assert mask.settings == expected
        with torch.inference_mode():
            reference = learning.learn_mask(tiny.model, conds, spec, expected)
        assert len(mask.history) == 1 and mask.history == reference.history
        assert all(torch.equal(mask.logits[k], reference.logits[k]) for k in reference.logits)
        masks[batch] = mask
    assert any(not torch.equal(masks[1].logits[k], masks[2].logits[k]) for k in masks[1].logits)
