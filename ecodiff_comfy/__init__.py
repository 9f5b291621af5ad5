"""ComfyUI host side of the pack: the bridge (ComfyUI internals) and shipped data files."""
