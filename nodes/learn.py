"""Learn Sparsity Mask: EcoDiff's end-to-end mask learning on a MODEL."""
from __future__ import annotations

import dataclasses
import logging

from comfy_api.latest import io

from ..ecodiff_comfy import preflight
from ..ecodiff_comfy.folders import MASK_FOLDER, RUNS_SUBFOLDER, run_state_path
from ..ecodiff_comfy.progress import Progress, notify
from ..ecodiff_comfy.sampling import LEARN_SAMPLERS, SamplingSpec, encode_prompts, scheduler_names
from ..ecodiff_comfy.weights import model_layout, refuse_pruned
from ..ecodiff_core.errors import EcoDiffError, MaskFileError
from ..ecodiff_core.learn import LearnSettings, StepInfo
from ..ecodiff_core.maskfile import MaskState, load_mask, save_mask
from .common import SEED_CONTROL, MaskType, calibration_inputs, mask_summary, node_schema, parse_prompts
from .learn_settings import DEFAULTS, LearnSettingsType, with_widgets


class LearnSparsityMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="EcoDiffLearnMask", display_name="Learn Sparsity Mask (EcoDiff)",
            description="Learns one gate per attention head, FFN neuron (and FLUX modulation channel) so that the "
                        "gated model's final latent matches the original's over whole sampling trajectories, with "
                        "a sparsity penalty. Interrupting keeps the latest state in models/ecodiff_masks/.runs; "
                        "running again with the same run_name resumes from it when the model, prompts and settings "
                        "are unchanged. Save the learned mask with Save Sparsity Mask.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to learn a mask for (SD1.x, SD2, SDXL, SD3.x, "
                                                "FLUX.1). It is not modified."),
                *calibration_inputs(
                    clip="Text encoder used to encode the calibration prompts. Not needed when positive/negative "
                         "conditionings are connected.",
                    prompts="Calibration prompts, one per line (lines starting with # are ignored). The default set "
                            "covers people, animals, places, objects and styles.",
                    negative_prompt="Negative prompt for classifier-free guidance, shared by all calibration prompts.",
                    max_prompts="Use only the first N prompts (0 = all). Fewer prompts learn faster but generalise "
                                "less."),
                io.Int.Input("steps", default=20, min=1, max=200,
                             tooltip="Sampling steps of each calibration trajectory (memory does not grow with steps "
                                     "when checkpointing is on)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance scale used along the trajectories (use 1.0 for "
                                       "FLUX)."),
                io.Combo.Input("sampler_name", options=list(LEARN_SAMPLERS), default="euler",
                               tooltip="Sampler of the calibration trajectories; learning needs a deterministic one "
                                       "(Euler)."),
                io.Combo.Input("scheduler", options=scheduler_names(), default="normal",
                               tooltip="Scheduler giving the σ schedule, from the model's own sampling settings."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=SEED_CONTROL,
                             tooltip="Seed of the starting noise (prompt i uses seed + i, modulo 2^64) and of the gate "
                                     "noise. Keep it fixed: a new seed means learning again."),
                io.Int.Input("epochs", default=DEFAULTS.epochs, min=1, max=1000,
                             tooltip="Passes over all prompts (the official runs use 4; fewer leave most gates "
                                     "undecided)."),
                io.Float.Input("beta", default=DEFAULTS.beta, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the sparsity penalty: higher removes more units."),
                io.String.Input("run_name", default="ecodiff_run",
                                tooltip="Name of the run state kept up to date in "
                                        f"models/ecodiff_masks/{RUNS_SUBFOLDER} (hidden from the masks list; after an "
                                        "interrupt, a rerun with the same name resumes). Save the mask with Save "
                                        "Sparsity Mask."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Resume an unfinished run saved under run_name if it was learned on the same "
                                         "model weights, prompts and settings; otherwise learning starts fresh and the "
                                         "summary says why."),
                MaskType.Input("resume_mask", optional=True,
                               tooltip="Continue learning from this mask instead (it must come from the same model; if "
                                       "its weights, prompts or settings differ, learning starts fresh and the summary "
                                       "says why)."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Instead of CLIP + prompts: one positive conditioning (a single "
                                              "calibration prompt)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative conditioning to go with 'positive'."),
                LearnSettingsType.Input("settings", optional=True,
                                        tooltip="Expert settings (accumulation, learning rates per kind, regulariser, "
                                                "gate temperature, λ₀, checkpointing) from an EcoDiff Learn Settings "
                                                "node; without it the engine's defaults are used."),
            ],
            outputs=[
                MaskType.Output(display_name="mask",
                                tooltip="The learned logits (one per prunable unit); feed Apply Pruned Mask or Save "
                                        "Sparsity Mask."),
                io.String.Output(display_name="summary",
                                 tooltip="Steps, first and last loss, whether learning finished, and why a saved run "
                                         "was not resumed."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,  # learning writes its run state: a graph of loader → Learn runs on its own
            not_idempotent=False,
        )

    @classmethod
    def execute(cls, model, prompts: str, negative_prompt: str, max_prompts: int, width: int, height: int,
                steps: int, cfg: float, sampler_name: str, scheduler: str, seed: int, epochs: int, beta: float,
                run_name: str, resume: bool, clip=None, resume_mask: MaskState | None = None, positive=None,
                negative=None, settings: LearnSettings | None = None, **expert) -> io.NodeOutput:
        """``expert``: EcoDiff Learn Settings widgets given by name (API callers, older workflows); they
        override ``settings``."""
        refuse_pruned(model, "learn a mask")
        settings = dataclasses.replace(with_widgets(settings or DEFAULTS, **expert), epochs=epochs, beta=beta,
                                       seed=seed)
        conds = cls._conditionings(clip, prompts, negative_prompt, max_prompts, positive, negative)
        spec = SamplingSpec(width=width, height=height, steps=steps, cfg=cfg, sampler_name=sampler_name,
                                   scheduler=scheduler, seed=seed)
        layout = model_layout(model)
        path = run_state_path(run_name)
        start, note = (resume_mask, "") if resume_mask is not None else (
            cls._unfinished(path, layout) if resume else (None, ""))
        if start is not None:
            start.check_layout(layout)
        total = [0]
        progress = Progress(1, getattr(cls.hidden, "unique_id", None) if cls.hidden else None)

        def callback(info: StepInfo) -> None:
            total[0] = info.total_steps
            notify("ecodiff.learn", {"node": progress.node_id, "step": info.step, "total": info.total_steps,
                                            "loss": info.loss, "recon": info.recon, "reg": info.reg,
                                            "sparsity": info.sparsity})
            progress.update(info.step, info.total_steps)

        state = preflight.learn_mask(model, conds, spec, settings, resume=start, callback=callback,
                                  on_stop=lambda s: save_mask(path, s))
        save_mask(path, state)
        text = "\n".join([mask_summary(state), *([note] if note else []),
                          f"run state kept in models/{MASK_FOLDER}/{RUNS_SUBFOLDER}/{path.name} (for resuming); "
                          "save the mask with Save Sparsity Mask"])
        return io.NodeOutput(state, text, ui={"text": (text,)})

    @staticmethod
    def _conditionings(clip, prompts: str, negative_prompt: str, max_prompts: int, positive, negative) -> list:
        if positive is not None:
            return [(positive, negative if negative is not None else positive)]
        lines = parse_prompts(prompts, max_prompts)
        if not lines:
            raise EcoDiffError("no calibration prompts: the prompts box is empty (write one prompt per line, "
                               "or connect positive/negative conditioning)")
        return encode_prompts(clip, lines, negative_prompt)

    @staticmethod
    def _unfinished(path, layout) -> tuple[MaskState | None, str]:
        """The unfinished run saved at ``path`` if it fits ``layout``; else None and why not."""
        if not path.is_file():
            return None, ""
        try:
            state = load_mask(path)
            if state.progress.get("finished"):
                return None, ""
            state.check_layout(layout)
        except MaskFileError as exc:  # damaged, or learned on another layout: start fresh
            note = f"started fresh instead of resuming {path.name}: {exc}"
            logging.getLogger("ecodiff").warning("EcoDiff learning %s", note)
            return None, note
        return state, ""
