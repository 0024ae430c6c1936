"""Consistent hashing: a weighted vnode ring (fast xxh3 or ketama-compatible), jump and
rendezvous hashing for comparison. Pure, deterministic across processes, no I/O."""

from ._errors import (
    DuplicateNodeError,
    EmptyRingError,
    NotEnoughNodesError,
    RingConfigError,
    RingError,
    UnknownNodeError,
)
from ._hashing import ketama_key_hash, load_skew, xxh3_key_hash
from ._jump import JumpHash, jump_hash
from ._rendezvous import RendezvousHash
from ._ring import DEFAULT_VNODES, KETAMA_VNODES, HashName, HashRing, MovedRange

__all__ = [
    "DEFAULT_VNODES",
    "KETAMA_VNODES",
    "DuplicateNodeError",
    "EmptyRingError",
    "HashName",
    "HashRing",
    "JumpHash",
    "MovedRange",
    "NotEnoughNodesError",
    "RendezvousHash",
    "RingConfigError",
    "RingError",
    "UnknownNodeError",
    "jump_hash",
    "ketama_key_hash",
    "load_skew",
    "xxh3_key_hash",
]
