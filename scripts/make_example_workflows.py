"""Write example_workflows/*.json (ComfyUI UI format) from the live node schemas.

    COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python scripts/make_example_workflows.py [--check]

(or ``python -m scripts.make_example_workflows``).  Schemas (inputs, widget order, defaults, outputs) come
from ComfyUI's own node classes and this pack's, loaded in-process
(``scripts/workflow_schema.object_info_in_process``), so widget values line up with the nodes exactly.
``--check`` writes nothing and exits 1 when a file differs from what would be written.  The files are
checked before writing (``scripts/workflow_check.py``) and committed; tests validate them
(tests/unit/test_example_workflows.py, tests/server, tests/browser).
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root is where `scripts` and `ecodiff_core` are
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.workflow_check import check_against_schemas, check_structure  # noqa: E402
from scripts.workflow_graph import WorkflowBuilder  # noqa: E402
from scripts.workflow_layout import overlaps  # noqa: E402
from scripts.workflow_schema import EXAMPLES, ROOT, object_info_in_process, schema_inputs  # noqa: E402

SDXL_NOTE = """# EcoDiff on SDXL: learn a mask, prune, compare

1. **Learn Sparsity Mask** runs the 100 shipped calibration prompts through whole 25-step trajectories and learns one
   gate per attention head and FFN neuron (checkpointing keeps memory at one step). It saves its mask as it goes
   to `models/ecodiff_masks/sdxl_ecodiff.safetensors`; interrupt at any time and queue again to resume.
2. **Apply Pruned Mask** removes 20 % of the UNet's parameters (change `sparsity` and queue again: learning is
   cached and does not rerun) and returns a smaller MODEL for any sampler.
3. Both KSamplers use the same seed, so **Compare** shows original vs pruned side by side.

Model: `sd_xl_base_1.0.safetensors` in `models/checkpoints`. The paper used 4 epochs of 50 steps; 2 epochs of 25
steps is a quicker start. **Save Sparsity Mask** writes a copy you can share (see the shared-mask workflow)."""

SD15_NOTE = """# EcoDiff on SD 1.5: learn a mask, prune, compare

Learn Sparsity Mask learns which attention heads and FFN neurons the UNet can lose on the shipped calibration
prompts (512x512, 20 steps, CFG 7). Apply Pruned Mask removes 20 % of the parameters; the two KSamplers share a
seed so Compare shows the difference. The mask is saved to `models/ecodiff_masks/sd15_ecodiff.safetensors`
while learning (interrupt and queue again to resume).

Model: `v1-5-pruned-emaonly-fp16.safetensors` in `models/checkpoints`."""

FLUX_SCHNELL_NOTE = """# EcoDiff on FLUX.1-schnell: learn a mask, prune, compare

Schnell is distilled for 4 steps at CFG 1 (no negative prompt is used). The mask covers attention heads, MLP
neurons and the modulation channels of the double and single blocks (`lr_channels`); `sigmoid` is the
official FLUX regulariser with beta 0.01. Apply Pruned Mask removes 20 % of the parameters.

Files: `flux1-schnell.safetensors` in `models/diffusion_models` (or `models/unet`), `clip_l.safetensors` and
`t5xxl_fp8_e4m3fn.safetensors` in `models/text_encoders`, `ae.safetensors` in `models/vae`.
Learning backpropagates through the 12B model: expect to need a large GPU."""

FLUX_DEV_NOTE = """# EcoDiff on FLUX.1-dev: learn a mask, prune, compare

