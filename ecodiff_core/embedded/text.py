"""Captions, a word-level tokenizer over a fixed vocabulary, and the tiny text encoder.

The text encoder is trained jointly with the transformer and shipped with it.  It returns FLUX-style
conditioning: per-token states (B, L, joint_attention_dim) that enter the joint attention, and a
pooled vector (masked mean of the token states) that enters AdaLN through ``time_text_embed``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SettingsError
from ..validation import check_int

CLASS_NAMES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)

# Templates seen in training.  ``{w}`` is the class word, ``{n}`` the numeral.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a handwritten {w}",
    "the digit {w}",
    "a handwritten number {w}",
    "the number {n}",
    "the digit {n}",
    "{w}",
    "{n}",
    "a handwritten digit {n}",
    "a drawing of the number {w}",
    "a picture of a handwritten {w}",
    "an image of the digit {n}",
    "a neat handwritten {w}",
    "a sloppy {w} written by hand",
    "the numeral {n}",
    "a sketch of the digit {w}",
    "a small black and white image of a {w}",
    "number {w}",
    "a {n} written by hand",
)

# Phrasings never seen in training, built only from in-vocabulary words (generalisation check).
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a picture of the digit {n}",
    "an image of the number {w}",
    "the handwritten numeral {w}",
    "a drawing of a handwritten {n}",
    "a neat sketch of the number {n}",
)

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<unk>")
PAD_ID, BOS_ID, UNK_ID = 0, 1, 2

_TEMPLATE_WORDS = sorted(
    {w for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES for w in t.replace("{w}", "").replace("{n}", "").split()}
)
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + CLASS_NAMES + tuple(str(i) for i in range(10)) + tuple(_TEMPLATE_WORDS)
_WORD_RE = re.compile(r"[a-z]+|[0-9]")  # punctuation is dropped


def caption(template: str, c: int) -> str:
    return template.format(w=CLASS_NAMES[c], n=str(c))


def captions_for_class(c: int, heldout: bool = False) -> list[str]:
    """All training captions (or the held-out phrasings) for digit class ``c``."""
    if not 0 <= c < len(CLASS_NAMES):
        raise SettingsError(f"class must be in 0..{len(CLASS_NAMES) - 1}, got {c}")
    return [caption(t, c) for t in (HELDOUT_TEMPLATES if heldout else TRAIN_TEMPLATES)]


def calibration_prompts(per_class: int = 10) -> tuple[list[str], list[int]]:
    """``10 * per_class`` varied prompts (class-major) and their labels; deterministic."""
    prompts, labels = [], []
    for c in range(len(CLASS_NAMES)):
        for k in range(per_class):
            prompts.append(caption(TRAIN_TEMPLATES[(k + c) % len(TRAIN_TEMPLATES)], c))
            labels.append(c)
    return prompts, labels


CALIBRATION_PROMPTS, CALIBRATION_LABELS = calibration_prompts()


@dataclass(frozen=True)
class Tokenizer:
    """Lower-cased word-level tokenizer: words and single digits; punctuation is dropped; unknown
    words map to ``<unk>``; ``<bos>`` is always first; longer texts are truncated to ``max_length``."""

    max_length: int = 10

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    def words(self, text: str) -> list[str]:
        return _WORD_RE.findall(text.lower())

    def ids(self, text: str) -> list[int]:
        index = _VOCAB_INDEX
        ids = [BOS_ID] + [index.get(w, UNK_ID) for w in self.words(text)]
        return ids[: self.max_length]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) padded with ``<pad>`` and a bool mask (B, L), True on real tokens."""
        ids = torch.full((len(texts), self.max_length), PAD_ID, dtype=torch.long)
        for i, t in enumerate(texts):
            row = self.ids(t)
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids != PAD_ID


_VOCAB_INDEX = {w: i for i, w in enumerate(VOCAB)}


@dataclass(frozen=True)
class TextEncoderConfig:
    """The tiny text encoder's shape: width ``dim`` (a multiple of ``heads``), ``layers``, ``heads``,
    MLP width ``mlp_ratio``·dim, ``max_length`` tokens; each an integer ≥ 1 (SettingsError)."""

    dim: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    max_length: int = 10

    def __post_init__(self) -> None:
        for name in ("dim", "layers", "heads", "mlp_ratio", "max_length"):
            check_int(f"text encoder {name}", getattr(self, name))
        if self.dim % self.heads:
            raise SettingsError(f"text encoder dim {self.dim} must be a multiple of heads ({self.heads})")


class _EncoderLayer(nn.Module):
    """Pre-norm self-attention + MLP with a key padding mask."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.proj(attn.transpose(1, 2).reshape(b, length, d))
        return x + self.mlp(self.norm2(x))


class TinyTextEncoder(nn.Module):
    """Token embedding + learned positions + a few transformer layers.

    Returns token states (B, L, dim) with padded positions zeroed, and pooled (B, dim), the mean
    over real tokens (``<bos>`` included, so the empty caption has a well-defined pooled vector).
    """

    def __init__(self, config: TextEncoderConfig = TextEncoderConfig()) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = Tokenizer(config.max_length)
        self.embed = nn.Embedding(self.tokenizer.vocab_size, config.dim)
        self.pos = nn.Parameter(torch.randn(config.max_length, config.dim) / math.sqrt(config.dim))
        self.layers = nn.ModuleList(
            _EncoderLayer(config.dim, config.heads, config.mlp_ratio) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.dim)

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x, mask)
        m = mask.unsqueeze(-1).to(x.dtype)
        tokens = self.norm(x) * m
        pooled = tokens.sum(1) / m.sum(1)
        return tokens, pooled

    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(texts)
        return self.encode_ids(ids.to(self.pos.device), mask.to(self.pos.device))
