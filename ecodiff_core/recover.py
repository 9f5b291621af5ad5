"""LoRA Recover: distil the original model into a LoRA on the pruned model (no image data).

Targets are the original (teacher) model's x0 predictions for the same (x_t, σ, conditioning); the
states x_t are the inputs of the Euler steps along the calibration prompts' trajectories, rolled out
either by the pruned model itself (``states="pruned"``, the states it will meet when sampling) or by
the original (``states="original"``).  Each optimiser step draws ``batch`` (trajectory, step) pairs at
random and minimises MSE(student x0, teacher x0).

The teacher is needed only once, before training: :func:`rollout_states` and :func:`teacher_targets`
precompute everything, so the two models never have to sit on the device together.

LoRA layers are the engine's own (:class:`LoraWeights`, ΔW = (α / r)·up·down on ``nn.Linear``
weights, the convention of ComfyUI's LoRA loader and of kohya/peft files): the host applies them
either as forward hooks (:meth:`LoraWeights.installed`, plain torch models) or by merging
:meth:`LoraWeights.merged_weight` into the weight (ComfyUI weight wrappers); both compute
x·(W + ΔW)ᵀ.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import EcoDiffError, SettingsError
from .replacements import ScatterLinear
from .safetensors_file import check_format, read, write_atomic
from .seeds import check_seed
from .trajectory import Denoiser, check_sigmas, teacher_steps
from .units import Layout
from .validation import check_choice, check_int, check_number, known_fields

TARGET_MODULES: tuple[str, ...] = ("attention", "attention_ffn", "all_linear")
STATE_SOURCES: tuple[str, ...] = ("pruned", "original")
LORA_FORMAT = "ecodiff-recover-lora"
STATE_FORMAT = "ecodiff-recover-state"
FORMAT_VERSION = 1


@dataclass
class RecoverSettings:
    """Settings of one recovery run; every host (node, command line) uses these defaults.

    rank     LoRA rank r (≥ 1).
    alpha    LoRA α; the update is (α / r)·up·down.
    targets  which Linear layers get a LoRA: "attention" (q/k/v/out and fused attention linears),
             "attention_ffn" (plus feed-forward layers) or "all_linear".
    steps    optimiser steps.      lr: AdamW learning rate.     batch: states per optimiser step.
    seed     seeds the LoRA initialisation and the draw of states.
    states   whose trajectories give the states x_t: "original" (default: on the embedded model it
             recovered better, docs/benchmarks.md, and in ComfyUI it saves one pass) or "pruned"
             (the student's own, without the LoRA).
    """

    rank: int = 16
    alpha: float = 16.0
    targets: str = "attention_ffn"
    steps: int = 300
    lr: float = 2e-3
    batch: int = 4
    seed: int = 0
    states: str = "original"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """SettingsError naming the first bad setting."""
        check_int("rank", self.rank, 1, 4096)
        check_number("alpha", self.alpha, strict=True)
        check_choice("targets", self.targets, TARGET_MODULES)
        check_int("steps", self.steps)
        check_number("learning rate", self.lr, strict=True)
        check_int("batch", self.batch)
        check_seed(self.seed)
        check_choice("states", self.states, STATE_SOURCES)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RecoverSettings:
        """Forward-compatible, like ``LearnSettings.from_dict``: unknown keys ignored (logged), missing
        ones take the defaults."""
        return cls(**known_fields(cls, data))


# --------------------------------------------------------------------------------------------
# which layers
# --------------------------------------------------------------------------------------------
def lora_target_paths(module: nn.Module, layout: Layout, targets: str) -> list[str]:
    """Paths of the ``nn.Linear`` layers of ``module`` that get a LoRA, in module order.

    ``layout`` is the full-size model's layout (paths are the same in the pruned model): "attention"
    takes the linears of head groups (producers and gates), "attention_ffn" adds those of neuron
    groups, "all_linear" takes every Linear.  Layers left with no input or output features (emptied
    by pruning) get none.  SettingsError for unknown ``targets``; EcoDiffError when nothing matches.
    """
    if targets not in TARGET_MODULES:
        raise SettingsError(f"targets must be one of {', '.join(TARGET_MODULES)}, got '{targets}'")
    kinds = {"attention": {"head"}, "attention_ffn": {"head", "neuron"}}.get(targets)
    chosen = None if kinds is None else {s.module for g in layout.groups if g.kind in kinds for s in g.slices}
    paths = []
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Linear) or 0 in sub.weight.shape:
            continue
        if chosen is None or name in chosen:
            paths.append(name)
    if not paths:
        raise EcoDiffError(f"no Linear layer of the model matches targets '{targets}'; choose 'all_linear'")
    return paths


# --------------------------------------------------------------------------------------------
# LoRA weights
# --------------------------------------------------------------------------------------------
class LoraWeights(nn.Module):
    """Low-rank updates ΔW = (α / r)·up·down, one per Linear path.

    down: (r, in_features), seeded Kaiming-uniform; up: (out_features, r), zeros (ΔW = 0 at start).
    Parameters are float32 on ``device``.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, alpha: float, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.rank, self.alpha = int(rank), float(alpha)
        self.paths = list(shapes)
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        gen = torch.Generator().manual_seed(seed)
        for path in self.paths:
            out_f, in_f = shapes[path]
            bound = 1.0 / math.sqrt(in_f)
            down = (torch.rand(self.rank, in_f, generator=gen) * 2 - 1) * bound
            self.down.append(nn.Parameter(down.to(device)))
            self.up.append(nn.Parameter(torch.zeros(out_f, self.rank, device=device)))
        self._index = {p: i for i, p in enumerate(self.paths)}

    @classmethod
    def for_module(cls, module: nn.Module, paths: Sequence[str], rank: int, alpha: float, seed: int = 0,
                   device: torch.device | str = "cpu") -> LoraWeights:
        shapes = {}
        for p in paths:
            out_f, in_f = module.get_submodule(p).weight.shape  # a ScatterLinear's weight holds its kept rows only
            shapes[p] = (out_f, in_f)
        return cls(shapes, rank, alpha, seed, device)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, path: str) -> torch.Tensor:
        """ΔW of ``path``, (out_features, in_features), float32."""
        i = self._index[path]
        return (self.up[i] @ self.down[i]) * self.scale

    def merged_weight(self, path: str, weight: torch.Tensor) -> torch.Tensor:
        """W + ΔW computed in float32 and cast back to W's dtype (what ComfyUI's loader merges)."""
        return (weight.float() + self.delta(path).to(weight.device)).to(weight.dtype)

    @contextlib.contextmanager
    def installed(self, module: nn.Module) -> Iterator[None]:
        """Forward hooks adding x·ΔWᵀ to each target Linear's output, removed on exit."""
        handles = []
        for path in self.paths:
            i = self._index[path]

            def hook(mod, args, out, i=i):
                x = args[0]
                low = torch.nn.functional.linear(x, self.down[i].to(x.dtype))
                delta = torch.nn.functional.linear(low, self.up[i].to(x.dtype)) * self.scale
                if isinstance(mod, ScatterLinear):  # ΔW covers the computed rows; the others stay 0
                    return out.index_add(-1, mod.rows.to(out.device), delta)
                return out + delta

            handles.append(module.get_submodule(path).register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def tensors(self, prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
        """The LoRA in the common file layout: ``<prefix><path>.lora_up.weight`` / ``.lora_down.weight``
        / ``.alpha`` (what ComfyUI's LoraLoaderModelOnly reads), CPU float32 copies."""
        out = {}
        for path, down, up in zip(self.paths, self.down, self.up, strict=True):
            out[f"{prefix}{path}.lora_up.weight"] = up.detach().float().cpu().clone().contiguous()
            out[f"{prefix}{path}.lora_down.weight"] = down.detach().float().cpu().clone().contiguous()
            out[f"{prefix}{path}.alpha"] = torch.tensor(self.alpha)
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor], prefix: str = "diffusion_model.") -> None:
        """Copy values saved by :meth:`tensors` (same paths and shapes) into the parameters."""
        with torch.no_grad():
            for path, down, up in zip(self.paths, self.down, self.up, strict=True):
                for name, param in (("lora_down", down), ("lora_up", up)):
                    key = f"{prefix}{path}.{name}.weight"
                    if key not in tensors or tuple(tensors[key].shape) != tuple(param.shape):
                        raise EcoDiffError(f"saved LoRA state does not fit: '{key}' missing or of another shape")
                    param.copy_(tensors[key].to(param.device, param.dtype))


