"""The host bridge: the ONLY code of the pack that touches ComfyUI's internals.

ModelPatcher, samplers, model_management, folder_paths and inference-mode handling live here; the
nodes call these functions and the engine (``ecodiff_core``) never sees ComfyUI.  ComfyUI is
imported lazily so the pack (and this module) import without it.

Facts this relies on (ComfyUI 0.3.64, checked again in ``tests/integration``):
- the executor runs nodes under ``torch.inference_mode()``: weights, latents and conds are inference
  tensors, which autograd may not save; learning runs in ``inference_mode(False)`` with copies;
- ``ModelPatcher.clone()`` shares the ``nn.Module``: nothing here mutates an input MODEL's module
  (learning hooks live only inside ``MaskLearner.learn``; weight copies and soft gates are
  patcher-scoped weight wrappers); ComfyUI leaves the last loaded clone's weight patches in that
  module, so every weight read goes through ``own_weights`` (loads this clone, checks it);
- ``CFGGuider`` prepares the model (loading through model_management, conds through
  ``process_conds``) and its ``__call__`` is the CFG-combined x0 prediction in σ-space, so one Euler
  loop serves EPS, V and flow models alike;
- FLUX blocks add residuals in place: forward and backward run under
  ``torch.autograd.graph.allow_mutation_on_saved_tensors``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..ecodiff_core.archs import find_layout
from .attention_patches import fit_attention_patches
from .lora_on_pruned import pruned_patcher
from ..ecodiff_core.plan import PrunePlan, PruneTarget, plan_pruning
from ..ecodiff_core.errors import EcoDiffError
from ..ecodiff_core.learn import CalibrationSample, LearnSettings, MaskLearner, StepInfo, model_response, run_inputs
from ..ecodiff_core.maskfile import MaskState
from ..ecodiff_core.prune import check_keep, physical_keep, prune_model
from ..ecodiff_core.pruned_record import PrunedFileError, check_pruned_record, check_record_layout, check_state_dict
from ..ecodiff_core.report import PruneReport
from ..ecodiff_core.seeds import check_seed, derived_seed
from ..ecodiff_core.units import Layout, get_linear

MASK_FOLDER = "ecodiff_masks"
PRUNED_FOLDER = "ecodiff_pruned"
PRUNED_FORMAT = "ecodiff-pruned-model"
PRUNED_FORMAT_VERSION = 1
LEARN_SAMPLERS: tuple[str, ...] = ("euler",)


# --------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------
def register_folders() -> None:
    """Register ``models/ecodiff_masks`` and ``models/ecodiff_pruned`` with folder_paths."""
    import folder_paths

    for name in (MASK_FOLDER, PRUNED_FOLDER):
        if name not in folder_paths.folder_names_and_paths:
            path = os.path.join(folder_paths.models_dir, name)
            folder_paths.folder_names_and_paths[name] = ([path], {".safetensors"})


def folder(name: str) -> Path:
    import folder_paths

    register_folders()
    path = Path(folder_paths.get_folder_paths(name)[0])
    path.mkdir(parents=True, exist_ok=True)
    return path


def list_files(name: str) -> list[str]:
    import folder_paths

    register_folders()
    return sorted(folder_paths.get_filename_list(name))


def file_path(name: str, filename: str) -> Path:
    import folder_paths

    register_folders()
    path = folder_paths.get_full_path(name, filename)
    if path is None:
        raise EcoDiffError(f"'{filename}' is not in models/{name}; put the file there or pick one from the list")
    return Path(path)


def safe_filename(stem: str, suffix: str = ".safetensors") -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem.strip()) or "ecodiff"
    return stem + suffix


# --------------------------------------------------------------------------------------------
# model introspection
# --------------------------------------------------------------------------------------------
def diffusion_module(model: Any) -> nn.Module:
    """The denoiser nn.Module inside a MODEL (ModelPatcher)."""
    base = getattr(model, "model", None)
    module = getattr(base, "diffusion_model", None)
    if not isinstance(module, nn.Module):
        raise EcoDiffError(f"expected a ComfyUI MODEL (ModelPatcher), got {type(model).__name__}")
    return module


# --------------------------------------------------------------------------------------------
# a MODEL's own weights (clones share one nn.Module)
# --------------------------------------------------------------------------------------------
def _own_weights_problem(model: Any, partial_ok: bool) -> str | None:
    """Why the shared module does not hold exactly ``model``'s weights (None when it does).

    ComfyUI keeps the last loaded clone's weight patches in the module its clones share;
    ``current_weight_patches_uuid`` names them and ``backup`` (shared by all clones) holds the
    originals of every weight patched in place.  Features are looked up with hasattr so another
    ComfyUI version answers with a clear error instead of silently wrong weights."""
    base = model.model
    if hasattr(base, "current_weight_patches_uuid") and hasattr(model, "patches_uuid") \
            and base.current_weight_patches_uuid != model.patches_uuid:
        return "another MODEL clone's weight patches (LoRA…) are loaded in the shared module"
    if getattr(base, "model_lowvram", False):
        return None if partial_ok else "ComfyUI loaded the model only partially (low VRAM), weight patches are not merged"
    patches, backup = getattr(model, "patches", None), getattr(model, "backup", None)
    if isinstance(patches, dict) and isinstance(backup, dict):
        foreign = sorted(set(backup) - set(patches))
        if foreign:
            return f"weights patched for another MODEL clone are still in place ({foreign[0]}…)"
    return None


def require_own_weights(model: Any, partial_ok: bool = False) -> nn.Module:
    """The denoiser module of ``model``, checked to hold exactly ``model``'s weights right now
    (``partial_ok``: a low-VRAM load, where ComfyUI's weight functions patch at compute time,
    is accepted).  Raises EcoDiffError otherwise."""
    problem = _own_weights_problem(model, partial_ok)
    if problem is not None:
        raise EcoDiffError(f"cannot read this MODEL's own weights: {problem}. Please report this with your "
                           "ComfyUI version; as a workaround run the EcoDiff node before sampling other "
                           "variants of the model")
    return diffusion_module(model)


@contextlib.contextmanager
def own_weights(model: Any) -> Iterator[nn.Module]:
    """The denoiser module of ``model`` holding exactly the weights of ``model``: its own weight
    patches (LoRA…) merged, none of another clone's.  The ONE way the pack reads weights.

    MODEL clones share one nn.Module and ComfyUI leaves the last loaded clone's patches in it, so
    ``model`` is loaded through ComfyUI's own machinery (``load_models_gpu``, which unpatches the
    other clone from the shared backups and patches this one; fully, so no patch is deferred to
    low-VRAM weight functions) and checked on entry and on exit (no other clone may be loaded
    while the block reads).  Weight wrappers (``add_weight_wrapper``) are compute-time functions
    and stay out of the values read here: ``wrapped_weights`` gives the values they compute.
    Raises EcoDiffError where that cannot be guaranteed."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    module = require_own_weights(model)
    yield module
    require_own_weights(model)


