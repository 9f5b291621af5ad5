"""The embedded digits model (``ecodiff_core.embedded``) as real ComfyUI MODEL, CLIP and VAE objects.

ComfyUI-side only (this module imports ComfyUI lazily, like the rest of ``ecodiff_comfy``).  What is built:

- **MODEL**: ComfyUI's own FLUX class (``comfy.model_base.Flux`` around ``comfy.ldm.flux.model.Flux``)
  from :class:`EcoDiffDemoFlux`, a small ``comfy.supported_models.Flux`` subclass with the shipped
  architecture, and the shipped diffusers weights converted by ComfyUI's own diffusers→FLUX key map
  (``comfy.model_detection.convert_diffusers_mmdit``).  The diffusers model packs the 8×8 image into
  16 tokens of 2×2 pixels (patch_size 1, 4 channels); ComfyUI's FLUX packs 2×2 patches itself, so the
  same weights read a **1-channel 8×8 latent that is the digit image itself** (patch_size 2, 1 channel,
  values in [-1, 1]).  Sampling is rectified flow in σ-space without time shift (``ModelSamplingFlux``
  with μ = 0, i.e. σ = t, the embedded model's ``sigmas(shift=1)``) and no guidance embedding.
- **CLIP**: a real ``comfy.sd.CLIP`` (ModelPatcher, memory management, clone) whose tokenizer is the
  embedded word-level tokenizer and whose encoder is the shipped jointly trained text encoder: token
  states (B, 10, 64) as ``cond`` and the pooled vector (B, 64) as ``pooled_output``.  One prompt per
  non-empty line: a multi-line text gives a batch of conditionings, and ComfyUI gives image ``i`` of a
  batch the line ``i mod lines`` — one stock KSampler then draws several digits at once.
- **VAE**: :class:`DemoVAE` maps the 8×8 latent to a 64×64 grey IMAGE (nearest ×8) and back (8×8 area
  mean), so ``EmptyLatentImage`` at 64×64 gives the model's 8×8 latent.

The digit judge reads IMAGE batches in ``demo_judge``.
"""
from __future__ import annotations

import logging
from functools import cache
from typing import Any

import torch
from torch import nn

from ..ecodiff_core.embedded.data import PATCH
from ..ecodiff_core.embedded.model import MODEL_FILE, TEXT_CONFIG, TRANSFORMER_CONFIG, WEIGHTS_DIR, WeightsMissingError
from ..ecodiff_core.embedded.text import PAD_ID, TinyTextEncoder, Tokenizer
from ..ecodiff_core.errors import EcoDiffError
from ..ecodiff_core.safetensors_file import read

log = logging.getLogger("ecodiff")

#: pixels per latent pixel of the displayed IMAGE (8×8 latent → 64×64 image)
DISPLAY_SCALE = 8
#: the embedded model's flow schedule: σ = t (SD3 shift 1 = ModelSamplingFlux μ = 0), σ-space timesteps
SAMPLING_SETTINGS = {"shift": 0.0, "multiplier": 1.0}
TOKENS_KEY = "ecodiff_digits"


def unet_config() -> dict:
    """ComfyUI FLUX ``unet_config`` of the shipped transformer (2×2 patches of a 1-channel latent)."""
    t = TRANSFORMER_CONFIG
    channels = t["in_channels"] // (PATCH * PATCH)
    return {
        "image_model": "flux", "guidance_embed": bool(t["guidance_embeds"]),
        "in_channels": channels, "out_channels": t["out_channels"] // (PATCH * PATCH), "patch_size": PATCH,
        "vec_in_dim": t["pooled_projection_dim"], "context_in_dim": t["joint_attention_dim"],
        "hidden_size": t["num_attention_heads"] * t["attention_head_dim"], "mlp_ratio": 4.0,
        "num_heads": t["num_attention_heads"], "depth": t["num_layers"],
        "depth_single_blocks": t["num_single_layers"], "axes_dim": list(t["axes_dims_rope"]), "theta": 10000,
        "qkv_bias": True,
    }


def _shipped_state_dict() -> dict[str, torch.Tensor]:
    path = WEIGHTS_DIR / MODEL_FILE
    if not path.is_file():
        raise WeightsMissingError(f"the demo model's weights are missing ({path}); reinstall the pack or "
                                  "regenerate them with `python scripts/train_default_model.py`")
    return {k: v.float() for k, v in read(path, what="demo model file")[0].items()}


