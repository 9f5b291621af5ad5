"""EcoDiff Demo Model and EcoDiff Judge Digits: try the pack on the shipped digits model, no download."""
from __future__ import annotations

from comfy_api.latest import io

from ..ecodiff_comfy import demo_judge, demo_model
from .common import node_schema


class DemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="EcoDiffDemoModel", display_name="EcoDiff Demo Model (digits)",
            description="The pack's shipped 2.3 M-parameter text-to-image FLUX model of 8×8 handwritten digits, as "
                        "ComfyUI's own FLUX model with its jointly trained text encoder and a display VAE. No "
                        "download. Use a 64×64 Empty Latent Image (the 8×8 latent), CFG 1.5, euler + simple; "
                        "prompts like 'the digit 7'; one prompt per line draws several digits in one batch "
                        "(image i gets line i mod the number of lines).",
            inputs=[],
            outputs=[
                io.Model.Output(display_name="MODEL",
                                tooltip="The digits denoiser: ComfyUI's FLUX class (2 double + 4 single blocks), "
                                        "rectified flow in σ-space, no guidance embedding."),
                io.Clip.Output(display_name="CLIP", tooltip="The shipped text encoder: a word-level tokenizer over a "
                                                            "small vocabulary ('the digit 7', 'a handwritten seven'); "
                                                            "one conditioning per line."),
                io.Vae.Output(display_name="VAE", tooltip="Shows the 1-channel 8×8 latent as a 64×64 grey image "
                                                          "(nearest ×8) and encodes images back (8×8 block means)."),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        model, clip, vae = demo_model.load_demo()
        return io.NodeOutput(model, clip, vae)


class JudgeDigits(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="EcoDiffJudgeDigits", display_name="EcoDiff Judge Digits",
            description="Scores digit images (e.g. from the EcoDiff Demo Model) with the pack's shipped CNN judge: "
                        "accuracy (the requested digit was drawn), confidence, and FD-judge (Fréchet distance in "
                        "the judge's feature space vs real digits; not FID).",
            inputs=[
                io.Image.Input("images",
                               tooltip="A batch of digit images (any size; read as grey and averaged to 8×8)."),
                io.String.Input("digits", default="0,1,2,3,4,5,6,7,8,9",
                                tooltip="The requested digit of each image, in batch order; image i is judged against "
                                        "digit i mod the count (matches a multi-line prompt of the demo CLIP)."),
                io.String.Input("label", default="",
                                tooltip="A name shown above the scores, e.g. 'original' or 'pruned'."),
            ],
            outputs=[
                io.Float.Output(display_name="accuracy",
                                tooltip="Fraction of images the judge reads as the requested digit (0–1)."),
                io.Float.Output(display_name="fd_judge",
                                tooltip="Fréchet distance of the judge's 128-d features vs the real test digits (lower "
                                        "is better; biased upward for small batches)."),
                io.String.Output(display_name="text", tooltip="The scores as text."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, digits: str, label: str) -> io.NodeOutput:
        result = demo_judge.judge_images(images, demo_judge.parse_digits(digits))
        text = demo_judge.judge_text(result)
        if label.strip():
            text = f"{label.strip()}\n{text}"
        return io.NodeOutput(result["accuracy"], result["fd_judge"], text, ui={"text": (text,)})
