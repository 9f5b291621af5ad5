"""Seeds: the one rule for seeds derived from a user's seed (prompt i, chunk k, ...).

Seeds are unsigned 64-bit integers, 0..2**64-1 (what ``torch.manual_seed`` and ComfyUI's seed
widgets take).  A derived seed is ``(seed + offset) mod 2**64``: prompt ``i`` of a run with seed
``s`` uses ``derived_seed(s, i)``, so the largest seed wraps around to 0 instead of overflowing.
"""
from __future__ import annotations

from .errors import SettingsError

SEED_SPACE = 2**64
SEED_MAX = SEED_SPACE - 1


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as an int in 0..SEED_MAX; SettingsError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise SettingsError(f"{name} must be an integer in 0..{SEED_MAX} (2**64-1), got {seed!r}")
    return seed


def derived_seed(seed: int, offset: int) -> int:
    """The seed of item ``offset`` (prompt, chunk, ...) of a run with ``seed``: ``(seed + offset) mod 2**64``."""
    return (check_seed(seed) + offset) % SEED_SPACE
