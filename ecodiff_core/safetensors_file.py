"""The pack's safetensors files (masks, pruned models, LoRA Recover states, LoRAs): written
atomically, read in one pass with their format and version checked.

Every file carries string metadata ``format`` and ``format_version`` beside its tensors; nothing is
unpickled.  A reader opens the file once (``safe_open``: header, metadata, then each tensor) and turns
every defect of the container (truncated, header garbage, not safetensors) into the caller's
``EcoDiffError`` subclass naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import EcoDiffError


def write_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` (contiguous CPU tensors) with string ``metadata`` to ``path`` through a temp
    file and a rename, so an interrupt never leaves a half-written file; creates the parent folder.
    Returns ``path`` as a Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read(path: str | os.PathLike, error: type[EcoDiffError] = EcoDiffError,
         what: str = "safetensors file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors by name, metadata) of the file at ``path``, read in one opening; ``error`` (naming
    the path and ``what`` it should be) when it is not a readable safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise error(f"{path} is not a readable {what} (truncated or corrupted?): {exc}") from exc
    return tensors, metadata


def read_metadata(path: str | os.PathLike, error: type[EcoDiffError] = EcoDiffError,
                  what: str = "safetensors file") -> dict[str, str]:
    """The string metadata of the file at ``path`` without reading its tensors; ``error`` as in
    :func:`read`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise error(f"{path} is not a readable {what} (truncated or corrupted?): {exc}") from exc


def check_format(metadata: dict[str, str], source: str, fmt: str, version: int, kind: str,
                 error: type[EcoDiffError] = EcoDiffError, hint: str = "") -> None:
    """``error`` unless ``metadata`` says ``format`` ``fmt`` at ``format_version`` ``version``.
    ``source`` names the file, ``kind`` what it should be ("an EcoDiff mask file"); ``hint`` is added
    when the format is another one (e.g. where such files load instead)."""
    if metadata.get("format") != fmt:
        raise error(f"{source} is not {kind} (metadata 'format' is {metadata.get('format')!r}){hint}")
    if metadata.get("format_version") != str(version):
        raise error(f"{source} is {kind} of format version {metadata.get('format_version')!r}; "
                    f"this version of EcoDiff reads version {version}")