FLUX-dev uses guidance distillation: CFG stays 1 and FluxGuidance (3.5) sets the guidance strength for
sampling (Learn Sparsity Mask uses the model's default guidance, 3.5). 20-step trajectories, `sigmoid`
regulariser with beta 0.01 as in the official FLUX config; Apply Pruned Mask removes 20 % of the parameters.

Files: `flux1-dev.safetensors` in `models/diffusion_models`, `clip_l.safetensors` and `t5xxl_fp16.safetensors`
in `models/text_encoders`, `ae.safetensors` in `models/vae`. Memory does not grow with the number of steps
(checkpointing), but the 12B model needs a large GPU."""

SD35_NOTE = """# EcoDiff on SD 3.5 Large: learn a mask, prune, compare

The MMDiT's joint attention heads (the context and image streams share each head) and both MLPs are gated.
1024x1024, 20-step trajectories at CFG 4.5 with the sgm_uniform scheduler; Apply Pruned Mask removes 20 % of
the parameters and both KSamplers share a seed for Compare.

Files: `sd3.5_large.safetensors` in `models/checkpoints` (its MODEL and VAE are used) and `clip_l.safetensors`,
`clip_g.safetensors`, `t5xxl_fp16.safetensors` in `models/text_encoders`."""

SHARED_NOTE = """# Use a shared EcoDiff mask: load, apply, sample

No learning here: **Load Sparsity Mask** reads a mask from `models/ecodiff_masks` (for example one saved by the
SDXL workflow's Save Sparsity Mask, or downloaded from someone who learned it on the same model). Apply Pruned
Mask checks that the mask fits the model and removes 20 % of the parameters; the pruned and original models
sample with the same seed and Compare shows both.

A mask learned on another model is refused with a clear error. To keep the pruned model itself, add
**Save Pruned Model** after Apply Pruned Mask (ComfyUI's checkpoint loaders cannot read width-pruned weights:
load it back with Load Pruned Model)."""

SD15_RECOVER_NOTE = """# EcoDiff on SD1.5: learn, prune 30 %, recover with a LoRA, compare

1. Learn Sparsity Mask learns which attention heads and FFN neurons matter (calibration prompts).
2. Apply Pruned Mask removes 30 % of the UNet's parameters (a smaller model, not a masked one).
3. EcoDiff LoRA Recover trains a rank-16 LoRA on the pruned model so that its predictions match the
   original model's along the calibration trajectories (no images needed), applies it, and saves it
   to models/loras/sd15_ecodiff_recover.safetensors. LoraLoaderModelOnly applies that file to the
   same pruned model later (Save Pruned Model / Load Pruned Model keep the pruned model).
4. Both KSamplers use the same seed and settings: Compare shows original vs pruned + LoRA.
Interrupting LoRA Recover keeps its state; queue again to resume.
"""

POSITIVE = "a red fox standing in a snowy birch forest at golden hour, detailed fur, soft light, photograph"
NEGATIVE = "blurry, low quality, deformed, watermark"

#: node sizes: at least what frontend 1.27 computes for each node (its widgets, web/ecodiff.js's result
#: box and chart included), so that the layout the files promise is the one the user sees
SIZES = {
    "CheckpointLoaderSimple": (315, 98), "UNETLoader": (315, 82), "DualCLIPLoader": (315, 130),
    "TripleCLIPLoader": (315, 106), "VAELoader": (315, 58), "CLIPTextEncode": (400, 180),
    "EmptyLatentImage": (315, 106), "EmptySD3LatentImage": (315, 106), "FluxGuidance": (315, 58),
    "KSampler": (315, 262), "VAEDecode": (210, 46), "EcoDiffLearnMask": (440, 800), "EcoDiffLearnSettings": (440, 388),
    "EcoDiffApplyMask": (340, 174),
    "EcoDiffSaveMask": (340, 150), "EcoDiffLoadMask": (340, 170), "EcoDiffPruningReport": (600, 640),
    "EcoDiffCompare": (720, 520), "EcoDiffDemoModel": (315, 98), "EcoDiffJudgeDigits": (400, 220),
    "EcoDiffLoraRecover": (440, 860),
}
REPORT_POS = (1900, 720)  # under the KSamplers, beside the Apply node: no wire passes behind it

#: model files of the examples: (ComfyUI model folder, download URL).  Loader nodes carry them as
#: ``properties.models`` (as ComfyUI's own templates do), so the frontend offers the download of a missing
#: file on load; it accepts .safetensors files from huggingface.co (or civitai.com) only.
MODEL_FILES = {
    "sd_xl_base_1.0.safetensors": (
        "checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"),
    "v1-5-pruned-emaonly-fp16.safetensors": (
        "checkpoints", "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors"),
    "sd3.5_large.safetensors": (
        "checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/resolve/main/sd3.5_large.safetensors"),
    "flux1-schnell.safetensors": (
        "diffusion_models", "https://huggingface.co/black-forest-labs/FLUX.1-schnell/resolve/main/flux1-schnell.safetensors"),
    "flux1-dev.safetensors": (
        "diffusion_models", "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors"),
    "clip_l.safetensors": (
        "text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    "clip_g.safetensors": (
        "text_encoders", "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/text_encoders/clip_g.safetensors"),
    "t5xxl_fp16.safetensors": (
        "text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
    "t5xxl_fp8_e4m3fn.safetensors": (
        "text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp8_e4m3fn.safetensors"),
    "ae.safetensors": (
        "vae", "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors"),
}


def add(b: WorkflowBuilder, kind: str, pos, widgets=None, title=None):
    node = b.add(kind, pos, widgets, size=SIZES.get(kind), title=title)
    models = [{"name": v, "url": MODEL_FILES[v][1], "directory": MODEL_FILES[v][0]}
              for v in (widgets or {}).values() if isinstance(v, str) and v in MODEL_FILES]
    if models:
        node.data["properties"]["models"] = models
    return node


def sampling_tail(b, model_original, model_pruned, positive, negative, latent, vae, sampler: dict, y0: float = 0.0):
    """KSampler (original) + KSampler (pruned) with the same settings and seed -> VAE decode -> Compare."""
    x = 1900
    k1 = add(b, "KSampler", (x, y0), sampler, title="KSampler (original)")
    k2 = add(b, "KSampler", (x, y0 + 340), sampler, title="KSampler (pruned, same seed)")
    for k, m in ((k1, model_original), (k2, model_pruned)):
        b.connect(m[0], m[1], k, "model")
        b.connect(positive[0], positive[1], k, "positive")
        b.connect(negative[0], negative[1], k, "negative")
        b.connect(latent[0], latent[1], k, "latent_image")
    d1 = add(b, "VAEDecode", (x + 360, y0))
    d2 = add(b, "VAEDecode", (x + 360, y0 + 340))
    for d, k in ((d1, k1), (d2, k2)):
        b.connect(k, "LATENT", d, "samples")
        b.connect(vae[0], vae[1], d, "vae")
    cmp_ = add(b, "EcoDiffCompare", (x + 620, y0), {"label_a": "original", "label_b": "pruned"})
    b.connect(d1, "IMAGE", cmp_, "image_a")
    b.connect(d2, "IMAGE", cmp_, "image_b")
    return k1, k2, cmp_


def learn_workflow(info: dict, *, loaders: str, note: str, learn: dict, sampler: dict, size: int,
                   sparsity: float = 0.2, mask_file: str | None = None, guidance: float | None = None,
                   models: dict, recover: dict | None = None) -> dict:
    b = WorkflowBuilder(info)
    b.note(note, (0, 0), (440, 380))
    if loaders == "checkpoint":
        ck = add(b, "CheckpointLoaderSimple", (0, 420), {"ckpt_name": models["ckpt"]})
        model, clip, vae = (ck, "MODEL"), (ck, "CLIP"), (ck, "VAE")
    elif loaders == "checkpoint+triple":
        ck = add(b, "CheckpointLoaderSimple", (0, 420), {"ckpt_name": models["ckpt"]})
        tc = add(b, "TripleCLIPLoader", (0, 560), {"clip_name1": models["clip1"], "clip_name2": models["clip2"],
                                                   "clip_name3": models["clip3"]})
        model, clip, vae = (ck, "MODEL"), (tc, "CLIP"), (ck, "VAE")
    elif loaders == "unet+dual":
        un = add(b, "UNETLoader", (0, 420), {"unet_name": models["unet"], "weight_dtype": "default"})
        dc = add(b, "DualCLIPLoader", (0, 540), {"clip_name1": models["clip1"], "clip_name2": models["clip2"],
                                                 "type": "flux"})
        va = add(b, "VAELoader", (0, 710), {"vae_name": models["vae"]})
        model, clip, vae = (un, "MODEL"), (dc, "CLIP"), (va, "VAE")
    else:
        raise ValueError(loaders)
    pos = add(b, "CLIPTextEncode", (480, 0), {"text": POSITIVE}, title="Positive prompt")
    neg = add(b, "CLIPTextEncode", (480, 230), {"text": "" if sampler["cfg"] == 1.0 else NEGATIVE},
              title="Negative prompt" + (" (unused at CFG 1)" if sampler["cfg"] == 1.0 else ""))
    for enc in (pos, neg):
        b.connect(clip[0], clip[1], enc, "clip")
    positive = (pos, "CONDITIONING")
    if guidance is not None:
        fg = add(b, "FluxGuidance", (480, 660), {"guidance": guidance})
        b.connect(pos, "CONDITIONING", fg, "conditioning")
        positive = (fg, "CONDITIONING")
    latent_kind = "EmptySD3LatentImage" if loaders != "checkpoint" else "EmptyLatentImage"
    lat = add(b, latent_kind, (480, 460), {"width": size, "height": size, "batch_size": 1})
    ln = add_learn(b, (940, 0), dict(learn, width=size, height=size))
    b.connect(model[0], model[1], ln, "model")
    b.connect(clip[0], clip[1], ln, "clip")
    ap = add(b, "EcoDiffApplyMask", (1420, 0), {"target": "params", "sparsity": sparsity, "mode": "prune"})
    b.connect(model[0], model[1], ap, "model")
    b.connect(ln, "mask", ap, "mask")
    if mask_file:
        sm = add(b, "EcoDiffSaveMask", (1420, 240), {"filename": mask_file})
        b.connect(ln, "mask", sm, "mask")
    rp = add(b, "EcoDiffPruningReport", REPORT_POS)
    b.connect(ap, "report", rp, "report")
    pruned = (ap, "model")
    if recover is not None:
        rc = add(b, "EcoDiffLoraRecover", (1420, 420), dict(recover, width=size, height=size))
        b.connect(ap, "model", rc, "model")
        b.connect(model[0], model[1], rc, "original_model")
        b.connect(clip[0], clip[1], rc, "clip")
        pruned = (rc, "model")
    sampling_tail(b, model, pruned, positive, (neg, "CONDITIONING"), (lat, "LATENT"), vae, sampler)
    key = learn["run_name"] + ("_recover" if recover is not None else "")
    return b.to_json(str(uuid.uuid5(uuid.NAMESPACE_URL, "ecodiff/" + key)))


def shared_mask_workflow(info: dict) -> dict:
    b = WorkflowBuilder(info)
    b.note(SHARED_NOTE, (0, 0), (440, 360))
    ck = add(b, "CheckpointLoaderSimple", (0, 420), {"ckpt_name": "sd_xl_base_1.0.safetensors"})
    lm = add(b, "EcoDiffLoadMask", (940, 0), {"mask_name": "sdxl_ecodiff_mask.safetensors"})
    pos = add(b, "CLIPTextEncode", (480, 0), {"text": POSITIVE}, title="Positive prompt")
    neg = add(b, "CLIPTextEncode", (480, 230), {"text": NEGATIVE}, title="Negative prompt")
    for enc in (pos, neg):
        b.connect(ck, "CLIP", enc, "clip")
    lat = add(b, "EmptyLatentImage", (480, 460), {"width": 1024, "height": 1024, "batch_size": 1})
    ap = add(b, "EcoDiffApplyMask", (1420, 0), {"target": "params", "sparsity": 0.2, "mode": "prune"})
    b.connect(ck, "MODEL", ap, "model")
    b.connect(lm, "mask", ap, "mask")
    rp = add(b, "EcoDiffPruningReport", REPORT_POS)
    b.connect(ap, "report", rp, "report")
    sampler = {"seed": 123456, "steps": 30, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    sampling_tail(b, (ck, "MODEL"), (ap, "model"), (pos, "CONDITIONING"), (neg, "CONDITIONING"),
                  (lat, "LATENT"), (ck, "VAE"), sampler)
    return b.to_json(str(uuid.uuid5(uuid.NAMESPACE_URL, "ecodiff/shared_mask")))


DEMO_NOTE = """# Try EcoDiff without downloading a model: the shipped digits model

**EcoDiff Demo Model** loads the pack's own 2.3 M-parameter text-to-image model of 8×8 handwritten digits as
ComfyUI's FLUX model (2 double + 4 single blocks), its trained text encoder as a CLIP and a display VAE
(8×8 latent → 64×64 grey image). Nothing is downloaded.

Learn Sparsity Mask learns gates on {n_learn} digit prompts ({epochs} epochs, one prompt per step; the official
FLUX settings with a faster neuron learning rate, 0.5); Apply Pruned Mask removes **30 % of the parameters**;
both models then draw the same {batch} digits (one prompt per line:
image *i* gets line *i* mod 10) from the same seed, and **EcoDiff Judge Digits** scores each batch with the
shipped digit judge: accuracy of the requested digit and FD-judge (Fréchet distance in the judge's feature
space vs real digits, not FID; lower is better).

Measured on a fresh ComfyUI, CPU only: {timing}."""
DEMO_TIMING = ("198 s for the whole graph (learning 120 optimiser steps, pruning, 2 × 100 digits at 10 steps), "
               "one thread on a busy 2-core machine; judge: original 1.000, pruned 0.990 at −30 %")
DEMO_BATCH = 100
DEMO_LEARN = {"max_prompts": 20, "epochs": 6, "accumulate": 1, "steps": 10}


def demo_prompts() -> str:
    """The embedded model's calibration prompts, round-robin over the digits (first N cover all ten)."""
    from ecodiff_core.embedded.text import calibration_prompts

    prompts, labels = calibration_prompts(10)
    order = sorted(range(len(prompts)), key=lambda i: (i % 10, labels[i]))
    return "\n".join(prompts[i] for i in order)


def demo_workflow(info: dict) -> dict:
    b = WorkflowBuilder(info)
    note = DEMO_NOTE.format(n_learn=DEMO_LEARN["max_prompts"], epochs=DEMO_LEARN["epochs"], batch=DEMO_BATCH,
                            timing=DEMO_TIMING)
    b.note(note, (0, 0), (440, 420))
    dm = add(b, "EcoDiffDemoModel", (0, 460))
    model, clip, vae = (dm, "MODEL"), (dm, "CLIP"), (dm, "VAE")
    digits = "\n".join(f"the digit {d}" for d in range(10))
    pos = add(b, "CLIPTextEncode", (480, 0), {"text": digits}, title="Positive prompts (one per line)")
    neg = add(b, "CLIPTextEncode", (480, 230), {"text": ""}, title="Negative prompt (empty)")
    for enc in (pos, neg):
        b.connect(clip[0], clip[1], enc, "clip")
    lat = add(b, "EmptyLatentImage", (480, 460), {"width": 64, "height": 64, "batch_size": DEMO_BATCH})
    learn = learn_settings("demo_digits_ecodiff", prompts=demo_prompts(), cfg=1.5, scheduler="simple", seed=0,
                           beta=0.01, regularizer="sigmoid", lr_heads=0.5, lr_neurons=0.5, lr_channels=0.5,
                           width=64, height=64, **DEMO_LEARN)
    ln = add_learn(b, (940, 0), learn)
    b.connect(model[0], model[1], ln, "model")
    b.connect(clip[0], clip[1], ln, "clip")
    ap = add(b, "EcoDiffApplyMask", (1420, 0), {"target": "params", "sparsity": 0.3, "mode": "prune"})
    b.connect(model[0], model[1], ap, "model")
    b.connect(ln, "mask", ap, "mask")
    rp = add(b, "EcoDiffPruningReport", REPORT_POS)
    b.connect(ap, "report", rp, "report")
    sampler = {"seed": 1, "steps": DEMO_LEARN["steps"], "cfg": 1.5, "sampler_name": "euler", "scheduler": "simple",
               "denoise": 1.0}
    sampling_tail(b, model, (ap, "model"), (pos, "CONDITIONING"), (neg, "CONDITIONING"), (lat, "LATENT"), vae,
                  sampler)
    decoders = [n for n in b.nodes if n.type == "VAEDecode"]
    for i, (dec, label) in enumerate(zip(decoders, ("original", "pruned"), strict=True)):
        jd = add(b, "EcoDiffJudgeDigits", (2520 + 440 * i, 560), {"digits": "0,1,2,3,4,5,6,7,8,9", "label": label},
                 title=f"Judge ({label})")
        b.connect(dec, "IMAGE", jd, "images")
    return b.to_json(str(uuid.uuid5(uuid.NAMESPACE_URL, "ecodiff/demo_digits")))


def learn_settings(run_name: str, **kw) -> dict:
    """Learn's widgets plus expert settings by name (these go to an EcoDiff Learn Settings node);
    whatever is not given keeps the node's default, which is the engine's."""
    base = {"negative_prompt": "", "max_prompts": 0, "sampler_name": "euler", "scheduler": "normal",
            "seed": 44, "run_name": run_name, "resume": True}
    base.update(kw)
    return base


def add_learn(b: WorkflowBuilder, pos, learn: dict):
    """Learn Sparsity Mask at ``pos``; expert settings in ``learn`` (the widgets of EcoDiff Learn
    Settings) go to a Learn Settings node below it, wired to its ``settings`` input."""
    expert_names = {s.name for s in schema_inputs(b.object_info["EcoDiffLearnSettings"]) if s.is_widget}
    expert = {k: v for k, v in learn.items() if k in expert_names}
    ln = add(b, "EcoDiffLearnMask", pos, {k: v for k, v in learn.items() if k not in expert_names})
    if expert:
        st = add(b, "EcoDiffLearnSettings", (pos[0], pos[1] + SIZES["EcoDiffLearnMask"][1] + 60), expert)
        b.connect(st, "settings", ln, "settings")
    return ln


def recover_settings(lora_name: str, **kw) -> dict:
    base = {"negative_prompt": "", "max_prompts": 0, "scheduler": "normal", "states": "original", "rank": 16,
            "alpha": 16.0, "target_modules": "attention_ffn", "train_steps": 300, "learning_rate": 0.002,
            "batch": 4, "seed": 44, "lora_name": lora_name, "resume": True}
    base.update(kw)
    return base


def build_all(info: dict) -> dict[str, dict]:
    ks = {"seed": 123456, "sampler_name": "euler", "denoise": 1.0}
    return {
        "sdxl_learn_prune_compare": learn_workflow(
            info, loaders="checkpoint", note=SDXL_NOTE, size=1024, mask_file="sdxl_ecodiff_mask",
            models={"ckpt": "sd_xl_base_1.0.safetensors"},
            learn=learn_settings("sdxl_ecodiff", steps=25, cfg=5.0),
            sampler=dict(ks, steps=30, cfg=5.0, scheduler="normal")),
        "sd15_learn_prune_compare": learn_workflow(
            info, loaders="checkpoint", note=SD15_NOTE, size=512, mask_file="sd15_ecodiff_mask",
            models={"ckpt": "v1-5-pruned-emaonly-fp16.safetensors"},
            learn=learn_settings("sd15_ecodiff", steps=20, cfg=7.0, lr_heads=0.2, lr_neurons=0.2),
            sampler=dict(ks, steps=25, cfg=7.0, scheduler="normal")),
        "flux_schnell_learn_prune_compare": learn_workflow(
            info, loaders="unet+dual", note=FLUX_SCHNELL_NOTE, size=1024, mask_file="flux_schnell_ecodiff_mask",
            models={"unet": "flux1-schnell.safetensors", "clip1": "clip_l.safetensors",
                    "clip2": "t5xxl_fp8_e4m3fn.safetensors", "vae": "ae.safetensors"},
            learn=learn_settings("flux_schnell_ecodiff", steps=4, cfg=1.0, scheduler="simple", seed=48, beta=0.01,
                                 regularizer="sigmoid", lr_heads=0.5, lr_neurons=0.1, lr_channels=0.5),
            sampler=dict(ks, steps=4, cfg=1.0, scheduler="simple")),
        "flux_dev_learn_prune_compare": learn_workflow(
            info, loaders="unet+dual", note=FLUX_DEV_NOTE, size=1024, mask_file="flux_dev_ecodiff_mask",
            guidance=3.5,
            models={"unet": "flux1-dev.safetensors", "clip1": "clip_l.safetensors",
                    "clip2": "t5xxl_fp16.safetensors", "vae": "ae.safetensors"},
            learn=learn_settings("flux_dev_ecodiff", steps=20, cfg=1.0, scheduler="simple", seed=48, beta=0.01,
                                 regularizer="sigmoid", lr_heads=0.5, lr_neurons=0.1, lr_channels=0.5),
            sampler=dict(ks, steps=20, cfg=1.0, scheduler="simple")),
        "sd35_large_learn_prune_compare": learn_workflow(
            info, loaders="checkpoint+triple", note=SD35_NOTE, size=1024, mask_file="sd35_large_ecodiff_mask",
            models={"ckpt": "sd3.5_large.safetensors", "clip1": "clip_l.safetensors", "clip2": "clip_g.safetensors",
                    "clip3": "t5xxl_fp16.safetensors"},
            learn=learn_settings("sd35_large_ecodiff", steps=20, cfg=4.5, scheduler="sgm_uniform", lr_heads=0.2,
                                 lr_neurons=0.2),
            sampler=dict(ks, steps=28, cfg=4.5, scheduler="sgm_uniform")),
        "sd15_learn_prune_recover_compare": learn_workflow(
            info, loaders="checkpoint", note=SD15_RECOVER_NOTE, size=512, sparsity=0.3,
            models={"ckpt": "v1-5-pruned-emaonly-fp16.safetensors"},
            learn=learn_settings("sd15_ecodiff", steps=20, cfg=7.0, lr_heads=0.2, lr_neurons=0.2),
            recover=recover_settings("sd15_ecodiff_recover", sample_steps=20, cfg=7.0),
            sampler=dict(ks, steps=25, cfg=7.0, scheduler="normal")),
        "shared_mask_apply_sample": shared_mask_workflow(info),
        "demo_digits_learn_prune_compare": demo_workflow(info),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    args = parser.parse_args()
    info = object_info_in_process()
    stale = []
    for name, wf in build_all(info).items():
        problems = check_structure(wf) + check_against_schemas(wf, info) + overlaps(wf)
        if problems:
            print(f"{name}: " + "\n  ".join(problems), file=sys.stderr)
            return 1
        path = EXAMPLES / f"{name}.json"
        text = json.dumps(wf, indent=2, ensure_ascii=False) + "\n"
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("out of date (run scripts/make_example_workflows.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
