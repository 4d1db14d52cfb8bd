"""One module per file format; `format_for` picks the one a SaveFormat names."""

from __future__ import annotations

from ..options import SaveFormat
from .base import Buffer, BufferFormat, Container, FileEntry, Format, write_buffers
from .npy import NpyFormat
from .npz import NpzFormat
from .pt import PtFormat
from .safetensors import SafetensorsFormat

__all__ = [
    "Buffer",
    "BufferFormat",
    "Container",
    "FileEntry",
    "Format",
    "format_for",
    "write_buffers",
]

_FORMATS: dict[SaveFormat, Format] = {
    f.save_format: f for f in (PtFormat(), NpyFormat(), NpzFormat(), SafetensorsFormat())
}


def format_for(save_format: SaveFormat) -> Format:
    return _FORMATS[save_format]
