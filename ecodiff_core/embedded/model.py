"""The embedded default text-to-image model: a small FLUX transformer + a tiny text encoder.

Rectified flow in sigma-space over the packed latent (B, 16, 4):
``x_sigma = (1 - sigma) * x0 + sigma * eps``; the transformer predicts ``v = eps - x0`` so that
``x0 = x - sigma * v``.  Sampling runs from sigma = 1 (pure noise) to sigma = 0.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .._compat import ensure_torchvision_importable
from ..denoisers import flow_denoiser, flow_sigmas
from ..errors import EcoDiffError, SettingsError, WeightsMissingError
from ..safetensors_file import read, write_atomic
from ..trajectory import Denoiser, sample
from .data import LATENT_SHAPE, image_ids, unpack
from .text import TextEncoderConfig, TinyTextEncoder

ensure_torchvision_importable()
from diffusers import FluxTransformer2DModel  # noqa: E402  (only after the guard above)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODEL_FILE = "default_model.safetensors"
FORMAT_VERSION = "1"

TRANSFORMER_CONFIG: dict = {
    "patch_size": 1,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),
}
TEXT_CONFIG = TextEncoderConfig(dim=64, layers=2, heads=4, mlp_ratio=2, max_length=10)


def build_transformer() -> FluxTransformer2DModel:
    """A randomly initialised transformer with the shipped architecture."""
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` noise levels from 1 to 0 (linear in t, then the FLUX/SD3 time shift)."""
    return flow_sigmas(steps, shift)


def initial_noise(n: int, seed: int) -> torch.Tensor:
    """x_T = eps at sigma = 1: (n, 16, 4) standard normal from a seeded CPU generator."""
    return torch.randn((n, *LATENT_SHAPE), generator=torch.Generator().manual_seed(seed))


