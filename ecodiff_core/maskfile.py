"""Mask files: λ per unit group in safetensors, with JSON metadata; also the resume checkpoint."""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import MaskFileError, SettingsError
from .learn_settings import LearnSettings
from .safetensors_file import check_format, read, write_atomic
from .units import UNIT_KINDS, Layout

FORMAT = "ecodiff-mask"
FORMAT_VERSION = 1
_LOGIT = "logits/"
_OPTIM = "optim/"
log = logging.getLogger("ecodiff")


@dataclass
class MaskState:
    """Learned logits plus everything needed to resume learning exactly where it stopped."""

    arch: str
    fingerprint: str
    logits: dict[str, torch.Tensor]
    kinds: dict[str, str]
    # the run's settings; a file stores them as JSON and loads them forward-compatibly
    # (``LearnSettings.from_dict``: unknown keys ignored with a log line, missing keys take defaults)
    settings: LearnSettings = field(default_factory=LearnSettings)
    progress: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "position": 0, "step": 0, "finished": False})
    history: list[dict[str, float]] = field(default_factory=list)
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)
    stop_reason: str = ""
    # what the run was learned from (see ``learn.run_inputs``): a rerun resumes only if they match
    inputs: dict[str, Any] = field(default_factory=dict)
    # how this run started (e.g. why a saved run was not resumed); shown in summaries, not saved
    start_note: str = ""

    @classmethod
    def fresh(cls, layout: Layout, init_logit: float) -> MaskState:
        return cls(
            arch=layout.arch,
            fingerprint=layout.fingerprint(),
            logits={g.name: torch.full((g.count,), float(init_logit)) for g in layout.groups},
            kinds={g.name: g.kind for g in layout.groups},
        )

    def check_layout(self, layout: Layout) -> None:
        """MaskFileError unless this mask's groups, sizes and kinds are exactly ``layout``'s."""
        mine = {n: t.numel() for n, t in self.logits.items()}
        theirs = {g.name: g.count for g in layout.groups}
        missing = sorted(set(theirs) - set(mine))
        extra = sorted(set(mine) - set(theirs))
        resized = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])
        rekinded = sorted(g.name for g in layout.groups if g.name in self.kinds and self.kinds[g.name] != g.kind)
        if self.fingerprint == layout.fingerprint():
            if not (missing or extra or resized or rekinded):
                return
            raise MaskFileError(f"this mask's logits do not match its own layout fingerprint {self.fingerprint} "
                                "(damaged or hand-edited mask); learn the mask again")
        details = []
        if missing:
            details.append(f"{len(missing)} groups of the model are not in the mask (e.g. {missing[0]})")
        if extra:
            details.append(f"{len(extra)} groups of the mask are not in the model (e.g. {extra[0]})")
        if resized:
            details.append(f"{len(resized)} groups differ in size (e.g. {resized[0]}: mask {mine[resized[0]]}, "
                           f"model {theirs[resized[0]]})")
        raise MaskFileError(
            f"this mask was learned on a different model layout ({self.arch}, fingerprint {self.fingerprint}) "
            f"than the one given ({layout.arch}, fingerprint {layout.fingerprint()}): "
            + "; ".join(details or ["group order or widths differ"])
            + ". Use a mask learned on this model, or learn a new one."
        )

    def summary(self) -> dict[str, Any]:
        losses = [h["loss"] for h in self.history if "loss" in h]
        return {"steps": len(losses), "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None}


def save_mask(path: str | os.PathLike, state: MaskState) -> Path:
    """Write atomically (temp file + rename) so an interrupt never leaves a half-written mask."""
    from . import __version__

    tensors = {_LOGIT + n: t.detach().float().cpu().contiguous() for n, t in state.logits.items()}
    tensors.update({_OPTIM + n: t.detach().cpu().contiguous() for n, t in state.optimizer.items()})
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "arch": state.arch,
        "fingerprint": state.fingerprint,
        "kinds": json.dumps(state.kinds),
        "settings": json.dumps(state.settings.to_dict()),
        "progress": json.dumps(state.progress),
        "history": json.dumps(state.history),
        "loss_summary": json.dumps(state.summary()),
        "stop_reason": state.stop_reason,
        "inputs": json.dumps(state.inputs),
        "package_version": __version__,
    }
    path = write_atomic(path, tensors, metadata)
    log.info("EcoDiff: saved mask for %s to %s", state.arch, path)
    return path


