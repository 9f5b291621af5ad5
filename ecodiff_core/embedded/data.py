"""The sklearn 8x8 digits, the fixed train/test split, and latent packing.

Images live in [-1, 1] with shape (B, 1, 8, 8).  The diffusion model works on the *packed* latent:
2x2 patches give a 4x4 grid of 16 tokens with 4 channels each, shape (B, 16, 4), in the same
patch order as FLUX (row-major over the grid, channel-major inside a patch).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 8
PATCH = 2
GRID = IMAGE_SIZE // PATCH
NUM_TOKENS = GRID * GRID
TOKEN_CHANNELS = PATCH * PATCH
LATENT_SHAPE = (NUM_TOKENS, TOKEN_CHANNELS)
NUM_CLASSES = 10
SPLIT_SEED = 0
TEST_SIZE = 300


@dataclass(frozen=True)
class DigitSplit:
    """Images in [-1, 1], shape (N, 1, 8, 8), float32; labels int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_digit_split(test_size: int = TEST_SIZE, seed: int = SPLIT_SEED) -> DigitSplit:
    """The project's fixed stratified split of ``sklearn.datasets.load_digits`` (1,497 / 300)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 8.0 - 1.0
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=seed
    )
    return DigitSplit(_as_images(x_tr), torch.from_numpy(y_tr), _as_images(x_te), torch.from_numpy(y_te))


def _as_images(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(1)


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, 8, 8) images -> (B, 16, 4) packed latent (FLUX 2x2 patch packing)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """(B, 16, 4) packed latent -> (B, 1, 8, 8) images, clamped to [-1, 1] unless ``clamp=False``."""
    b = latents.shape[0]
    x = latents.reshape(b, GRID, GRID, 1, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    images = x.reshape(b, 1, IMAGE_SIZE, IMAGE_SIZE)
    return images.clamp(-1.0, 1.0) if clamp else images


def image_ids() -> torch.Tensor:
    """FLUX position ids of the 16 image tokens, shape (16, 3): (0, row, col)."""
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


def shift_augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    b = images.shape[0]
    pad = torch.nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    offs = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    out = torch.empty_like(images)
    for i in range(b):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = pad[i, :, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE]
    return out
