"""tensorsink: get tensors out of a GPU job and onto storage, asynchronously and crash-safely."""

from __future__ import annotations

import typing

from .commit import sweep
from .errors import (
    BackendUnavailableError,
    GraphCaptureError,
    InvalidKeyError,
    InvalidLayoutError,
    SaveFunctionError,
    SymlinkError,
    TensorsinkError,
    UnsupportedValueError,
    WriterClosedError,
    WriterForkedError,
)
from .future import WriteFuture, WriteHandle
from .options import Backend, DictMode, Durability, SaveFormat, WriterOptions
from .stats import WriterStats

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """AsyncWriter on first use: it imports torch, which the command line's sweep and --help need not."""
    if name == "AsyncWriter":
        from .writer import AsyncWriter

        globals()["AsyncWriter"] = AsyncWriter
        return AsyncWriter
    raise AttributeError(f"module 'tensorsink' has no attribute {name!r}")


if typing.TYPE_CHECKING:
    from .writer import AsyncWriter

__all__ = [
    "AsyncWriter",
    "Backend",
    "BackendUnavailableError",
    "DictMode",
    "Durability",
    "GraphCaptureError",
    "InvalidKeyError",
    "InvalidLayoutError",
    "SaveFormat",
    "SaveFunctionError",
    "SymlinkError",
    "TensorsinkError",
    "UnsupportedValueError",
    "WriteFuture",
    "WriteHandle",
    "WriterClosedError",
    "WriterForkedError",
    "WriterOptions",
    "WriterStats",
    "__version__",
    "sweep",
]
