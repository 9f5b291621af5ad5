"""Tiny random-weight diffusers models (SD1.5-like, SDXL-like, FLUX-like, SD3.5-like) and example inputs.

Reusable by any unit test: ``build(name, dtype)`` returns ``(model, inputs)`` where
``model(**inputs)`` runs one forward pass.  Weights are seeded, so two builds are identical.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ecodiff_core._compat import ensure_torchvision_importable

MODEL_NAMES: tuple[str, ...] = ("sd15", "sdxl", "flux")
# SD3 (MMDiT) joins the table and slicing tests; the other suites' harnesses know the three above
TABLE_MODEL_NAMES: tuple[str, ...] = MODEL_NAMES + ("sd3",)

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads
# contend so badly that one 8×8 UNet forward takes seconds instead of ~15 ms.
torch.set_num_threads(1)


def diffusers_module():
    ensure_torchvision_importable()
    import diffusers
    diffusers.utils.logging.set_verbosity_error()  # silences the float32-modules notice of .to()
    return diffusers


def _randomise(model: nn.Module, seed: int) -> None:
    """Replace the init with seeded noise of a moderate scale (zero-init layers made non-zero too,
    so that every unit really contributes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[-1] if p.ndim > 1 else 1
            scale = 0.1 if p.ndim == 1 else fan_in ** -0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


#: what the tiny SD1.5- and SDXL-like UNets share: two 8x8 levels of cross-attention blocks
_TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                  norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24)


def tiny_sd15() -> nn.Module:
    return diffusers_module().UNet2DConditionModel(
        **_TINY_UNET, attention_head_dim=2,  # diffusers' misnomer: number of heads
    )


def tiny_sdxl() -> nn.Module:
    return diffusers_module().UNet2DConditionModel(
        **_TINY_UNET, transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=12 + 6 * 4,
    )


def tiny_flux() -> nn.Module:
    d = diffusers_module()
    return d.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=3, joint_attention_dim=12, pooled_projection_dim=10,
        axes_dims_rope=(2, 2, 4),
    )


def tiny_sd3() -> nn.Module:
    """SD3.5-like: dual attention in the first block, RMS q/k norms; the last block is context pre-only."""
    d = diffusers_module()
    return d.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=3, joint_attention_dim=12, caption_projection_dim=24, pooled_projection_dim=10,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
    )


def _unet_inputs(model: nn.Module, dtype: torch.dtype, g: torch.Generator, sdxl: bool) -> dict[str, Any]:
    inputs = {
        "sample": torch.randn(2, 4, 8, 8, generator=g, dtype=dtype),
        "timestep": torch.tensor([10.0, 500.0], dtype=dtype),
        "encoder_hidden_states": torch.randn(2, 5, 24, generator=g, dtype=dtype),
        "return_dict": False,
    }
    if sdxl:
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 12, generator=g, dtype=dtype),
                                       "time_ids": torch.randn(2, 6, generator=g, dtype=dtype)}
    return inputs


def _flux_inputs(model: nn.Module, dtype: torch.dtype, g: torch.Generator) -> dict[str, Any]:
    n_img, n_txt = 16, 5
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                         indexing="ij"), -1).reshape(-1, 3)
    return {
        "hidden_states": torch.randn(2, n_img, 4, generator=g, dtype=dtype),
        "encoder_hidden_states": torch.randn(2, n_txt, 12, generator=g, dtype=dtype),
        "pooled_projections": torch.randn(2, 10, generator=g, dtype=dtype),
        "timestep": torch.tensor([0.3, 0.8], dtype=dtype),
        "img_ids": img_ids.to(dtype),
        "txt_ids": torch.zeros(n_txt, 3, dtype=dtype),
        "return_dict": False,
    }


def _sd3_inputs(model: nn.Module, dtype: torch.dtype, g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g, dtype=dtype),
        "encoder_hidden_states": torch.randn(2, 5, 12, generator=g, dtype=dtype),
        "pooled_projections": torch.randn(2, 10, generator=g, dtype=dtype),
        "timestep": torch.tensor([300.0, 800.0], dtype=dtype),
        "return_dict": False,
    }


BUILDERS: dict[str, Callable[[], nn.Module]] = {"sd15": tiny_sd15, "sdxl": tiny_sdxl, "flux": tiny_flux,
                                                "sd3": tiny_sd3}
INPUTS = {"flux": _flux_inputs, "sd3": _sd3_inputs}


def build(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A seeded tiny model in eval mode and example inputs for one forward pass."""
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    _randomise(model, seed)
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = INPUTS[name](model, dtype, g) if name in INPUTS else _unet_inputs(model, dtype, g, name == "sdxl")
    return model, inputs


def run(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """One forward pass returning the output tensor."""
    with torch.no_grad():
        return model(**inputs)[0]


def must_keep_layout(layout, n: int):
    """``layout`` where every group must keep ``min(n, count)`` units (and so has no ``empty``
    replacement): the engine's rule for owners that cannot run emptied, on every kind of group."""
    import dataclasses

    from ecodiff_core.units import Layout

    return Layout(arch=layout.arch, groups=tuple(dataclasses.replace(g, min_keep=min(n, g.count), empty=None)
                                                 for g in layout.groups))
