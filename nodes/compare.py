"""Compare: two IMAGE batches side by side, labelled, shown in the node without JavaScript."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..ecodiff_comfy.images import side_by_side
from .common import node_schema


def _saved(images, cls) -> list:
    return ui.PreviewImage(images, cls=cls).as_dict()["images"]


class CompareImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="EcoDiffCompare", display_name="Compare Images (EcoDiff)",
            description="Stitches A and B side by side with labels and shows the result in the node; also passes "
                        "a_images/b_images on (and in the UI message) for compare widgets.",
            inputs=[
                io.Image.Input("image_a", tooltip="Left images, e.g. from the original model."),
                io.Image.Input("image_b", tooltip="Right images, e.g. from the pruned model with the same seed."),
                io.String.Input("label_a", default="original", tooltip="Label drawn above the left images."),
                io.String.Input("label_b", default="pruned", tooltip="Label drawn above the right images."),
            ],
            outputs=[
                io.Image.Output(display_name="comparison", tooltip="The labelled side-by-side images."),
                io.Image.Output(display_name="a_images", tooltip="image_a, passed through."),
                io.Image.Output(display_name="b_images", tooltip="image_b, passed through."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image_a, image_b, label_a: str, label_b: str) -> io.NodeOutput:
        stitched = side_by_side(image_a, image_b, label_a, label_b)
        shown = {"images": _saved(stitched, cls), "a_images": _saved(image_a, cls), "b_images": _saved(image_b, cls)}
        return io.NodeOutput(stitched, image_a, image_b, ui=shown)
