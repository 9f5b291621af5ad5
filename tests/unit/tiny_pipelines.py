"""Tiny random-weight diffusers pipelines (SD1.5, SDXL, SD3, FLUX) saved to disk, built offline.

Tokenizers are made here too: a CLIP BPE tokenizer from a letters-only vocabulary (no merges) and a
T5 tokenizer from a ``tokenizers`` Unigram model over the same letters.  ``save(kind, folder)``
writes a pipeline folder that ``DiffusionPipeline.from_pretrained(folder, local_files_only=True)``
loads; sizes: 16×16 images, VAE factor 2, one or two tiny blocks per family.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from tiny_models import _randomise, diffusers_module

PIPELINE_KINDS: tuple[str, ...] = ("sd15", "sdxl", "sd3", "flux")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CLIP_TOKENS = 8  # model_max_length of the CLIP tokenizers and their position embeddings
IMAGE = 16  # pixels; latents are 8×8 (VAE factor 2)


def clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=CLIP_TOKENS)


def t5_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in LETTERS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=64)


def clip_encoder(hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=2 + 2 * len(LETTERS), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_TOKENS,
                            projection_dim=projection or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_encoder(d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=4 + len(LETTERS), d_model=d_model, d_kv=4, d_ff=2 * d_model,
                                   num_layers=1, num_heads=2, relative_attention_num_buckets=8,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def vae(latent_channels: int):
    d = diffusers_module()
    return d.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                           latent_channels=latent_channels, norm_num_groups=4, sample_size=IMAGE)


def _unet(sdxl: bool):
    d = diffusers_module()
    extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": 4,
             "projection_class_embeddings_input_dim": 12 + 6 * 4, "transformer_layers_per_block": (1, 2),
             "use_linear_projection": True} if sdxl else {}
    return d.UNet2DConditionModel(
        sample_size=IMAGE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
        attention_head_dim=(2, 4) if sdxl else 2, **extra)


def build(kind: str, seed: int = 0):
    """The pipeline object of ``kind`` with seeded random weights."""
    d = diffusers_module()
    torch.manual_seed(seed)
    tmp = Path(tempfile.mkdtemp(prefix="ecodiff_tokenizers_"))  # vocab files, read once by the tokenizers
    if kind == "sd15":
        parts = {"unet": _unet(False), "text_encoder": clip_encoder(24), "tokenizer": clip_tokenizer(tmp / "a"),
                 "vae": vae(4), "scheduler": d.EulerDiscreteScheduler(beta_schedule="scaled_linear", steps_offset=1),
                 "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        cls = d.StableDiffusionPipeline
    elif kind == "sdxl":
        parts = {"unet": _unet(True), "text_encoder": clip_encoder(16), "text_encoder_2": clip_encoder(8, 12),
                 "tokenizer": clip_tokenizer(tmp / "a"), "tokenizer_2": clip_tokenizer(tmp / "b"), "vae": vae(4),
                 "scheduler": d.EulerDiscreteScheduler(beta_schedule="scaled_linear", steps_offset=1)}
        cls = d.StableDiffusionXLPipeline
    elif kind == "sd3":
        transformer = d.SD3Transformer2DModel(
            sample_size=IMAGE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
            pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
        parts = {"transformer": transformer, "text_encoder": clip_encoder(8, 4), "text_encoder_2": clip_encoder(8, 4),
                 "text_encoder_3": t5_encoder(16), "tokenizer": clip_tokenizer(tmp / "a"),
                 "tokenizer_2": clip_tokenizer(tmp / "b"), "tokenizer_3": t5_tokenizer(), "vae": vae(4),
                 "scheduler": d.FlowMatchEulerDiscreteScheduler(shift=3.0)}
        cls = d.StableDiffusion3Pipeline
    elif kind == "flux":
        transformer = d.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))
        parts = {"transformer": transformer, "text_encoder": clip_encoder(8), "text_encoder_2": t5_encoder(16),
                 "tokenizer": clip_tokenizer(tmp / "a"), "tokenizer_2": t5_tokenizer(), "vae": vae(4),
                 "scheduler": d.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                             max_shift=1.15, base_image_seq_len=4,
                                                             max_image_seq_len=64)}
        cls = d.FluxPipeline
    else:
        raise ValueError(kind)
    for i, module in enumerate(v for v in parts.values() if isinstance(v, torch.nn.Module)):
        _randomise(module, seed + i)
    return cls(**parts)


def save(kind: str, folder: Path, seed: int = 0) -> Path:
    """Write the tiny ``kind`` pipeline to ``folder`` (float32, safetensors); returns ``folder``."""
    build(kind, seed).save_pretrained(str(folder))
    return folder
