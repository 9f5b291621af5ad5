"""Commands on local diffusers pipelines: ``learn``, ``prune`` and ``report`` of ``python -m ecodiff_core``.

``learn`` runs data-parallel under ``torchrun`` (see ``distributed``).  Settings are checked before any
model is loaded; engine errors become one ``error:`` line and exit code 2 (``__main__.command_errors``).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from .errors import EcoDiffError, SettingsError
from .safetensors_file import read_metadata, write_atomic
from .seeds import SEED_MAX

log = logging.getLogger("ecodiff")
LR_KINDS = ("head", "neuron", "channel")


def _types():
    from .__main__ import C_INT_MAX, MAX_RESOLUTION, _at_least_one, _int_in

    return _int_in, C_INT_MAX, MAX_RESOLUTION, _at_least_one


def _refuse_ignored(args: argparse.Namespace, names: tuple[str, ...], why: str) -> None:
    from .__main__ import refuse_ignored

    refuse_ignored(args, names, why)


def _common(p: argparse.ArgumentParser, threads: bool = True) -> None:
    _, _, _, at_least_one = _types()
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weight dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the denoiser runs (auto: CUDA if available; under torchrun cuda:LOCAL_RANK)")
    if threads:
        p.add_argument("--threads", type=at_least_one, default=None, help="CPU threads for torch (default: torch's)")


def add_learn_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .hard_concrete import REGULARIZERS
    from .learn import LearnSettings
    from .learn_settings import TARGET, TARGET_MODES

    int_in, c_int_max, max_res, _ = _types()
    d = LearnSettings()
    p = sub.add_parser("learn", help="learn an EcoDiff mask on a local diffusers pipeline (SD1.5, SDXL, SD3, FLUX)",
                       description="Learn one logit per attention head, FFN neuron and modulation channel of the "
                                   "pipeline's denoiser along the sampling trajectories (--objective per_step, the "
                                   "default, or end_to_end, the paper's), and write the mask "
                                   "(a resumable checkpoint after every step). Text encoders run once per prompt and "
                                   "are freed before learning. Data-parallel under torchrun: "
                                   "torchrun --nproc-per-node N -m ecodiff_core learn ...")
    p.add_argument("--model", type=Path, required=True, help="local diffusers pipeline folder (model_index.json)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="text file, one calibration prompt per line (default: the shipped 100 prompts)")
    p.add_argument("--max-prompts", type=int_in(1, c_int_max), default=None, help="use only the first N prompts")
    p.add_argument("--negative-prompt", default="", help="negative prompt for CFG (SD1.5, SDXL, SD3)")
    p.add_argument("--width", type=int_in(None, max_res), default=None,
                   help="image width in pixels (default: the model's)")
    p.add_argument("--height", type=int_in(None, max_res), default=None,
                   help="image height in pixels (default: the model's)")
    p.add_argument("--steps", type=int_in(None, c_int_max), default=10, help="sampling steps of each trajectory")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (default 7 for SD1.5/SDXL/SD3; FLUX uses --guidance)")
    p.add_argument("--guidance", type=float, default=3.5,
                   help="FLUX dev distilled guidance (FLUX only; schnell takes none)")
    p.add_argument("--max-sequence-length", type=int_in(None, 4096), default=256,
                   help="T5 prompt tokens (SD3, FLUX)")
    p.add_argument("--epochs", type=int_in(None, c_int_max), default=d.epochs, help="passes over the prompts")
    p.add_argument("--accumulate", type=int_in(None, c_int_max), default=d.accumulate,
                   help="prompts per optimiser step (split over the torchrun processes)")
    p.add_argument("--beta", type=float, default=d.beta, help="weight of the sparsity regulariser")
    p.add_argument("--regularizer", choices=(*REGULARIZERS, TARGET), default=d.regularizer,
                   help="sparsity regulariser; 'target' learns for --target (expected removed cost held at it)")
    p.add_argument("--target", type=float, default=d.target,
                   help="with --regularizer target: fraction of parameters (or FLOPs) to remove, (0, 0.95]")
    p.add_argument("--target-mode", choices=TARGET_MODES, default=d.target_mode,
                   help="with --regularizer target: what --target counts")
    for kind in LR_KINDS:
        p.add_argument(f"--lr-{kind}", type=float, default=d.lr[kind], help=f"learning rate of {kind} logits")
    p.add_argument("--objective", choices=("end_to_end", "per_step"), default=d.objective,
                   help=f"what the gated denoiser must reproduce: per_step = the original's x0 at every step of "
                        f"its own trajectories (measured best); end_to_end = the final latent of the whole gated "
                        f"trajectory (the paper's) (default: {d.objective})")
    p.add_argument("--warm-start", type=float, default=d.warm_start,
                   help="fraction of the epochs learned first with the per-step loss, then with --objective "
                        "(0 = none)")
    p.add_argument("--no-checkpointing", action="store_true", help="backpropagate through the whole trajectory "
                   "instead of recomputing one step at a time (more memory, same result)")
    p.add_argument("--block-checkpointing", choices=("auto", "on", "off"), default="off",
                   help="activation checkpointing inside each recomputed step (less memory, slower)")
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0, help=f"random seed, 0..{SEED_MAX}")
    p.add_argument("--output", type=Path, default=Path("ecodiff_mask.safetensors"), help="mask file to write")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --output (same inputs only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output instead of refusing")
    p.add_argument("--stop-after", type=int_in(1, c_int_max), default=None,
                   help="stop after this many optimiser steps of this invocation (resume later with --resume)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _common(p)
    return p


def add_prune_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    int_in, _, max_res, _ = _types()
    p = sub.add_parser("prune", help="prune a diffusers pipeline's denoiser with a learned mask",
                       description="Remove the lowest-logit units of the pipeline's denoiser for a budget and save "
                                   "the pruned denoiser as safetensors with the record that rebuilds it "
                                   "(ecodiff_core.pruned_diffusers.load_pruned_denoiser returns a diffusers model "
                                   "for pipe.unet / pipe.transformer).")
    p.add_argument("--model", type=Path, required=True, help="local diffusers pipeline folder")
    p.add_argument("--mask", type=Path, required=True, help="mask file from the learn command")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, default=None, help="fraction of parameters to remove (default 0.2)")
    target.add_argument("--flops", type=float, default=None, help="fraction of FLOPs to remove (at --width/--height)")
    target.add_argument("--keep-ratios", default=None,
                        help="fraction of units to keep per kind, e.g. 'head=0.8,neuron=0.7'")
    p.add_argument("--align", default="auto",
                   help="keep every pruned module's features a multiple of this: auto (8 when --device is cuda, "
                        "for tensor-core GEMM shapes; off elsewhere), off, or an integer such as 8; the target "
                        "is then met to within one aligned group")
    p.add_argument("--width", type=int_in(None, max_res), default=None, help="image width for FLOP measurement")
    p.add_argument("--height", type=int_in(None, max_res), default=None, help="image height for FLOP measurement")
    p.add_argument("--output", type=Path, required=True, help="pruned denoiser file (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    _common(p)
    return p


def add_report_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="say what a mask file or a pruned denoiser file holds",
                       description="Print what a mask file (architecture, units, learned sparsity, progress, "
                                   "settings) or a pruned diffusers denoiser file (class, kept units, parameters, "
                                   "target) holds.")
    p.add_argument("file", type=Path, help="mask or pruned-denoiser safetensors file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


# -- shared ---------------------------------------------------------------------------------------
def _dtype(name: str, device: torch.device) -> torch.dtype:
    from .pipelines import DTYPES

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _check_output(path: Path, allowed: bool, hint: str) -> None:
    if path.is_dir():
        raise SettingsError(f"--output {path} is a folder; give a file name such as {hint}")
    if path.exists() and not allowed:
        raise SettingsError(f"--output {path} exists; give --overwrite to replace it"
                            + (" or --resume to continue it" if hint.startswith("mask") else ""))


def _denoiser_config(info) -> dict[str, Any]:
    """The denoiser's config.json."""
    path = info.folder / info.denoiser / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EcoDiffError(f"cannot read the denoiser config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise EcoDiffError(f"the denoiser config {path} is not a JSON object")
    return config


def _image_size(args: argparse.Namespace, info, config: dict[str, Any]) -> tuple[int, int]:
    """(width, height) from ``--width``/``--height``, each defaulting to the model's native side: the
    denoiser config's ``sample_size`` in pixels (FLUX names none: 1024)."""
    sample = config.get("sample_size")
    size = int(sample) * info.vae_scale_factor if isinstance(sample, int) and sample > 0 else 1024
    return (size if args.width is None else args.width), (size if args.height is None else args.height)


def _refuse_family_ignored(args: argparse.Namespace, info, config: dict[str, Any]) -> None:
    """Conditioning options this pipeline family does not read are an error, not silently dropped."""
    if info.kind == "flux":
        _refuse_ignored(args, ("cfg", "negative_prompt"), f"not for a {info.class_name}: FLUX runs without CFG "
                        "(its distilled guidance is --guidance)")
        if not config.get("guidance_embeds", False):
            _refuse_ignored(args, ("guidance",), "this FLUX transformer has no guidance embedding (schnell-like); "
                            "it takes no guidance value")
    else:
        _refuse_ignored(args, ("guidance",), f"only for FLUX pipelines; this {info.class_name} takes --cfg")
        if args.cfg == 1.0:
            _refuse_ignored(args, ("negative_prompt",), "only with CFG: at --cfg 1 no negative prediction is made")
    if info.kind not in ("flux", "sd3"):
        _refuse_ignored(args, ("max_sequence_length",), f"only for pipelines with a T5 text encoder (SD3, FLUX); "
                        f"a {info.class_name} has none")


def sampling_settings(args: argparse.Namespace, info, steps: int):
    """The trajectories' settings from the command line, checked for this pipeline (before any loading)."""
    from .pipelines import SamplingSettings

    config = _denoiser_config(info)
    _refuse_family_ignored(args, info, config)
    width, height = _image_size(args, info, config)
    sampling = SamplingSettings(width=width, height=height, steps=steps,
                                cfg=args.cfg if args.cfg is not None else 7.0, guidance=args.guidance,
                                negative_prompt=args.negative_prompt, max_sequence_length=args.max_sequence_length,
                                seed=args.seed)
    sampling.validate(info)
    return sampling


def _progress(enabled: bool, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, unit="step", dynamic_ncols=True)


# -- learn ----------------------------------------------------------------------------------------
def learn_settings(args: argparse.Namespace):
    from .learn import LearnSettings
    from .learn_settings import TARGET

    fields = dict(epochs=args.epochs, accumulate=args.accumulate, beta=args.beta,
                  lr={k: getattr(args, f"lr_{k}") for k in LR_KINDS}, checkpointing=not args.no_checkpointing,
                  block_checkpointing=args.block_checkpointing, objective=args.objective,
                  warm_start=args.warm_start, seed=args.seed)
    if args.regularizer == TARGET:  # textbook gates (noise offset 0), see LearnSettings.for_target
        _refuse_ignored(args, ("beta",), "not with --regularizer target: the target replaces the β-weighted "
                        "regulariser")
        settings = LearnSettings.for_target(args.target, args.target_mode, **fields)
    else:
        _refuse_ignored(args, ("target", "target_mode"), "only with --regularizer target")
        settings = LearnSettings(regularizer=args.regularizer, **fields)
    settings.validate()
    return settings


def learn_command(args: argparse.Namespace) -> int:
    """``python -m ecodiff_core learn``; data-parallel under torchrun."""
    from . import distributed
    from .archs import find_layout
    from .learn import MaskLearner, digest, resume_problem, run_inputs
    from .maskfile import load_mask, save_mask
    from .pipelines import calibration_sample, load_and_encode, pipeline_info
    from .prompts import read_prompts

    settings = learn_settings(args)
    _check_output(args.output, args.resume or args.overwrite, "mask.safetensors")
    info = pipeline_info(args.model)
    sampling = sampling_settings(args, info, args.steps)
    prompts = read_prompts(args.prompts)[:args.max_prompts]
    device = distributed.device_for_rank(args.device)
    dtype = _dtype(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    parallel = distributed.start(device)
    try:
        main = parallel is None or parallel.is_main
        mine = parallel.shard(len(prompts)) if parallel is not None else list(range(len(prompts)))
        loaded = load_and_encode(info, sampling, [prompts[i] for i in mine], device, dtype)
        model, sigmas = loaded.model, loaded.sigmas
        conditioning = digest({"prompts": prompts, "text_encoders": loaded.text_encoders,
                               "negative_prompt": args.negative_prompt})
        layout = find_layout(model)
        _refuse_ignored(args, tuple(f"lr_{k}" for k in LR_KINDS if k not in layout.kinds()),
                        f"this {info.class_name}'s denoiser has no such units (it has {', '.join(layout.kinds())})")
        samples: list[Any] = [None] * len(prompts)
        for index, encoding in zip(mine, loaded.encodings, strict=True):
            samples[index] = calibration_sample(info, model, encoding, sampling, index, loaded.eps)
        resume = None
        if args.resume and args.output.is_file():
            resume = load_mask(args.output, layout)
        elif args.resume:
            log.warning("EcoDiff: no mask at %s to resume; learning starts fresh", args.output)
        inputs = run_inputs(model, conditioning, settings,
                            {**sampling.to_dict(), "pipeline": info.class_name, "prompts": len(prompts)})
        problem = resume_problem(resume, inputs) if resume is not None else ""
        if problem and not args.overwrite:  # starting fresh would replace the saved run
            raise SettingsError(f"--resume: the run in {args.output} cannot be continued: {problem} (a run "
                                "continues only with the inputs and settings it started with, epochs included, "
                                "so that it ends where an uninterrupted run would); give --overwrite to learn "
                                "afresh into that file (the saved run is replaced), or another --output")
        learner = MaskLearner(model, layout, settings, resume=resume, inputs=inputs, parallel=parallel)
        if learner.start_note and main:
            print(f"note: {learner.start_note}")
        per_epoch = -(-len(prompts) // settings.accumulate)
        bar = _progress(main and not args.no_progress, per_epoch * settings.epochs, learner.progress["step"],
                        "learning")
        taken = 0

        def callback(step) -> bool:
            nonlocal taken
            taken += 1
            if main:
                save_mask(args.output, learner.state)
                bar.set_postfix(loss=f"{step.loss:.4g}", refresh=False)
                bar.update(1)
            return not (args.stop_after is not None and taken >= args.stop_after)

        try:
            state = learner.learn(samples, sigmas, callback)
        finally:
            bar.close()
        if main:
            save_mask(args.output, state)
            sparsity = ", ".join(f"{k} {v:.1%}" for k, v in learner.sparsity().items())
            status = "finished" if state.progress.get("finished") else (state.stop_reason or "stopped")
            print(f"{status}: step {state.progress['step']}, epoch {state.progress['epoch']}/{settings.epochs}; "
                  f"units with λ < 0: {sparsity}")
            print(f"wrote {args.output}")
        if learner.diverged:  # the file holds the last good mask; the run itself failed
            cpu_half = " (float16 on a CPU overflows easily: use --dtype float32)" if (
                dtype == torch.float16 and device.type == "cpu") else ""
            raise EcoDiffError(f"learning failed: {state.stop_reason}{cpu_half}")
        if parallel is not None:
            parallel.barrier()
        return 0
    finally:
        distributed.stop()


# -- prune ----------------------------------------------------------------------------------------
def prune_target(args: argparse.Namespace, device: torch.device | None = None):
    """The ``PruneTarget`` of the prune command's options (``--align`` resolved for ``device``)."""
    from .plan import PruneTarget, parse_keep_ratios, resolve_align

    align = resolve_align(getattr(args, "align", 1), device)
    if args.keep_ratios is not None:
        return PruneTarget(keep_ratios=parse_keep_ratios(args.keep_ratios), align=align)
    if args.flops is not None:
        return PruneTarget(flops=args.flops, align=align)
    return PruneTarget(params=args.sparsity if args.sparsity is not None else 0.2, align=align)


def prune_command(args: argparse.Namespace) -> int:
    """``python -m ecodiff_core prune``: plan, prune and save the denoiser; print the report."""
    from .archs import find_layout
    from .distributed import device_for_rank
    from .flops import measure_flops, total_flops
    from .learn import weights_digest
    from .mask_checks import mask_warnings, plan_warnings
    from .maskfile import load_mask
    from .pipelines import SamplingSettings, example_inputs, load_denoiser, pipeline_info
    from .plan import plan_pruning
    from .prune import prune_model
    from .pruned_diffusers import pruning_record, save_pruned_denoiser
    from .report import PruneReport

    device = device_for_rank(args.device)
    target = prune_target(args, device)
    if target.mode != "flops":
        _refuse_ignored(args, ("width", "height"), "only with --flops (the image size at which FLOPs are measured)")
    _check_output(args.output, args.overwrite, "pruned.safetensors")
    info = pipeline_info(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_denoiser(info, _dtype(args.dtype, device)).to(device)
    layout = find_layout(model)
    state = load_mask(args.mask, layout)
    flop_costs = None
    if target.mode == "flops":
        width, height = _image_size(args, info, _denoiser_config(info))
        SamplingSettings(width=width, height=height, steps=1).validate(info)  # the size rules of learn
        inputs = example_inputs(info, model, width, height)
        with torch.no_grad():
            flop_costs = measure_flops(model, layout, lambda: model(**inputs, return_dict=False))
    plan = plan_pruning(model, layout, state.logits, target, flop_costs, settings=state.settings)
    pruned = prune_model(model, layout, plan.keep, scores=state.logits)
    record = pruning_record(model, layout, plan.keep, state.logits)
    flops = (flop_costs.total, total_flops(lambda: pruned(**inputs, return_dict=False))) if flop_costs else (None, None)
    report = PruneReport.build(model, pruned, layout, plan.keep, *flops)
    warnings = mask_warnings(state, weights_digest(model)) + plan_warnings(layout, plan.keep)
    extra = {"target": {"mode": target.mode, "params": target.params, "flops": target.flops,
                        "keep_ratios": target.keep_ratios, "align": target.align},
             "removed_fraction": plan.removed_fraction, "params_before": report.params_before,
             "params_after": report.params_after, "flops_before": report.flops_before,
             "flops_after": report.flops_after, "mask": args.mask.name, "pipeline": info.class_name,
             "notes": plan.notes, "warnings": warnings}
    save_pruned_denoiser(args.output, pruned, record, extra)
    for warning in warnings:  # the checks Apply Pruned Mask shows, first
        print(f"WARNING: {warning}")
    print(report.to_text())
    for note in plan.notes:
        print(f"note: {note}")
    print(f"\nwrote {args.output}; load it with ecodiff_core.pruned_diffusers.load_pruned_denoiser and set "
          f"pipe.{info.denoiser} to it")
    return 0


# -- report ---------------------------------------------------------------------------------------
def file_report(path: Path) -> dict[str, Any]:
    """What a mask or pruned-denoiser file holds, as a JSON-able dict (``"type"``: "mask" or "pruned")."""
    from .maskfile import FORMAT as MASK_FORMAT
    from .maskfile import load_mask
    from .pruned_diffusers import FORMAT as PRUNED_FORMAT
    from .pruned_diffusers import read_pruned_file

    if path.is_dir():
        raise EcoDiffError(f"{path} is a folder; give a mask file (learn --output) or a pruned-denoiser file "
                           "(prune --output), both .safetensors")
    if not path.is_file():
        raise EcoDiffError(f"file not found: {path}")
    fmt = read_metadata(path).get("format")
    if fmt == MASK_FORMAT:
        state = load_mask(path)
        kinds: dict[str, dict[str, float]] = {}
        for name, logits in state.logits.items():
            k = kinds.setdefault(state.kinds[name], {"units": 0, "below_zero": 0})
            k["units"] += logits.numel()
            k["below_zero"] += int((logits < 0).sum())
        return {"type": "mask", "arch": state.arch, "fingerprint": state.fingerprint, "groups": len(state.logits),
                "kinds": kinds, "progress": state.progress, "loss": state.summary(), "stop_reason": state.stop_reason,
                "settings": state.settings.to_dict(), "resumable": bool(state.optimizer)}
    if fmt == PRUNED_FORMAT:
        record, info, tensors = read_pruned_file(path)
        return {"type": "pruned", "arch": record["arch"], "class": record["diffusers_class"],
                "fingerprint": record["fingerprint"], "groups": len(record["counts"]),
                "units_before": sum(record["counts"].values()),
                "units_after": sum(len(v) for v in record["kept"].values()),
                "parameters": sum(t.numel() for t in tensors.values() if t.is_floating_point()),
                "silenced": record["silenced"], **info}
    raise EcoDiffError(f"{path} is neither an EcoDiff mask nor a pruned diffusers denoiser (format {fmt!r})")


def report_text(data: dict[str, Any]) -> str:
    if data["type"] == "mask":
        p = data["progress"]
        lines = [f"EcoDiff mask ({data['arch']}, fingerprint {data['fingerprint']}): {data['groups']} unit groups"]
        lines += [f"  {kind}: {k['units']:,} units, {k['below_zero'] / k['units']:.1%} with λ < 0"
                  for kind, k in data["kinds"].items()]
        lines.append(f"progress: step {p.get('step')}, epoch {p.get('epoch')}"
                     f"/{data['settings'].get('epochs', '?')}, {'finished' if p.get('finished') else 'not finished'}"
                     f"{'' if not data['resumable'] else ' (resumable)'}")
        if data["loss"]["steps"]:
            lines.append(f"loss: {data['loss']['first_loss']:.4g} -> {data['loss']['last_loss']:.4g}")
        if data["stop_reason"]:
            lines.append(f"stopped: {data['stop_reason']}")
        return "\n".join(lines)
    lines = [f"EcoDiff pruned {data['class']} ({data['arch']}, fingerprint {data['fingerprint']})",
             f"units: {data['units_before']:,} -> {data['units_after']:,} in {data['groups']} groups",
             f"values stored (parameters and buffers): {data['parameters']:,}"]
    for name, key in (("parameters", "params"), ("FLOPs per forward", "flops")):
        before, after = data.get(f"{key}_before"), data.get(f"{key}_after")
        if before and after is not None:
            lines.append(f"{name}: {before:,.0f} -> {after:,.0f} (-{(before - after) / before:.1%})")
    if "removed_fraction" in data:
        mode = (data.get("target") or {}).get("mode", "params")
        unit = "FLOPs" if mode == "flops" else "parameters"
        lines.append(f"planned removal: {data['removed_fraction']:.1%} of the {unit} ({mode} target)")
    if "target" in data:
        lines.append("target: " + json.dumps({k: v for k, v in data["target"].items() if v is not None}))
    if data["silenced"]:
        lines.append(f"silenced groups (one zeroed unit kept): {len(data['silenced'])}")
    return "\n".join(lines)


def report_command(args: argparse.Namespace) -> int:
    data = file_report(args.file)
    print(json.dumps(data, indent=2) if args.json else report_text(data))
    return 0


COMMANDS = {"learn": (add_learn_parser, learn_command), "prune": (add_prune_parser, prune_command),
            "report": (add_report_parser, report_command)}


# -- recover --------------------------------------------------------------------------------------
def add_recover_arguments(p: argparse.ArgumentParser) -> tuple[str, ...]:
    """The diffusers options of ``recover`` (``--model DIR`` selects the diffusers path); returns the
    destinations that only the diffusers path reads."""
    int_in, c_int_max, max_res, _ = _types()
    g = p.add_argument_group("diffusers pipelines (recover --model DIR --pruned FILE)")
    g.add_argument("--model", type=Path, default=None, help="local diffusers pipeline folder (the original)")
    g.add_argument("--pruned", type=Path, default=None, help="pruned denoiser from the prune command")
    g.add_argument("--prompts", type=Path, default=None, help="calibration prompts file (default: the shipped ones)")
    g.add_argument("--max-prompts", type=int_in(1, c_int_max), default=None, help="use only the first N prompts")
    g.add_argument("--negative-prompt", default="", help="negative prompt for CFG")
    g.add_argument("--width", type=int_in(None, max_res), default=None, help="image width in pixels")
    g.add_argument("--height", type=int_in(None, max_res), default=None, help="image height in pixels")
    g.add_argument("--cfg", type=float, default=None, help="CFG scale of the trajectories (default 7; not FLUX)")
    g.add_argument("--guidance", type=float, default=3.5, help="FLUX dev distilled guidance")
    g.add_argument("--max-sequence-length", type=int_in(None, 4096), default=256, help="T5 prompt tokens")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto", help="weight dtype")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the models run")
    return tuple(a.dest for a in g._group_actions if a.dest != "model")


def lora_file_tensors(lora, prefix: str) -> dict[str, torch.Tensor]:
    """The LoRA in the PEFT layout diffusers' ``load_lora_weights`` reads: ``<prefix>.<path>.lora_A.weight``
    (down, r × in) and ``lora_B.weight`` (up × α/r, out × r), so it computes x·(W + ΔW)ᵀ with the
    loader's default scale (α = r)."""
    out = {}
    for path in lora.paths:
        i = lora._index[path]
        out[f"{prefix}.{path}.lora_A.weight"] = lora.down[i].detach().float().cpu().contiguous()
        out[f"{prefix}.{path}.lora_B.weight"] = (lora.up[i].detach().float() * lora.scale).cpu().contiguous()
    return out


def recover_command(args: argparse.Namespace) -> int:
    """``python -m ecodiff_core recover --model DIR --pruned FILE``: LoRA Recover of a pruned diffusers
    denoiser, saved in the LoRA format of diffusers' ``pipe.load_lora_weights``."""
    from tqdm.auto import tqdm

    from .archs import find_layout
    from .distributed import device_for_rank
    from .learn import frozen_weights
    from .pipelines import calibration_sample, load_and_encode, pipeline_info
    from .prompts import read_prompts
    from .pruned_diffusers import load_pruned_denoiser, read_pruned_file
    from .recover import (
        DistillProblem,
        LoraRecoverer,
        LoraWeights,
        RecoverSettings,
        distillation_loss,
        lora_metadata,
        lora_target_paths,
        rollout_states,
        teacher_targets,
    )
    from .replacements import ScatterLinear

    if args.pruned is None:
        raise SettingsError("recover --model needs --pruned FILE: the pruned denoiser written by the prune command")
    settings = RecoverSettings(rank=args.rank, alpha=args.alpha, targets=args.targets, steps=args.steps, lr=args.lr,
                               batch=args.batch, seed=args.seed, states=args.states)
    if args.output.is_file():
        raise SettingsError(f"--output {args.output} is a file; give the folder to write recover_lora.safetensors to")
    info = pipeline_info(args.model)
    sampling = sampling_settings(args, info, args.state_steps)
    record, _, _ = read_pruned_file(args.pruned)
    prompts = read_prompts(args.prompts)[:args.max_prompts]
    device = device_for_rank(args.device)
    dtype = _dtype(args.dtype, device)
    loaded = load_and_encode(info, sampling, prompts, device, dtype)
    teacher, sigmas, eps = loaded.model, loaded.sigmas, loaded.eps
    layout = find_layout(teacher)
    if record["fingerprint"] != layout.fingerprint():
        raise SettingsError(f"{args.pruned.name} was pruned from another model than {args.model} (layout "
                            f"fingerprint {record['fingerprint']} vs {layout.fingerprint()})")
    student = load_pruned_denoiser(args.pruned, device=device, dtype=dtype)
    paths = [p for p in lora_target_paths(student, layout, settings.targets)
             if not isinstance(student.get_submodule(p), ScatterLinear)]  # diffusers' loader cannot fit those
    lora = LoraWeights.for_module(student, paths, settings.rank, settings.alpha, settings.seed, device)
    progress = not args.no_progress
    with frozen_weights(student), frozen_weights(teacher):
        problems = []
        for index, encoding in enumerate(tqdm(loaded.encodings, desc="teacher targets", disable=not progress)):
            t = calibration_sample(info, teacher, encoding, sampling, index, eps)
            s = calibration_sample(info, student, encoding, sampling, index, eps)
            if settings.states == "pruned":
                with lora.installed(student):
                    states = rollout_states(s.denoise, s.noise, sigmas)
            else:
                states = rollout_states(t.denoise, t.noise, sigmas)
            sig = sigmas[:-1]
            problems.append(DistillProblem(s.denoise, states, sig, teacher_targets(t.denoise, states, sig)))
        del teacher, loaded  # the teacher is needed only for the targets
        recoverer = LoraRecoverer(lora, settings, layout.arch, layout.fingerprint())
        with lora.installed(student):
            before = distillation_loss(problems)
            with tqdm(total=settings.steps, desc="LoRA recover", unit="step", disable=not progress) as bar:
                def on_step(step) -> None:
                    bar.set_postfix(loss=f"{step.loss:.5f}", refresh=False)
                    bar.update(1)

                state = recoverer.train(problems, on_step)
            after = distillation_loss(problems)
    if state.stop_reason:
        raise EcoDiffError(f"recovery stopped early: {state.stop_reason}")
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / "recover_lora.safetensors"
    meta = lora_metadata(settings, layout.arch, layout.fingerprint(), record["kept"],
                         {"layout": "peft", "prefix": info.denoiser, "alpha_folded_into_lora_B": "true"})
    write_atomic(out, lora_file_tensors(lora, info.denoiser), meta)
    print(f"LoRA Recover on {info.class_name}: distillation loss {before:.5g} -> {after:.5g} "
          f"({len(paths)} layers, rank {settings.rank})")
    print(f"wrote {out}; load it with pipe.load_lora_weights(\"{out}\") after setting pipe.{info.denoiser} "
          "to the pruned denoiser")
    return 0
