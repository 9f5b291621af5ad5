"""Full-size diffusers denoisers on the meta device (no weights, no downloads) for memory estimates.

The configs are the published ``config.json`` of each model's denoiser (UNet / transformer),
written out here.  ``step_memory(arch, …)`` traces one learning step of the model with
``memory.measure_learning_step`` and returns weights and activation peaks.

SD3.5 has no unit table in the engine yet; its trace gates every feed-forward neuron and AdaLN
channel (attention heads of the joint attention stay ungated) and checkpoints each
``JointTransformerBlock``, which is close to what a table would do.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ._compat import ensure_torchvision_importable
from .errors import EcoDiffError
from .memory import StepMemory, estimate_step, measure_learning_step, to_fp8, weight_bytes
from .units import Layout

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_SCHNELL = dict(FLUX_DEV, guidance_embeds=False)
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                  attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                  caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                  qk_norm="rms_norm")
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))


@dataclass(frozen=True)
class FullSizeArch:
    """A published denoiser: diffusers class, config, text tokens and its default compute dtype."""

    cls: str
    config: dict
    tokens: int
    family: str  # "unet" | "flux" | "sd3"


ARCHS: dict[str, FullSizeArch] = {
    "sd15": FullSizeArch("UNet2DConditionModel", SD15, 77, "unet"),
    "sdxl": FullSizeArch("UNet2DConditionModel", SDXL, 77, "unet"),
    "flux-dev": FullSizeArch("FluxTransformer2DModel", FLUX_DEV, 512, "flux"),
    "flux-schnell": FullSizeArch("FluxTransformer2DModel", FLUX_SCHNELL, 256, "flux"),
    "sd35-large": FullSizeArch("SD3Transformer2DModel", SD35_LARGE, 333, "sd3"),
    "sd35-medium": FullSizeArch("SD3Transformer2DModel", SD35_MEDIUM, 333, "sd3"),
}
WEIGHT_DTYPES = ("bf16", "fp16", "fp8")


def _arch(name: str) -> FullSizeArch:
    if name not in ARCHS:
        raise EcoDiffError(f"unknown architecture '{name}'; choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


def compute_dtype(arch: str, weight_dtype: str) -> torch.dtype:
    """fp16 weights compute in fp16; bf16 and fp8 weights compute in bf16."""
    return torch.float16 if weight_dtype == "fp16" else torch.bfloat16


def build_meta(arch: str, weight_dtype: str = "bf16") -> nn.Module:
    """The full-size denoiser with meta tensors (shapes only), weights in ``weight_dtype``."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise EcoDiffError(f"unknown weight dtype '{weight_dtype}'; choose one of {', '.join(WEIGHT_DTYPES)}")
    spec = _arch(arch)
    ensure_torchvision_importable()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    with torch.device("meta"):
        model = getattr(diffusers, spec.cls)(**spec.config)
    model = model.to(compute_dtype(arch, weight_dtype)).eval()
    if weight_dtype == "fp8":
        to_fp8(model)
    return model


def _sd3_layout(model: nn.Module) -> tuple[Layout, list[str]]:
    from .archs.diffusers_blocks import feedforward_group
    from .archs.shared import has_class, modulation_group

    groups, blocks = [], []
    for i, block in enumerate(model.transformer_blocks):
        path = f"transformer_blocks.{i}"
        blocks.append(path)
        groups.append(modulation_group(block.norm1.linear, f"{path}.norm1.linear", path))
        for name in ("ff", "ff_context"):
            ff = getattr(block, name, None)
            if ff is not None and has_class(ff, "FeedForward"):
                group = feedforward_group(ff, f"{path}.{name}", path)
                if group is not None:
                    groups.append(group)
    return Layout(arch="diffusers_sd3_estimate", groups=tuple(groups)), blocks


