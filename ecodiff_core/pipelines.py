"""Local diffusers pipelines for the command line: load, encode prompts once, build learning problems.

A pipeline folder is what ``DiffusionPipeline.save_pretrained`` writes (``model_index.json`` plus one
folder per component).  Four families are supported, each with one denoiser of ``denoisers``:

=========  ============================  ==============  ===========================================
kind       pipeline class                denoiser        denoiser in σ-space
=========  ============================  ==============  ===========================================
``sd``     StableDiffusionPipeline       ``unet``        ε-prediction, CFG (``unet_eps_denoiser``)
``sdxl``   StableDiffusionXLPipeline     ``unet``        ε-prediction + pooled/time ids, CFG
``sd3``    StableDiffusion3Pipeline      ``transformer`` rectified flow, CFG (``flow_denoiser``, timestep 1000·σ)
``flux``   FluxPipeline                  ``transformer`` rectified flow, distilled guidance
=========  ============================  ==============  ===========================================

Everything is read with ``local_files_only=True``: nothing is downloaded.  Text encoders run once
per prompt (``encode_prompts``) and are freed before learning (``free_text_encoders``); the
embeddings live on the CPU until a problem's denoiser moves them to the model's device.
"""
from __future__ import annotations

import gc
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .denoisers import EpsSchedule, flow_denoiser, unet_eps_denoiser
from .errors import EcoDiffError, SettingsError
from .learn import CalibrationSample
from .seeds import derived_seed

log = logging.getLogger("ecodiff")

PIPELINE_KINDS: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
DENOISER_CLASSES: dict[str, str] = {
    "UNet2DConditionModel": "unet", "SD3Transformer2DModel": "transformer", "FluxTransformer2DModel": "transformer",
}
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def diffusers_module():
    """``import diffusers`` (with the torchvision guard of ``_compat``), or EcoDiffError saying what to install."""
    from ._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    try:
        import diffusers
    except ImportError as exc:
        raise EcoDiffError(f"the diffusers commands need the diffusers and transformers packages ({exc}); "
                           "install them with: pip install diffusers transformers") from exc
    return diffusers


@dataclass(frozen=True)
class PipelineInfo:
    """What ``model_index.json`` of a pipeline folder says."""

    folder: Path
    class_name: str
    kind: str  # one of PIPELINE_KINDS' values
    denoiser: str  # "unet" or "transformer": the component EcoDiff prunes
    denoiser_class: str
    vae_scale_factor: int


def pipeline_info(folder: str | Path) -> PipelineInfo:
    """Read and check a local pipeline folder.  EcoDiffError when it is missing, not a diffusers
    pipeline, or of an unsupported family."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not folder.is_dir():
        raise EcoDiffError(f"model folder not found: {folder}; give a local diffusers pipeline folder "
                           "(the one holding model_index.json)")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EcoDiffError(f"{folder} has no model_index.json: it is not a diffusers pipeline folder "
                           "(save one with pipe.save_pretrained(folder))") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EcoDiffError(f"{index} is not readable JSON: {exc}") from exc
    class_name = data.get("_class_name") if isinstance(data, dict) else None
    if class_name not in PIPELINE_KINDS:
        raise EcoDiffError(f"{folder} holds a {class_name!r}; supported pipelines: {', '.join(PIPELINE_KINDS)}")
    denoiser = "unet" if "unet" in data else "transformer"
    entry = data.get(denoiser)
    denoiser_class = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if denoiser_class not in DENOISER_CLASSES:
        raise EcoDiffError(f"{index}: the {denoiser} component is {entry!r}, expected one of "
                           f"{', '.join(DENOISER_CLASSES)}")
    vae_factor = 8
    vae_config = folder / "vae" / "config.json"
    if vae_config.is_file():
        try:
            vae_factor = 2 ** (len(json.loads(vae_config.read_text(encoding="utf-8"))["block_out_channels"]) - 1)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EcoDiffError(f"{vae_config} is damaged: {exc}") from exc
    return PipelineInfo(folder, class_name, PIPELINE_KINDS[class_name], denoiser, denoiser_class, vae_factor)


def _from_pretrained(what: str, load) -> Any:
    import warnings

    try:
        with warnings.catch_warnings():  # newer diffusers rename torch_dtype (still accepted) to dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return load()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EcoDiffError(f"cannot load {what} with local files only: {first}") from exc


def load_pipeline(info: PipelineInfo, dtype: torch.dtype = torch.float32, vae: bool = False) -> Any:
    """The pipeline (without its VAE unless ``vae``), weights in ``dtype``, on the CPU."""
    d = diffusers_module()
    extra = {} if vae else {"vae": None}
    pipe = _from_pretrained(f"the pipeline in {info.folder}", lambda: d.DiffusionPipeline.from_pretrained(
        str(info.folder), local_files_only=True, torch_dtype=dtype, **extra))
    _in_dtype(getattr(pipe, info.denoiser), dtype)
    return pipe


def load_denoiser(info: PipelineInfo, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Only the denoiser (``unet`` / ``transformer``) of the pipeline, in eval mode on the CPU."""
    d = diffusers_module()
    cls = getattr(d, info.denoiser_class)
    model = _from_pretrained(f"{info.folder / info.denoiser}", lambda: cls.from_pretrained(
        str(info.folder), subfolder=info.denoiser, local_files_only=True, torch_dtype=dtype))
    return _in_dtype(model, dtype).eval()


