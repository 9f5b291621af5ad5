"""Tiny random-weight models of ComfyUI's real SD1.5, SDXL, FLUX and SD3 classes, for tests.

Shared by the integration tests and by the server test's test-only node pack.  Nothing here is
imported by the node pack itself.  ``bootstrap()`` (from ``scripts/comfy_env.py``) makes ComfyUI
importable on a CPU-only machine; every builder calls it.  This file also works loaded alone from
its path (the test node pack inside a ComfyUI server, the shared reproducers): it then loads
``scripts/comfy_env.py`` from its file.

Built as ComfyUI itself does (``comfy.supported_models.<Arch>(unet_config).get_model``) because
ComfyUI's state-dict detection only recognises full-size models.  ``comfy.ops`` leaves weights
uninitialised, so every parameter is filled from a seeded generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

try:
    from scripts import comfy_env  # the repository root on sys.path (pytest's pythonpath)
except ImportError:  # loaded alone from this file: the environment module from its file, sys.path untouched
    import importlib.util
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location(
        "ecodiff_comfy_env", Path(__file__).resolve().parent.parent / "scripts" / "comfy_env.py")
    comfy_env = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(comfy_env)

bootstrap = comfy_env.bootstrap
ARCHS: tuple[str, ...] = ("sd15", "sdxl", "flux", "sd3")


@dataclass
class TinyModel:
    """A MODEL (ModelPatcher) plus matching positive/negative CONDITIONING and latent size."""

    arch: str
    model: Any
    positive: list
    negative: list
    latent_channels: int
    context_dim: int
    pooled_dim: int

    def empty_latent(self, size: int = 8, batch: int = 1) -> dict:
        return {"samples": torch.zeros(batch, self.latent_channels, size, size)}

    def conditioning(self, seed: int) -> list:
        return make_conditioning(self.arch, self.context_dim, self.pooled_dim, seed)


POOLED = 32


def unet_config(arch: str) -> dict:
    if arch == "sdxl":
        return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                "legacy": False, "num_classes": "sequential", "adm_in_channels": POOLED + 6 * 256,
                "in_channels": 4, "model_channels": 64, "num_res_blocks": [1, 1], "transformer_depth": [0, 1],
                "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
                "context_dim": 64, "num_head_channels": 32, "transformer_depth_output": [0, 0, 1, 1],
                "use_temporal_attention": False, "use_temporal_resblock": False}
    if arch == "sd15":
        return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 64,
                "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "channel_mult": [1, 2],
                "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 64,
                "num_heads": 2, "transformer_depth_output": [1, 1, 1, 1],
                "use_temporal_attention": False, "use_temporal_resblock": False}
    if arch == "flux":
        return {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
                "patch_size": 2, "vec_in_dim": POOLED, "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 4.0,
                "num_heads": 4, "depth": 1, "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000,
                "qkv_bias": True}
    if arch == "sd3":
        return {"in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "out_channels": 16,
                "depth": 2, "input_size": None, "adm_in_channels": POOLED,
                "context_embedder_config": {"target": "torch.nn.Linear",
                                            "params": {"in_features": 64, "out_features": 128}},
                "num_patches": 256, "pos_embed_max_size": 16, "x_block_self_attn_layers": []}
    raise ValueError(f"unknown tiny arch '{arch}'; choose one of {', '.join(ARCHS)}")


def model_config(arch: str) -> Any:
    import comfy.supported_models as sm
    import comfy.supported_models_base  # noqa: F401

    cfg_cls = {"sdxl": sm.SDXL, "sd15": sm.SD15, "flux": sm.Flux, "sd3": sm.SD3}[arch]
    cfg = cfg_cls(unet_config(arch))
    if arch == "sdxl":
        cfg.unet_config["num_head_channels"] = 32  # SDXL's extra config forces 64
    if arch == "sd15":
        cfg.unet_config["num_heads"] = 2
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def init_weights(module: torch.nn.Module, seed: int) -> None:
    """Deterministic small random weights: ComfyUI's ops leave them uninitialised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith(("scale", "weight")) and "norm" in name.lower():
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        for b in module.buffers():  # e.g. MMDiT's pos_embed, left as torch.empty
            if b.is_floating_point():
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def build_model(arch: str, seed: int = 0) -> Any:
    """A ModelPatcher around a freshly built tiny ``comfy.model_base`` model."""
    bootstrap()
    import comfy.model_management as mm
    import comfy.model_patcher

    cfg = model_config(arch)
    model = cfg.get_model({}, "", device=torch.device("cpu"))
    init_weights(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def dims(arch: str) -> tuple[int, int, int]:
    """(latent channels, context dim, pooled dim) of a tiny arch."""
    return {"sdxl": (4, 64, POOLED), "sd15": (4, 64, 0), "flux": (16, 64, POOLED), "sd3": (16, 64, POOLED)}[arch]


def make_conditioning(arch: str, context_dim: int, pooled_dim: int, seed: int, tokens: int = 6) -> list:
    """A CONDITIONING list as a text encoder would give: [[cross_attn, {pooled_output, …}]]."""
    gen = torch.Generator().manual_seed(seed)
    cross = torch.randn(1, tokens, context_dim, generator=gen)
    extra: dict[str, Any] = {}
    if pooled_dim:
        extra["pooled_output"] = torch.randn(1, pooled_dim, generator=gen)
    if arch == "flux":
        extra["guidance"] = 3.5
    return [[cross, extra]]


def tiny(arch: str, seed: int = 0) -> TinyModel:
    channels, context, pooled = dims(arch)
    mp = build_model(arch, seed)
    return TinyModel(arch, mp, make_conditioning(arch, context, pooled, 1000 + seed),
                     make_conditioning(arch, context, pooled, 2000 + seed), channels, context, pooled)


class TinyClip:
    """A stand-in CLIP: ``encode_from_tokens_scheduled`` turns a prompt into a deterministic
    CONDITIONING (hash-seeded), so nodes that take CLIP + text run on tiny models."""

    def __init__(self, arch: str) -> None:
        self.arch = arch
        _, self.context_dim, self.pooled_dim = dims(arch)

    def tokenize(self, text: str) -> dict:
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens: dict, add_dict: dict | None = None) -> list:
        import hashlib

        seed = int.from_bytes(hashlib.sha256(tokens["text"].encode()).digest()[:4], "little")
        return make_conditioning(self.arch, self.context_dim, self.pooled_dim, seed)


