"""The diffusers command line on tiny pipelines built on disk: learn → prune → load → denoise.

The pruned denoiser, loaded with ``load_pruned_denoiser`` and put into the pipeline, must compute
what the original computes with the removed units hard-gated to zero (the test's own gating hooks).
"""
from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from ecodiff_core.__main__ import main
from ecodiff_core.archs import find_layout
from ecodiff_core.cli_diffusers import file_report
from ecodiff_core.errors import EcoDiffError
from ecodiff_core.learn import MaskLearner
from ecodiff_core.maskfile import load_mask
from ecodiff_core.pipelines import load_denoiser, load_pipeline, pipeline_info
from ecodiff_core.plan import PruneTarget, plan_pruning, resolve_align
from ecodiff_core.prompts import read_prompts
from ecodiff_core.pruned_diffusers import load_pruned_denoiser, pruning_record, read_pruned_file
from ecodiff_core.pruned_record import PrunedFileError
from test_prune import hard_gate_hooks
from tiny_pipelines import IMAGE, PIPELINE_KINDS, save

PROMPTS = ["a red cat", "a blue dog", "a green tree", "the sun"]
T5_TOKENS = 8


@pytest.fixture(autouse=True)
def ecodiff_logger_restored():
    """``main`` sets the ``ecodiff`` logger up as a process entry point does; other test modules run in
    the same process and must find it as they left it."""
    import logging

    log = logging.getLogger("ecodiff")
    level, handlers = log.level, list(log.handlers)
    yield
    log.setLevel(level)
    log.handlers[:] = handlers


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli_pipelines")
    (folder / "prompts.txt").write_text("# calibration\n" + "\n".join(PROMPTS) + "\n\n")
    return folder


@pytest.fixture(scope="module")
def pipelines(workdir):
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = save(kind, workdir / kind)
        return built[kind]

    return get


def learn_args(model: Path, output: Path, *extra: str) -> list[str]:
    t5 = ["--max-sequence-length", str(T5_TOKENS)] if model.name in ("sd3", "flux") else []  # the kind's folder
    return ["learn", "--model", str(model), "--prompts", str(output.parent / "prompts.txt"), "--steps", "2",
            "--epochs", "1", "--accumulate", "2", "--width", str(IMAGE), "--height", str(IMAGE), *t5,
            "--output", str(output), "--no-progress", "--threads", "1", *extra]


def gated_keep(record: dict) -> dict[str, torch.Tensor]:
    """The gate the pruned model computes: kept units open, silenced groups (one zeroed unit) closed."""
    keep = {name: torch.zeros(count, dtype=torch.bool) for name, count in record["counts"].items()}
    for name, kept in record["kept"].items():
        if name not in record["silenced"]:
            keep[name][kept] = True
    return keep


def denoise_once(pipe, kind: str) -> torch.Tensor:
    extra = {"max_sequence_length": T5_TOKENS} if kind in ("sd3", "flux") else {}
    return pipe("a red cat", num_inference_steps=1, height=IMAGE, width=IMAGE, output_type="latent",
                generator=torch.Generator().manual_seed(0), **extra).images


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


@pytest.mark.parametrize("kind", PIPELINE_KINDS)
def test_learn_prune_load_and_denoise(kind, pipelines, workdir, capsys):
    model, mask, pruned = pipelines(kind), workdir / f"{kind}_mask.safetensors", workdir / f"{kind}.safetensors"
    channels = ["--lr-channel", "0.5"] if kind == "flux" else []  # the other families have no channel units
    assert main(learn_args(model, mask, "--lr-head", "0.5", "--lr-neuron", "0.5", *channels)) == 0
    state = load_mask(mask)
    assert state.progress["finished"] and state.progress["step"] == 2
    assert main(["prune", "--model", str(model), "--mask", str(mask), "--sparsity", "0.2",
                 "--output", str(pruned)]) == 0
    assert "wrote" in capsys.readouterr().out

    info = pipeline_info(model)
    pipe = load_pipeline(info, vae=True)
    original = getattr(pipe, info.denoiser)
    record, extra, _ = read_pruned_file(pruned)
    layout = find_layout(original)
    assert record["fingerprint"] == layout.fingerprint() == state.fingerprint
    full = denoise_once(pipe, kind)
    handles = hard_gate_hooks(original, layout, gated_keep(record))
    try:
        expected = denoise_once(pipe, kind)
    finally:
        for h in handles:
            h.remove()
    slim = load_pruned_denoiser(pruned)
    assert type(slim) is type(original)
    setattr(pipe, info.denoiser, slim)
    assert rel_err(expected, denoise_once(pipe, kind)) <= 1e-5
    assert rel_err(full, expected) > 1e-4  # the pruning changed something

    n_params = sum(p.numel() for p in slim.parameters())
    assert n_params == extra["params_after"] < extra["params_before"] == sum(p.numel() for p in original.parameters())
    assert extra["removed_fraction"] >= 0.2
    report = file_report(pruned)
    assert report["units_after"] == sum(len(v) for v in record["kept"].values()) < report["units_before"]


