"""Pictures for the nodes: labelled side-by-side comparisons and the pruning chart (PIL + torch).

ComfyUI IMAGE tensors are (batch, height, width, 3) floats in [0, 1].
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..ecodiff_core.errors import EcoDiffError

LABEL_HEIGHT = 28


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(np.clip(255.0 * image.detach().cpu().float().numpy(), 0, 255).astype(np.uint8))


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0) for im in images])


def _font(size: int = 16) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _labelled(image: Image.Image, label: str, height: int) -> Image.Image:
    canvas = Image.new("RGB", (image.width, height + LABEL_HEIGHT), (24, 24, 24))
    canvas.paste(image, (0, LABEL_HEIGHT))
    ImageDraw.Draw(canvas).text((6, 5), label, fill=(240, 240, 240), font=_font())
    return canvas


def side_by_side(a: torch.Tensor, b: torch.Tensor, label_a: str, label_b: str, gap: int = 4) -> torch.Tensor:
    """One labelled A|B image per pair; the shorter batch repeats its last image."""
    if a.ndim != 4 or b.ndim != 4:
        raise EcoDiffError("compare needs two IMAGE batches (batch, height, width, channels)")
    out = []
    for i in range(max(a.shape[0], b.shape[0])):
        ia, ib = to_pil(a[min(i, a.shape[0] - 1)]), to_pil(b[min(i, b.shape[0] - 1)])
        height = max(ia.height, ib.height)
        la, lb = _labelled(ia, label_a, height), _labelled(ib, label_b, height)
        canvas = Image.new("RGB", (la.width + gap + lb.width, height + LABEL_HEIGHT), (255, 255, 255))
        canvas.paste(la, (0, 0))
        canvas.paste(lb, (la.width + gap, 0))
        out.append(canvas)
    return to_tensor(out)


def kept_chart(rows: list[tuple[str, dict[str, tuple[int, int]]]], title: str) -> torch.Tensor:
    """Horizontal bars per block: kept / total units of each kind (one colour per kind)."""
    colors = {"head": (66, 133, 244), "neuron": (52, 168, 83), "channel": (251, 188, 5)}
    kinds = [k for k in colors if any(k in r for _, r in rows)]
    bar_h, pad, label_w, bar_w = 12, 6, 260, 360
    row_h = len(kinds) * bar_h + pad
    height = 40 + 24 + max(1, len(rows)) * row_h + 10
    im = Image.new("RGB", (label_w + bar_w + 90, height), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    font = _font(13)
    draw.text((8, 8), title, fill=(0, 0, 0), font=_font(16))
    x = 8
    for kind in kinds:
        draw.rectangle([x, 34, x + 12, 46], fill=colors[kind])
        draw.text((x + 16, 32), f"{kind}s kept", fill=(0, 0, 0), font=font)
        x += 130
    y = 64
    for block, stats in rows:
        draw.text((8, y), block[-34:], fill=(0, 0, 0), font=font)
        for j, kind in enumerate(kinds):
            if kind not in stats:
                continue
            kept, total = stats[kind]
            top = y + j * bar_h
            draw.rectangle([label_w, top, label_w + bar_w, top + bar_h - 2], outline=(200, 200, 200))
            frac = kept / total if total else 0.0
            draw.rectangle([label_w, top, label_w + int(bar_w * frac), top + bar_h - 2], fill=colors[kind])
            draw.text((label_w + bar_w + 6, top - 2), f"{kept}/{total}", fill=(0, 0, 0), font=font)
        y += row_h
    return to_tensor([im])
