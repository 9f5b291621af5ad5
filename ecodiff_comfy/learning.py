"""Learning a sparsity mask for a MODEL inside ComfyUI: the engine's ``MaskLearner`` run in the body
of ``sampling.run_with_denoisers`` (one x0 denoiser per calibration prompt, CFG included).

Facts this relies on (ComfyUI 0.3.64): the executor runs nodes under ``torch.inference_mode()``, so
a mask loaded inside a workflow holds inference tensors (they are cloned before learning resumes);
learning hooks live only inside ``MaskLearner.learn`` (the MODEL's shared module is left as it was).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..ecodiff_core.learn import LearnSettings, MaskLearner, StepInfo, model_response, run_inputs
from ..ecodiff_core.maskfile import MaskState
from . import sampling
from .progress import state_kept_on_stop
from .weights import model_layout, refuse_pruned

log = logging.getLogger("ecodiff")


def learn_mask(model: Any, conds: Sequence[tuple[list, list]], spec: sampling.SamplingSpec, settings: LearnSettings,
               resume: MaskState | None = None, callback: Callable[[StepInfo], bool | None] | None = None,
               on_stop: Callable[[MaskState], None] | None = None) -> MaskState:
    """Learn a sparsity mask for ``model``.  If ``callback`` raises (ComfyUI's interrupt comes
    through ProgressBar.update), ``on_stop`` receives the latest good state, then the error goes on.

    ``resume`` is continued only if it was learned from the same weights (as loaded, patches
    included), conditioning, σ schedule, starting latents and settings, and the model responds
    alike (its x0 prediction for the first prompt, which sees model options, model and object
    patches and weight wrappers); otherwise learning starts fresh and the returned state's
    ``start_note`` says why.  An already-pruned MODEL is refused (EcoDiffError)."""
    refuse_pruned(model, "learn a mask")
    layout = model_layout(model)
    if resume is not None:
        resume.check_layout(layout)
        with torch.inference_mode(False):  # a mask loaded inside the executor holds inference tensors
            resume = dataclasses.replace(resume, logits={k: v.clone() for k, v in resume.logits.items()},
                                         optimizer={k: v.clone() for k, v in resume.optimizer.items()})

    def body(session: sampling.Session) -> MaskState:
        first = session.samples[0]  # the model's behaviour (patches, options, sampling objects), ungated
        inputs = run_inputs(session.module, conds, settings, {
            **dataclasses.asdict(spec), "sigmas": session.sigmas, "starts": [s.noise for s in session.samples]},
            response=model_response(first.denoise, first.noise, session.sigmas))
        learner = MaskLearner(session.module, layout, settings, resume=resume, grad_context=sampling.grad_context,
                              inputs=inputs)
        with state_kept_on_stop(lambda: learner.state, on_stop):
            return learner.learn(session.samples, session.sigmas, callback)

    log.info("EcoDiff: calibration trajectories of %d steps at %d×%d", spec.steps, spec.width, spec.height)
    return sampling.run_with_denoisers(model, conds, spec, body)  # the engine logs start and finish
