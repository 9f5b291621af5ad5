"""Save / Load Pruned Model (models/ecodiff_pruned; ComfyUI's loaders cannot load width-pruned weights)."""
from __future__ import annotations

from comfy_api.latest import io

from ..ecodiff_comfy.folders import PRUNED_FOLDER, file_path, file_version, folder, list_files, safe_filename
from ..ecodiff_comfy.pruned_files import load_pruned_model, save_pruned_model
from .common import node_schema


class SavePrunedModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="EcoDiffSavePrunedModel", display_name="Save Pruned Model (EcoDiff)",
            description="Writes the pruned denoiser as safetensors with the metadata needed to rebuild its "
                        "shapes (base architecture config + kept units) to models/ecodiff_pruned.",
            inputs=[
                io.Model.Input("model", tooltip="A MODEL from Apply Pruned Mask (mode prune) or Load Pruned Model."),
                io.String.Input("filename", default="ecodiff_pruned",
                                tooltip="File name in models/ecodiff_pruned (.safetensors is added); an existing file "
                                        "is replaced."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the model was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename: str) -> io.NodeOutput:
        path = save_pruned_model(model, folder(PRUNED_FOLDER) / safe_filename(filename))
        text = f"saved {path.name} to models/{PRUNED_FOLDER}"
        return io.NodeOutput(str(path), ui={"text": (text,)})


class LoadPrunedModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="EcoDiffLoadPrunedModel", display_name="Load Pruned Model (EcoDiff)",
            description="Loads a pruned model saved by Save Pruned Model; the slim module is rebuilt without "
                        "allocating the full-size one. Use your usual CLIP and VAE loaders beside it.",
            inputs=[
                io.Combo.Input("model_name", options=list_files(PRUNED_FOLDER),
                               tooltip="A pruned model file in models/ecodiff_pruned."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The pruned model, ready for any sampler.")],
        )

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_pruned_model(file_path(PRUNED_FOLDER, model_name)))

    @classmethod
    def fingerprint_inputs(cls, model_name: str) -> str:
        return file_version(PRUNED_FOLDER, model_name)
