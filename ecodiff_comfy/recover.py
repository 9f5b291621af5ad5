"""LoRA Recover inside ComfyUI: the host side of ``ecodiff_core.recover``.

The LoRA is the engine's own (``LoraWeights``); inside ComfyUI it is applied to the pruned MODEL as
patcher-scoped weight wrappers (``ModelPatcher.add_weight_wrapper``, as ComfyUI's own trainer does),
each computing W + (α/r)·up·down in float32 and casting back to the weight's dtype, which is what
ComfyUI's LoRA loader merges.  The input MODELs are never modified.

Three passes through ``sampling.run_with_denoisers`` keep at most one model loaded at a time (ComfyUI's
model management may unload the other): (1) the states x_t along the calibration trajectories of the
pruned model (or of the original), (2) the original model's x0 on those states, kept on the CPU,
(3) training.  The output MODEL is the pruned MODEL with the saved LoRA file's tensors applied by
``comfy.sd.load_lora_for_models`` — the path of the stock LoraLoaderModelOnly.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..ecodiff_core.errors import EcoDiffError
from ..ecodiff_core.learn import frozen_weights
from ..ecodiff_core.recover import (
    DistillProblem,
    LoraRecoverer,
    LoraWeights,
    RecoverSettings,
    RecoverState,
    RecoverStepInfo,
    distillation_loss,
    lora_metadata,
    lora_target_paths,
    rollout_states,
    teacher_targets,
)
from ..ecodiff_core.safetensors_file import write_atomic
from . import sampling
from .progress import state_kept_on_stop
from .weights import diffusion_module, model_layout, pruning_info

log = logging.getLogger("ecodiff")


class _LoraWeight:
    """Patcher-scoped weight wrapper: W → W + ΔW of one path (gradients reach the LoRA)."""

    def __init__(self, lora: LoraWeights, path: str) -> None:
        self.lora, self.path = lora, path

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.lora.merged_weight(self.path, weight)

    def move_to(self, device: Any = None) -> int:
        return 0


def check_models(original: Any, pruned: Any) -> tuple[Any, dict]:
    """The original's layout and the pruned MODEL's record, after checking they belong together."""
    record = pruning_info(pruned)
    if record is None:
        raise EcoDiffError("LoRA Recover trains on a pruned MODEL: connect the output of Apply Pruned Mask "
                           "(mode 'prune') or Load Pruned Model to 'model'")
    if pruning_info(original) is not None:
        raise EcoDiffError("'original_model' is itself pruned: connect the full model the mask was learned on")
    layout = model_layout(original)
    if layout.fingerprint() != record["fingerprint"]:
        raise EcoDiffError(f"the pruned MODEL was pruned from another model (layout {record['fingerprint']}, "
                           f"original_model has {layout.fingerprint()}); connect the model it was pruned from")
    return layout, record


def pruned_fingerprint(record: dict) -> str:
    """Identifies a pruned model's shapes: layout fingerprint + kept units."""
    data = json.dumps([record["fingerprint"], record["kept"]], sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def _weights_digest(model: Any, h: hashlib._Hash) -> None:
    """A cheap digest of a MODEL's weights: shape and sum of a spread of its parameters."""
    params = list(diffusion_module(model).state_dict().items())
    for name, t in params[:: max(1, len(params) // 16)] + params[-1:]:
        h.update(f"{name}{tuple(t.shape)}{float(t.detach().float().sum()):.6e}".encode())


def _conds_digest(obj: Any, h: hashlib._Hash) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(obj.detach().float().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _conds_digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _conds_digest(v, h)
    else:
        h.update(repr(obj).encode())


def run_fingerprint(original: Any, pruned: Any, record: dict, conds: Sequence[tuple[list, list]],
                    spec: sampling.SamplingSpec, settings: RecoverSettings) -> str:
    """Identifies a recovery run's inputs: both models (shapes and weights), the calibration
    conditionings, the trajectories and the settings that shape training (not ``steps``)."""
    h = hashlib.sha256(pruned_fingerprint(record).encode())
    with torch.inference_mode(False):
        _weights_digest(original, h)
        _weights_digest(pruned, h)
        _conds_digest(list(conds), h)
    fixed = {k: v for k, v in settings.to_dict().items() if k != "steps"}
    h.update(json.dumps([vars(spec), fixed], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def lora_patched(model: Any, lora: LoraWeights) -> Any:
    """A clone of ``model`` whose target Linear weights read W + ΔW (training wrappers)."""
    patcher = model.clone()
    for path in lora.paths:
        patcher.add_weight_wrapper(f"diffusion_model.{path}.weight", _LoraWeight(lora, path))
    return patcher


@dataclass
class RecoverResult:
    state: RecoverState
    lora: LoraWeights
    metadata: dict[str, str]
    loss_before: float | None = None
    loss_after: float | None = None


def recover_lora(original: Any, pruned: Any, conds: Sequence[tuple[list, list]], spec: sampling.SamplingSpec,
                 settings: RecoverSettings, resume: RecoverState | None = None,
                 callback: Callable[[RecoverStepInfo], bool | None] | None = None,
                 on_stop: Callable[[RecoverState], None] | None = None, measure: bool = False) -> RecoverResult:
    """Train a LoRA on ``pruned`` that distils ``original`` along the calibration trajectories.

    ``conds``: (positive, negative) CONDITIONING per prompt; ``spec``: the trajectories (size, steps,
    CFG, scheduler, seed).  If ``callback`` raises (ComfyUI's interrupt), ``on_stop`` receives the
    latest good state and the error goes on.  ``measure`` adds the distillation loss over every state
    before and after (one more forward per state, twice).
    """
    import comfy.model_management as mm

    settings.validate()
    layout, record = check_models(original, pruned)
    fingerprint = run_fingerprint(original, pruned, record, conds, spec, settings)
    with torch.inference_mode(False):
        module = diffusion_module(pruned)
        paths = lora_target_paths(module, layout, settings.targets)
        lora = LoraWeights.for_module(module, paths, settings.rank, settings.alpha, settings.seed,
                                      device=mm.get_torch_device())
        if resume is not None:
            resume = RecoverState(resume.arch, resume.fingerprint, {k: v.clone() for k, v in resume.lora.items()},
                                  resume.settings, dict(resume.progress), list(resume.history),
                                  {k: v.clone() for k, v in resume.optimizer.items()}, resume.stop_reason)
        recoverer = LoraRecoverer(lora, settings, layout.arch, fingerprint, resume, sampling.grad_context)
        student = lora_patched(pruned, lora)

    def states_body(session: sampling.Session) -> list[list[torch.Tensor]]:
        return [[x.cpu() for x in rollout_states(s.denoise, s.noise, session.sigmas)] for s in session.samples]

    def targets_body(states: list[list[torch.Tensor]]):
        def body(session: sampling.Session):
            sig = session.sigmas[:-1]
            out = []
            for s, xs in zip(session.samples, states, strict=True):
                xs = xs if xs is not None else rollout_states(s.denoise, s.noise, session.sigmas)
                xs = [x.to(session.device) for x in xs]
                out.append(([x.cpu() for x in xs], [t.cpu() for t in teacher_targets(s.denoise, xs, sig)]))
            return out
        return body

    if settings.states == "pruned":  # the pruned model without the LoRA: a resumed run sees the same states
        states = sampling.run_with_denoisers(pruned, conds, spec, states_body)
    else:
        states = [None] * len(conds)
    data = sampling.run_with_denoisers(original, conds, spec, targets_body(states))

    def train_body(session: sampling.Session) -> RecoverResult:
        sig = session.sigmas[:-1]
        problems = [DistillProblem(s.denoise, [x.to(session.device) for x in xs], sig,
                                   [t.to(session.device) for t in ts])
                    for s, (xs, ts) in zip(session.samples, data, strict=True)]
        with frozen_weights(session.module):
            before = distillation_loss(problems) if measure else None
            with state_kept_on_stop(lambda: recoverer.state, on_stop):
                state = recoverer.train(problems, callback)
            after = distillation_loss(problems) if measure else None
        meta = lora_metadata(settings, layout.arch, layout.fingerprint(), record["kept"],
                             {"base_model": record.get("model_config_class", ""), "pruned_fingerprint": fingerprint,
                              "steps_trained": state.progress.get("step", 0)})
        return RecoverResult(state, lora, meta, before, after)

    log.info("EcoDiff: LoRA Recover of a pruned %s model (%d layers, rank %d) on %d prompts", layout.arch,
             len(paths), settings.rank, len(conds))
    result = sampling.run_with_denoisers(student, conds, spec, train_body)
    log.info("EcoDiff: LoRA Recover %s after %d steps", "finished" if result.state.progress.get("finished")
             else "stopped", result.state.progress.get("step", 0))
    return result


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write the LoRA file atomically (safetensors with ``metadata``)."""
    path = write_atomic(path, {k: v.contiguous() for k, v in tensors.items()}, metadata)
    log.info("EcoDiff: saved the recovered LoRA to %s", path)
    return path


def apply_lora(model: Any, tensors: dict[str, torch.Tensor], strength: float = 1.0) -> Any:
    """``model`` with the LoRA applied as ComfyUI's LoraLoaderModelOnly does; every key must land."""
    import comfy.lora
    import comfy.lora_convert

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(tensors)), key_map)
    expected = {k for k in tensors if k.endswith(".lora_up.weight")}
    if len(loaded) != len(expected):
        raise EcoDiffError(f"only {len(loaded)} of {len(expected)} LoRA layers map onto this MODEL's weights")
    patched = model.clone()
    done = patched.add_patches(loaded, strength)
    if len(done) != len(loaded):
        raise EcoDiffError(f"only {len(done)} of {len(loaded)} LoRA layers apply to this MODEL")
    return patched


def unfinished_state(path: Path, fingerprint: str) -> tuple[RecoverState | None, str]:
    """(the saved, unfinished state of the same run at ``path`` or None, a note when one was passed
    over because it belongs to other inputs or cannot be read)."""
    from ..ecodiff_core.recover import load_recover_state

    if not path.is_file():
        return None, ""
    try:
        state = load_recover_state(path)
    except EcoDiffError as exc:
        return None, f"the saved state {path.name} could not be read ({exc}); started afresh"
    if state.progress.get("finished"):
        return None, ""
    if state.fingerprint != fingerprint:
        return None, (f"the unfinished run saved as {path.name} was for other inputs (models, prompts, "
                      "trajectories or settings); started afresh")
    return state, f"resumed from step {state.progress.get('step', 0)}"
