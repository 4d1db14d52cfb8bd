"""NUMPY_NPY: numpy's .npy layout, a padded text header followed by the array's bytes in C order."""

from __future__ import annotations

import math
import os
import struct
from functools import lru_cache

import numpy as np

from ..arrays import Array, numpy_dtype
from ..options import SaveFormat
from .base import FileEntry, HeaderFormat

__all__ = ["NPY_ALIGNMENT", "NpyFormat", "npy_header"]

#: numpy pads its headers so the data starts on a multiple of this.
NPY_ALIGNMENT = 64
_MAGIC = b"\x93NUMPY"


@lru_cache(maxsize=256)  # outputs of a stream mostly share dtype and shape
def npy_header(dtype: np.dtype, shape: tuple[int, ...], alignment: int = NPY_ALIGNMENT) -> bytes:
    """The .npy header for a C-ordered array, padded with spaces so the data starts at `alignment`."""
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (  # noqa: UP031 (numpy's own form)
        np.lib.format.dtype_to_descr(dtype),
        tuple(shape),
    )
    try:
        encoded, version, length_format = text.encode("latin1"), 1, "<H"
    except UnicodeEncodeError:  # field names beyond Latin-1: version 3.0 is UTF-8, as np.save writes
        encoded, version, length_format = text.encode("utf-8"), 3, "<I"
    if version == 1 and _padded(10 + len(encoded) + 1, alignment) - 10 > 0xFFFF:  # too long for 1.0
        version, length_format = 2, "<I"
    fixed = len(_MAGIC) + 2 + struct.calcsize(length_format)
    header_len = _padded(fixed + len(encoded) + 1, alignment) - fixed
    body = encoded + b" " * (header_len - len(encoded) - 1) + b"\n"
    return _MAGIC + bytes([version, 0]) + struct.pack(length_format, header_len) + body


def _padded(size: int, alignment: int) -> int:
    return -(-size // alignment) * alignment


class NpyFormat(HeaderFormat):
    save_format = SaveFormat.NUMPY_NPY
    holds_collections = False

    def __init__(self, alignment: int = NPY_ALIGNMENT) -> None:
        self.alignment = alignment

    def dtype_tag(self, array: Array) -> np.dtype | None:
        return numpy_dtype(array)

    def header(self, entry: FileEntry) -> bytes:
        (array,) = entry.arrays
        dtype = numpy_dtype(array)
        assert dtype is not None  # checked at write()
        return npy_header(dtype, tuple(array.shape), self.alignment)

    def check_file(self, path: str) -> None:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            # 3.0 is 2.0 with a UTF-8 header: read as Latin-1, field names blur, sizes do not.
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in ((1, 0), (2, 0), (3, 0)):
                raise ValueError(f".npy version {version} is not one tensorsink writes")
            shape, _, dtype = read.get(version, np.lib.format.read_array_header_2_0)(file)
            expected = file.tell() + math.prod(shape) * dtype.itemsize
        size = os.path.getsize(path)
        if size != expected:
            raise ValueError(f"holds {size} bytes where its header promises {expected}")