def _problem(arch: str, model: nn.Module, width: int, height: int, batch: int, cfg: bool):
    """(layout, block paths or None, denoiser, x, sigmas) for one step at this size."""
    from . import denoisers
    from .archs import find_layout

    spec = _arch(arch)
    dtype = next(p.dtype for p in model.parameters() if p.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2))
    meta = dict(device="meta", dtype=dtype)
    if width % 16 or height % 16 or width < 16 or height < 16:
        raise EcoDiffError(f"width and height must be positive multiples of 16, got {width}×{height}")
    h, w = height // 8, width // 8
    sigmas = torch.tensor([1.0, 0.5], **meta)

    if spec.family == "unet":
        cond = {"encoder_hidden_states": torch.empty(batch, spec.tokens, spec.config["cross_attention_dim"], **meta)}
        if spec.config.get("addition_embed_type") == "text_time":
            cond["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, 1280, **meta),
                                         "time_ids": torch.empty(batch, 6, **meta)}
        uncond = dict(cond) if cfg else None
        denoise = denoisers.unet_eps_denoiser(model, denoisers.EpsSchedule.scaled_linear(), cond, uncond, cfg=5.0)
        x = torch.empty(batch, 4, h, w, **meta)
        layout = find_layout(model)
        return layout, None, denoise, x, sigmas
    if spec.family == "flux":
        tokens = (h // 2) * (w // 2)
        cond = {"encoder_hidden_states": torch.empty(batch, spec.tokens, 4096, **meta),
                "pooled_projections": torch.empty(batch, 768, **meta),
                "img_ids": torch.empty(tokens, 3, **meta), "txt_ids": torch.empty(spec.tokens, 3, **meta)}
        if spec.config.get("guidance_embeds"):
            cond["guidance"] = torch.empty(batch, **meta)
        uncond = dict(cond) if cfg else None
        denoise = denoisers.flow_denoiser(model, cond, uncond, cfg=3.5)
        x = torch.empty(batch, tokens, 64, **meta)
        return find_layout(model), None, denoise, x, sigmas
    cond = {"encoder_hidden_states": torch.empty(batch, spec.tokens, spec.config["joint_attention_dim"], **meta),
            "pooled_projections": torch.empty(batch, spec.config["pooled_projection_dim"], **meta)}
    denoise = denoisers.flow_denoiser(model, cond, dict(cond) if cfg else None, cfg=4.5, timestep_scale=1000.0)
    layout, blocks = _sd3_layout(model)
    return layout, blocks, denoise, torch.empty(batch, 16, h, w, **meta), sigmas


@dataclass(frozen=True)
class MemoryReport:
    arch: str
    width: int
    height: int
    batch: int
    cfg: bool
    weight_dtype: str
    memory: StepMemory
    seconds: float


def step_memory(arch: str, width: int = 1024, height: int = 1024, batch: int = 1, cfg: bool = False,
                weight_dtype: str = "bf16", modes: tuple[bool, ...] = (False, True)) -> MemoryReport:
    """Weights and activation peaks (plain, block-checkpointed: the ``modes`` asked for) of one
    learning step of ``arch``.

    Traced on the meta device; cached per (arch, size, batch, CFG, weight dtype, mode).  ``seconds``
    is the wall time of building and tracing.
    """
    if batch < 1:
        raise EcoDiffError(f"batch must be >= 1, got {batch}")
    start = time.perf_counter()
    model = build_meta(arch, weight_dtype)
    layout, blocks, denoise, x, sigmas = _problem(arch, model, width, height, batch, cfg)

    def measure(block_checkpointing: bool) -> int:
        return measure_learning_step(model, layout, denoise, x, sigmas, block_checkpointing, block_paths=blocks)

    key = ("fullsize", arch, layout.fingerprint(), tuple(x.shape), batch, cfg, weight_dtype)
    memory = estimate_step(key, lambda: weight_bytes(model), measure, modes)
    return MemoryReport(arch, width, height, batch, cfg, weight_dtype, memory, time.perf_counter() - start)


def memory_table(report: MemoryReport, block_checkpointing: bool | None) -> str:
    """Plain-text lines: weights, activations and total in GB (both modes when None)."""
    from .memory import GB

    m = report.memory
    head = (f"{report.arch} {report.width}x{report.height}, batch {report.batch}"
            f"{' x2 (CFG)' if report.cfg else ''}, {report.weight_dtype} weights — one learning step:")
    lines = [head, f"  weights:      {m.weights / GB:6.2f} GB"]
    modes = [False, True] if block_checkpointing is None else [block_checkpointing]
    for mode in modes:
        if (m.activations_blocks if mode else m.activations_plain) is None:
            continue
        label = "block checkpointing " + ("on" if mode else "off")
        lines.append(f"  activations:  {m.activations(mode) / GB:6.2f} GB  ({label})")
        lines.append(f"  total:        {m.total(mode) / GB:6.2f} GB  ({label})")
    if block_checkpointing is False and m.activations_blocks is not None and \
            m.activations_blocks < m.activations_plain:
        lines.append(f"  with block checkpointing on: {m.total(True) / GB:.2f} GB "
                     f"(activations {m.activations_blocks / GB:.2f} GB instead of {m.activations_plain / GB:.2f} GB)")
    lines.append(f"  (estimated from a meta-device trace in {report.seconds:.1f} s; add CUDA context/allocator "
                 "overhead of roughly 0.5-1 GB)")
    return "\n".join(lines)