@pytest.mark.parametrize("align", ["off", "8"])
def test_prune_ranks_like_every_host_and_aligns(align, pipelines, workdir):
    """The command line plans as Apply Pruned Mask does: the mask's own learning rates put the kinds
    on one scale (``plan.ranking_scores``), and ``--align`` keeps every group's kept features a
    multiple of it ("auto" is off on a CPU)."""
    model, mask = pipelines("sd15"), workdir / "ranked_mask.safetensors"
    if not mask.exists():  # very unequal rates: raw logits would rank the kinds differently
        assert main(learn_args(model, mask, "--lr-head", "2", "--lr-neuron", "0.02")) == 0
    pruned = workdir / f"ranked_{align}.safetensors"
    assert main(["prune", "--model", str(model), "--mask", str(mask), "--sparsity", "0.3", "--align", align,
                 "--output", str(pruned), "--overwrite"]) == 0
    record, extra, _ = read_pruned_file(pruned)
    state = load_mask(mask)
    original = load_denoiser(pipeline_info(model), torch.float32)
    layout = find_layout(original)
    target = PruneTarget(params=0.3, align=resolve_align(align, "cpu"))

    def kept(settings):
        plan = plan_pruning(original, layout, state.logits, target, settings=settings)
        return pruning_record(original, layout, plan.keep, state.logits)["kept"]

    assert record["kept"] == kept(state.settings) != kept(None)
    assert extra["target"]["align"] == target.align
    for g in layout.groups:
        assert len(record["kept"][g.name]) * g.width % target.align == 0 or len(record["kept"][g.name]) == g.count


def test_prune_warns_as_apply_does(pipelines, workdir, capsys):
    """The mask checks Apply Pruned Mask shows: an unfinished mask, and one learned on other weights
    (the same pipeline with other random weights), printed and kept in the file's info."""
    model, mask = pipelines("sd15"), workdir / "unfinished_mask.safetensors"
    other = workdir / "sd15_other_weights"
    if not other.exists():
        save("sd15", other, seed=1)
    assert main(learn_args(model, mask, "--epochs", "3", "--stop-after", "1", "--overwrite")) == 0
    for target, expected in ((model, "the mask is unfinished"), (other, "learned on other weights")):
        pruned = workdir / "warned.safetensors"
        capsys.readouterr()
        assert main(["prune", "--model", str(target), "--mask", str(mask), "--output", str(pruned),
                     "--overwrite"]) == 0
        printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING: ")]
        assert any(expected in line for line in printed), printed
        assert any(expected in w for w in read_pruned_file(pruned)[1]["warnings"])


def test_mask_report_counts_the_learned_logits(pipelines, workdir):
    mask = workdir / "report_mask.safetensors"
    assert main(learn_args(pipelines("sd15"), mask, "--beta", "0", "--lr-head", "2", "--lr-neuron", "2")) == 0
    state = load_mask(mask)
    report = file_report(mask)
    for kind, k in report["kinds"].items():
        logits = torch.cat([v for n, v in state.logits.items() if state.kinds[n] == kind])
        assert k["units"] == logits.numel() and k["below_zero"] == int((logits < 0).sum())
    assert report["progress"]["step"] == 2 and report["resumable"]


