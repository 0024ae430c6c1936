"""Hashes the affinity strategy needs besides the ring (``photostack.blocks.ring.HashRing``)."""

from __future__ import annotations

import hashlib

__all__ = ["stable_hash", "unit_fraction"]


def stable_hash(data: bytes) -> int:
    """A 64-bit hash that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def unit_fraction(key: bytes, salt: str) -> float:
    """A deterministic number in [0, 1) for (key, salt): the slow-start gate of a key."""
    return stable_hash(key + b"\x00" + salt.encode()) / 2.0**64
