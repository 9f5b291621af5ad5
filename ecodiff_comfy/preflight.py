"""Memory preflight for learning inside ComfyUI: estimate one learning step, compare it with the free
device memory ComfyUI reports, and stop before any compute when it cannot fit.

The estimate traces the project's own learning step (``ecodiff_core.memory.measure_learning_step``)
on a meta-device copy of the MODEL's diffusion module (same classes, shapes and weight dtypes; no
memory, no compute), called as ComfyUI's model_base calls it, with the latent and conditioning
shapes of this run and PyTorch's fused attention (what ComfyUI uses on NVIDIA GPUs).  Estimates
are cached per model layout and shapes.  ComfyUI is imported lazily, as in the rest of ``ecodiff_comfy``.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..ecodiff_core.errors import EcoDiffError
from ..ecodiff_core.learn import LearnSettings, use_block_checkpointing
from ..ecodiff_core.memory import (
    FP8_DTYPES,
    GB,
    StepMemory,
    estimate_step,
    fit_advice,
    measure_learning_step,
    meta_copy,
    weight_bytes,
)
from . import learning
from .sampling import grad_context
from .weights import diffusion_module, model_layout

log = logging.getLogger("ecodiff")


class InsufficientMemoryError(EcoDiffError):
    """One learning step would not fit in the free device memory."""


def _cond_tensor(cond: list) -> torch.Tensor:
    return cond[0][0]


def _dims(module: nn.Module) -> tuple[str, int, int | None]:
    """(family, context features, pooled/ADM features or None) of a ComfyUI diffusion module."""
    name = type(module).__name__
    if hasattr(module, "input_blocks"):  # UNetModel
        ctx = next((m.to_k.in_features for n, m in module.named_modules() if n.endswith("attn2")), None)
        adm = module.label_emb[0][0].in_features if getattr(module, "num_classes", None) == "sequential" else None
        return "unet", ctx or 1, adm
    if hasattr(module, "double_blocks"):  # Flux
        return "flux", module.txt_in.in_features, module.vector_in.in_layer.in_features
    if hasattr(module, "joint_blocks"):  # MMDiT
        embedder = module.context_embedder
        ctx = embedder.in_features if hasattr(embedder, "in_features") else module.hidden_size
        adm = module.y_embedder.mlp[0].in_features if module.y_embedder is not None else None
        return "mmdit", ctx, adm
    raise EcoDiffError(f"no memory preflight for a {name}")


def compute_dtype(model: Any) -> torch.dtype:
    base = model.model
    return base.manual_cast_dtype if base.manual_cast_dtype is not None else base.get_dtype()


def _attention_override():
    import comfy.ldm.modules.attention as attention

    def override(func, *args, **kwargs):
        return attention.attention_pytorch(*args, **kwargs)

    return override


def _meta_problem(model: Any, module: nn.Module, spec: Any, conds: Sequence[tuple[list, list]], prompts: int = 1):
    """(denoiser, x, sigmas) on meta for a step of this run: ``prompts`` calibration prompts per
    denoiser call (``LearnSettings.prompt_batch``), CFG batch, latent and context shapes."""
    family, ctx_dim, adm = _dims(module)
    dtype = compute_dtype(model)
    meta = dict(device="meta", dtype=dtype)
    cfg = spec.cfg != 1.0
    n = (2 if cfg else 1) * prompts
    channels = model.model.latent_format.latent_channels
    factor = getattr(model.model.latent_format, "spacial_downscale_ratio", 8)
    tokens = max(max(_cond_tensor(p).shape[1], _cond_tensor(q).shape[1]) for p, q in conds)
    x = torch.empty(prompts, channels, spec.height // factor, spec.width // factor, **meta)
    context = torch.empty(n, tokens, ctx_dim, **meta)
    extra: dict[str, Any] = {"transformer_options": {"optimized_attention_override": _attention_override()}}
    if adm is not None:
        extra["y"] = torch.empty(n, adm, **meta)
    if family == "flux" and getattr(getattr(module, "params", None), "guidance_embed", False):
        extra["guidance"] = torch.empty(n, **meta)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        batch = torch.cat([x, x]) if cfg else x
        out = module(batch, sigma.expand(n), context, **extra)
        x0 = batch - sigma * out
        if not cfg:
            return x0
        c, u = x0.chunk(2)
        return u + spec.cfg * (c - u)

    return denoise, x, torch.tensor([1.0, 0.5], **meta), (family, tokens, str(dtype))


def weight_dtype_name(module: nn.Module) -> str:
    dtypes = {p.dtype for p in module.parameters()}
    if dtypes & set(FP8_DTYPES):
        return "fp8"
    return "fp16" if torch.float16 in dtypes else "bf16" if torch.bfloat16 in dtypes else "fp32"


def prompts_per_step(settings: LearnSettings, conds: Sequence[tuple[list, list]]) -> int:
    """Calibration prompts one learning step runs at once: ``prompt_batch``, at most all of them."""
    return max(1, min(settings.prompt_batch, len(conds)))


def estimate(model: Any, spec: Any, conds: Sequence[tuple[list, list]],
             modes: tuple[bool, ...] = (False, True), prompts: int = 1) -> StepMemory:
    """Weights and activation peaks (without / with block checkpointing, the ``modes`` asked for) of
    one learning step of ``model`` for the latent size, CFG and prompts of ``spec``/``conds``, with
    ``prompts`` calibration prompts per denoiser call (``prompts_per_step``); cached per layout and
    shape.

    Raises EcoDiffError for a model the preflight cannot trace.
    """
    module = diffusion_module(model)
    layout = model_layout(model)
    with torch.inference_mode(False):
        copy = meta_copy(module)
        denoise, x, sigmas, shape_key = _meta_problem(model, copy, spec, conds, prompts)
        key = ("comfy", layout.fingerprint(), weight_dtype_name(module), tuple(x.shape), spec.cfg != 1.0, shape_key)

        def measure(block_checkpointing: bool) -> int:
            return measure_learning_step(copy, layout, denoise, x, sigmas, block_checkpointing,
                                         grad_context=grad_context)

        return estimate_step(key, lambda: weight_bytes(module), measure, modes)


def free_memory(model: Any) -> tuple[int, torch.device]:
    """Bytes ComfyUI reports free on the MODEL's load device (RAM on CPU)."""
    import comfy.model_management as mm

    device = model.load_device
    return int(mm.get_free_memory(device)), torch.device(device)


