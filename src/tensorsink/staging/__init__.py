"""Staging: getting device tensors into host memory the workers can read (see stager.py)."""

from __future__ import annotations

from .engine import Completion, CopyEngine, CudaEngine
from .pool import ALIGNMENT, Block, PinnedPool, default_pool_bytes
from .stager import Staged, Stager, on_device

__all__ = [
    "ALIGNMENT",
    "Block",
    "Completion",
    "CopyEngine",
    "CudaEngine",
    "PinnedPool",
    "Staged",
    "Stager",
    "default_pool_bytes",
    "on_device",
]