@torch.no_grad()
def wrapped_weights(model: Any, module: nn.Module) -> dict[str, torch.Tensor]:
    """The values ``model`` computes with for its weight-wrapped parameters (``add_weight_wrapper``:
    TrainLoraNode's LoRA, soft gates…), by parameter name in ``module`` (its denoiser, read through
    ``own_weights``).  As ``comfy.ops.cast_bias_weight`` does, each wrapper is applied in order to
    the weight cast to the compute dtype (the manual-cast dtype, else the weight's own); the result
    is stored back in the parameter's dtype.  Only wrapped keys are returned; keys outside the
    denoiser are ignored."""
    wrappers = getattr(model, "weight_wrapper_patches", None) or {}
    compute = getattr(model.model, "manual_cast_dtype", None)
    params = dict(module.named_parameters())
    out = {}
    for key, functions in wrappers.items():
        name = key.removeprefix("diffusion_model.")
        if not key.startswith("diffusion_model.") or name not in params or not functions:
            continue
        p = params[name]
        value = p.detach().to(compute or p.dtype, copy=True)
        for f in functions:
            value = f(value)
        out[name] = value.to(p.dtype)
    return out


def model_layout(model: Any) -> Layout:
    """The prunable units of a MODEL; UnsupportedArchitectureError names the supported ones."""
    return find_layout(diffusion_module(model))


def pruning_info(model: Any) -> dict | None:
    """The pruning record of a MODEL built by ``build_pruned_model`` (None for others)."""
    return getattr(model.model, "ecodiff_pruning", None)


