"""SAFETENSORS: an 8-byte header length, a JSON header, then the tensors' bytes back to back."""

from __future__ import annotations

import json
import math
import os
import struct
from functools import lru_cache

import numpy as np
import torch

from ..arrays import Array, safetensors_dtype, safetensors_tag
from ..errors import InvalidKeyError
from ..options import SaveFormat
from .base import Container, FileEntry, HeaderFormat

__all__ = ["SAFETENSORS_ALIGNMENT", "SafetensorsFormat", "safetensors_header"]

#: safetensors pads its header so the data starts on a multiple of this.
SAFETENSORS_ALIGNMENT = 8
_METADATA = "__metadata__"
#: The safetensors reader refuses larger headers.
_MAX_HEADER = 100_000_000


@lru_cache(maxsize=256)  # outputs of a stream mostly share names, dtypes and shapes
def safetensors_header(
    tensors: tuple[tuple[str, str, tuple[int, ...], int], ...], alignment: int = SAFETENSORS_ALIGNMENT
) -> bytes:
    """The length prefix and JSON header for (name, dtype tag, shape, nbytes) laid out in that order."""
    layout: dict[str, object] = {_METADATA: {"format": "pt"}}
    start = 0
    for name, tag, shape, size in tensors:
        layout[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [start, start + size]}
        start += size
    text = json.dumps(layout, separators=(",", ":")).encode("utf-8")
    padded = -(-(8 + len(text)) // alignment) * alignment - 8
    return struct.pack("<Q", padded) + text + b" " * (padded - len(text))


@lru_cache(maxsize=1024)  # keyed by what write() has at hand: names, dtypes, shapes
def _header_of(
    names: tuple[str, ...],
    dtypes: tuple[torch.dtype | np.dtype, ...],
    shapes: tuple[tuple[int, ...], ...],
    alignment: int,
) -> bytes:
    layout = tuple(
        (name, str(safetensors_tag(dtype)), tuple(shape), math.prod(shape) * dtype.itemsize)
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True)
    )
    return safetensors_header(layout, alignment)


class SafetensorsFormat(HeaderFormat):
    save_format = SaveFormat.SAFETENSORS
    native_payload = True  # its dtype tags are little-endian

    def __init__(self, alignment: int = SAFETENSORS_ALIGNMENT) -> None:
        self.alignment = alignment

    def dtype_tag(self, array: Array) -> str | None:
        return safetensors_dtype(array)

    def check_collection(self, key: str, container: Container, names: tuple[str, ...]) -> None:
        if sum(len(name) for name in names) > _MAX_HEADER // 8 and self.header_size(names) > _MAX_HEADER:
            raise InvalidKeyError(
                f"the mapping keys of {key!r} would make a safetensors header over {_MAX_HEADER:,} bytes, "
                "which the safetensors reader refuses"
            )
        if _METADATA in names:
            raise InvalidKeyError(
                f"mapping key {_METADATA!r} of {key!r} is reserved by safetensors for the file's metadata; "
                "rename the entry"
            )

    @staticmethod
    def header_size(names: tuple[str, ...]) -> int:
        """About the header's size for these names (as JSON strings, with a generous 100 bytes each
        for dtype, shape and offsets)."""
        return sum(len(json.dumps(name)) + 100 for name in names)

    def header(self, entry: FileEntry) -> bytes:
        if len(entry.arrays) == 1:  # the common case, without building a key per array
            (array,) = entry.arrays
            return _header_of(entry.names, (array.dtype,), (array.shape,), self.alignment)
        dtypes = tuple(array.dtype for array in entry.arrays)
        return _header_of(entry.names, dtypes, tuple(array.shape for array in entry.arrays), self.alignment)

    def check_file(self, path: str) -> None:
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise ValueError("shorter than a safetensors length prefix")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER:
                raise ValueError(
                    f"its header of {length:,} bytes is over the {_MAX_HEADER:,} the reader takes"
                )
            try:
                layout = json.loads(file.read(min(length, 100 << 20)))
            except ValueError as exc:
                raise ValueError(f"its header is not whole JSON: {exc}") from None
        end = max((t["data_offsets"][1] for n, t in layout.items() if n != _METADATA), default=0)
        size, expected = os.path.getsize(path), 8 + length + end
        if size != expected:
            raise ValueError(f"holds {size} bytes where its header promises {expected}")
