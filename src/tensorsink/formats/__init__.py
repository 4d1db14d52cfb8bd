"""One module per file format; `format_for` picks the one a SaveFormat names."""

from __future__ import annotations

from ..options import SaveFormat
from .base import Buffer, BufferFormat, Container, FileEntry, Format, HeaderFormat, write_buffers
from .npy import NPY_ALIGNMENT, NpyFormat
from .npz import NpzFormat
from .pt import PtFormat
from .safetensors import SAFETENSORS_ALIGNMENT, SafetensorsFormat

__all__ = [
    "Buffer",
    "BufferFormat",
    "Container",
    "FileEntry",
    "Format",
    "HeaderFormat",
    "NpyFormat",
    "PtFormat",
    "SafetensorsFormat",
    "format_for",
    "write_buffers",
]


def format_for(save_format: SaveFormat, align: int | None = None) -> Format:
    """The format a SaveFormat names; `align` (NPY and safetensors only) pads headers to a multiple of it."""
    if save_format is SaveFormat.NUMPY_NPY:
        return NpyFormat(align or NPY_ALIGNMENT)
    if save_format is SaveFormat.SAFETENSORS:
        return SafetensorsFormat(align or SAFETENSORS_ALIGNMENT)
    if align is not None:
        raise ValueError(f"align={align} does not apply to {save_format.name}")
    return PtFormat() if save_format is SaveFormat.PYTORCH_PT else NpzFormat()