class DefaultModel(nn.Module):
    """Transformer + text encoder; all sampling goes through :meth:`make_denoiser`."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = build_transformer()
        self.text_encoder = TinyTextEncoder(TEXT_CONFIG)
        self.register_buffer("img_ids", image_ids(), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(TEXT_CONFIG.max_length, 3), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.img_ids.device

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states (B, 10, 64) and pooled vectors (B, 64); differentiable (wrap in no_grad)."""
        return self.text_encoder(list(prompts))

    def _transformer_kwargs(self, tokens: torch.Tensor, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """The transformer's conditioning kwargs for token states (B, L, 64) and pooled vectors (B, 64)."""
        return {"encoder_hidden_states": tokens, "pooled_projections": pooled,
                "img_ids": self.img_ids, "txt_ids": self.txt_ids[: tokens.shape[1]]}

    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        tokens: torch.Tensor,
        pooled: torch.Tensor,
        transformer: nn.Module | None = None,
    ) -> torch.Tensor:
        """v = eps - x0 predicted at noise level ``sigma`` (scalar or (B,)) for packed ``x`` (B, 16, 4),
        without guidance: the training objective's forward.  Sampling goes through :meth:`make_denoiser`."""
        net = self.transformer if transformer is None else transformer
        timestep = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        kwargs = self._transformer_kwargs(tokens, pooled)
        return net(hidden_states=x, timestep=timestep, return_dict=False, **kwargs)[0]

    def make_denoiser(self, prompts: list[str], cfg: float, transformer: nn.Module | None = None) -> Denoiser:
        """x0-predictor ``(x, sigma) -> x0`` for ``len(prompts)`` latents, with CFG in one batch.

        The text is encoded once, without gradients; gradients flow through ``transformer`` (pass a
        pruned or gated copy to sample it with the same code).  ``cfg == 1`` skips the uncond branch.
        The engine's :func:`~ecodiff_core.denoisers.flow_denoiser` does the rest.
        """
        conditioning = self.conditioning(prompts, cfg)
        return self.denoiser_from_embeddings(conditioning["cond"], conditioning["uncond"], cfg, transformer)

    def conditioning(self, prompts: list[str], cfg: float) -> dict:
        """``{"cond": (tokens, pooled), "uncond": (tokens, pooled) or None}`` for ``prompts``, encoded
        without gradients; tensors have the prompt dimension first (stackable, see ``batching``)."""
        with torch.no_grad():
            cond = self.encode(list(prompts))
            uncond = self.encode([""] * len(prompts)) if cfg != 1.0 else None
        return {"cond": cond, "uncond": uncond}

    def batch_denoiser(self, cfg: float, transformer: nn.Module | None = None) -> Callable[[dict], Denoiser]:
        """Conditioning (from :meth:`conditioning`, several stacked) → denoiser: the
        ``batch_denoiser`` of batchable calibration samples."""
        def build(conditioning: dict) -> Denoiser:
            return self.denoiser_from_embeddings(conditioning["cond"], conditioning["uncond"], cfg, transformer)

        return build

    def denoiser_from_embeddings(
        self,
        cond: tuple[torch.Tensor, torch.Tensor],
        uncond: tuple[torch.Tensor, torch.Tensor] | None,
        cfg: float,
        transformer: nn.Module | None = None,
    ) -> Denoiser:
        """Like :meth:`make_denoiser` from precomputed (tokens, pooled) pairs; ``uncond`` may be
        None only when ``cfg == 1`` (SettingsError otherwise)."""
        if cfg != 1.0 and uncond is None:
            raise SettingsError("classifier-free guidance (cfg != 1) needs the unconditional embeddings; "
                                "pass uncond or use cfg = 1")
        net = self.transformer if transformer is None else transformer
        return flow_denoiser(net, self._transformer_kwargs(*cond),
                             self._transformer_kwargs(*uncond) if cfg != 1.0 else None, cfg)

    @torch.no_grad()
    def sample_latents(
        self,
        prompts: list[str],
        steps: int = 20,
        cfg: float = 1.5,
        seed: int = 0,
        transformer: nn.Module | None = None,
        shift: float = 1.0,
    ) -> torch.Tensor:
        """Euler sampling (:func:`~ecodiff_core.trajectory.sample`) from ``initial_noise(len(prompts),
        seed)`` over ``sigmas(steps, shift)``; returns packed x0 (B, 16, 4)."""
        denoise = self.make_denoiser(prompts, cfg, transformer)
        return sample(denoise, initial_noise(len(prompts), seed).to(self.device), sigmas(steps, shift).to(self.device))

    def sample(
        self,
        prompts: list[str],
        steps: int = 20,
        cfg: float = 1.5,
        seed: int = 0,
        transformer: nn.Module | None = None,
        shift: float = 1.0,
    ) -> torch.Tensor:
        """:meth:`sample_latents` as images (B, 1, 8, 8) in [-1, 1]."""
        return unpack(self.sample_latents(prompts, steps, cfg, seed, transformer, shift))


def _config_metadata() -> dict[str, str]:
    return {
        "format_version": FORMAT_VERSION,
        "transformer_config": json.dumps(TRANSFORMER_CONFIG),
        "text_encoder_config": json.dumps(asdict(TEXT_CONFIG)),
    }


def save_default_model(
    model: DefaultModel, path: Path | str, extra_metadata: dict[str, str] | None = None, fp16: bool = True
) -> None:
    """Write transformer + text encoder weights (fp16 by default) to one safetensors file."""
    dtype = torch.float16 if fp16 else torch.float32
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    write_atomic(path, tensors, {**_config_metadata(), **(extra_metadata or {})})


def load_default_model(path: Path | str | None = None, device: str | torch.device = "cpu") -> DefaultModel:
    """The shipped default model in float32 and eval mode (weights from ``embedded/weights/``)."""
    path = Path(path) if path is not None else WEIGHTS_DIR / MODEL_FILE
    if not path.is_file():
        raise WeightsMissingError(
            f"default model weights not found at {path}; regenerate them with "
            "`python scripts/train_default_model.py`"
        )
    tensors, meta = read(path, what="default model file")
    expected = _config_metadata()
    for key in ("transformer_config", "text_encoder_config"):
        if json.loads(meta.get(key, "null")) != json.loads(expected[key]):
            raise EcoDiffError(f"{path}: {key} in the file does not match the code; retrain the model "
                               "(`python scripts/train_default_model.py`)")
    model = DefaultModel()
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.to(device).eval().requires_grad_(False)
