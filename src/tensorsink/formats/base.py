"""The interface every format implements, and the one routine that puts buffers into a file."""

from __future__ import annotations

import enum
import errno
import os
import struct
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, NamedTuple, TypeAlias

from ..arrays import Array, byte_view, dtype_name, plain_byte_view
from ..errors import UnsupportedValueError
from ..options import SaveFormat

__all__ = [
    "Buffer",
    "BufferFormat",
    "Container",
    "FileEntry",
    "Format",
    "HeaderFormat",
    "check_zip",
    "write_buffers",
    "zip_end_records",
]

Buffer: TypeAlias = "bytes | bytearray | memoryview"
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
#: Each concrete format's class by the SaveFormat it writes, so a refusal can ask the others.
_FORMATS: dict[SaveFormat, type[Format]] = {}


class Container(enum.Enum):
    """What the caller passed, so a single-file format can store the same shape back."""

    TENSOR = "tensor"
    MAPPING = "mapping"
    SEQUENCE = "sequence"


class FileEntry(NamedTuple):
    """One file a write() makes: its final path, and the named arrays that go into it."""

    path: str
    container: Container
    names: tuple[str, ...]
    arrays: tuple[Array, ...]
    nbytes: int


class Format(ABC):
    """A file format: what it accepts (checked on the caller's thread) and how it writes a file."""

    save_format: ClassVar[SaveFormat]
    #: False when a file holds exactly one array, so mappings and sequences need DictMode.SPLIT.
    holds_collections: ClassVar[bool] = True
    #: Whether torch's nested (ragged) tensors can be stored.
    holds_nested: ClassVar[bool] = False

    #: The files' suffix, ".pt" ...: set for each format class from its save_format.
    suffix: ClassVar[str]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "save_format" in cls.__dict__:
            cls.suffix = "." + cls.save_format.value
            _FORMATS[cls.save_format] = cls

    def check(self, name: str, array: Array) -> None:
        """Raise UnsupportedValueError if this format cannot store `array` exactly."""
        if self.dtype_tag(array) is None:
            holders = [f"SaveFormat.{save_format.name}" for save_format in self.alternatives(array)]
            advice = f"use {' or '.join(holders)}" if holders else "no format can store it"
            raise UnsupportedValueError(
                f"{name}: dtype {dtype_name(array)} cannot be stored as {self.suffix}; {advice}"
            )

    def check_collection(self, key: str, container: Container, names: tuple[str, ...]) -> None:
        """Raise InvalidLayoutError or InvalidKeyError for a mapping or sequence this format cannot
        store readably in one file (a reserved name, an empty collection). Most take any."""
        return

    @abstractmethod
    def dtype_tag(self, array: Array) -> object | None:
        """How the format names the array's dtype, or None if it cannot store it."""

    def alternatives(self, array: Array) -> list[SaveFormat]:
        """The other formats that can store `array`'s dtype: asked of each, so that a refusal never
        sends the caller to a format that refuses it too."""
        return [
            save_format
            for save_format in SaveFormat
            if save_format is not self.save_format
            and save_format in _FORMATS
            and _FORMATS[save_format]().dtype_tag(array) is not None
        ]

    @abstractmethod
    def write(self, fd: int, entry: FileEntry) -> None:
        """Write the whole file for `entry` into the empty file open at `fd`."""

    @abstractmethod
    def check_file(self, path: str) -> None:
        """Raise ValueError (or OSError) unless the file at `path` is whole in this format's layout:
        what verify() asks, from headers and sizes alone, so no torn file passes for a good one."""


class BufferFormat(Format):
    """A format that is a header plus the arrays' own buffers, written in one gathered write."""

    @abstractmethod
    def encode(self, entry: FileEntry) -> list[Buffer]:
        """The file's contents as a list of buffers; payloads are views, never copies."""

    def encode_with_crc(self, entry: FileEntry) -> tuple[list[Buffer], int | None]:
        """encode(), and the whole file's CRC-32 where encoding computes its pieces' CRCs anyway (a
        ZIP's records), else None: the engine then takes it while writing."""
        return self.encode(entry), None

    def write(self, fd: int, entry: FileEntry) -> None:
        write_buffers(fd, self.encode(entry))


class HeaderFormat(BufferFormat):
    """A header, then each array's bytes in order: what a device-direct writer can lay down itself."""

    #: Whether payloads must be in the machine's byte order (else each array keeps its own).
    native_payload: ClassVar[bool] = False

    @abstractmethod
    def header(self, entry: FileEntry) -> bytes:
        """The header; it needs only the arrays' dtypes and shapes, never their data."""

    def encode(self, entry: FileEntry) -> list[Buffer]:
        return [self.header(entry), *(byte_view(array, native=self.native_payload) for array in entry.arrays)]

    def encode_plain(self, entry: FileEntry) -> list[Buffer] | None:
        """encode(), where every array's bytes can be viewed as they are (costing microseconds, so the
        caller's thread may do it); None where one needs a copy first."""
        buffers: list[Buffer] = [b""]
        for array in entry.arrays:
            view = plain_byte_view(array, native=self.native_payload)
            if view is None:
                return None
            buffers.append(view)
        buffers[0] = self.header(entry)
        return buffers


ZIP_MAX32 = 0xFFFFFFFF
ZIP_MAX16 = 0xFFFF


def zip_end_records(
    count: int, directory_size: int, directory_offset: int, *, made_by: int, needed: int, end_offset: int
) -> bytes:
    """A ZIP's closing records, ZIP64 always: its end record, locator, and the classic end record
    (whose directory offset each writer fills its own way: `end_offset`)."""
    zip64_end = struct.pack(
        "<IQHHIIQQQQ", 0x06064B50, 44, made_by, needed, 0, 0, count, count, directory_size, directory_offset
    )
    locator = struct.pack("<IIQI", 0x07064B50, 0, directory_offset + directory_size, 1)
    count16, size32 = min(count, ZIP_MAX16), min(directory_size, ZIP_MAX32)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count16, count16, size32, end_offset, 0)
    return zip64_end + locator + end


def check_zip(path: str) -> None:
    """A ZIP (.npz, torch's .pt) is whole when its central directory is there and every member's
    stored bytes lie inside the file; ValueError otherwise."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile as exc:
        raise ValueError(f"not a whole ZIP archive: {exc}") from None
    for member in members:
        if member.header_offset + 30 + len(member.filename) + member.compress_size > size:
            raise ValueError(f"member {member.filename!r} runs past the end of the file")


def write_buffers(fd: int, buffers: Sequence[Buffer]) -> int:
    """Write all of `buffers` (bytes-like, one byte per item) to `fd` with os.writev; returns the bytes.

    One call usually writes everything; after a short write (or past IOV_MAX buffers) it resumes
    where that call stopped, slicing views, never copying.
    """
    total = sum(len(b) for b in buffers)
    if len(buffers) <= _IOV_MAX:
        written = os.writev(fd, buffers)
        if written == total:
            return total
    else:
        written = 0
    views = [memoryview(b) for b in buffers if len(b)]
    first = 0
    while True:
        while written:
            head = views[first]
            if written >= head.nbytes:
                written -= head.nbytes
                first += 1
            else:
                views[first] = head[written:]
                written = 0
        if first == len(views):
            return total
        written = os.writev(fd, views[first : first + _IOV_MAX])
        if written <= 0:  # no progress: a file system that would have us loop forever
            raise OSError(errno.EIO, f"os.writev wrote {written} bytes of {total}, making no progress")
