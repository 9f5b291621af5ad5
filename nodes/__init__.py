"""The EcoDiff ComfyUI nodes (V3 schema API).  Imported only when ComfyUI is present."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from ..ecodiff_comfy.folders import register_folders
from .apply import ApplyPrunedMask
from .compare import CompareImages
from .demo import DemoModel, JudgeDigits
from .learn import LearnSparsityMask
from .learn_settings import LearnSettingsNode
from .mask_files import LoadSparsityMask, SaveSparsityMask
from .pruned_files import LoadPrunedModel, SavePrunedModel
from .recover import LoraRecover
from .report import PruningReport

NODES: list[type[io.ComfyNode]] = [
    LearnSparsityMask, LearnSettingsNode, ApplyPrunedMask, SaveSparsityMask, LoadSparsityMask,
    SavePrunedModel, LoadPrunedModel, CompareImages, PruningReport, LoraRecover,
    DemoModel, JudgeDigits,
]


class EcoDiffExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> EcoDiffExtension:
    register_folders()
    return EcoDiffExtension()
