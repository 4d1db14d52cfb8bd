"""tensorsink: get tensors out of a GPU job and onto storage, asynchronously and crash-safely."""

from __future__ import annotations

from .commit import sweep
from .errors import (
    BackendUnavailableError,
    InvalidKeyError,
    InvalidLayoutError,
    SymlinkError,
    TensorsinkError,
    UnsupportedValueError,
    WriterClosedError,
)
from .future import WriteFuture
from .options import Backend, DictMode, Durability, SaveFormat, WriterOptions
from .stats import WriterStats
from .writer import AsyncWriter

__version__ = "0.1.0"

__all__ = [
    "AsyncWriter",
    "Backend",
    "BackendUnavailableError",
    "DictMode",
    "Durability",
    "InvalidKeyError",
    "InvalidLayoutError",
    "SaveFormat",
    "SymlinkError",
    "TensorsinkError",
    "UnsupportedValueError",
    "WriteFuture",
    "WriterClosedError",
    "WriterOptions",
    "WriterStats",
    "__version__",
    "sweep",
]
