"""Calibration prompts: the shipped list and text with one prompt per line."""
from __future__ import annotations

from pathlib import Path

from .errors import SettingsError

DEFAULT_PROMPTS_FILE = Path(__file__).resolve().parent / "calibration_prompts.txt"


def parse_prompts(text: str) -> list[str]:
    """The prompts of ``text``, one per line; blank lines and lines starting with ``#`` are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts of a text file, one per line (see :func:`parse_prompts`); ``None``: the shipped
    calibration prompts.  SettingsError when the file is missing, unreadable or holds no prompt."""
    path = Path(path) if path is not None else DEFAULT_PROMPTS_FILE
    if not path.is_file():
        raise SettingsError(f"prompts file not found: {path}; give a text file with one prompt per line")
    try:
        prompts = parse_prompts(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read prompts file {path}: {exc}") from exc
    if not prompts:
        raise SettingsError(f"{path} holds no prompts (one per line; lines starting with # are comments)")
    return prompts
