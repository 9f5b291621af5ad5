"""Errors raised by ecodiff_core; all are ValueErrors so callers can catch one family.

Each message says what went wrong and what to do.  Their ``__module__`` is the short name
:data:`ERROR_MODULE`: ComfyUI shows an error as ``module.qualname`` (``exception_type``) with the
message, and the module of a custom node pack is its folder's path; an EcoDiff error reads
``EcoDiff.MaskFileError: …`` instead.  Subclasses defined anywhere get the same short name.
"""
from __future__ import annotations

ERROR_MODULE = "EcoDiff"


class EcoDiffError(ValueError):
    """Base class of every error ecodiff_core raises on purpose."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.__module__ = ERROR_MODULE


EcoDiffError.__module__ = ERROR_MODULE


class UnsupportedArchitectureError(EcoDiffError):
    """No architecture table recognises the model."""


class MaskFileError(EcoDiffError):
    """A mask file is missing, damaged, or belongs to another model."""


class SettingsError(EcoDiffError):
    """A setting is out of range; the message names it and the allowed range."""


class WeightsMissingError(EcoDiffError, FileNotFoundError):
    """Shipped weights (the embedded model's, the judge's) are not where they should be; the message
    names the script that regenerates them.  Also a FileNotFoundError."""


class LoraSliceError(EcoDiffError):
    """A weight patch (LoRA, LoHa, LoKr, diff…) made for the full model cannot be fitted to a pruned one."""