def _in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``model``'s floating-point weights to ``dtype`` where the loader left them in another one
    (some diffusers versions ignore ``torch_dtype`` for some classes, e.g. SD3Transformer2DModel)."""
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        nn.Module.to(model, dtype=dtype)  # plain cast: diffusers' .to() warns about its fp32 modules
    return model


def text_encoders_digest(pipe: Any) -> str:
    """Fingerprint of the text encoders' weights (what turns prompts into conditioning)."""
    from .learn import digest, weights_digest

    return digest({name: weights_digest(getattr(pipe, name)) for name in TEXT_COMPONENTS
                   if name.startswith("text_encoder") and isinstance(getattr(pipe, name, None), nn.Module)})


def free_text_encoders(pipe: Any) -> None:
    """Drop the text encoders and tokenizers from ``pipe`` and release their memory."""
    for name in TEXT_COMPONENTS:
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class SamplingSettings:
    """How the learning trajectories are sampled.  ``cfg``: classifier-free guidance scale (SD,
    SDXL, SD3; 1 = none); ``guidance``: FLUX's distilled guidance (FLUX dev; schnell has none)."""

    width: int = 512
    height: int = 512
    steps: int = 10
    cfg: float = 7.0
    guidance: float = 3.5
    negative_prompt: str = ""
    max_sequence_length: int = 256
    seed: int = 0

    def validate(self, info: PipelineInfo) -> None:
        multiple = info.vae_scale_factor * (2 if info.kind in ("flux", "sd3") else 1)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < multiple or value % multiple:
                raise SettingsError(f"{name} must be a positive multiple of {multiple} for this {info.class_name}, "
                                    f"got {value}")
        if self.steps < 1:
            raise SettingsError(f"steps must be >= 1, got {self.steps}")
        if self.max_sequence_length < 1:
            raise SettingsError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")
        for name in ("cfg", "guidance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SettingsError(f"{name} must be a finite number >= 0, got {value}")

    def uses_cfg(self, info: PipelineInfo) -> bool:
        return info.kind != "flux" and self.cfg != 1.0

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@torch.no_grad()
def encode_prompts(pipe: Any, info: PipelineInfo, prompts: Iterable[str], settings: SamplingSettings,
                   device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """Run the pipeline's text encoders once per prompt; per prompt a dict with ``cond`` (and
    ``uncond`` when CFG is used) holding the denoiser's conditioning kwargs, on the CPU."""
    for name in TEXT_COMPONENTS:
        if name.startswith("text_encoder") and isinstance(getattr(pipe, name, None), nn.Module):
            getattr(pipe, name).to(device)
    cfg = settings.uses_cfg(info)
    out = []
    for prompt in prompts:
        if info.kind == "sd":
            pe, ne = pipe.encode_prompt(prompt, device, 1, cfg, negative_prompt=settings.negative_prompt)
            entry = {"cond": {"encoder_hidden_states": pe}, "uncond": {"encoder_hidden_states": ne}}
        elif info.kind == "sdxl":
            pe, ne, pp, npp = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                 do_classifier_free_guidance=cfg,
                                                 negative_prompt=settings.negative_prompt)
            time_ids = torch.tensor([[settings.height, settings.width, 0, 0, settings.height, settings.width]],
                                    dtype=pe.dtype)
            entry = {"cond": {"encoder_hidden_states": pe,
                              "added_cond_kwargs": {"text_embeds": pp, "time_ids": time_ids}},
                     "uncond": {"encoder_hidden_states": ne,
                                "added_cond_kwargs": {"text_embeds": npp, "time_ids": time_ids}}}
        elif info.kind == "sd3":
            pe, ne, pp, npp = pipe.encode_prompt(prompt, prompt, prompt, device=device, num_images_per_prompt=1,
                                                 do_classifier_free_guidance=cfg,
                                                 negative_prompt=settings.negative_prompt,
                                                 max_sequence_length=settings.max_sequence_length)
            entry = {"cond": {"encoder_hidden_states": pe, "pooled_projections": pp},
                     "uncond": {"encoder_hidden_states": ne, "pooled_projections": npp}}
        else:
            pe, pp, text_ids = pipe.encode_prompt(prompt, prompt, device=device, num_images_per_prompt=1,
                                                  max_sequence_length=settings.max_sequence_length)
            entry = {"cond": {"encoder_hidden_states": pe, "pooled_projections": pp, "txt_ids": text_ids}}
        if not cfg:
            entry.pop("uncond", None)
        out.append(_to(entry, "cpu"))
    return out


def _to(obj: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if dtype is not None and obj.is_floating_point() else None)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def latent_shape(info: PipelineInfo, model: nn.Module, settings: SamplingSettings) -> tuple[int, ...]:
    """Shape of one starting latent as the denoiser takes it (FLUX: packed 2×2 patches)."""
    h, w = settings.height // info.vae_scale_factor, settings.width // info.vae_scale_factor
    channels = int(model.config.in_channels)
    if info.kind == "flux":
        return (1, (h // 2) * (w // 2), channels)
    return (1, channels, h, w)


def _flux_image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def sigma_schedule(pipe_or_folder: Any, info: PipelineInfo, settings: SamplingSettings,
                   model: nn.Module) -> tuple[torch.Tensor, EpsSchedule | None]:
    """The σ schedule the pipeline's own scheduler would sample with (ending at 0), float64; for
    ε models also the training schedule that maps σ to timesteps."""
    d = diffusers_module()
    config = _scheduler_config(pipe_or_folder, info)
    if info.kind in ("sd", "sdxl"):
        scheduler = d.EulerDiscreteScheduler.from_config(config)
        scheduler.set_timesteps(settings.steps)
        ac = scheduler.alphas_cumprod.double()
        return scheduler.sigmas.double(), EpsSchedule(((1 - ac) / ac).sqrt())
    scheduler = d.FlowMatchEulerDiscreteScheduler.from_config(config)
    if info.kind == "flux":
        import numpy as np

        seq = latent_shape(info, model, settings)[1]
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        mu = seq * (hi - lo) / (top - base) + lo - (hi - lo) / (top - base) * base
        try:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / settings.steps, settings.steps), mu=mu)
        except OverflowError as exc:  # exp(μ) of the time shift
            raise SettingsError(f"{seq} image tokens are far outside the range of this pipeline's scheduler "
                                f"(max_image_seq_len {top}): its flow shift overflows; use a smaller --width/"
                                "--height") from exc
    else:
        scheduler.set_timesteps(settings.steps)
    return scheduler.sigmas.double(), None


def _scheduler_config(pipe_or_folder: Any, info: PipelineInfo) -> dict:
    scheduler = getattr(pipe_or_folder, "scheduler", None)
    if scheduler is not None:
        return dict(scheduler.config)
    path = info.folder / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EcoDiffError(f"cannot read the scheduler config {path}: {exc}") from exc


def calibration_sample(info: PipelineInfo, model: nn.Module, encoding: dict[str, Any], settings: SamplingSettings,
                       index: int, eps: EpsSchedule | None) -> CalibrationSample:
    """Prompt ``index``'s learning problem: its denoiser (conditioning on the model's device and
    dtype) and its starting latent, drawn from ``derived_seed(settings.seed, index)`` so that any
    process builds the same problem for the same prompt."""
    p = next(model.parameters())
    cond = _to(encoding["cond"], p.device, p.dtype)
    uncond = _to(encoding.get("uncond"), p.device, p.dtype) if "uncond" in encoding else None
    shape = latent_shape(info, model, settings)
    generator = torch.Generator().manual_seed(derived_seed(settings.seed, index))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
    cfg = settings.cfg
    if info.kind in ("sd", "sdxl"):
        denoise = unet_eps_denoiser(model, eps, cond, uncond, cfg)
    elif info.kind == "sd3":
        denoise = flow_denoiser(model, cond, uncond, cfg, timestep_scale=1000.0)  # SD3 takes 1000·σ
    else:
        h = settings.height // info.vae_scale_factor // 2
        w = settings.width // info.vae_scale_factor // 2
        cond["img_ids"] = _flux_image_ids(h, w).to(p.device, p.dtype)
        if getattr(model.config, "guidance_embeds", False):
            cond["guidance"] = torch.full((1,), float(settings.guidance), device=p.device, dtype=torch.float32)
        denoise = flow_denoiser(model, cond)
    return CalibrationSample(denoise=denoise, noise=noise)


def example_inputs(info: PipelineInfo, model: nn.Module, width: int, height: int,
                   text_tokens: int | None = None) -> dict[str, Any]:
    """Zero inputs of the shapes one denoiser call takes at ``width`` × ``height`` (batch 1), for
    FLOP measurement; ``text_tokens`` defaults to the families' usual prompt length."""
    p = next(model.parameters())
    settings = SamplingSettings(width=width, height=height)
    x = torch.zeros(latent_shape(info, model, settings), device=p.device, dtype=p.dtype)
    cfg = model.config

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, device=p.device, dtype=p.dtype)

    if info.kind in ("sd", "sdxl"):
        inputs = {"sample": x, "timestep": zeros(1) + 500,
                  "encoder_hidden_states": zeros(1, text_tokens or 77, cfg.cross_attention_dim)}
        if info.kind == "sdxl":
            pooled = model.add_embedding.linear_1.in_features - 6 * cfg.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {"text_embeds": zeros(1, pooled), "time_ids": zeros(1, 6)}
        return inputs
    inputs = {"hidden_states": x, "timestep": zeros(1) + 0.5,
              "encoder_hidden_states": zeros(1, text_tokens or (333 if info.kind == "sd3" else 512),
                                             cfg.joint_attention_dim),
              "pooled_projections": zeros(1, cfg.pooled_projection_dim)}
    if info.kind == "flux":
        h = height // info.vae_scale_factor // 2
        inputs.update(img_ids=_flux_image_ids(h, width // info.vae_scale_factor // 2).to(p.device, p.dtype),
                      txt_ids=zeros(inputs["encoder_hidden_states"].shape[1], 3))
        if getattr(cfg, "guidance_embeds", False):
            inputs["guidance"] = zeros(1) + 3.5
    return inputs


@dataclass
class EncodedPipeline:
    """A pipeline ready for learning: its denoiser (on the device, eval mode), the prompts' encodings
    (CPU), the σ schedule, the ε training schedule (UNets) and a digest of the text encoders' weights."""

    model: nn.Module
    encodings: list[dict[str, Any]]
    sigmas: torch.Tensor
    eps: EpsSchedule | None
    text_encoders: str


def load_and_encode(info: PipelineInfo, settings: SamplingSettings, prompts: list[str],
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> EncodedPipeline:
    """Load the pipeline (no VAE), run the text encoders once per prompt of ``prompts``, free them
    and every other part but the denoiser, and move the denoiser to ``device``."""
    pipe = load_pipeline(info, dtype)
    model = getattr(pipe, info.denoiser)
    text = text_encoders_digest(pipe)
    log.info("EcoDiff: encoding %d prompts with the text encoders", len(prompts))
    encodings = encode_prompts(pipe, info, prompts, settings, device)
    free_text_encoders(pipe)
    model = model.to(device).eval()
    sigmas, eps = sigma_schedule(pipe, info, settings, model)
    del pipe
    gc.collect()
    return EncodedPipeline(model, encodings, sigmas, eps, text)
