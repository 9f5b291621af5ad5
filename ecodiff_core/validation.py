"""Checks shared by the settings dataclasses, and their forward-compatible loading from dicts.

Each check raises :class:`~ecodiff_core.errors.SettingsError` naming the setting, what it must be
and the value given, so a bad value never surfaces later as a plain ``TypeError`` / ``ValueError``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import SettingsError

log = logging.getLogger("ecodiff")


def check_int(name: str, value: object, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in ``low..high`` (no upper bound when ``high`` is None); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"{name} must be an integer, got {value!r}")
    if high is not None and not low <= value <= high:
        raise SettingsError(f"{name} must be in {low}..{high}, got {value}")
    if value < low:
        raise SettingsError(f"{name} must be >= {low}, got {value}")
    return value


def check_number(name: str, value: object, low: float | None = 0.0, strict: bool = False) -> float:
    """``value`` as a finite float >= ``low`` (> ``low`` when ``strict``; any finite value when ``low``
    is None); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and (low is None or (value > low if strict else value >= low))):
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise SettingsError(f"{name} must be a finite number{bound}, got {value}")
    return float(value)


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def known_fields(cls: type, data: object) -> dict[str, Any]:
    """The entries of ``data`` that are fields of the dataclass ``cls``, for ``cls(**...)``.

    Forward-compatible, as peft's configs load: keys a newer version wrote are ignored with one info
    line on the ``ecodiff`` logger; keys that are missing (an older file) take ``cls``'s defaults.
    SettingsError when ``data`` is not a mapping with string keys.
    """
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        raise SettingsError(f"{cls.__name__} must be read from an object of named settings, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        log.info("EcoDiff %s: ignored settings this version does not know: %s", cls.__name__, ", ".join(unknown))
    return {k: v for k, v in data.items() if k in names}


def field_defaults(cls: type) -> dict[str, Any]:
    """Each field's default value of the dataclass ``cls`` (fresh from its factory), without building
    ``cls`` (whose validation may look at files); fields without a default are left out."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out
