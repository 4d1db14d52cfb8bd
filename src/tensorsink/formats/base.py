"""The interface every format implements, and the one routine that puts buffers into a file."""

from __future__ import annotations

import enum
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, NamedTuple, TypeAlias

from ..arrays import Array, byte_view, dtype_name
from ..errors import UnsupportedValueError
from ..options import SaveFormat

__all__ = ["Buffer", "BufferFormat", "Container", "FileEntry", "Format", "HeaderFormat", "write_buffers"]

Buffer: TypeAlias = "bytes | bytearray | memoryview"
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


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

    @property
    def suffix(self) -> str:
        return "." + self.save_format.value

    def check(self, name: str, array: Array) -> None:
        """Raise UnsupportedValueError if this format cannot store `array` exactly."""
        if self.dtype_tag(array) is None:
            raise UnsupportedValueError(
                f"{name}: dtype {dtype_name(array)} cannot be stored as {self.suffix}; "
                f"use {self.alternatives(array)}"
            )

    @abstractmethod
    def dtype_tag(self, array: Array) -> object | None:
        """How the format names the array's dtype, or None if it cannot store it."""

    def alternatives(self, array: Array) -> str:
        return "SaveFormat.SAFETENSORS or SaveFormat.PYTORCH_PT"

    @abstractmethod
    def write(self, fd: int, entry: FileEntry) -> None:
        """Write the whole file for `entry` into the empty file open at `fd`."""


class BufferFormat(Format):
    """A format that is a header plus the arrays' own buffers, written in one gathered write."""

    @abstractmethod
    def encode(self, entry: FileEntry) -> list[Buffer]:
        """The file's contents as a list of buffers; payloads are views, never copies."""

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
        if written <= 0:
            raise OSError(f"os.writev wrote {written} bytes to fd {fd}")