# --------------------------------------------------------------------------------------------
# states and targets
# --------------------------------------------------------------------------------------------
@dataclass
class DistillProblem:
    """One calibration trajectory's training data.

    denoise  the STUDENT's x0 predictor (LoRA applied by the host), conditioning and CFG inside.
    states   x_t per step, each shaped like the trajectory's latent (B, …).
    sigmas   σ of each state, (len(states),).
    targets  the teacher's x0 for each state (same shapes as ``states``).
    """

    denoise: Denoiser
    states: list[torch.Tensor]
    sigmas: torch.Tensor
    targets: list[torch.Tensor] = field(default_factory=list)


def rollout_states(denoise: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor) -> list[torch.Tensor]:
    """Inputs x_t of every Euler step of ``denoise``'s trajectory from ``noise`` (no grad)."""
    check_sigmas(sigmas)
    return teacher_steps(denoise, noise, sigmas)[0]


def teacher_targets(denoise: Denoiser, states: Sequence[torch.Tensor], sigmas: torch.Tensor) -> list[torch.Tensor]:
    """The teacher's x0 prediction for each (state, σ) (no grad)."""
    with torch.no_grad():
        return [denoise(x, sigmas[i]) for i, x in enumerate(states)]


def distillation_loss(problems: Sequence[DistillProblem]) -> float:
    """Mean over every state of MSE(student x0, teacher x0), without grad."""
    total, n = 0.0, 0
    with torch.no_grad():
        for p in problems:
            for i, x in enumerate(p.states):
                total += torch.nn.functional.mse_loss(p.denoise(x, p.sigmas[i]).float(), p.targets[i].float()).item()
                n += 1
    return total / max(n, 1)


