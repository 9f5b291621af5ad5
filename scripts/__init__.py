"""Developer scripts of this repository (not part of the node pack ComfyUI loads): training the embedded
models, generating the example workflows, and ``comfy_env`` (ComfyUI in-process for tests and scripts).
Run them from the repository root as files (``python scripts/x.py``) or modules (``python -m scripts.x``)."""