# --------------------------------------------------------------------------------------------
# sampling setup
# --------------------------------------------------------------------------------------------
@dataclass
class SamplingSpec:
    """What the calibration trajectories look like (the same as a KSampler run)."""

    width: int = 1024
    height: int = 1024
    steps: int = 20
    cfg: float = 5.0
    sampler_name: str = "euler"
    scheduler: str = "normal"
    seed: int = 0

    def validate(self) -> None:
        import comfy.samplers

        if self.sampler_name not in LEARN_SAMPLERS:
            raise EcoDiffError(f"learning follows a deterministic trajectory; sampler '{self.sampler_name}' is not "
                               f"supported, use one of {', '.join(LEARN_SAMPLERS)}")
        if self.scheduler not in comfy.samplers.SCHEDULER_NAMES:
            raise EcoDiffError(f"unknown scheduler '{self.scheduler}'; choose one of "
                               f"{', '.join(comfy.samplers.SCHEDULER_NAMES)}")
        if self.steps < 1:
            raise EcoDiffError(f"steps must be >= 1, got {self.steps}")
        if self.width < 8 or self.height < 8:
            raise EcoDiffError(f"width and height must be >= 8 pixels, got {self.width}×{self.height}")
        check_seed(self.seed)


def sigma_schedule(model: Any, scheduler: str, steps: int) -> torch.Tensor:
    """σ schedule from the model's own ``model_sampling`` (object patches included)."""
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).float().cpu()


