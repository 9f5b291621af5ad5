"""Running a body inside ComfyUI's sampling machinery: the calibration trajectories' setup (size,
steps, CFG, σ schedule, starting latents, conditioning) and one x0 denoiser per prompt, or per
batch of prompts stacked along dim 0.

Facts this relies on (ComfyUI 0.3.64, checked again in ``tests/integration``):
- ``CFGGuider`` prepares the model (loading through model_management, conds through
  ``process_conds``) and its ``__call__`` is the CFG-combined x0 prediction in σ-space, so one Euler
  loop serves EPS, V and flow models alike; a ``comfy.samplers.Sampler`` subclass gets the ready
  guider in ``sample`` (``HostedRun`` runs the body there instead of sampling);
- the executor runs nodes under ``torch.inference_mode()``: latents and conds are inference
  tensors; bodies run in ``inference_mode(False)`` with copies of the conds and non-inference
  views of the weights (see ``weights.plain_tensors``);
- FLUX blocks add residuals in place and FreeU patches activations in place: forward and backward
  run under ``ecodiff_core.saved_tensors.allow_mutation_on_saved_tensors`` (``grad_context``).
ComfyUI is imported lazily so the pack imports without it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..ecodiff_core import saved_tensors
from ..ecodiff_core.errors import SettingsError
from ..ecodiff_core.learn import CalibrationSample
from ..ecodiff_core.seeds import check_seed, derived_seed
from ..ecodiff_core.validation import check_choice, check_int, check_number
from .weights import diffusion_module, plain_tensors, require_own_weights

LEARN_SAMPLERS: tuple[str, ...] = ("euler",)


def scheduler_names() -> list[str]:
    """ComfyUI's scheduler names (the σ schedules ``sigma_schedule`` accepts)."""
    import comfy.samplers

    return list(comfy.samplers.SCHEDULER_NAMES)


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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """SettingsError naming the first bad field (run again after changing a field in place)."""
        if self.sampler_name not in LEARN_SAMPLERS:
            raise SettingsError(f"learning follows a deterministic trajectory; sampler '{self.sampler_name}' is "
                                f"not supported, use one of {', '.join(LEARN_SAMPLERS)}")
        check_choice("scheduler", self.scheduler, scheduler_names())
        check_int("steps", self.steps)
        check_int("width", self.width, low=8)
        check_int("height", self.height, low=8)
        check_number("cfg", self.cfg)
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
        raise SettingsError("a CLIP model is needed to encode the calibration prompts "
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

def grad_context() -> contextlib.AbstractContextManager:
    """In-place writes to saved tensors (FLUX's residual adds, FreeU's patches): autograd keeps
    copies of what is overwritten (``ecodiff_core.saved_tensors``)."""
    return saved_tensors.allow_mutation_on_saved_tensors()


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
    latent x_T per (positive, negative) pair, and call ``body`` with them; returns its result.

    The samples are batchable (``CalibrationSample.batchable``): with ``LearnSettings.prompt_batch``
    > 1 the engine stacks prompts whose conditioning shapes agree (the same token count) and runs
    them as one ComfyUI batch; others run one by one."""
    import comfy.sample
    import comfy.sampler_helpers
    import comfy.samplers

    spec.validate()
    if not conds:
        raise SettingsError("no calibration prompts: give at least one non-empty prompt")
    HostedRun = _host_sampler_class()
    with torch.inference_mode(False):
        patcher = model.clone()  # the guider's own patcher; the input MODEL is left as it was
        module = diffusion_module(patcher)
        sigmas = sigma_schedule(patcher, spec.scheduler, spec.steps)
        latent = comfy.sample.fix_empty_latent_channels(patcher, empty_latent(patcher, spec))
        conds = _clone_tensors(list(conds))

        def body_in_guider(guider, dev_sigmas, extra_args, noise, latent_image, max_denoise):
            device = noise.device
            ms = guider.inner_model.model_sampling

            def batch_denoiser(conditioning: dict) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
                """The CFG x0 denoiser of prompts stacked along dim 0 (ComfyUI takes a batch of
                conditionings as a multi-line CLIPTextEncode gives); the first prompt's seed."""
                rows, seed = conditioning["prompt"].shape[0], derived_seed(spec.seed, int(conditioning["prompt"][0]))
                processed = comfy.samplers.process_conds(
                    guider.inner_model, _rows(noise, rows),
                    {"positive": comfy.sampler_helpers.convert_cond(conditioning["positive"]),
                     "negative": comfy.sampler_helpers.convert_cond(conditioning["negative"])},
                    device, _rows(latent_image, rows), None, seed)
                return _denoiser(guider, processed, extra_args, seed)

            samples = []
            for i, (pos, neg) in enumerate(conds):
                x_noise = comfy.sample.prepare_noise(latent, derived_seed(spec.seed, i)).to(device)
                x_t = ms.noise_scaling(dev_sigmas[0], x_noise, latent_image, max_denoise)
                conditioning = {"positive": pos, "negative": neg, "prompt": torch.tensor([i])}
                samples.append(CalibrationSample.batchable(batch_denoiser, conditioning, x_t))
            require_own_weights(patcher, partial_ok=True)  # the guider loaded exactly this clone's weights
            with plain_tensors(module):
                return body(Session(module, samples, dev_sigmas, device))

        guider = comfy.samplers.CFGGuider(patcher)
        guider.set_conds(conds[0][0], conds[0][1])
        guider.set_cfg(spec.cfg)
        host = HostedRun(body_in_guider)
        noise = comfy.sample.prepare_noise(latent, spec.seed)
        guider.sample(noise, latent, host, sigmas, disable_pbar=True, seed=spec.seed)
        return host.result


def _rows(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """``t`` (1, …) as ``rows`` equal rows (a view); None stays None."""
    return t if t is None or t.shape[0] == rows else t.expand(rows, *t.shape[1:])


def _denoiser(guider: Any, processed: dict, extra_args: dict,
              seed: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        guider.conds = processed
        s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1)
        s = s.expand(x.shape[0]) if s.numel() == 1 else s
        return guider(x, s, extra_args["model_options"], seed)

    return denoise

