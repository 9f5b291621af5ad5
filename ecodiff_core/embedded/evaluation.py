"""Measure the default model (or a pruned transformer of it) with the judge."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import SettingsError
from ..seeds import check_seed, derived_seed
from ..validation import check_int, check_number
from .data import NUM_CLASSES
from .judge import Judge
from .model import DefaultModel
from .text import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, caption


@dataclass(frozen=True)
class EvalSettings:
    """How a model is measured: ``per_class`` images per digit (≥ 1), Euler ``steps`` (≥ 1), guidance
    ``cfg`` (finite, ≥ 0), noise ``seed``, flow time ``shift`` (> 0), prompts from the training or the
    ``heldout`` templates, ``batch`` prompts per sampling call (≥ 1).  SettingsError when built with a
    bad value."""

    per_class: int = 50
    steps: int = 20
    cfg: float = 1.5
    seed: int = 0
    shift: float = 1.0
    heldout: bool = False
    batch: int = 500

    def __post_init__(self) -> None:
        for name in ("per_class", "steps", "batch"):
            check_int(name, getattr(self, name))
        check_number("cfg", self.cfg)
        check_seed(self.seed)
        check_number("shift", self.shift, strict=True)
        if not isinstance(self.heldout, bool):
            raise SettingsError(f"heldout must be true or false, got {self.heldout!r}")


def evaluation_prompts(per_class: int = 50, heldout: bool = False) -> tuple[list[str], list[int]]:
    """``per_class`` prompts per digit, cycling through the training (or held-out) templates."""
    templates = HELDOUT_TEMPLATES if heldout else TRAIN_TEMPLATES
    prompts, labels = [], []
    for c in range(NUM_CLASSES):
        for k in range(per_class):
            prompts.append(caption(templates[k % len(templates)], c))
            labels.append(c)
    return prompts, labels


@torch.no_grad()
def generate(
    model: DefaultModel, prompts: list[str], settings: EvalSettings, transformer: nn.Module | None = None
) -> torch.Tensor:
    """Images (N, 1, 8, 8) by :meth:`DefaultModel.sample` in chunks of ``settings.batch`` prompts;
    chunk ``k`` uses noise seed ``derived_seed(settings.seed, k)`` ((seed + k) mod 2**64)."""
    out = []
    for k, start in enumerate(range(0, len(prompts), settings.batch)):
        chunk = prompts[start : start + settings.batch]
        out.append(model.sample(chunk, settings.steps, settings.cfg, derived_seed(settings.seed, k), transformer,
                                settings.shift))
    return torch.cat(out)


def evaluate_model(
    model: DefaultModel,
    judge: Judge,
    settings: EvalSettings = EvalSettings(),
    transformer: nn.Module | None = None,
) -> dict[str, float]:
    """Judge accuracy, confidence and FD-judge of ``10 * per_class`` samples, plus sampling seconds."""
    prompts, labels = evaluation_prompts(settings.per_class, settings.heldout)
    t0 = time.perf_counter()
    images = generate(model, prompts, settings, transformer)
    seconds = time.perf_counter() - t0
    return {**judge.evaluate(images, labels), "sample_seconds": seconds, **asdict(settings)}