def empty_latent(model: Any, spec: SamplingSpec) -> torch.Tensor:
    latent_format = model.get_model_object("latent_format")
    ratio = int(getattr(latent_format, "spacial_downscale_ratio", 8))
    return torch.zeros(1, latent_format.latent_channels, spec.height // ratio, spec.width // ratio)


def encode_prompts(clip: Any, prompts: Sequence[str], negative: str) -> list[tuple[list, list]]:
    """(positive, negative) CONDITIONING for every prompt, through the CLIP's own encoder."""
    if clip is None:
        raise EcoDiffError("a CLIP model is needed to encode the calibration prompts "
                           "(or connect positive/negative conditioning instead)")
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
    return [(clip.encode_from_tokens_scheduled(clip.tokenize(p)), neg) for p in prompts]


def _clone_tensors(obj: Any) -> Any:
    """Deep copy of a CONDITIONING structure with every tensor cloned (no inference tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tensors(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_tensors(v) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------
# inference tensors
# --------------------------------------------------------------------------------------------
class _CopyWeight:
    """Identity weight wrapper: makes ``comfy.ops`` layers use a fresh (non-inference) copy."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if not weight.is_inference() else weight.clone()

    def move_to(self, device: Any = None) -> int:
        return 0


def _trainable_patcher(model: Any) -> Any:
    """A clone whose comfy.ops layers read non-inference copies of inference-tensor weights.

    Every weight/bias of a comfy.ops layer gets the wrapper: which tensors are inference tensors is
    only known once the clone is loaded (the shared module may hold another clone's weights now)."""
    patcher = model.clone()
    module = diffusion_module(model)
    for name, sub in module.named_modules():
        if not hasattr(sub, "weight_function"):
            continue
        for attr in ("weight", "bias"):
            if isinstance(getattr(sub, attr, None), torch.Tensor):
                patcher.add_weight_wrapper(f"diffusion_model.{name}.{attr}", _CopyWeight())
    return patcher


@contextlib.contextmanager
def _plain_tensors(module: nn.Module) -> Iterator[None]:
    """Inference-tensor parameters/buffers of layers without weight functions (e.g. FLUX's QK-norm
    scales) are swapped for clones for the duration, and the originals put back afterwards."""
    swapped: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    try:
        for sub in module.modules():
            covered = hasattr(sub, "weight_function")
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference() and not (covered and name in ("weight", "bias")):
                    swapped.append((sub, name, True, p))
                    sub._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    swapped.append((sub, name, False, b))
                    sub._buffers[name] = b.clone()
        yield
    finally:
        for sub, name, is_param, original in reversed(swapped):
            (sub._parameters if is_param else sub._buffers)[name] = original


def grad_context() -> contextlib.AbstractContextManager:
    """FLUX's in-place residual adds: let autograd keep copies of mutated saved tensors."""
    return torch.autograd.graph.allow_mutation_on_saved_tensors()


# --------------------------------------------------------------------------------------------
# running inside ComfyUI's sampling machinery
# --------------------------------------------------------------------------------------------
def _host_sampler_class():
    import comfy.samplers

    class HostedRun(comfy.samplers.Sampler):
        """A Sampler whose ``sample`` runs a body with the ready guider instead of sampling."""

        def __init__(self, body: Callable[[Any, torch.Tensor, dict, torch.Tensor, torch.Tensor, bool], Any]) -> None:
            self.body = body
            self.result: Any = None

        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            max_denoise = self.max_denoise(model_wrap, sigmas)
            self.result = self.body(model_wrap, sigmas, extra_args, noise, latent_image, max_denoise)
            return latent_image if latent_image is not None else noise

    return HostedRun


@dataclass
class Session:
    """What a body running inside the guider gets: the module, samples and the σ schedule."""

    module: nn.Module
    samples: list[CalibrationSample]
    sigmas: torch.Tensor
    device: torch.device


def run_with_denoisers(model: Any, conds: Sequence[tuple[list, list]], spec: SamplingSpec,
                       body: Callable[[Session], Any]) -> Any:
    """Load ``model`` through ComfyUI, build one x0 denoiser (CFG included) and one starting
    latent x_T per (positive, negative) pair, and call ``body`` with them; returns its result."""
    import comfy.sample
    import comfy.sampler_helpers
    import comfy.samplers

    spec.validate()
    if not conds:
        raise EcoDiffError("no calibration prompts: give at least one non-empty prompt")
    HostedRun = _host_sampler_class()
    with torch.inference_mode(False):
        patcher = _trainable_patcher(model)
        module = diffusion_module(patcher)
        sigmas = sigma_schedule(patcher, spec.scheduler, spec.steps)
        latent = comfy.sample.fix_empty_latent_channels(patcher, empty_latent(patcher, spec))
        conds = _clone_tensors(list(conds))

        def body_in_guider(guider, dev_sigmas, extra_args, noise, latent_image, max_denoise):
            device = noise.device
            ms = guider.inner_model.model_sampling
            samples = []
            for i, (pos, neg) in enumerate(conds):
                processed = comfy.samplers.process_conds(
                    guider.inner_model, noise,
                    {"positive": comfy.sampler_helpers.convert_cond(pos),
                     "negative": comfy.sampler_helpers.convert_cond(neg)},
                    device, latent_image, None, derived_seed(spec.seed, i))
                x_noise = comfy.sample.prepare_noise(latent, derived_seed(spec.seed, i)).to(device)
                x_t = ms.noise_scaling(dev_sigmas[0], x_noise, latent_image, max_denoise)
                samples.append(CalibrationSample(_denoiser(guider, processed, extra_args, derived_seed(spec.seed, i)), x_t))
            require_own_weights(patcher, partial_ok=True)  # the guider loaded exactly this clone's weights
            with _plain_tensors(module):
                return body(Session(module, samples, dev_sigmas, device))

        guider = comfy.samplers.CFGGuider(patcher)
        guider.set_conds(conds[0][0], conds[0][1])
        guider.set_cfg(spec.cfg)
        host = HostedRun(body_in_guider)
        noise = comfy.sample.prepare_noise(latent, spec.seed)
        guider.sample(noise, latent, host, sigmas, disable_pbar=True, seed=spec.seed)
        return host.result


def _denoiser(guider: Any, processed: dict, extra_args: dict, seed: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        guider.conds = processed
        s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1)
        s = s.expand(x.shape[0]) if s.numel() == 1 else s
        return guider(x, s, extra_args["model_options"], seed)

    return denoise


# --------------------------------------------------------------------------------------------
# learning
# --------------------------------------------------------------------------------------------
def learn_mask(model: Any, conds: Sequence[tuple[list, list]], spec: SamplingSpec, settings: LearnSettings,
               resume: MaskState | None = None, callback: Callable[[StepInfo], bool | None] | None = None,
               on_stop: Callable[[MaskState], None] | None = None) -> MaskState:
    """Learn a sparsity mask for ``model``.  If ``callback`` raises (ComfyUI's interrupt comes
    through ProgressBar.update), ``on_stop`` receives the latest good state, then the error goes on.

    ``resume`` is continued only if it was learned from the same weights (as loaded, patches
    included), conditioning, σ schedule, starting latents and settings, and the model responds
    alike (its x0 prediction for the first prompt, which sees model options, model and object
    patches and weight wrappers); otherwise learning starts fresh and the returned state's
    ``start_note`` says why."""
    layout = model_layout(model)
    if resume is not None:
        resume.check_layout(layout)
        with torch.inference_mode(False):  # a mask loaded inside the executor holds inference tensors
            resume = dataclasses.replace(resume, logits={k: v.clone() for k, v in resume.logits.items()},
                                         optimizer={k: v.clone() for k, v in resume.optimizer.items()})

    def body(session: Session) -> MaskState:
        first = session.samples[0]  # the model's behaviour (patches, options, sampling objects), ungated
        inputs = run_inputs(session.module, conds, settings, {
            **dataclasses.asdict(spec), "sigmas": session.sigmas, "starts": [s.noise for s in session.samples]},
            response=model_response(first.denoise, first.noise, session.sigmas))
        learner = MaskLearner(session.module, layout, settings, resume=resume, grad_context=grad_context,
                              inputs=inputs)
        try:
            state = learner.learn(session.samples, session.sigmas, callback)
        except BaseException:
            if on_stop is not None:
                state = learner.state
                state.stop_reason = state.stop_reason or f"interrupted after step {state.progress.get('step', 0)}"
                on_stop(state)
            raise
        return state

    return run_with_denoisers(model, conds, spec, body)


def trajectory_losses(model: Any, conds: Sequence[tuple[list, list]], spec: SamplingSpec,
                      keep: dict[str, torch.Tensor] | None, reference: Any | None = None) -> list[torch.Tensor]:
    """Final latents of ``model`` (hard-gated by ``keep`` if given) along our Euler trajectories."""
    from ..ecodiff_core.gate_hooks import hard_gates
    from ..ecodiff_core.trajectory import sample

    layout = model_layout(model) if keep is not None else None

    def body(session: Session) -> list[torch.Tensor]:
        ctx = hard_gates(session.module, layout, keep) if keep is not None else contextlib.nullcontext()
        with ctx:
            return [sample(s.denoise, s.noise, session.sigmas).cpu() for s in session.samples]

    return run_with_denoisers(model, conds, spec, body)


# --------------------------------------------------------------------------------------------
# pruning
# --------------------------------------------------------------------------------------------
def plan(model: Any, state: MaskState, target: PruneTarget) -> tuple[Layout, PrunePlan]:
    """Keep masks for ``target`` (the engine keeps the units that must stay, ``min_keep``)."""
    layout = model_layout(model)
    state.check_layout(layout)
    return layout, plan_pruning(diffusion_module(model), layout, state.logits, target)


class _GateWeight:
    """Patcher-scoped soft gate: scales a Linear's input columns or output rows."""

    def __init__(self, scale: torch.Tensor, side: str) -> None:
        self.scale, self.side = scale, side

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(device=weight.device, dtype=weight.dtype)
        if weight.ndim == 1:
            return weight * scale
        return weight * (scale[None, :] if self.side == "in" else scale[:, None])

    def move_to(self, device: Any = None) -> int:
        if device is not None:
            self.scale = self.scale.to(device)
        return self.scale.numel() * self.scale.element_size()


def gate_scales(module: nn.Module, layout: Layout, values: dict[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """Per (Linear path, side): the feature scale vector built from every group gating it."""
    scales: dict[tuple[str, str], torch.Tensor] = {}
    for g in layout.groups:
        for site in g.gates:
            lin = get_linear(module, site.module)
            width = lin.in_features if site.side == "in" else lin.out_features
            scale = scales.setdefault((site.module, site.side), torch.ones(width))
            stop = site.offset + g.count * g.width
            scale[site.offset:stop] = values[g.name].float().cpu().repeat_interleave(g.width)
    return scales


def soft_gated_model(model: Any, layout: Layout, keep: dict[str, torch.Tensor]) -> Any:
    """A clone of ``model`` that multiplies removed units by 0 through weight wrappers (preview)."""
    keep = check_keep(layout, keep)
    patcher = model.clone()
    module = diffusion_module(model)
    for (path, side), scale in gate_scales(module, layout, keep).items():
        rows = getattr(get_linear(module, path), "rows", None)  # a pruned ScatterLinear holds only these
        if side == "out" and isinstance(rows, torch.Tensor):
            scale = scale[rows.cpu()]
        patcher.add_weight_wrapper(f"diffusion_model.{path}.weight", _GateWeight(scale, side))
        if side == "out" and get_linear(module, path).bias is not None:
            patcher.add_weight_wrapper(f"diffusion_model.{path}.bias", _GateWeight(scale, side))
    return patcher


def soft_preview(model: Any, layout: Layout, plan: PrunePlan) -> tuple[Any, PruneReport]:
    """The soft-gated MODEL and the report of what pruning would remove (weights keep their size,
    so "after" is the plan's count)."""
    module = diffusion_module(model)
    report = PruneReport.build(module, module, layout, plan.keep)
    report.params_after = report.params_before - plan.removed_params
    return soft_gated_model(model, layout, plan.keep), report


def _new_base_model(model: Any, pruned: nn.Module, record: dict) -> Any:
    """A new ``comfy.model_base`` object around ``pruned``; the input's objects are not touched."""
    base = model.model
    memo = {id(base.diffusion_model): pruned}
    for attr in ("current_patcher",):
        if hasattr(base, attr):
            memo[id(getattr(base, attr))] = None
    new = copy.deepcopy(base, memo)
    new.model_config = copy.deepcopy(base.model_config)
    new.ecodiff_pruning = record
    for attr in ("model_loaded_weight_memory", "lowvram_patch_counter", "model_lowvram", "current_weight_patches_uuid"):
        if hasattr(new, attr):
            delattr(new, attr)
    return new


def _wrap(model: Any, base: Any) -> Any:
    """A new ModelPatcher for ``base`` carrying over ``model``'s options and non-weight object patches."""
    import comfy.model_patcher

    patcher = pruned_patcher(base, diffusion_module(model), model.load_device, model.offload_device)
    patcher.model_options = comfy.model_patcher.create_model_options_clone(model.model_options) \
        if hasattr(comfy.model_patcher, "create_model_options_clone") else copy.deepcopy(model.model_options)
    for key, obj in model.object_patches.items():
        if not key.startswith("diffusion_model."):
            patcher.add_object_patch(key, obj)
    if hasattr(model, "force_cast_weights"):  # ModelComputeDtype: layers cast to the patched compute dtype
        patcher.force_cast_weights = model.force_cast_weights
    return patcher


def build_pruned_model(model: Any, layout: Layout, keep: dict[str, torch.Tensor],
                       logits: dict[str, torch.Tensor]) -> tuple[Any, PruneReport]:
    """A NEW, physically smaller MODEL; ``model`` and its module stay as they were.  Units that must
    stay although ``keep`` removes them (``min_keep``) stay silenced: the highest-``logits`` ones."""
    keep = check_keep(layout, keep)
    adjusted, silenced = physical_keep(layout, keep, logits)
    with torch.inference_mode(False), own_weights(model) as source:
        pruned = prune_model(source, layout, keep, logits, weights=wrapped_weights(model, source))
        fit_attention_patches(pruned)
        report = PruneReport.build(source, pruned, layout, keep)
    record = pruning_record(model, layout, adjusted, silenced)
    return _wrap(model, _new_base_model(model, pruned, record)), report


def pruning_record(model: Any, layout: Layout, keep: dict[str, torch.Tensor], silenced: list[str]) -> dict:
    """Everything needed to rebuild the pruned module's shapes from the base architecture."""
    base = model.model
    original = pruning_info(model)
    if original is not None:
        raise EcoDiffError("this MODEL is already pruned by EcoDiff; apply masks to the original model "
                           "(masks are learned for the full-size layout)")
    cfg = base.model_config
    return {
        "arch": layout.arch,
        "fingerprint": layout.fingerprint(),
        "model_config_class": type(cfg).__name__,
        "unet_config": _jsonable(cfg.unet_config),
        "sampling_settings": _jsonable(getattr(cfg, "sampling_settings", {})),
        "model_type": base.model_type.name,
        "model_class": type(base).__name__,
        "kept": {name: torch.nonzero(k).reshape(-1).tolist() for name, k in keep.items()},
        "counts": {g.name: g.count for g in layout.groups},
        "silenced": list(silenced),
        **precision_record(model),
    }


def precision_record(model: Any) -> dict:
    """How ComfyUI stores and computes the weights of ``model``: ``weight_dtype`` (what the model
    config builds layers in), ``manual_cast_dtype`` (compute dtype of ComfyUI's manual cast, None
    when weights compute in their own dtype), ``scaled_fp8`` (weight dtype of scaled-fp8 layers,
    else None) and ``fp8_optimizations``; dtypes as torch names ("float8_e4m3fn")."""
    base, cfg = model.model, model.model.model_config
    weight = cfg.unet_config.get("dtype")
    if not isinstance(weight, torch.dtype):
        weight = base.get_dtype() if hasattr(base, "get_dtype") else None
    return {
        "weight_dtype": _dtype_name(weight),
        "manual_cast_dtype": _dtype_name(model.get_model_object("manual_cast_dtype") if hasattr(model, "get_model_object")
                                         else getattr(base, "manual_cast_dtype", None)),
        "scaled_fp8": _dtype_name(getattr(cfg, "scaled_fp8", None)),
        "fp8_optimizations": bool(getattr(cfg, "optimizations", {}).get("fp8", False)),
    }


def _dtype_name(dtype: Any) -> str | None:
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else None


def _dtype_from_name(name: Any, what: str) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise EcoDiffError(f"the pruned model's record has {what} {name!r}, which is not a floating-point torch "
                           "dtype; the file is damaged: prune and save the model again")
    return dtype


def _set_precision(cfg: Any, record: dict, sd: dict[str, torch.Tensor]) -> None:
    """Build ``cfg`` with the saved model's weight dtype and manual cast, as ComfyUI's loaders do
    (``set_inference_dtype``).  Records written before these were stored: the weight dtype of the
    record's unet_config (else the state dict's dominant one), the manual cast ComfyUI picks for
    that dtype on this device (``unet_manual_cast``), scaled fp8 when the layers carry scales."""
    import comfy.model_management as mm

    if "weight_dtype" in record:
        weight = _dtype_from_name(record["weight_dtype"], "weight_dtype")
        cast = _dtype_from_name(record.get("manual_cast_dtype"), "manual_cast_dtype")
        scaled = _dtype_from_name(record.get("scaled_fp8"), "scaled_fp8")
        fp8_optimizations = bool(record.get("fp8_optimizations", False))
    else:
        weight = cfg.unet_config.get("dtype")
        if not isinstance(weight, torch.dtype):
            counts: dict[torch.dtype, int] = {}
            for t in sd.values():
                if t.is_floating_point():
                    counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
            weight = max(counts, key=counts.get) if counts else torch.float32
        supported = getattr(cfg, "supported_inference_dtypes", [torch.float16, torch.bfloat16, torch.float32])
        cast = mm.unet_manual_cast(weight, mm.get_torch_device(), supported)
        scaled = next((sd[k[:-len("scale_weight")] + "weight"].dtype for k in sd
                       if k.endswith(".scale_weight") and k[:-len("scale_weight")] + "weight" in sd), None)
        fp8_optimizations = False
    cfg.set_inference_dtype(weight, cast)
    if scaled is not None:
        cfg.scaled_fp8 = scaled
    if fp8_optimizations:
        cfg.optimizations = dict(getattr(cfg, "optimizations", {}), fp8=True)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _from_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__dtype__"}:
            return getattr(torch, obj["__dtype__"])
        return {k: _from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# pruned model files
# --------------------------------------------------------------------------------------------
def save_pruned_model(model: Any, path: Path) -> Path:
    """Safetensors of the pruned denoiser's weights + the record to rebuild its shapes."""
    import safetensors.torch

    record = pruning_info(model)
    if record is None:
        raise EcoDiffError("Save Pruned Model needs a MODEL from Apply Pruned Mask (or Load Pruned Model); "
                           "unpruned models are saved with ComfyUI's own checkpoint savers")
    with own_weights(model) as module:
        wrapped = wrapped_weights(model, module)  # weight wrappers folded in, as pruning does
        sd = {k: wrapped.get(k, v).detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    dtype = record.get("weight_dtype") or (str(next(iter(sd.values())).dtype) if sd else "float32")
    metadata = {"format": PRUNED_FORMAT, "format_version": str(PRUNED_FORMAT_VERSION),
                "record": json.dumps(record), "dtype": dtype.removeprefix("torch.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(sd, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def _read_pruned(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise EcoDiffError(f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc
    if meta.get("format") != PRUNED_FORMAT:
        raise EcoDiffError(f"{path.name} is not an EcoDiff pruned model (metadata 'format' is {meta.get('format')!r}); "
                           "full checkpoints load with ComfyUI's own loaders")
    if meta.get("format_version") != str(PRUNED_FORMAT_VERSION):
        raise EcoDiffError(f"{path.name} has pruned-model format version {meta.get('format_version')!r}; "
                           f"this version reads {PRUNED_FORMAT_VERSION}")
    try:
        record = json.loads(meta["record"])
    except (KeyError, json.JSONDecodeError, RecursionError) as exc:
        raise PrunedFileError(f"{path.name} has damaged metadata: {type(exc).__name__}: {exc}") from exc
    return sd, check_pruned_record(record, path.name)


def _pack_model_configs() -> dict[str, type]:
    """Model-config classes the pack defines itself (the demo digits model), by class name."""
    from .demo_model import model_config_classes

    return model_config_classes()


def _pruned_classes(path: Path, record: dict) -> tuple[type, type]:
    """The ComfyUI model-config and model classes a checked record names.  Only real ones are
    accepted (subclasses of ``supported_models_base.BASE`` / ``model_base.BaseModel``); nothing else
    named in a file is looked up or called."""
    import comfy.model_base
    import comfy.supported_models
    import comfy.supported_models_base

    cfg_name, model_name = record["model_config_class"], record["model_class"]
    cfg_cls = getattr(comfy.supported_models, cfg_name, None) or _pack_model_configs().get(cfg_name)
    if not (isinstance(cfg_cls, type) and issubclass(cfg_cls, comfy.supported_models_base.BASE)):
        raise PrunedFileError(f"{path.name} was pruned from a {cfg_name!r} model, which is not a model-config "
                              "class this ComfyUI knows; update ComfyUI, or the file is damaged")
    model_cls = getattr(comfy.model_base, model_name, None)
    if not (isinstance(model_cls, type) and issubclass(model_cls, comfy.model_base.BaseModel)):
        raise PrunedFileError(f"{path.name}: record 'model_class' {model_name!r} is not a model class this "
                              "ComfyUI knows; update ComfyUI, or the file is damaged")
    if record["model_type"] not in comfy.model_base.ModelType.__members__:
        raise PrunedFileError(f"{path.name}: record 'model_type' {record['model_type']!r} is not one of "
                              f"{', '.join(comfy.model_base.ModelType.__members__)}")
    return cfg_cls, model_cls


def _rebuild_defects(load: Callable[[Path], Any]) -> Callable[[Path], Any]:
    """The record is checked before use (``_read_pruned``, ``_pruned_classes``); what ComfyUI's model
    code still refuses while rebuilding from its config values becomes one PrunedFileError naming the
    file, instead of a TypeError/KeyError/... from deep inside ComfyUI."""
    @functools.wraps(load)
    def wrapper(path: Path) -> Any:
        try:
            return load(path)
        except PrunedFileError:
            raise
        except EcoDiffError as exc:  # e.g. the rebuilt model is no architecture we know
            if Path(path).name in str(exc):
                raise
            raise PrunedFileError(f"{Path(path).name}: {exc}") from exc
        except torch.OutOfMemoryError:
            raise
        except (TypeError, KeyError, IndexError, AttributeError, ValueError, AssertionError, ArithmeticError,
                RuntimeError) as exc:
            raise PrunedFileError(f"{Path(path).name}: ComfyUI cannot rebuild the model its record describes "
                                  f"({type(exc).__name__}: {exc}); the file is damaged or was written for "
                                  "another ComfyUI version") from exc

    return wrapper


@_rebuild_defects
def load_pruned_model(path: Path) -> Any:
    """Rebuild the slim module on the meta device (no full-size allocation), then load weights."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher

    sd, record = _read_pruned(path)
    cfg_cls, model_cls = _pruned_classes(path, record)
    cfg = cfg_cls(_from_jsonable(record["unet_config"]))
    cfg.unet_config = _from_jsonable(record["unet_config"])
    cfg.sampling_settings = _from_jsonable(record["sampling_settings"])
    _set_precision(cfg, record, sd)
    model_type = comfy.model_base.ModelType[record["model_type"]]
    base = model_cls(cfg, model_type=model_type, device=torch.device("meta"))
    layout = find_layout(base.diffusion_model)
    keep = check_record_layout(record, layout, path.name)
    pruned = prune_model(base.diffusion_model, layout, keep)
    fit_attention_patches(pruned)
    check_state_dict(pruned, sd, path.name, cfg.manual_cast_dtype)
    offload = mm.unet_offload_device()
    missing, unexpected = pruned.load_state_dict(sd, strict=False, assign=True)
    meta_left = [n for n, t in list(pruned.named_parameters()) + list(pruned.named_buffers()) if t.is_meta]
    if unexpected or meta_left:
        raise EcoDiffError(f"{path.name} does not fit the rebuilt model: unexpected {unexpected[:3]}, "
                           f"missing {meta_left[:3]}")
    full, base.diffusion_model = base.diffusion_model, pruned.to(offload)
    base.ecodiff_pruning = record
    return pruned_patcher(base, full, mm.get_torch_device(), offload)


# --------------------------------------------------------------------------------------------
# progress, interruption, UI messages
# --------------------------------------------------------------------------------------------
class Progress:
    """ComfyUI's progress bar for one node; every update is also an interrupt point."""

    def __init__(self, total: int, node_id: str | None = None) -> None:
        import comfy.utils

        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id) if node_id is not None \
            else comfy.utils.ProgressBar(total)

    def update(self, value: int, total: int | None = None) -> None:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(value, total)


def is_interrupt(exc: BaseException) -> bool:
    import comfy.model_management

    return isinstance(exc, comfy.model_management.InterruptProcessingException)


def notify(event: str, data: dict) -> None:
    """Send a websocket event to the UI when a server runs (no-op in scripts and tests)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, data, getattr(instance, "client_id", None))


def interrupt_processing(value: bool = True) -> None:
    """Ask ComfyUI to interrupt (as POST /interrupt does); used by tests."""
    import comfy.model_management

    comfy.model_management.interrupt_current_processing(value)