def _split(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def comfy_flux_state_dict(diffusers_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers ``FluxTransformer2DModel`` keys → ComfyUI FLUX keys, by ComfyUI's own converter.

    Raises EcoDiffError if any key is left unconverted (the converter and the weights disagree).
    """
    import comfy.model_detection

    sd = dict(diffusers_sd)
    out = comfy.model_detection.convert_diffusers_mmdit(sd, "")
    if out is None or sd:
        raise EcoDiffError(f"ComfyUI's diffusers→FLUX converter left keys unconverted: {sorted(sd)[:5]}; "
                           "this ComfyUI version does not fit the pack's demo model")
    return out


# --------------------------------------------------------------------------------------------
# MODEL
# --------------------------------------------------------------------------------------------
@cache
def _config_classes() -> tuple[type, type]:
    import comfy.latent_formats
    import comfy.supported_models

    class EcoDiffDigitsLatent(comfy.latent_formats.LatentFormat):
        """The demo model's latent: the 8×8 digit image itself, 1 channel in [-1, 1] (no scaling)."""

        latent_channels = 1
        latent_dimensions = 2
        spacial_downscale_ratio = DISPLAY_SCALE
        scale_factor = 1.0

        def __init__(self) -> None:
            self.latent_rgb_factors = [[0.5, 0.5, 0.5]]  # grey previews: (x + 1) / 2
            self.latent_rgb_factors_bias = [0.5, 0.5, 0.5]

    class EcoDiffDemoFlux(comfy.supported_models.Flux):
        """The embedded digits model as a ComfyUI FLUX model config."""

        unet_config = {"image_model": "flux", "guidance_embed": False, "in_channels": 1, "patch_size": 2}
        sampling_settings = dict(SAMPLING_SETTINGS)
        latent_format = EcoDiffDigitsLatent
        memory_usage_factor = 1.0
        supported_inference_dtypes = [torch.float32, torch.bfloat16, torch.float16]

        def clip_target(self, state_dict={}):  # noqa: B006  (ComfyUI's signature)
            return demo_clip_target()

    return EcoDiffDemoFlux, EcoDiffDigitsLatent


def model_config_classes() -> dict[str, type]:
    """The pack's own ComfyUI model-config classes by name (for rebuilding saved pruned models)."""
    cfg_cls, _ = _config_classes()
    return {cfg_cls.__name__: cfg_cls}


def load_demo_model(dtype: torch.dtype = torch.float32) -> Any:
    """A NEW ModelPatcher around ComfyUI's FLUX class with the shipped weights (fp32 by default)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    cfg_cls, _ = _config_classes()
    cfg = cfg_cls(unet_config())
    cfg.set_inference_dtype(dtype, None)
    base = cfg.get_model({}, "", device=torch.device("cpu"))
    weights = comfy_flux_state_dict(_split(_shipped_state_dict(), "transformer."))
    missing, unexpected = base.diffusion_model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise EcoDiffError(f"the demo weights do not fit ComfyUI's FLUX class: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    base.diffusion_model.to(dtype)
    base.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------
class DemoTokenizer:
    """ComfyUI tokenizer interface over the embedded word-level tokenizer.

    ``tokenize_with_weights`` returns ``{"ecodiff_digits": rows}``, one row of ``(id, 1.0)`` pairs
    (length 10, ``<pad>``-filled) per non-empty line of the text (one row for an empty text).
    Prompt weights such as ``(word:1.2)`` are not supported: the text is read as plain words.
    """

    def __init__(self, embedding_directory=None, tokenizer_data={}) -> None:  # noqa: B006
        self.tokenizer = Tokenizer(TEXT_CONFIG.max_length)

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        lines = [line.strip() for line in str(text).splitlines() if line.strip()] or [""]
        ids, _ = self.tokenizer(lines)
        rows = []
        for row in ids.tolist():
            rows.append([(t, 1.0, i) if return_word_ids else (t, 1.0) for i, t in enumerate(row)])
        return {TOKENS_KEY: rows}

    def untokenize(self, token_weight_pair):
        return token_weight_pair

    def state_dict(self) -> dict:
        return {}


class DemoTextEncoder(nn.Module):
    """ComfyUI text-encoder interface (``encode_token_weights``) over the shipped TinyTextEncoder.

    Returns ``cond`` (B, 10, 64) token states (padding zeroed) and ``pooled`` (B, 64), B = rows.
    """

    def __init__(self, device=None, dtype=None, model_options={}) -> None:  # noqa: B006
        super().__init__()
        self.text_encoder = TinyTextEncoder(TEXT_CONFIG).to(device=device or "cpu")
        self.dtypes = {torch.float32}

    def reset_clip_options(self) -> None:
        pass

    def set_clip_options(self, options: dict) -> None:
        pass  # no layers to skip, no projection: CLIP Set Last Layer has no effect on this encoder

    def encode_token_weights(self, tokens: dict) -> tuple[torch.Tensor, torch.Tensor]:
        rows = tokens.get(TOKENS_KEY) if isinstance(tokens, dict) else None
        if not rows:
            raise EcoDiffError("these tokens do not come from the EcoDiff demo CLIP; encode the prompt with the "
                               "CLIP of the EcoDiff Demo Model node")
        device = self.text_encoder.pos.device
        ids = torch.tensor([[int(t[0]) for t in row] for row in rows], dtype=torch.long, device=device)
        tokens_out, pooled = self.text_encoder.encode_ids(ids, ids != PAD_ID)
        return tokens_out.float().cpu(), pooled.float().cpu()

    def load_sd(self, sd: dict[str, torch.Tensor]):
        return self.text_encoder.load_state_dict(_split(sd, "text_encoder.") or sd, strict=True)


def demo_clip_target() -> Any:
    import comfy.supported_models_base

    return comfy.supported_models_base.ClipTarget(DemoTokenizer, DemoTextEncoder)


def load_demo_clip() -> Any:
    """A NEW ``comfy.sd.CLIP`` whose encoder is the shipped text encoder (float32)."""
    import comfy.sd

    sd = _split(_shipped_state_dict(), "text_encoder.")
    clip = comfy.sd.CLIP(demo_clip_target(), parameters=sum(v.numel() for v in sd.values()),
                         model_options={"dtype": torch.float32})
    clip.cond_stage_model.text_encoder.load_state_dict(sd, strict=True)
    clip.cond_stage_model.eval().requires_grad_(False)
    return clip


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------
class DemoVAE:
    """The demo model's "VAE": latent (B, 1, h, w) in [-1, 1] ↔ grey IMAGE (B, 8h, 8w, 3) in [0, 1].

    ``decode`` clamps to [-1, 1], maps to [0, 1] and upscales ×8 (nearest); ``encode`` takes the mean
    of the RGB channels and the mean of each 8×8 block (exact inverse of ``decode`` on its own images).
    """

    latent_channels = 1
    latent_dim = 2
    output_channels = 3
    downscale_ratio = DISPLAY_SCALE
    upscale_ratio = DISPLAY_SCALE
    working_dtypes = [torch.float32]
    not_video = True

    def throw_exception_if_invalid(self) -> None:
        pass

    def spacial_compression_decode(self) -> int:
        return DISPLAY_SCALE

    def spacial_compression_encode(self) -> int:
        return DISPLAY_SCALE

    def temporal_compression_decode(self):
        return None

    def decode(self, samples: torch.Tensor, **kwargs) -> torch.Tensor:
        if samples.ndim != 4 or samples.shape[1] != 1:
            raise EcoDiffError(f"the demo VAE decodes 1-channel latents (B, 1, h, w) of the EcoDiff demo model, "
                               f"got shape {tuple(samples.shape)}")
        x = (samples.float().cpu().clamp(-1.0, 1.0) + 1.0) / 2.0
        x = torch.nn.functional.interpolate(x, scale_factor=DISPLAY_SCALE, mode="nearest")
        return x.movedim(1, -1).expand(-1, -1, -1, 3).contiguous()

    def decode_tiled(self, samples: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.decode(samples)

    def encode(self, pixels: torch.Tensor, **kwargs) -> torch.Tensor:
        if pixels.ndim != 4:
            raise EcoDiffError(f"the demo VAE encodes IMAGE batches (B, H, W, C), got shape {tuple(pixels.shape)}")
        b, h, w, _ = pixels.shape
        if h < DISPLAY_SCALE or w < DISPLAY_SCALE:
            raise EcoDiffError(f"images must be at least {DISPLAY_SCALE}×{DISPLAY_SCALE} pixels, got {w}×{h}")
        grey = pixels[..., :3].float().cpu().mean(-1, keepdim=True).movedim(-1, 1)
        latent = torch.nn.functional.adaptive_avg_pool2d(grey, (h // DISPLAY_SCALE, w // DISPLAY_SCALE))
        return latent * 2.0 - 1.0

    def encode_tiled(self, pixels: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.encode(pixels)

    def get_sd(self) -> dict:
        return {}


def load_demo() -> tuple[Any, Any, DemoVAE]:
    """(MODEL, CLIP, VAE) of the embedded digits model, all new objects."""
    return load_demo_model(), load_demo_clip(), DemoVAE()


__all__ = ["DemoTextEncoder", "DemoTokenizer", "DemoVAE", "comfy_flux_state_dict", "load_demo", "load_demo_clip",
           "load_demo_model", "model_config_classes", "unet_config"]