def test_report_prints_masks_and_pruned_files_as_text_and_json(pipelines, workdir, capsys):
    """The report command on both kinds of file, as the README shows it: text and --json."""
    model, mask, pruned = pipelines("sd15"), workdir / "printed_mask.safetensors", workdir / "printed.safetensors"
    assert main(learn_args(model, mask, "--overwrite")) == 0
    assert main(["prune", "--model", str(model), "--mask", str(mask), "--output", str(pruned), "--overwrite"]) == 0
    state = load_mask(mask)
    capsys.readouterr()
    assert main(["report", str(mask)]) == 0
    assert f"progress: step 2, epoch 1/{state.settings.epochs}, finished" in capsys.readouterr().out
    assert main(["report", str(mask), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["settings"] == state.settings.to_dict() and printed["type"] == "mask"
    assert main(["report", str(pruned), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "pruned"


def test_text_encoders_are_freed_before_learning(pipelines, workdir, monkeypatch):
    model = pipelines("sd15")  # imports diffusers (and transformers) with the torchvision guard
    from transformers import CLIPTextModel

    seen = []
    learn = MaskLearner.learn

    def spy(self, samples, sigmas, callback=None):
        gc.collect()
        seen.append(sum(type(o) is CLIPTextModel for o in gc.get_objects()))
        return learn(self, samples, sigmas, callback)

    gc.collect()
    before = sum(type(o) is CLIPTextModel for o in gc.get_objects())
    monkeypatch.setattr(MaskLearner, "learn", spy)
    assert main(learn_args(model, workdir / "freed.safetensors", "--overwrite")) == 0
    assert seen == [before]


@pytest.mark.parametrize("target, check", [
    (["--flops", "0.3"], lambda extra, record: extra["target"]["flops"] == 0.3 and extra["removed_fraction"] >= 0.3),
    (["--keep-ratios", "head=0.5,neuron=0.75"], lambda extra, record: extra["target"]["keep_ratios"] == {
        "head": 0.5, "neuron": 0.75}),
])
def test_prune_targets(target, check, pipelines, workdir, capsys):
    model, mask = pipelines("sd15"), workdir / "targets_mask.safetensors"
    if not mask.exists():
        assert main(learn_args(model, mask)) == 0
    out = workdir / "targets.safetensors"
    size = ["--width", str(IMAGE), "--height", str(IMAGE)] if "--flops" in target else []
    assert main(["prune", "--model", str(model), "--mask", str(mask), *target, *size, "--output", str(out),
                 "--overwrite"]) == 0
    record, extra, _ = read_pruned_file(out)
    assert check(extra, record)
    flops = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FLOPs per forward")]
    if "--flops" in target:  # measured on both models at the asked size
        before, after = (float(v.replace(",", "")) for v in flops[0].split(": ")[1].split(" (")[0].split(" -> "))
        assert after < before * 0.8
    else:
        assert not flops
    if "--keep-ratios" in target:
        state = load_mask(mask)
        for kind, ratio in (("head", 0.5), ("neuron", 0.75)):
            names = [n for n, k in state.kinds.items() if k == kind]
            total = sum(record["counts"][n] for n in names)
            assert sum(len(record["kept"][n]) for n in names) == round(ratio * total)


def _bad_cases(root: Path, model: Path, mask: Path) -> dict[str, list[str]]:
    folder = root / "a_folder"
    folder.mkdir(exist_ok=True)
    return {
        "model folder missing": learn_args(root / "nowhere", root / "m.safetensors"),
        "not a pipeline": learn_args(folder, root / "m.safetensors"),
        "steps 0": learn_args(model, root / "m.safetensors", "--steps", "0"),
        "epochs 0": learn_args(model, root / "m.safetensors", "--epochs", "0"),
        "odd width": learn_args(model, root / "m.safetensors", "--width", "15"),
        "nan beta": learn_args(model, root / "m.safetensors", "--beta", "nan"),
        "warm start over 1": learn_args(model, root / "m.safetensors", "--warm-start", "2"),
        "target in percent": learn_args(model, root / "m.safetensors", "--regularizer", "target", "--target", "30"),
        "output is a folder": learn_args(model, folder),
        "output exists": learn_args(model, mask),
        "prompts missing": learn_args(model, root / "m.safetensors", "--prompts", str(root / "none.txt")),
        "sparsity in percent": ["prune", "--model", str(model), "--mask", str(mask), "--sparsity", "20",
                                "--output", str(root / "p.safetensors")],
        "two targets": ["prune", "--model", str(model), "--mask", str(mask), "--sparsity", "0.2", "--flops", "0.2",
                        "--output", str(root / "p.safetensors")],
        "bad keep ratios": ["prune", "--model", str(model), "--mask", str(mask), "--keep-ratios", "head=2",
                            "--output", str(root / "p.safetensors")],
        "align not a multiple": ["prune", "--model", str(model), "--mask", str(mask), "--align", "fast",
                                 "--output", str(root / "p.safetensors")],
        "align too large": ["prune", "--model", str(model), "--mask", str(mask), "--align", "1024",
                            "--output", str(root / "p.safetensors")],
        "mask of another model": ["prune", "--model", str(model), "--mask", str(root / "other_mask.safetensors"),
                                  "--output", str(root / "p.safetensors")],
        "report of a foreign file": ["report", str(root / "prompts.txt")],
    }


BAD = ["model folder missing", "not a pipeline", "steps 0", "epochs 0", "odd width", "nan beta",
       "warm start over 1", "target in percent", "output is a folder",
       "output exists", "prompts missing", "sparsity in percent", "two targets", "bad keep ratios",
       "align not a multiple", "align too large", "mask of another model", "report of a foreign file"]


@pytest.mark.parametrize("case", BAD)
def test_bad_arguments_end_in_one_error_line(case, pipelines, workdir, capsys):
    model, mask = pipelines("sd15"), workdir / "targets_mask.safetensors"
    if not mask.exists():
        assert main(learn_args(model, mask)) == 0
    other = workdir / "other_mask.safetensors"
    if not other.exists():
        assert main(learn_args(pipelines("flux"), other)) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(_bad_cases(workdir, model, mask)[case])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "error:" in err[-1] and "Traceback" not in "\n".join(err)


def test_learn_for_a_target_with_a_warm_start(pipelines, workdir):
    mask = workdir / "target_mask.safetensors"
    assert main(learn_args(pipelines("sd15"), mask, "--epochs", "2", "--objective", "end_to_end", "--warm-start",
                           "0.5", "--regularizer",
                           "target", "--target", "0.3", "--target-mode", "flops")) == 0
    state = load_mask(mask)
    assert (state.settings.regularizer, state.settings.target, state.settings.target_mode) == ("target", 0.3, "flops")
    assert state.settings.warm_start == 0.5 and state.settings.gate.noise_offset == 0  # textbook gates
    assert [h["target"] for h in state.history] and len(state.progress["multipliers"]) == 2


def _schnell(flux: Path, workdir: Path) -> Path:
    """The tiny FLUX pipeline without a guidance embedding (as FLUX.1 schnell), in a folder named flux."""
    import json
    import shutil

    folder = workdir / "schnell" / "flux"
    if not folder.exists():
        shutil.copytree(flux, folder)
        config = folder / "transformer" / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "guidance_embeds": False}))
    return folder


IGNORED = {  # options this run would not read, or a run that would be lost: (argv, what the one error line says)
    "target without the target regularizer": (["learn", "{m}", "--target", "0.3"],
                                              "--target: only with --regularizer target"),
    "target mode without it": (["learn", "{m}", "--target-mode", "flops"], "--target-mode: only with --regularizer"),
    "beta with a target": (["learn", "{m}", "--regularizer", "target", "--target", "0.3", "--beta", "0.1"],
                           "--beta: not with --regularizer target"),
    "guidance on SD1.5": (["learn", "{m}", "--guidance", "3.5"], "--guidance: only for FLUX pipelines"),
    "T5 length on SD1.5": (["learn", "{m}", "--max-sequence-length", "8"], "--max-sequence-length: only for"),
    "CFG on FLUX": (["learn", "{flux}", "--cfg", "4", "--negative-prompt", "x"],
                    "--cfg, --negative-prompt: not for a FluxPipeline"),
    "negative prompt without CFG": (["learn", "{m}", "--cfg", "1", "--negative-prompt", "x"],
                                    "--negative-prompt: only with CFG"),
    "channel rate on SD1.5": (["learn", "{m}", "--lr-channel", "0.5"],
                              "--lr-channel: this StableDiffusionPipeline's denoiser has no such units"),
    "guidance without a guidance embedding": (["learn", "{schnell}", "--guidance", "3.5"],
                                              "--guidance: this FLUX transformer has no guidance embedding"),
    "float16 on a CPU diverges": (["learn", "{m}", "--dtype", "float16"],
                                  "learning failed: non-finite loss (nan) at step 1"),
    "width 0": (["learn", "{m}", "--width", "0"], "width must be a positive multiple of 2 for this "
                "StableDiffusionPipeline, got 0"),
    "warm start per step": (["learn", "{m}", "--warm-start", "0.5"], "set objective 'end_to_end' or warm_start 0"),
    "resume other settings": (["learn", "{m}", "--resume", "--lr-head", "0.3"],
                              "cannot be continued: learning settings changed: lr"),
    "size without --flops": (["prune", "{p}", "--sparsity", "0.2", "--width", "32"],
                             "--width: only with --flops"),
    "report of a folder": (["report", "{folder}"], "is a folder; give a mask file"),
}


@pytest.mark.parametrize("case", IGNORED)
def test_options_a_run_would_ignore_are_an_error(case, pipelines, workdir, capsys):
    """An option this run does not read (even at its default value), or a --resume that would start fresh
    over the saved run, is one error line naming it, before any learning."""
    model, mask = pipelines("sd15"), workdir / "ignored_mask.safetensors"
    if not mask.exists():
        assert main(learn_args(model, mask)) == 0
    capsys.readouterr()
    argv, message = IGNORED[case]
    command, where, *extra = argv
    if command == "learn":
        argv = learn_args({"{flux}": pipelines("flux"), "{schnell}": _schnell(pipelines("flux"), workdir)}.get(
            where, model), mask, *extra)
        fresh = workdir / f"ignored_{case.replace(' ', '_')}.safetensors"  # a refused run must not write one
        argv = argv if "--resume" in extra else [a if a != str(mask) else str(fresh) for a in argv]
    elif command == "prune":
        argv = ["prune", "--model", str(model), "--mask", str(mask), "--output", str(workdir / "p.safetensors"),
                *extra]
    else:
        argv = ["report", str(workdir)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "error:" in err[-1] and message in err[-1], err


@pytest.mark.parametrize("extra, named", [
    (["--model", "{model}", "--pruned", "{pruned}", "--sparsity", "0.3"], "--sparsity: only for the embedded model"),
    (["--model", "{model}", "--pruned", "{pruned}", "--mask", "m.safetensors", "--eval-per-class", "5"],
     "--eval-per-class, --mask: only for the embedded model"),
    (["--pruned", "{pruned}"], "--pruned: only with --model DIR"),
    (["--guidance", "3.5", "--dtype", "float32"], "--dtype, --guidance: only with --model DIR"),
])
def test_recover_refuses_options_of_the_other_mode(extra, named, pipelines, tmp_path, capsys):
    """Options that one mode of ``recover`` would ignore are an error naming them (even at their default
    value), before anything is loaded or learned."""
    argv = ["recover", *(a.format(model=pipelines("sd15"), pruned=tmp_path / "p.safetensors") for a in extra)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert named in capsys.readouterr().err


def test_image_size_beyond_the_flow_scheduler_is_a_clear_error(pipelines, workdir, capsys):
    """The tiny FLUX scheduler knows up to 64 image tokens; at the model's default 1024 px the flow
    shift exp(μ) overflows: one error line naming the cause, exit code 2."""
    argv = ["learn", "--model", str(pipelines("flux")), "--prompts", str(workdir / "prompts.txt"), "--steps", "2",
            "--max-sequence-length", str(T5_TOKENS), "--no-progress", "--output", str(workdir / "fx.safetensors")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error: 65536 image tokens are far outside the range" in capsys.readouterr().err


def test_damaged_pruned_files_are_refused(pipelines, workdir, tmp_path):
    model, mask = pipelines("sd15"), workdir / "damaged_mask.safetensors"
    assert main(learn_args(model, mask)) == 0
    good = tmp_path / "good.safetensors"
    assert main(["prune", "--model", str(model), "--mask", str(mask), "--output", str(good)]) == 0
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PrunedFileError, match="not a readable safetensors"):
        load_pruned_denoiser(tmp_path / "truncated.safetensors")
    record, _, tensors = read_pruned_file(good)
    from ecodiff_core.pruned_diffusers import save_pruned_denoiser

    name = next(iter(record["kept"]))
    bad = dict(record, kept={**record["kept"], name: [record["counts"][name]]})
    module = torch.nn.Module()
    for i, v in enumerate(tensors.values()):
        module.register_buffer(f"t{i}", v)
    save_pruned_denoiser(tmp_path / "bad.safetensors", module, bad)
    with pytest.raises(PrunedFileError, match="outside"):
        load_pruned_denoiser(tmp_path / "bad.safetensors")
    with pytest.raises(EcoDiffError, match="not a pruned diffusers denoiser"):
        load_pruned_denoiser(mask)


def test_shipped_prompts_are_read():
    prompts = read_prompts()
    assert len(prompts) == 100 and all(p and not p.startswith("#") for p in prompts)


def _peft_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


def test_recover_on_a_pruned_diffusers_denoiser(pipelines, workdir, capsys):
    """LoRA Recover lowers the distillation loss; the file is in diffusers' PEFT LoRA layout; with PEFT
    installed, ``pipe.load_lora_weights`` on the pruned pipeline computes the hand-merged W + B·A."""
    from safetensors.torch import load_file

    model, mask, pruned = pipelines("sd15"), workdir / "recover_mask.safetensors", workdir / "recover.safetensors"
    assert main(learn_args(model, mask)) == 0
    assert main(["prune", "--model", str(model), "--mask", str(mask), "--keep-ratios", "head=0.5,neuron=0.5",
                 "--output", str(pruned)]) == 0
    capsys.readouterr()
    out = workdir / "recovered"
    assert main(["recover", "--model", str(model), "--pruned", str(pruned), "--prompts",
                 str(workdir / "prompts.txt"), "--state-steps", "2", "--steps", "6", "--rank", "2", "--alpha", "4",
                 "--lr", "0.02", "--width", str(IMAGE), "--height", str(IMAGE), "--output", str(out),
                 "--no-progress", "--threads", "1"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if "distillation loss" in s)
    before, after = (float(v) for v in line.split("distillation loss ")[1].split(" (")[0].split(" -> "))
    assert after < before
    lora = load_file(out / "recover_lora.safetensors")
    slim = load_pruned_denoiser(pruned)
    paths = {k[len("unet."):-len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")}
    assert paths and set(lora) == {f"unet.{p}.lora_{x}.weight" for p in paths for x in "AB"}
    for p in paths:
        out_f, in_f = slim.get_submodule(p).weight.shape
        assert lora[f"unet.{p}.lora_A.weight"].shape == (2, in_f)
        assert lora[f"unet.{p}.lora_B.weight"].shape == (out_f, 2)
    assert any(float(lora[f"unet.{p}.lora_B.weight"].abs().max()) > 0 for p in paths)
    if not _peft_available():
        return
    info = pipeline_info(model)
    pipe = load_pipeline(info, vae=True)
    merged = load_pruned_denoiser(pruned)
    with torch.no_grad():
        for p in paths:
            merged.get_submodule(p).weight += lora[f"unet.{p}.lora_B.weight"] @ lora[f"unet.{p}.lora_A.weight"]
    pipe.unet = merged
    expected = denoise_once(pipe, "sd15")
    pipe.unet = slim
    pipe.load_lora_weights(str(out / "recover_lora.safetensors"))
    assert rel_err(expected, denoise_once(pipe, "sd15")) <= 1e-5


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_denoiser_loads_in_the_asked_dtype(kind, pipelines):
    """diffusers leaves some classes (SD3) in float32 despite torch_dtype; the loaders cast them."""
    from ecodiff_core.pipelines import load_denoiser

    info = pipeline_info(pipelines(kind))
    assert {p.dtype for p in load_denoiser(info, torch.bfloat16).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in getattr(load_pipeline(info, torch.bfloat16), info.denoiser).parameters()} == {
        torch.bfloat16}


def test_cli_log_lines_go_to_the_stderr_of_the_moment(pipelines, workdir, monkeypatch):
    """The CLI logs the ``ecodiff`` logger's lines to whatever stderr is current (a handler bound to the
    stream of the first call wrote to closed streams later: "--- Logging error ---"); the root logger,
    which other libraries log to, is left alone."""
    import io
    import logging

    mask = workdir / "log_mask.safetensors"
    root_handlers = list(logging.getLogger().handlers)
    assert main(learn_args(pipelines("sd15"), mask)) == 0
    assert main(["report", str(mask)]) == 0
    assert logging.getLogger().handlers == root_handlers
    ours = [h for h in logging.getLogger("ecodiff").handlers if type(h).__name__ == "_CurrentStderr"]
    assert len(ours) == 1
    later = io.StringIO()
    monkeypatch.setattr("sys.stderr", later)
    logging.getLogger("ecodiff").info("a later line")
    assert later.getvalue() == "a later line\n"