# --------------------------------------------------------------------------------------------
# state (resume)
# --------------------------------------------------------------------------------------------
@dataclass
class RecoverState:
    """Everything to resume or publish a recovery run: LoRA tensors (file layout), optimizer, progress."""

    arch: str
    fingerprint: str
    lora: dict[str, torch.Tensor]
    settings: RecoverSettings
    progress: dict = field(default_factory=lambda: {"step": 0, "finished": False})
    history: list[dict] = field(default_factory=list)
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)
    stop_reason: str = ""


def save_recover_state(path: Path, state: RecoverState) -> Path:
    """Write ``state`` atomically as safetensors (tensors + JSON metadata)."""
    tensors = {f"lora/{k}": v.contiguous() for k, v in state.lora.items()}
    tensors.update({f"optimizer/{k}": v.detach().cpu().contiguous() for k, v in state.optimizer.items()})
    meta = {"format": STATE_FORMAT, "format_version": str(FORMAT_VERSION), "arch": state.arch,
            "fingerprint": state.fingerprint, "settings": json.dumps(state.settings.to_dict()),
            "progress": json.dumps(state.progress), "history": json.dumps(state.history),
            "stop_reason": state.stop_reason}
    return write_atomic(path, tensors, meta)


def load_recover_state(path: Path) -> RecoverState:
    """Read a state written by :func:`save_recover_state`; EcoDiffError if damaged or foreign."""
    tensors, meta = read(path, what="LoRA Recover state")
    check_format(meta, Path(path).name, STATE_FORMAT, FORMAT_VERSION, "a LoRA Recover state file")
    try:
        return RecoverState(
            arch=meta["arch"], fingerprint=meta["fingerprint"],
            lora={k[5:]: v for k, v in tensors.items() if k.startswith("lora/")},
            settings=RecoverSettings.from_dict(json.loads(meta["settings"])), progress=json.loads(meta["progress"]),
            history=json.loads(meta["history"]),
            optimizer={k[10:]: v for k, v in tensors.items() if k.startswith("optimizer/")},
            stop_reason=meta.get("stop_reason", ""))
    except (KeyError, TypeError, json.JSONDecodeError, SettingsError) as exc:
        raise EcoDiffError(f"{Path(path).name} has damaged metadata: {exc}") from exc


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
@dataclass
class RecoverStepInfo:
    step: int
    total_steps: int
    loss: float
    elapsed: float


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class LoraRecoverer:
    """Trains ``lora`` (already applied to the student by the host) to match the teacher's targets."""

    def __init__(self, lora: LoraWeights, settings: RecoverSettings, arch: str, fingerprint: str,
                 resume: RecoverState | None = None,
                 grad_context: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        settings.validate()
        self.lora, self.settings, self.arch, self.fingerprint = lora, settings, arch, fingerprint
        self.grad_context = grad_context
        self.params = list(lora.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=0.0)
        self.progress = {"step": 0, "finished": False}
        self.history: list[dict] = []
        self.stop_reason = ""
        if resume is not None:
            self._resume(resume)

    def _resume(self, state: RecoverState) -> None:
        if state.fingerprint != self.fingerprint:
            raise EcoDiffError("the saved LoRA Recover state belongs to another pruned model (fingerprint "
                               f"{state.fingerprint} vs {self.fingerprint}); start a new run (another name)")
        saved = state.settings
        for name in ("rank", "alpha", "targets", "states", "seed", "batch"):
            if getattr(saved, name) != getattr(self.settings, name):
                raise EcoDiffError(f"the saved LoRA Recover state was trained with {name}={getattr(saved, name)!r}, "
                                   f"not {getattr(self.settings, name)!r}; use the same settings or another name")
        self.lora.load_tensors(state.lora)
        self.progress = {"step": int(state.progress.get("step", 0)), "finished": False}
        self.history = list(state.history)
        for i, p in enumerate(self.params):
            entry = {k.split("/", 1)[1]: v.to(p.device) for k, v in state.optimizer.items()
                     if k.split("/", 1)[0] == str(i)}
            if entry:
                self.optimizer.state[p] = entry

    @property
    def state(self) -> RecoverState:
        opt = {}
        for i, p in enumerate(self.params):
            for key, value in self.optimizer.state.get(p, {}).items():
                opt[f"{i}/{key}"] = torch.as_tensor(value).detach().cpu().clone()
        return RecoverState(self.arch, self.fingerprint, self.lora.tensors(), dataclasses.replace(self.settings),
                            dict(self.progress), list(self.history), opt, self.stop_reason)

    def _draw(self, problems: Sequence[DistillProblem], step: int) -> list[tuple[int, int]]:
        sizes = [len(p.states) for p in problems]
        total = sum(sizes)
        gen = torch.Generator().manual_seed(_seed(self.settings.seed, step))
        flat = torch.randint(total, (self.settings.batch,), generator=gen).tolist()
        out = []
        for f in flat:
            for j, n in enumerate(sizes):
                if f < n:
                    out.append((j, f))
                    break
                f -= n
        return out

    def train(self, problems: Sequence[DistillProblem],
              callback: Callable[[RecoverStepInfo], bool | None] | None = None) -> RecoverState:
        """Run (or continue) to ``settings.steps``; ``callback`` returning False stops.  A non-finite
        loss stops with the last good LoRA kept (``stop_reason`` says so)."""
        if not problems or not any(p.states for p in problems):
            raise SettingsError("no calibration states: give at least one prompt")
        for p in problems:
            if len(p.targets) != len(p.states):
                raise EcoDiffError("every state needs its teacher target: call teacher_targets first")
        start = time.perf_counter()
        while self.progress["step"] < self.settings.steps:
            step = self.progress["step"]
            grads = [torch.zeros_like(p) for p in self.params]
            loss = 0.0
            for j, i in self._draw(problems, step):
                prob = problems[j]
                with torch.enable_grad(), self.grad_context():
                    pred = prob.denoise(prob.states[i], prob.sigmas[i])
                    item = torch.nn.functional.mse_loss(pred.float(), prob.targets[i].float()) / self.settings.batch
                    g = torch.autograd.grad(item, self.params, allow_unused=True)
                for acc, gi in zip(grads, g, strict=True):
                    if gi is not None:
                        acc.add_(gi)
                loss += item.item()
            if not math.isfinite(loss) or not all(torch.isfinite(g).all() for g in grads):
                self.stop_reason = (f"non-finite loss ({loss}) at step {step + 1}; stopped with the last good LoRA "
                                    "kept. Lower the learning rate.")
                return self.state
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.progress["step"] = step + 1
            self.history.append({"step": step + 1, "loss": loss})
            info = RecoverStepInfo(step + 1, self.settings.steps, loss, time.perf_counter() - start)
            if callback is not None and callback(info) is False:
                self.stop_reason = f"stopped by request after step {step + 1}"
                return self.state
        self.progress["finished"] = True
        return self.state


def lora_metadata(settings: RecoverSettings, arch: str, fingerprint: str, pruned_layout: dict,
                  extra: dict | None = None) -> dict[str, str]:
    """safetensors metadata of a recovered LoRA (all values strings)."""
    meta = {"format": LORA_FORMAT, "format_version": str(FORMAT_VERSION), "rank": str(settings.rank),
            "alpha": repr(float(settings.alpha)), "targets": settings.targets, "base_architecture": arch,
            "layout_fingerprint": fingerprint,
            "mask_fingerprint": hashlib.sha256(json.dumps(pruned_layout, sort_keys=True).encode()).hexdigest()[:16],
            "pruned_layout": json.dumps({k: len(v) if isinstance(v, list) else v for k, v in pruned_layout.items()}),
            "settings": json.dumps(settings.to_dict())}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta
