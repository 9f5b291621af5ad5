"""Damaged copies of a safetensors file for the fuzzing tests (masks in the unit tier, pruned models in
the integration tier): truncations and single-bit flips, labelled, drawn from a seeded ``random.Random``."""
from __future__ import annotations

import random
import struct
from collections.abc import Iterable, Iterator


def header_end(data: bytes) -> int:
    """Offset of the first tensor byte: the 8-byte little-endian header length plus the JSON header."""
    return 8 + struct.unpack("<Q", data[:8])[0]


def truncations_and_bit_flips(good: bytes, rng: random.Random, cuts: Iterable[int], random_cuts: int,
                              flips: int, anywhere_every: int) -> Iterator[tuple[str, bytes]]:
    """(label, bytes): ``good`` cut at each of ``cuts`` and at ``random_cuts`` random offsets (in order), then
    ``flips`` copies with one bit flipped: every ``anywhere_every``-th anywhere in the file, the others in
    the header.  ``rng`` is drawn from in a fixed order, so a caller may keep drawing from it after."""
    end = header_end(good)
    for cut in sorted({*cuts, *rng.sample(range(len(good)), random_cuts)}):
        yield f"truncated at {cut}", good[:cut]
    for k in range(flips):
        pos = rng.randrange(end) if k % anywhere_every else rng.randrange(len(good))
        flipped = bytearray(good)
        flipped[pos] ^= 1 << rng.randrange(8)
        yield f"bit flip at {pos}", bytes(flipped)
