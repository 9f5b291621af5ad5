"""Memory preflight: the peak memory of one learning step, measured by tracing it.

One learning step is the recomputed step of time-step checkpointing: the gated forward with grad
and one vector-Jacobian product (``trajectory.step_vjp``, gates from ``MaskLearner``).  Its peak is
measured, not guessed: the step runs on the model as it is (meta tensors for full-size models: no
memory, no compute) while ``LiveBytes`` counts every storage an operator creates and when it is
freed.  Weights are the model's parameters and buffers at their stored dtype.

Two conventions make a meta trace stand for a GPU run:
- attention runs as a fused (flash-style) kernel that saves q, k, v, the output and the row
  log-sum-exp, never the L × L score matrix (on meta, PyTorch would otherwise pick the math path);
- weights stored in 8 bits are cast to the compute dtype at each use, as ComfyUI's manual cast
  does; those per-use copies count as activations (autograd keeps them for the backward).

Estimates are cached per model layout and input shapes (``estimate_step``).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import EcoDiffError

GB = 1e9
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one learning step: weights, and the activation peak without / with block
    checkpointing (None for a mode that was not traced)."""

    weights: int
    activations_plain: int | None
    activations_blocks: int | None

    def activations(self, block_checkpointing: bool) -> int:
        value = self.activations_blocks if block_checkpointing else self.activations_plain
        if value is None:
            raise EcoDiffError(f"block checkpointing {'on' if block_checkpointing else 'off'} was not traced")
        return value

    def total(self, block_checkpointing: bool) -> int:
        return self.weights + self.activations(block_checkpointing)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created by operators while active: ``live`` now, ``peak`` max.

    Storages that existed before (weights, inputs) are not counted; a view counts its storage once.
    Works on every device including meta (storages have sizes there, only no data).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and not t.is_sparse}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_sparse:
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._seen and key not in inputs:  # views and in-place results are not new
                    nbytes = storage.nbytes()
                    self._seen.add(key)
                    self.live += nbytes
                    weakref.finalize(storage, self._freed, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


class MetaKernels(TorchFunctionMode):
    """On meta tensors: fused attention (flash-style saved tensors) and per-use casts of fp8 weights."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
            given = {**dict(zip(names, args, strict=False)), **kwargs}
            q, k, v = given["query"], given["key"], given["value"]
            plain = given.get("attn_mask") is None and not given.get("enable_gqa", False)
            if q.device.type == "meta" and plain and q.shape[:-2] == k.shape[:-2]:
                extra = {"scale": given["scale"]} if given.get("scale") is not None else {}
                out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, 0.0, bool(given.get("is_causal", False)), **extra)
                return out
        if func in (F.linear, F.conv2d) and len(args) >= 2:
            x, w = args[0], args[1]
            if isinstance(w, torch.Tensor) and w.dtype in FP8_DTYPES:
                b = args[2] if len(args) > 2 else kwargs.pop("bias", None)
                b = b.to(x.dtype) if isinstance(b, torch.Tensor) else b
                return func(x, w.to(x.dtype), b, *args[3:], **kwargs)
        return func(*args, **kwargs)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are meta tensors of the same shapes and
    dtypes: the same classes and forward code, no memory.  The original is not touched."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer at its stored dtype (shared tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t.untyped_storage())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def measure_learning_step(model: nn.Module, layout: Any, denoise: Callable, x: torch.Tensor,
                          sigmas: torch.Tensor, block_checkpointing: bool,
                          grad_context: Callable[[], Any] = contextlib.nullcontext,
                          block_paths: list[str] | None = None) -> int:
    """Peak bytes of activations (beyond weights and ``x``) of one learning step on ``model``.

    Runs exactly the step ``MaskLearner`` recomputes: gates sampled from λ, the gated denoiser
    call with grad (blocks checkpointed if asked) and the VJP for the input and every λ.
    ``x``: the step's input latent; ``sigmas``: at least two values (step 0 is traced).
    Works on meta tensors (no memory, no compute) and on real ones alike.  ``block_paths``
    overrides the blocks the architecture table names (for models without a table).
    """
    from .learn import LearnSettings, MaskLearner, frozen_weights
    from .trajectory import step_vjp

    if layout is None:
        raise EcoDiffError("the memory preflight needs the model's unit layout (its gates are part of the step)")
    mode = "on" if block_checkpointing and block_paths is None else "off"
    learner = MaskLearner(model, layout, LearnSettings(block_checkpointing=mode))
    if block_checkpointing and block_paths is not None:
        learner.block_paths = list(block_paths)
    if block_checkpointing and not learner.block_paths:
        raise EcoDiffError(f"architecture '{layout.arch}' names no blocks to checkpoint")
    params = list(learner.logits.values())
    upstream = torch.ones_like(x)
    with learner.controller.installed(), frozen_weights(model), MetaKernels(), \
            LiveBytes() as counter:
        grads = step_vjp(denoise, x, sigmas, 0, upstream, params, learner._gate_setter(0), True,
                         grad_context, learner._step_context)
        del grads
    return counter.peak


_CACHE: dict[tuple, int] = {}


def estimate_step(key: tuple, weights: Callable[[], int], measure: Callable[[bool], int],
                  modes: tuple[bool, ...] = (False, True)) -> StepMemory:
    """``StepMemory`` for ``key`` (model layout fingerprint, shapes, dtypes, CFG), each mode traced
    once: ``measure(block_checkpointing)`` gives an activation peak, ``weights()`` the weight bytes.
    Only the block-checkpointing ``modes`` asked for are traced (and filled in)."""
    for mode in modes:
        if (key, mode) not in _CACHE:
            _CACHE[(key, mode)] = measure(mode)
    if (key, "weights") not in _CACHE:
        _CACHE[(key, "weights")] = weights()
    return StepMemory(_CACHE[(key, "weights")], _CACHE.get((key, False)), _CACHE.get((key, True)))


@contextlib.contextmanager
def no_cache() -> Iterator[None]:
    """Estimates made inside are not kept (tests)."""
    saved = dict(_CACHE)
    try:
        yield
    finally:
        _CACHE.clear()
        _CACHE.update(saved)


def to_fp8(model: nn.Module, dtype: torch.dtype = torch.float8_e4m3fn) -> nn.Module:
    """Store every Linear / Conv2d weight of ``model`` in 8 bits (in place), as ComfyUI's fp8
    UNETLoader does; ``MetaKernels`` casts them back at each use."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
    return model


def fit_advice(estimate: StepMemory, free: int, block_checkpointing: bool, weight_dtype: str,
               what: str) -> str:
    """The message when one learning step does not fit: the estimate, the free memory, the remedies."""
    need = estimate.total(block_checkpointing)
    lines = [f"learning {what} needs about {need / GB:.1f} GB for one step (weights {estimate.weights / GB:.1f} GB "
             f"+ activations {estimate.activations(block_checkpointing) / GB:.1f} GB"
             f"{' with' if block_checkpointing else ' without'} block checkpointing), "
             f"but only {free / GB:.1f} GB are free on the device."]
    remedies = []
    if not block_checkpointing:
        remedies.append(f"turn block checkpointing on (then about {estimate.total(True) / GB:.1f} GB)")
    remedies.append("learn at a lower resolution (activations grow with the pixel count)")
    if weight_dtype not in ("fp8", "float8_e4m3fn", "float8_e5m2"):
        remedies.append("load the model with fp8 weights (UNETLoader weight_dtype fp8_e4m3fn), about half the "
                        "weight memory of 16-bit weights")
    remedies.append("free memory held by other models or use a larger GPU")
    return lines[0] + " To make it fit: " + "; ".join(remedies) + "."
