"""The EcoDiff Judge Digits node's side: the shipped digit judge (``ecodiff_core.embedded.judge``)
scoring ComfyUI IMAGE batches (B, H, W, C floats in [0, 1], as VAE Decode gives them).
"""
from __future__ import annotations

import re
from functools import lru_cache

import torch

from ..ecodiff_core.embedded.data import IMAGE_SIZE, NUM_CLASSES
from ..ecodiff_core.errors import EcoDiffError


def parse_digits(text: str) -> list[int]:
    """'0,1,2' / '0 1 2' / '012' → [0, 1, 2]: every decimal digit character is one label."""
    digits = [int(c) for c in re.findall(r"\d", text or "")]
    if not digits:
        raise EcoDiffError("no digits given: write the requested digit of each image, e.g. 0,1,2,3,4,5,6,7,8,9 "
                           "(image i is judged against digit i mod the count)")
    return digits


def images_to_digits(images: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, C) in [0, 1] → judge input (B, 1, 8, 8) in [-1, 1] (grey, 8×8 block means)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise EcoDiffError(f"expected an IMAGE batch (B, H, W, C), got {getattr(images, 'shape', type(images))}")
    grey = images[..., :3].float().cpu().mean(-1, keepdim=True).movedim(-1, 1)
    return torch.nn.functional.adaptive_avg_pool2d(grey, (IMAGE_SIZE, IMAGE_SIZE)) * 2.0 - 1.0


@lru_cache(maxsize=1)
def _judge():
    from ..ecodiff_core.embedded.judge import load_judge

    return load_judge()


def judge_images(images: torch.Tensor, digits: list[int]) -> dict[str, float]:
    """accuracy / confidence / fd_judge of ``images`` against ``digits`` (image i ↔ digits[i % n]).

    ``fd_judge`` is the Fréchet distance of the judge's features vs the real test digits (not FID;
    biased upward for small batches: ``fd_floor`` is the value of as many real digits, when the batch
    holds at least one image per class).
    """
    from ..ecodiff_core.embedded.judge import real_data_floor

    if any(not 0 <= d < NUM_CLASSES for d in digits):
        raise EcoDiffError(f"digits must be 0..9, got {digits}")
    x = images_to_digits(images)
    n = x.shape[0]
    labels = [digits[i % len(digits)] for i in range(n)]
    judge = _judge()
    if n < 2:  # one image has no covariance: accuracy and confidence only
        probs = judge.predict(x)
        label = torch.tensor(labels)
        return {"accuracy": float((probs.argmax(-1) == label).float().mean()),
                "confidence": float(probs.gather(1, label[:, None]).mean()), "fd_judge": float("nan"),
                "count": float(n), "fd_floor": float("nan")}
    result = judge.evaluate(x, labels)
    result["count"] = float(n)
    result["fd_floor"] = real_data_floor(judge, n=n) if n >= NUM_CLASSES else float("nan")
    return result


def judge_text(result: dict[str, float]) -> str:
    n = int(result["count"])
    floor = result.get("fd_floor", float("nan"))
    floor_text = f" (real digits at n={n}: {floor:.1f})" if floor == floor else ""
    fd = result["fd_judge"]
    fd_text = f"FD-judge {fd:.2f}{floor_text}" if fd == fd else "FD-judge: needs at least 2 images"
    return (f"accuracy {result['accuracy']:.3f} ({round(result['accuracy'] * n)}/{n} drawn as requested)\n"
            f"confidence {result['confidence']:.3f}\n"
            f"{fd_text}\n"
            "FD-judge: Fréchet distance in the digit judge's feature space vs real test digits (not FID); "
            "lower is better")
