"""LoRA Recover: train a LoRA on a pruned MODEL that distils the original MODEL."""
from __future__ import annotations

from comfy_api.latest import io

from ..ecodiff_comfy import recover as host
from ..ecodiff_comfy.folders import LORA_FOLDER, RECOVER_FOLDER, folder, safe_filename
from ..ecodiff_comfy.progress import Progress, notify
from ..ecodiff_comfy.sampling import SamplingSpec, scheduler_names
from ..ecodiff_core.recover import STATE_SOURCES, TARGET_MODULES, RecoverSettings, RecoverStepInfo, save_recover_state
from .common import calibration_inputs, node_schema
from .learn import LearnSparsityMask

_D = RecoverSettings()


class LoraRecover(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="EcoDiffLoraRecover", display_name="EcoDiff LoRA Recover",
            description="Trains a LoRA on the pruned model so that its x0 predictions match the original model's "
                        "on states along the calibration prompts' trajectories (distillation, no images needed). "
                        "Outputs the pruned model with the LoRA applied and saves the LoRA to models/loras, where "
                        "LoraLoaderModelOnly applies it to the same pruned model. Interrupting keeps the latest "
                        "state in models/ecodiff_recover; running again with the same lora_name resumes.",
            inputs=[
                io.Model.Input("model", tooltip="The pruned model (from Apply Pruned Mask or Load Pruned Model). It is "
                                                "not modified."),
                io.Model.Input("original_model", tooltip="The full model it was pruned from: the teacher whose "
                                                         "predictions the LoRA learns to match."),
                *calibration_inputs(
                    clip="Text encoder for the calibration prompts. Not needed when positive/negative conditionings "
                         "are connected.",
                    prompts="Calibration prompts, one per line (lines starting with # are ignored).",
                    negative_prompt="Negative prompt for classifier-free guidance, shared by all prompts.",
                    max_prompts="Use only the first N prompts (0 = all)."),
                io.Int.Input("sample_steps", default=20, min=1, max=200,
                             tooltip="Euler steps of each calibration trajectory; its step inputs are the training "
                                     "states."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance scale of the trajectories and targets (use 1.0 for "
                                       "FLUX)."),
                io.Combo.Input("scheduler", options=scheduler_names(), default="normal",
                               tooltip="Scheduler giving the σ schedule."),
                io.Combo.Input("states", options=list(STATE_SOURCES), default=_D.states,
                               tooltip="Whose trajectories give the training states: 'original' = the full model's "
                                       "(default; recovered better on the embedded model and needs one pass fewer), "
                                       "'pruned' = the pruned model's own, without the LoRA (the states it meets when "
                                       "sampling)."),
                io.Int.Input("rank", default=_D.rank, min=1, max=4096, tooltip="LoRA rank."),
                io.Float.Input("alpha", default=_D.alpha, min=0.001, max=4096.0, step=0.5,
                               tooltip="LoRA alpha: the update is alpha/rank · up·down."),
                io.Combo.Input("target_modules", options=list(TARGET_MODULES), default=_D.targets,
                               tooltip="Which Linear layers get a LoRA: attention, attention + feed-forward, or every "
                                       "Linear."),
                io.Int.Input("train_steps", default=_D.steps, min=1, max=1000000, tooltip="Optimiser steps."),
                io.Float.Input("learning_rate", default=_D.lr, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate."),
                io.Int.Input("batch", default=_D.batch, min=1, max=1024,
                             tooltip="States per optimiser step (gradient accumulation over prompts and steps)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the trajectories' noise (prompt i uses seed + i), the LoRA "
                                     "initialisation and the draw of states."),
                io.String.Input("lora_name", default="ecodiff_recover",
                                tooltip="File name in models/loras (and of the resumable state in "
                                        "models/ecodiff_recover)."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Resume an unfinished run saved under lora_name for this pruned model."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Instead of CLIP + prompts: one positive conditioning."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative conditioning to go with 'positive'."),
            ],
            outputs=[
                io.Model.Output(display_name="model",
                                tooltip="The pruned model with the recovered LoRA applied (as LoraLoaderModelOnly "
                                        "applies the saved file)."),
                io.String.Output(display_name="summary", tooltip="Steps, first and last loss, and the saved file."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, original_model, prompts: str, negative_prompt: str, max_prompts: int, width: int,
                height: int, sample_steps: int, cfg: float, scheduler: str, states: str, rank: int, alpha: float,
                target_modules: str, train_steps: int, learning_rate: float, batch: int, seed: int, lora_name: str,
                resume: bool, clip=None, positive=None, negative=None) -> io.NodeOutput:
        settings = RecoverSettings(rank=rank, alpha=alpha, targets=target_modules, steps=train_steps,
                                   lr=learning_rate, batch=batch, seed=seed, states=states)
        _, record = host.check_models(original_model, model)
        conds = LearnSparsityMask._conditionings(clip, prompts, negative_prompt, max_prompts, positive, negative)
        spec = SamplingSpec(width=width, height=height, steps=sample_steps, cfg=cfg, scheduler=scheduler,
                                   seed=seed)
        stem = safe_filename(lora_name, "")
        state_path = folder(RECOVER_FOLDER) / f"{stem}.safetensors"
        fingerprint = host.run_fingerprint(original_model, model, record, conds, spec, settings)
        start, note = host.unfinished_state(state_path, fingerprint) if resume else (None, "")
        progress = Progress(train_steps, getattr(cls.hidden, "unique_id", None) if cls.hidden else None)

        def callback(info: RecoverStepInfo) -> None:
            notify("ecodiff.learn", {"node": progress.node_id, "step": info.step, "total": info.total_steps,
                                            "loss": info.loss, "recon": info.loss, "reg": 0.0, "sparsity": {}})
            progress.update(info.step, info.total_steps)

        result = host.recover_lora(original_model, model, conds, spec, settings, resume=start, callback=callback,
                                   on_stop=lambda s: save_recover_state(state_path, s))
        save_recover_state(state_path, result.state)
        tensors = result.lora.tensors()
        path = host.save_lora(folder(LORA_FOLDER) / f"{stem}.safetensors", tensors, result.metadata)
        out = host.apply_lora(model, tensors)
        losses = [h["loss"] for h in result.state.history]
        done = "finished" if result.state.progress.get("finished") else f"stopped ({result.state.stop_reason})"
        loss = f"loss {losses[0]:.5g} → {losses[-1]:.5g}" if losses else "no steps"
        text = (f"LoRA Recover: {len(result.lora.paths)} layers, rank {rank}, {len(losses)} steps, {loss}, {done}\n"
                + (f"{note}\n" if note else "") + f"saved to models/{LORA_FOLDER}/{path.name}")
        return io.NodeOutput(out, text, ui={"text": (text,)})
