"""NUMPY_NPZ: a stored (uncompressed) ZIP of .npy members, as np.savez writes and np.load reads.

Written by hand so that each member is its .npy header plus the array's own buffer, with no copy of the
payload; only the CRC-32 reads it, once: the whole file's CRC (for the manifest) is combined from the
members' and the headers'. Every record carries ZIP64 fields, so one layout serves all sizes.
"""

from __future__ import annotations

import struct

import numpy as np

from ..arrays import Array, byte_view, host_array, numpy_dtype
from ..checksum import crc32, crc32_combine
from ..errors import InvalidKeyError, InvalidLayoutError
from ..options import SaveFormat
from .base import Buffer, BufferFormat, Container, FileEntry, check_zip, zip_end_records
from .npy import npy_header

__all__ = ["NpzFormat"]

_VERSION = 45  # ZIP64
_UTF8_NAMES = 0x0800
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01: fixed, so the same arrays give the same bytes
_UNIX_FILE = 0o100644 << 16
_MAX32 = 0xFFFFFFFF
_MAX16 = 0xFFFF


class NpzFormat(BufferFormat):
    save_format = SaveFormat.NUMPY_NPZ

    def dtype_tag(self, array: Array) -> np.dtype | None:
        return numpy_dtype(array)

    def check_collection(self, key: str, container: Container, names: tuple[str, ...]) -> None:
        for name in names:
            if "\0" in name or len(name.encode()) > _MAX16 - 4:
                raise InvalidKeyError(
                    f"mapping key {name[:40]!r} of {key!r} cannot name an .npz member: no NUL, and at most "
                    f"{_MAX16 - 4} bytes"
                )
        if not names:
            raise InvalidLayoutError(
                f"the {container.value} for key {key!r} is empty: np.load cannot read an .npz without "
                "members (it takes it for a pickle); write at least one array, or use SaveFormat.PYTORCH_PT"
            )

    def encode(self, entry: FileEntry) -> list[Buffer]:
        return self.encode_with_crc(entry)[0]

    def encode_with_crc(self, entry: FileEntry) -> tuple[list[Buffer], int]:
        buffers: list[Buffer] = []
        directory: list[bytes] = []
        offset = 0
        whole = 0  # the file's CRC so far
        for name, array in zip(entry.names, entry.arrays, strict=True):
            host = host_array(array)
            header = npy_header(host.dtype, tuple(array.shape))
            payload = byte_view(host)
            size = len(header) + payload.nbytes
            crc = crc32(payload, crc32(header))
            member = (name + ".npy").encode("utf-8")
            local = _local_header(member, crc, size)
            buffers += [local, header, payload]
            whole = crc32_combine(crc32(local, whole), crc, size)
            directory.append(_central_header(member, crc, size, offset))
            offset += len(local) + size
        central = b"".join(directory)
        end = _end_records(len(directory), len(central), offset)
        buffers += [central, end]
        return buffers, crc32(end, crc32(central, whole))

    def check_file(self, path: str) -> None:
        check_zip(path)


def _local_header(name: bytes, crc: int, size: int) -> bytes:
    extra = struct.pack("<HHQQ", 0x0001, 16, size, size)
    fixed = struct.pack(
        "<IHHHHHIIIHH",
        0x04034B50,
        _VERSION,
        _UTF8_NAMES,
        0,
        0,
        _DOS_DATE,
        crc,
        _MAX32,
        _MAX32,
        len(name),
        len(extra),
    )
    return fixed + name + extra


def _central_header(name: bytes, crc: int, size: int, offset: int) -> bytes:
    extra = struct.pack("<HHQQQ", 0x0001, 24, size, size, offset)
    fixed = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        0x02014B50,
        (3 << 8) | _VERSION,
        _VERSION,
        _UTF8_NAMES,
        0,
        0,
        _DOS_DATE,
        crc,
        _MAX32,
        _MAX32,
        len(name),
        len(extra),
        0,
        0,
        0,
        _UNIX_FILE,
        _MAX32,
    )
    return fixed + name + extra


def _end_records(count: int, directory_size: int, directory_offset: int) -> bytes:
    return zip_end_records(
        count,
        directory_size,
        directory_offset,
        made_by=(3 << 8) | _VERSION,
        needed=_VERSION,
        end_offset=_MAX32,
    )
