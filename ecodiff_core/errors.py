"""Errors raised by ecodiff_core; all are ValueErrors so callers can catch one family."""
from __future__ import annotations


class EcoDiffError(ValueError):
    """Base class of every error ecodiff_core raises on purpose."""


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
