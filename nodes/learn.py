"""Learn Sparsity Mask: EcoDiff's end-to-end mask learning on a MODEL."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..ecodiff_comfy import preflight
from ..ecodiff_comfy.folders import MASK_FOLDER, default_prompts, folder, safe_filename
from ..ecodiff_comfy.progress import Progress, notify
from ..ecodiff_comfy.sampling import LEARN_SAMPLERS, SamplingSpec, encode_prompts, scheduler_names
from ..ecodiff_comfy.weights import model_layout
from ..ecodiff_core.errors import EcoDiffError, MaskFileError
from ..ecodiff_core.hard_concrete import REGULARIZERS
from ..ecodiff_core.learn import LearnSettings, StepInfo
from ..ecodiff_core.maskfile import MaskState, load_mask, save_mask
from .common import CATEGORY, SEED_CONTROL, MaskType, mask_summary, parse_prompts


class LearnSparsityMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EcoDiffLearnMask",
            display_name="Learn Sparsity Mask (EcoDiff)",
            category=CATEGORY,
            description="Learns one gate per attention head, FFN neuron (and FLUX modulation channel) so that the "
                        "gated model's final latent matches the original's over whole sampling trajectories, with "
                        "a sparsity penalty. Interrupting keeps the latest mask in models/ecodiff_masks; running "
                        "again with the same run_name resumes from it when the model, prompts and settings "
                        "are unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to learn a mask for (SD1.x, SD2, SDXL, SD3.x, FLUX.1). It is not modified."),
                io.Clip.Input("clip", optional=True, tooltip="Text encoder used to encode the calibration prompts. Not needed when positive/negative conditionings are connected."),
                io.String.Input("prompts", multiline=True, default=default_prompts(), tooltip="Calibration prompts, one per line (lines starting with # are ignored). The default set covers people, animals, places, objects and styles."),
                io.String.Input("negative_prompt", multiline=True, default="", tooltip="Negative prompt for classifier-free guidance, shared by all calibration prompts."),
                io.Int.Input("max_prompts", default=0, min=0, max=10000, tooltip="Use only the first N prompts (0 = all). Fewer prompts learn faster but generalise less."),
                io.Int.Input("width", default=1024, min=16, max=8192, step=8, tooltip="Image width of the calibration trajectories, in pixels."),
                io.Int.Input("height", default=1024, min=16, max=8192, step=8, tooltip="Image height of the calibration trajectories, in pixels."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps of each calibration trajectory (memory does not grow with steps when checkpointing is on)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=30.0, step=0.1, tooltip="Classifier-free guidance scale used along the trajectories (use 1.0 for FLUX)."),
                io.Combo.Input("sampler_name", options=list(LEARN_SAMPLERS), default="euler", tooltip="Sampler of the calibration trajectories; learning needs a deterministic one (Euler)."),
                io.Combo.Input("scheduler", options=scheduler_names(), default="normal", tooltip="Scheduler giving the σ schedule, from the model's own sampling settings."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=SEED_CONTROL, tooltip="Seed of the starting noise (prompt i uses seed + i, modulo 2^64) and of the gate noise. Keep it fixed: a new seed means learning again."),
                io.Int.Input("epochs", default=2, min=1, max=1000, tooltip="Passes over all prompts."),
                io.Int.Input("accumulate", default=4, min=1, max=1000, tooltip="Prompts per optimiser step (gradient accumulation)."),
                io.Float.Input("beta", default=0.5, min=0.0, max=100.0, step=0.01, tooltip="Weight of the sparsity penalty: higher removes more units."),
                io.Combo.Input("regularizer", options=list(REGULARIZERS), default="l1", tooltip="Sparsity penalty: l1 = mean |λ| (official SDXL), sigmoid = mean sigmoid(0.4λ+1) (official FLUX), l0 = expected fraction of open gates."),
                io.Float.Input("lr_heads", default=0.1, min=1e-6, max=10.0, step=0.01, tooltip="Learning rate of the attention-head logits."),
                io.Float.Input("lr_neurons", default=0.1, min=1e-6, max=10.0, step=0.01, tooltip="Learning rate of the feed-forward neuron logits."),
                io.Float.Input("lr_channels", default=0.5, min=1e-6, max=10.0, step=0.01, tooltip="Learning rate of the FLUX modulation-channel logits (ignored for other models)."),
                io.Boolean.Input("checkpointing", default=True, tooltip="Time-step gradient checkpointing: memory of one step whatever the step count, about one extra forward per step."),
                io.String.Input("run_name", default="ecodiff_run", tooltip="Name of the mask file kept up to date in models/ecodiff_masks (after an interrupt, a rerun with the same name resumes)."),
                io.Boolean.Input("resume", default=True, tooltip="Resume an unfinished run saved under run_name if it was learned on the same model weights, prompts and settings; otherwise learning starts fresh and the summary says why."),
                MaskType.Input("resume_mask", optional=True, tooltip="Continue learning from this mask instead (it must come from the same model; if its weights, prompts or settings differ, learning starts fresh and the summary says why)."),
                io.Conditioning.Input("positive", optional=True, tooltip="Instead of CLIP + prompts: one positive conditioning (a single calibration prompt)."),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative conditioning to go with 'positive'."),
                io.Combo.Input("block_checkpointing", options=["auto", "on", "off"], default="auto", optional=True, tooltip="Activation checkpointing per transformer/ResNet block inside each step: far less memory (SDXL fits in 12 GB, FLUX with fp8 weights in 16 GB) for about one extra forward. auto = on only when the memory check says the step would not fit otherwise."),
            ],
            outputs=[
                MaskType.Output(display_name="mask", tooltip="The learned logits (one per prunable unit); feed Apply Pruned Mask or Save Sparsity Mask."),
                io.String.Output(display_name="summary", tooltip="Steps, first and last loss, whether learning finished, and why a saved run was not resumed."),
            ],
            hidden=[io.Hidden.unique_id],
            not_idempotent=False,
        )

    @classmethod
    def execute(cls, model, prompts: str, negative_prompt: str, max_prompts: int, width: int, height: int,
                steps: int, cfg: float, sampler_name: str, scheduler: str, seed: int, epochs: int, accumulate: int,
                beta: float, regularizer: str, lr_heads: float, lr_neurons: float, lr_channels: float,
                checkpointing: bool, run_name: str, resume: bool, clip=None, resume_mask: MaskState | None = None,
                positive=None, negative=None, block_checkpointing: str = "auto") -> io.NodeOutput:
        conds = cls._conditionings(clip, prompts, negative_prompt, max_prompts, positive, negative)
        spec = SamplingSpec(width=width, height=height, steps=steps, cfg=cfg, sampler_name=sampler_name,
                                   scheduler=scheduler, seed=seed)
        settings = LearnSettings(epochs=epochs, accumulate=accumulate, beta=beta, regularizer=regularizer,
                                 lr={"head": lr_heads, "neuron": lr_neurons, "channel": lr_channels},
                                 checkpointing=checkpointing, block_checkpointing=block_checkpointing, seed=seed)
        layout = model_layout(model)
        path = folder(MASK_FOLDER) / safe_filename(run_name)
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
                          f"saved to models/{MASK_FOLDER}/{path.name}"])
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
