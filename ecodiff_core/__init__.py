"""EcoDiff engine: learnable structured sparsity for diffusion models, in plain PyTorch.

Never imports ComfyUI; works on any ``nn.Module`` an architecture table recognises.  The flow,
module by module: ``archs`` (find the unit groups) → ``learn`` (hard-concrete gates over the
sampling trajectory, ``trajectory``) → ``plan`` (which units to remove for a budget) → ``prune``
(a new, smaller module) → ``recover`` (a LoRA that distils the original back in).

The public API::

    from ecodiff_core import find_layout, MaskLearner, LearnSettings, plan_pruning, PruneTarget, prune_model
"""
from .archs import find_layout
from .errors import EcoDiffError
from .learn import CalibrationSample, LearnSettings, MaskLearner
from .maskfile import MaskState, load_mask, save_mask
from .plan import PrunePlan, PruneTarget, plan_pruning
from .prune import prune_model

__version__ = "0.1.0"

__all__ = [
    "CalibrationSample", "EcoDiffError", "LearnSettings", "MaskLearner", "MaskState", "PrunePlan",
    "PruneTarget", "find_layout", "load_mask", "plan_pruning", "prune_model", "save_mask",
]