def sample(mp: Any, positive: list, negative: list, seed: int = 0, steps: int = 3, cfg: float = 2.0,
           size: int = 8, sampler: str = "euler", scheduler: str = "normal") -> torch.Tensor:
    """ComfyUI's own KSampler path (``comfy.sample.sample``, as ``nodes.common_ksampler`` does)."""
    import comfy.sample

    channels = mp.model.latent_format.latent_channels
    latent = torch.zeros(1, channels, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(mp, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               denoise=1.0, disable_pbar=True, seed=seed)


def build_model_precision(arch: str, seed: int, weight_dtype: torch.dtype, manual_cast: torch.dtype | None = None,
                          scaled_fp8: torch.dtype | None = None) -> Any:
    """Like ``build_model`` with weights stored as ComfyUI's loaders store them: in ``weight_dtype``
    (fp8 included), computed in ``manual_cast`` (None: in their own dtype), optionally as scaled fp8
    (Linear weights in ``scaled_fp8`` with float32 ``scale_weight``).  Filled in float32, then cast."""
    bootstrap()
    import comfy.model_management as mm
    import comfy.model_patcher

    cfg = model_config(arch)
    cfg.scaled_fp8 = scaled_fp8
    cfg.set_inference_dtype(weight_dtype, manual_cast)
    model = cfg.get_model({}, "", device=torch.device("cpu"))
    module = model.diffusion_model
    dtypes = {name: p.dtype for name, p in module.named_parameters()}
    for p in module.parameters():
        p.data = p.data.to(torch.float32)
    for b in module.buffers():
        if b.is_floating_point():
            b.data = b.data.to(torch.float32)
    init_weights(module, seed)
    for name, p in module.named_parameters():
        p.data = p.data.to(dtypes[name])
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())
