"""Several calibration prompts as one batch: stacking their conditioning and their latents.

A calibration sample is batchable when it carries its ``conditioning`` (any nesting of dicts,
lists and tuples whose tensors all have the sample's prompt dimension first, the dimension of its
``noise``) and the ``batch_denoiser`` that builds a denoiser from such conditioning.  Samples that
share one ``batch_denoiser`` object and whose conditioning, latents and targets agree in every
dimension but the first are concatenated along it: one denoiser call then serves them all.  When
they do not stack (a different prompt length, a host that gives no conditioning), the reason is
returned and the caller runs them one by one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class NotStackable(Exception):
    """Why samples cannot run as one batch (a sentence for the log; never shown as an error)."""


def stack_tree(trees: Sequence[Any], rows: Sequence[int]) -> Any:
    """Concatenate ``trees`` (one per sample, with ``rows[i]`` prompts each) along dim 0: tensors
    are concatenated, dicts / lists / tuples stacked entry by entry, other values (None, numbers,
    strings) must be equal and are kept once.  Raises NotStackable with the reason."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(t, torch.Tensor) for t in trees):
            raise NotStackable("a conditioning entry is a tensor in one sample and not in another")
        for t, n in zip(trees, rows, strict=True):
            if t.ndim == 0 or t.shape[0] != n:
                raise NotStackable(f"a conditioning tensor of shape {tuple(t.shape)} does not have the prompt "
                                   f"dimension ({n}) first")
            if t.shape[1:] != first.shape[1:] or t.dtype != first.dtype or t.device != first.device:
                raise NotStackable(f"conditioning shapes differ ({tuple(first.shape)} and {tuple(t.shape)})")
        return torch.cat(list(trees))
    if isinstance(first, dict):
        if any(not isinstance(t, dict) or t.keys() != first.keys() for t in trees):
            raise NotStackable("the conditioning entries differ between samples")
        return {k: stack_tree([t[k] for t in trees], rows) for k in first}
    if isinstance(first, (list, tuple)):
        if any(type(t) is not type(first) or len(t) != len(first) for t in trees):
            raise NotStackable("the conditioning entries differ between samples")
        return type(first)(stack_tree(list(column), rows) for column in zip(*trees, strict=True))
    if any(t is not first and t != first for t in trees):
        raise NotStackable(f"conditioning values differ between samples ({first!r} and others)")
    return first


def stack_latents(tensors: Sequence[torch.Tensor | None], what: str) -> torch.Tensor | None:
    """Concatenate per-sample latents (B_i, …) along dim 0 (None when none is given)."""
    if all(t is None for t in tensors):
        return None
    if any(t is None for t in tensors):
        raise NotStackable(f"some samples have no {what}")
    if any(t.shape[1:] != tensors[0].shape[1:] for t in tensors):
        raise NotStackable(f"{what} shapes differ ({tuple(tensors[0].shape)} and others)")
    return torch.cat(list(tensors))
