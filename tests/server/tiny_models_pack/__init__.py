"""Test-only ComfyUI node pack: tiny real ComfyUI models (MODEL, CLIP, VAE) with seeded random weights.

Loaded by the server and browser tests (symlinked into a temporary ``custom_nodes``); never shipped.
The denoisers are ComfyUI's own SD1.5 / SDXL / FLUX / SD3 classes built from tiny configs by
``tests/comfy_tiny.py``; the CLIP is ``comfy_tiny.TinyClip`` (deterministic conditioning per prompt,
accepted by the stock CLIPTextEncode); the VAE is a real ``comfy.sd.VAE`` around a tiny AutoencoderKL
(8x upscale, 4 or 16 latent channels).  The loaders mirror the stock ones' outputs so that example
workflows can run with their loaders swapped for these:

    CheckpointLoaderSimple -> EcoDiffTinyCheckpointLoader (MODEL, CLIP, VAE)
    UNETLoader             -> EcoDiffTinyUNETLoader (MODEL)
    DualCLIPLoader / TripleCLIPLoader / CLIPLoader -> EcoDiffTinyCLIPLoader (CLIP)
    VAELoader              -> EcoDiffTinyVAELoader (VAE)
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_TINY_FILE = Path(__file__).resolve().parent.parent.parent / "comfy_tiny.py"
_TINY_NAME = "ecodiff_test_comfy_tiny"


def _comfy_tiny():
    """``tests/comfy_tiny.py`` under a private module name (keeps tests/ off ComfyUI's sys.path)."""
    if _TINY_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(_TINY_NAME, _TINY_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_TINY_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[_TINY_NAME]


ARCHS = ["sdxl", "sd15", "flux", "sd3"]
_CACHE: dict[tuple, object] = {}


def tiny_model(arch: str, seed: int):
    key = ("model", arch, seed)
    if key not in _CACHE:
        _CACHE[key] = _comfy_tiny().build_model(arch, seed)
    return _CACHE[key]


def tiny_clip(arch: str):
    key = ("clip", arch)
    if key not in _CACHE:
        _CACHE[key] = _comfy_tiny().TinyClip(arch)
    return _CACHE[key]


def tiny_vae(arch: str, seed: int = 0):
    key = ("vae", arch, seed)
    if key not in _CACHE:
        import comfy.sd
        from comfy.ldm.models.autoencoder import AutoencoderKL

        channels = _comfy_tiny().dims(arch)[0]
        params = {"embed_dim": channels,
                  "ddconfig": {"double_z": True, "z_channels": channels, "resolution": 64, "in_channels": 3,
                               "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                               "attn_resolutions": [], "dropout": 0.0}}
        ae = AutoencoderKL(**params)
        _comfy_tiny().init_weights(ae, seed)
        vae = comfy.sd.VAE(sd=ae.state_dict(), config={"params": params})
        vae.latent_channels = channels
        _CACHE[key] = vae
    return _CACHE[key]


_ARCH = (ARCHS, {"default": "sdxl", "tooltip": "Which tiny ComfyUI architecture to build."})
_SEED = ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": False,
                 "tooltip": "Seed of the random weights."})


class _TinyLoader:
    """What the loaders share: category, entry point, and required inputs from ``INPUTS``."""

    CATEGORY = "EcoDiff/testing"
    FUNCTION = "load"
    INPUTS: dict = {"arch": _ARCH}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": dict(cls.INPUTS)}


class EcoDiffTinyCheckpointLoader(_TinyLoader):
    DESCRIPTION = "TEST ONLY: a tiny random-weight checkpoint (MODEL, CLIP, VAE) of a real ComfyUI architecture."
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    INPUTS = {"arch": _ARCH, "seed": _SEED}

    def load(self, arch, seed):
        return tiny_model(arch, seed), tiny_clip(arch), tiny_vae(arch)


class EcoDiffTinyUNETLoader(_TinyLoader):
    DESCRIPTION = "TEST ONLY: a tiny random-weight diffusion model of a real ComfyUI architecture."
    RETURN_TYPES = ("MODEL",)
    INPUTS = {"arch": _ARCH, "seed": _SEED}

    def load(self, arch, seed):
        return (tiny_model(arch, seed),)


class EcoDiffTinyCLIPLoader(_TinyLoader):
    DESCRIPTION = "TEST ONLY: a stand-in text encoder giving deterministic conditioning for a tiny architecture."
    RETURN_TYPES = ("CLIP",)

    def load(self, arch):
        return (tiny_clip(arch),)


class EcoDiffTinyVAELoader(_TinyLoader):
    DESCRIPTION = "TEST ONLY: a tiny random-weight VAE (real comfy.sd.VAE) for a tiny architecture."
    RETURN_TYPES = ("VAE",)

    def load(self, arch):
        return (tiny_vae(arch),)


NODE_CLASS_MAPPINGS = {
    "EcoDiffTinyCheckpointLoader": EcoDiffTinyCheckpointLoader,
    "EcoDiffTinyUNETLoader": EcoDiffTinyUNETLoader,
    "EcoDiffTinyCLIPLoader": EcoDiffTinyCLIPLoader,
    "EcoDiffTinyVAELoader": EcoDiffTinyVAELoader,
}


class _UpscaleModelLoaderPlaceholder:
    """Stands in for the stock UpscaleModelLoader where it failed to import (``spandrel`` missing).

    ComfyUI frontend 1.27.10 registers default model providers for a fixed list of loader nodes and
    throws (``Cannot read properties of undefined (reading 'name')``) while building the combo widget
    of ANY loader (CheckpointLoaderSimple, VAELoader, UNETLoader) when one of them, UpscaleModelLoader,
    is absent from /object_info.  Only registered when the real node is missing; never executed.
    """

    CATEGORY = "loaders"
    RETURN_TYPES = ("UPSCALE_MODEL",)
    FUNCTION = "load_model"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"model_name": (folder_paths.get_filename_list("upscale_models"),)}}

    def load_model(self, model_name):
        raise RuntimeError("placeholder registered by the EcoDiff test pack: install spandrel for upscale models")


def _stock_node_missing(name: str) -> bool:
    try:
        import nodes  # ComfyUI's nodes.py (this pack is only ever loaded by a ComfyUI server)
    except ImportError:
        return False
    return name not in getattr(nodes, "NODE_CLASS_MAPPINGS", {name: None})


if _stock_node_missing("UpscaleModelLoader"):
    NODE_CLASS_MAPPINGS["UpscaleModelLoader"] = _UpscaleModelLoaderPlaceholder

NODE_DISPLAY_NAME_MAPPINGS = {k: k.replace("EcoDiffTiny", "Tiny ") + " (EcoDiff tests)"
                              for k in NODE_CLASS_MAPPINGS if k.startswith("EcoDiffTiny")}
