"""Where the pack's files live: its folders under ComfyUI's ``models`` directory and the shipped
calibration prompts.

Facts this relies on (ComfyUI 0.3.64): ``folder_paths.folder_names_and_paths`` maps a folder name to
(paths, extensions); a pack may add its own names, and ``get_filename_list`` / ``get_full_path``
then list and resolve files there as for ComfyUI's own folders.  ComfyUI is imported lazily so the
pack imports without it.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..ecodiff_core.errors import EcoDiffError
from ..ecodiff_core.prompts import read_prompts

MASK_FOLDER = "ecodiff_masks"
PRUNED_FOLDER = "ecodiff_pruned"
#: run states of Learn (resumable after an interrupt) live in this hidden sub-folder of the masks
#: folder: they follow it wherever it is configured and survive restarts (ComfyUI's temp folder is
#: emptied at every start), while the masks list shows only the masks a user saved
RUNS_SUBFOLDER = ".runs"
RECOVER_FOLDER = "ecodiff_recover"  # resumable states of LoRA Recover runs
LORA_FOLDER = "loras"  # ComfyUI's own


def register_folders() -> None:
    """Register ``models/ecodiff_masks``, ``models/ecodiff_pruned`` and ``models/ecodiff_recover``
    with folder_paths (names already registered, e.g. from extra_model_paths.yaml, are kept)."""
    import folder_paths

    for name in (MASK_FOLDER, PRUNED_FOLDER, RECOVER_FOLDER):
        if name not in folder_paths.folder_names_and_paths:
            path = os.path.join(folder_paths.models_dir, name)
            folder_paths.folder_names_and_paths[name] = ([path], {".safetensors"})


def folder(name: str) -> Path:
    """The first directory of the ComfyUI folder ``name`` (created if missing): where files are written."""
    import folder_paths

    register_folders()
    path = Path(folder_paths.get_folder_paths(name)[0])
    path.mkdir(parents=True, exist_ok=True)
    return path


def list_files(name: str) -> list[str]:
    """The file names in the ComfyUI folder ``name``, sorted (for the nodes' combo boxes); files in
    hidden sub-folders (such as the run states in ``RUNS_SUBFOLDER``) are left out."""
    import folder_paths

    register_folders()
    return sorted(f for f in folder_paths.get_filename_list(name)
                  if not any(part.startswith(".") for part in Path(f).parts[:-1]))


def run_state_path(run_name: str) -> Path:
    """Where Learn keeps the resumable state of ``run_name``: ``<masks folder>/.runs/<run_name>.safetensors``
    (the sub-folder is created)."""
    path = folder(MASK_FOLDER) / RUNS_SUBFOLDER
    path.mkdir(parents=True, exist_ok=True)
    return path / safe_filename(run_name)


def file_path(name: str, filename: str) -> Path:
    """The full path of ``filename`` in the ComfyUI folder ``name``; EcoDiffError when it is not there."""
    import folder_paths

    register_folders()
    path = folder_paths.get_full_path(name, filename)
    if path is None:
        raise EcoDiffError(f"'{filename}' is not in models/{name}; put the file there or pick one from the list")
    return Path(path)


def file_version(name: str, filename: str) -> str:
    """``path:mtime`` of a file in a folder (a node's cache key: a rewritten file reruns the node);
    the bare ``filename`` when it cannot be found (the node's execute reports that)."""
    try:
        path = file_path(name, filename)
        return f"{path}:{path.stat().st_mtime_ns}"
    except Exception:  # noqa: BLE001 - an unknown file is reported by the node's execute
        return filename


def safe_filename(stem: str, suffix: str = ".safetensors") -> str:
    """``stem`` with every character but letters, digits, ``-_.`` replaced by ``_``, plus ``suffix``."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem.strip()) or "ecodiff"
    return stem + suffix


def default_prompts() -> str:
    """The shipped calibration prompts, one per line (comments dropped)."""
    return "\n".join(read_prompts())
