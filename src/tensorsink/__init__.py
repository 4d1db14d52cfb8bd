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
from .options import Backend, DictMode, Durability, SaveFormat, ShardOptions, WriterOptions
from .stats import ShardStats, WriterStats

__version__ = "0.1.0"


_LAZY = {"AsyncWriter": ".writer", "ShardReader": ".shards.index", "ShardWriter": ".shards.writer"}


def __getattr__(name: str) -> object:
    """The writers on first use: they import torch, which the command line's sweep and --help need not."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tensorsink' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if typing.TYPE_CHECKING:
    from .shards.index import ShardReader
    from .shards.writer import ShardWriter
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
    "ShardOptions",
    "ShardReader",
    "ShardStats",
    "ShardWriter",
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