def check(model: Any, spec: Any, conds: Sequence[tuple[list, list]], settings: LearnSettings) -> LearnSettings:
    """Stop with ``InsufficientMemoryError`` if one learning step cannot fit; otherwise return the
    settings with ``block_checkpointing`` resolved to "on" or "off" ("auto": on only when the plain
    step would not fit on a GPU).  Nothing is computed on the device.

    The estimate counts the model's weights as resident (ComfyUI loads them fully for learning).
    """
    settings.validate()
    spec.validate()
    prompts = prompts_per_step(settings, conds)
    try:
        memory = estimate(model, spec, conds, (True,) if settings.block_checkpointing == "on" else (False, True),
                          prompts)
    except EcoDiffError:
        raise
    except Exception as exc:  # noqa: BLE001 — a model the trace cannot run: learning reports its own error
        log.warning("EcoDiff memory preflight skipped (%s: %s)", type(exc).__name__, exc)
        return dataclasses.replace(settings, block_checkpointing="off" if settings.block_checkpointing == "auto"
                                   else settings.block_checkpointing)
    free, device = free_memory(model)
    # ComfyUI may already hold this model's weights on the device: they are not free but are ours.
    loaded = _loaded_bytes(model)
    available = free + loaded
    blocks = use_block_checkpointing(settings.block_checkpointing, memory, available, device)
    need = memory.total(blocks)
    log.info("EcoDiff preflight: one learning step of %d prompt(s) needs about %.2f GB (weights %.2f, "
             "activations %.2f, block checkpointing %s); %.2f GB available", prompts, need / GB,
             memory.weights / GB, memory.activations(blocks) / GB, "on" if blocks else "off", available / GB)
    if need > available:
        what = f"{type(diffusion_module(model)).__name__} at {spec.width}×{spec.height}" \
               f"{' with CFG' if spec.cfg != 1.0 else ''}, {prompts} prompt(s) per step (prompt_batch)"
        fewer = f" Or lower prompt_batch (now {prompts}): each prompt in a step adds its own activations." \
            if prompts > 1 else ""
        raise InsufficientMemoryError(
            "EcoDiff stopped before learning: " +
            fit_advice(memory, available, blocks, weight_dtype_name(diffusion_module(model)), what) + fewer)
    return dataclasses.replace(settings, block_checkpointing="on" if blocks else "off")


def _loaded_bytes(model: Any) -> int:
    try:
        return int(model.loaded_size())
    except Exception:  # noqa: BLE001 — older/other patchers: count nothing as ours
        return 0


def learn_mask(model: Any, conds: Sequence[tuple[list, list]], spec: Any, settings: LearnSettings,
               **kwargs: Any) -> Any:
    """``learning.learn_mask`` after the memory preflight, which may stop it before any compute; the
    learner runs with ``block_checkpointing`` as the preflight resolved it ("auto" → "on"/"off")."""
    return learning.learn_mask(model, conds, spec, check(model, spec, conds, settings), **kwargs)
