"""Save / Load Sparsity Mask (models/ecodiff_masks)."""
from __future__ import annotations

from comfy_api.latest import io

from ..ecodiff_comfy.folders import MASK_FOLDER, file_path, file_version, folder, list_files, safe_filename
from ..ecodiff_core.maskfile import MaskState, load_mask, save_mask
from .common import MaskType, mask_summary, node_schema


class SaveSparsityMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="EcoDiffSaveMask", display_name="Save Sparsity Mask (EcoDiff)",
            description="Writes the mask as safetensors (logits + metadata: architecture, layout fingerprint, "
                        "settings, loss history) to models/ecodiff_masks.",
            inputs=[
                MaskType.Input("mask", tooltip="The mask to save."),
                io.String.Input("filename", default="ecodiff_mask",
                                tooltip="File name in models/ecodiff_masks (.safetensors is added); an existing file "
                                        "is replaced."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the mask was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, mask: MaskState, filename: str) -> io.NodeOutput:
        path = save_mask(folder(MASK_FOLDER) / safe_filename(filename), mask)
        text = f"saved {path.name} to models/{MASK_FOLDER}\n{mask_summary(mask)}"
        return io.NodeOutput(str(path), ui={"text": (text,)})


class LoadSparsityMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="EcoDiffLoadMask", display_name="Load Sparsity Mask (EcoDiff)",
            description="Reads a mask from models/ecodiff_masks (shared masks go there too).",
            inputs=[
                io.Combo.Input("mask_name", options=list_files(MASK_FOLDER),
                               tooltip="A mask file in models/ecodiff_masks."),
            ],
            outputs=[
                MaskType.Output(display_name="mask",
                                tooltip="The loaded mask; Apply Pruned Mask checks that it fits the model."),
                io.String.Output(display_name="summary", tooltip="Architecture, steps and loss of the mask."),
            ],
        )

    @classmethod
    def execute(cls, mask_name: str) -> io.NodeOutput:
        state = load_mask(file_path(MASK_FOLDER, mask_name))
        text = mask_summary(state)
        return io.NodeOutput(state, text, ui={"text": (text,)})

    @classmethod
    def fingerprint_inputs(cls, mask_name: str) -> str:
        return file_version(MASK_FOLDER, mask_name)