def load_mask(path: str | os.PathLike, layout: Layout | None = None) -> MaskState:
    """Read a mask; with ``layout``, also check that it belongs to that model."""
    path = Path(path)
    if not path.is_file():
        raise MaskFileError(f"mask file not found: {path}")
    tensors, meta = read(path, MaskFileError)
    check_format(meta, str(path), FORMAT, FORMAT_VERSION, "an EcoDiff mask file", MaskFileError)
    try:
        kinds = json.loads(meta["kinds"])
        state = MaskState(
            arch=meta["arch"],
            fingerprint=meta["fingerprint"],
            logits={k[len(_LOGIT):]: v for k, v in tensors.items() if k.startswith(_LOGIT)},
            kinds=kinds,
            settings=LearnSettings.from_dict(json.loads(meta.get("settings", "{}"))),
            progress=json.loads(meta.get("progress", "{}")),
            history=json.loads(meta.get("history", "[]")),
            optimizer={k[len(_OPTIM):]: v for k, v in tensors.items() if k.startswith(_OPTIM)},
            stop_reason=meta.get("stop_reason", ""),
            inputs=json.loads(meta.get("inputs", "{}")),
        )
    except (KeyError, TypeError, json.JSONDecodeError, RecursionError, SettingsError) as exc:
        raise MaskFileError(f"{path} has damaged metadata ({type(exc).__name__}: {exc}); "
                            "re-save the mask or learn a new one") from exc
    if not isinstance(kinds, dict) or set(kinds) != set(state.logits):
        raise MaskFileError(f"{path} has damaged metadata: unit kinds do not match the stored logits")
    problem = _state_problem(state, tensors)
    if problem:
        raise MaskFileError(f"{path} is damaged: {problem}; re-save the mask or learn a new one")
    if layout is not None:
        state.check_layout(layout)
    log.info("EcoDiff: loaded mask for %s from %s", state.arch, path)
    return state


# The resume checkpoint's optimizer state, as the learner's AdamW writes it: per unit group, either no
# entry (no step taken yet) or exactly these parts, all float32: "step" a scalar count >= 0, "exp_avg" and
# "exp_avg_sq" (>= 0) shaped like the group's logits.  Stored as "optim/<part>/<group>".
OPTIMIZER_PARTS = ("step", "exp_avg", "exp_avg_sq")
OPTIMIZER_DTYPE = torch.float32

_PROGRESS_TYPES = {"epoch": int, "position": int, "step": int, "finished": bool}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _state_problem(state: MaskState, tensors: dict[str, torch.Tensor]) -> str:
    """What is wrong with a mask read from a file ("" if nothing): every field's type and range."""
    if not (isinstance(state.arch, str) and state.arch and isinstance(state.fingerprint, str) and state.fingerprint):
        return "metadata 'arch' and 'fingerprint' must be non-empty strings"
    if not state.logits:
        return "it holds no logits"
    odd = sorted(k for k in tensors if not k.startswith((_LOGIT, _OPTIM)))
    if odd:
        return f"unexpected tensor {odd[0]!r}"
    for name, kind in state.kinds.items():
        if kind not in UNIT_KINDS:
            return f"group {name!r} has unit kind {kind!r}, not one of {', '.join(UNIT_KINDS)}"
    for name, t in state.logits.items():
        if t.ndim != 1 or t.numel() < 1 or not t.is_floating_point():
            return f"the logits of {name!r} must be a non-empty 1-D float tensor, got {t.dtype} {tuple(t.shape)}"
        if not bool(torch.isfinite(t).all()):
            return f"the logits of {name!r} are not all finite"
    problem = _optimizer_problem(state)
    if problem:
        return problem
    if not isinstance(state.inputs, dict):
        return "metadata 'inputs' must be a JSON object"
    if not isinstance(state.progress, dict):
        return "metadata 'progress' must be a JSON object"
    for key, kind in _PROGRESS_TYPES.items():
        value = state.progress.get(key)
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0)):
            return f"progress {key!r} must be {'true/false' if kind is bool else 'an integer >= 0'}, got {value!r}"
    if not isinstance(state.history, list) or not all(
            isinstance(h, dict) and all(_is_number(v) and math.isfinite(v) for v in h.values()) for h in state.history):
        return "metadata 'history' must be a list of objects of finite numbers"
    if not isinstance(state.stop_reason, str):
        return "metadata 'stop_reason' must be a string"
    return ""


def _optimizer_problem(state: MaskState) -> str:
    """What is wrong with a mask's optimizer state ("" if nothing): it must be complete (every part for
    every unit group, or none at all), with exact shapes, dtype and ranges, so resuming never fails."""
    if not state.optimizer:
        return ""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.optimizer.items():
        part, _, name = key.partition("/")
        if part not in OPTIMIZER_PARTS:
            return f"optimizer tensor {key!r} is not one of the parts {', '.join(OPTIMIZER_PARTS)}"
        if name not in state.logits:
            return f"optimizer tensor {key!r} names no unit group of the mask"
        parts.setdefault(name, {})[part] = t
    for name in state.logits:
        have = parts.get(name, {})
        missing = [p for p in OPTIMIZER_PARTS if p not in have]
        if missing:
            return f"the optimizer state of {name!r} lacks {', '.join(missing)} (it must hold " \
                   f"{', '.join(OPTIMIZER_PARTS)} for every unit group, or no optimizer state at all)"
        for part, t in have.items():
            shape = () if part == "step" else tuple(state.logits[name].shape)
            if t.dtype != OPTIMIZER_DTYPE or tuple(t.shape) != shape:
                return f"optimizer tensor '{part}/{name}' is {t.dtype} {tuple(t.shape)}, expected " \
                       f"{OPTIMIZER_DTYPE} {shape}"
            if not bool(torch.isfinite(t).all()):
                return f"optimizer tensor '{part}/{name}' is not all finite"
            if part != "exp_avg" and bool((t < 0).any()):
                return f"optimizer tensor '{part}/{name}' is negative"
        step = float(have["step"])
        if step != int(step):
            return f"optimizer step of {name!r} is {step}, not a whole number"
    return ""
