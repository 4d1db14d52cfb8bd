"""PYTORCH_PT: the file torch.save writes for a tensor, a dict or a list, loadable with torch.load.

torch.save streams its records through a C++ ZIP writer that calls back into Python for every piece.
Here torch's own pickling (`torch.serialization._save`) runs against a stand-in writer that only records
what it is handed: data.pkl and the small records as bytes, each storage as the storage itself. The ZIP
is then laid out byte for byte as torch's writer (miniz) lays it out, so the file is a list of buffers:
the small pickle and the headers, and a view of each storage's own memory. Only the CRC-32 reads the
payload, once, with the GIL released (the whole file's CRC, for the manifest, is combined from the
records'); the one gathered write does the rest.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.serialization

from ..arrays import Array, compact_tensor, torch_dtype, torch_tensor
from ..checksum import crc32, crc32_combine
from ..options import SaveFormat
from .base import Buffer, BufferFormat, Container, FileEntry, check_zip, zip_end_records

__all__ = ["PtFormat", "PtTemplate", "pt_template"]

_ARCHIVE = b"archive/"  # the folder torch's writer uses for a file object (it names no path)
_VERSION_RECORD = b"3\n"  # the format version torch.save's writer records (kProducedFileFormatVersion)
_DEFAULT_ALIGNMENT = 64  # where torch writes no .storage_alignment record, its writer aligns to 64
_MAX32 = 0xFFFFFFFF
_UTF8_NAMES = 0x0800
_HAS_DESCRIPTOR = 0x0008  # sizes and CRC follow the data, as miniz writes every non-empty record
_ZIP64_MADE_BY = (3 << 8) | 30
_ZIP64_NEEDED = 45
_MASK64 = (1 << 64) - 1

#: torch.save minus its ZIP writer: pickles `obj` and hands each record to `zip_file.write_record`.
_torch_save_records: Callable[..., None] | None = getattr(torch.serialization, "_save", None)


class _Record(NamedTuple):
    name: bytes
    data: Buffer
    crc: int


class _NoView(Exception):
    """A record whose memory cannot be viewed; the file is then torch.save's own, made in memory."""


class _RecordWriter:
    """Stands in for torch's PyTorchFileWriter: keeps each record (storages as views) in call order.

    Older torch releases hand a storage's data_ptr() rather than the storage: `storages` maps the
    pointers of the tensors being saved back to their storages, which keep the memory alive.
    """

    def __init__(self, storages: dict[int, torch.UntypedStorage]) -> None:
        self.records: list[_Record] = []
        self._storages = storages

    def write_record(self, name: str, data: str | bytes | int | torch.UntypedStorage, nbytes: int) -> None:
        view: Buffer
        if isinstance(data, torch.UntypedStorage):
            view = _storage_view(data)
        elif isinstance(data, int):
            storage = self._storages.get(data)
            if nbytes and (storage is None or storage.nbytes() != nbytes):
                raise _NoView(name)
            view = _storage_view(storage) if storage is not None and nbytes else b""
        else:
            view = _small_bytes(data)
        if len(view) != nbytes:
            raise ValueError(f"record {name!r}: {len(view)} bytes given where torch.save names {nbytes}")
        # The ZIP's CRC-32, the one pass over the payload, with the GIL released. torch.load checks
        # no CRC (a flipped payload byte loads silently), but zipfile and unzip do.
        self.records.append(_Record(_ARCHIVE + name.encode("utf-8"), view, crc32(view)))

    def write_record_metadata(self, name: str, nbytes: int) -> None:
        raise RuntimeError("torch.serialization.skip_data() is not supported by tensorsink's .pt writer")

    def alignment(self) -> int:
        """The storage alignment torch's pickling recorded (and torch.load will expect)."""
        for record in self.records:
            if record.name == _ARCHIVE + b".storage_alignment":
                return int(bytes(record.data))
        return _DEFAULT_ALIGNMENT

    def finish(self) -> None:
        """Add the two records torch's writer appends on its own when it closes."""
        self.write_record("version", _VERSION_RECORD.decode(), len(_VERSION_RECORD))
        self.write_record(".data/serialization_id", _serialization_id(self.records), 40)


class _Payload:
    """Stands in for a storage's bytes where only their length matters (a template's layout)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def __len__(self) -> int:
        return self.nbytes


class _TemplateRecords(_RecordWriter):
    """The records of a tensor's .pt with its storage's bytes and CRC left out (neither is read)."""

    def write_record(self, name: str, data: str | bytes | int | torch.UntypedStorage, nbytes: int) -> None:
        if isinstance(data, (torch.UntypedStorage, int)):
            self.records.append(_Record(_ARCHIVE + name.encode("utf-8"), _Payload(nbytes), 0))  # type: ignore[arg-type]
        else:
            super().write_record(name, data, nbytes)


class PtTemplate(NamedTuple):
    """A plain tensor's .pt less what its bytes decide: the archive up to its storage (`head`), the
    archive after it (`tail`) with room for the storage's CRC (at `payload_crc_at`: its descriptor and
    its central entry), for the second half of the serialization id (20 digits at `id_at`: the hash of
    `seed` with the storage's CRC, then with each of `crcs_after`), and for that id record's CRC (at
    `id_crc_at`). The native engine fills it once it has the CRC (engine/_native/plain.c)."""

    head: bytes
    tail: bytes
    head_crc: int
    seed: int
    crcs_after: tuple[int, ...]
    payload_crc_at: tuple[int, int]
    id_at: int
    id_crc_at: tuple[int, int]


_ID_HOLE = b"#" * 20  # the id's CRC half, in a template: no header or small record holds 20 of these


@lru_cache(maxsize=64)
def pt_template(dtype_name: str, shape: tuple[int, ...]) -> PtTemplate | None:
    """The template of the .pt that PtFormat writes for a C-contiguous tensor of this dtype and shape,
    or None (no such dtype, no elements, or a torch whose pickling tensorsink cannot follow)."""
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype) or math.prod(shape) == 0 or _torch_save_records is None:
        return None
    records = _TemplateRecords({})
    _torch_save_records(
        torch.empty(shape, dtype=dtype), records, pickle, torch.serialization.DEFAULT_PROTOCOL, False
    )
    records.write_record("version", _VERSION_RECORD.decode(), len(_VERSION_RECORD))
    (payload,) = [i for i, record in enumerate(records.records) if isinstance(record.data, _Payload)]
    names = 0
    seed = 0
    for i, record in enumerate(records.records):
        names = _hash_combine(names, crc32(record.name))
        if i < payload:
            seed = _hash_combine(seed, record.crc)
    hole = f"{names:020d}".encode() + _ID_HOLE
    listed = [*records.records, _Record(_ARCHIVE + b".data/serialization_id", hole, 0)]
    buffers, _ = _zip(listed, records.alignment())
    if len(buffers) != 3 or not isinstance(buffers[1], _Payload):  # not the layout torch.save had
        return None
    head, _, tail = (bytes(buffer) if not isinstance(buffer, _Payload) else b"" for buffer in buffers)
    id_at = tail.index(_ID_HOLE)
    entries = _central_entries(tail, len(listed))
    return PtTemplate(
        head,
        tail.replace(_ID_HOLE, b"0" * len(_ID_HOLE)),
        crc32(head),
        seed,
        tuple(record.crc for record in records.records[payload + 1 :]),
        (4, entries[payload] + 16),  # the CRC after the descriptor's signature; a central entry's
        id_at,
        (id_at + len(_ID_HOLE) + 4, entries[-1] + 16),
    )


def _central_entries(tail: bytes, count: int) -> list[int]:
    """Where each of the `count` central directory entries at the end of `tail` starts."""
    at = tail.index(b"PK\x01\x02")
    starts = []
    for _ in range(count):
        starts.append(at)
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", tail, at + 28)
        at += 46 + name_length + extra_length + comment_length
    return starts


class PtFormat(BufferFormat):
    save_format = SaveFormat.PYTORCH_PT
    holds_nested = True

    def dtype_tag(self, array: Array) -> torch.dtype | None:
        return torch_dtype(array)

    def encode(self, entry: FileEntry) -> list[Buffer]:
        return self.encode_with_crc(entry)[0]

    def encode_with_crc(self, entry: FileEntry) -> tuple[list[Buffer], int | None]:
        tensors = [compact_tensor(torch_tensor(array)) for array in entry.arrays]
        obj = _saved_object(entry.container, entry.names, tensors)
        if _torch_save_records is None:  # a torch without the internal: its own bytes, copied once
            return [_saved_in_memory(obj)], None
        writer = _RecordWriter(_storages_by_pointer(tensors))
        try:
            _torch_save_records(obj, writer, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
        except _NoView:
            return [_saved_in_memory(obj)], None
        writer.finish()
        return _zip(writer.records, writer.alignment())

    def check_file(self, path: str) -> None:
        check_zip(path)


def _saved_object(container: Container, names: tuple[str, ...], tensors: list[torch.Tensor]) -> object:
    """What torch.save is given: the compacted tensors (detached, owning only their own bytes) in the
    caller's shape."""
    if container is Container.TENSOR:
        (tensor,) = tensors
        return tensor
    if container is Container.MAPPING:
        return dict(zip(names, tensors, strict=True))
    return tensors


def _storages_by_pointer(tensors: list[torch.Tensor]) -> dict[int, torch.UntypedStorage]:
    storages: dict[int, torch.UntypedStorage] = {}
    for tensor in tensors:
        if not tensor.is_nested:  # its sizes and offsets are storages of their own: saved whole instead
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage
    return storages


def _saved_in_memory(obj: object) -> memoryview:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def _storage_view(storage: torch.UntypedStorage) -> memoryview:
    """The storage's bytes as a flat memoryview of its own memory (torch hands CPU storages only)."""
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    array: np.ndarray = flat.numpy()
    return array.data


def _small_bytes(data: str | bytes) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def _serialization_id(records: list[_Record]) -> str:
    """The 40-digit id torch's writer derives from the record names and CRCs: the CRC half is torch's
    own; the names are hashed with CRC-32 where torch uses the C++ library's string hash. torch.load
    only reports the id, and the same tensors still give the same bytes."""
    names = 0
    crcs = 0
    for record in records:
        names = _hash_combine(names, crc32(record.name))
        crcs = _hash_combine(crcs, record.crc)
    return f"{names:020d}{crcs:020d}"


def _hash_combine(seed: int, value: int) -> int:
    return (seed ^ (value + 0x9E3779B9 + (seed << 6) + (seed >> 2))) & _MASK64


def _zip(records: list[_Record], alignment: int) -> tuple[list[Buffer], int]:
    """The archive as miniz writes it for torch: each record's data aligned by an "FB" extra field in
    its local header, a data descriptor after it, ZIP64 fields only past 4 GiB, ZIP64 end records;
    and the whole archive's CRC-32, from the records' and the headers'."""
    pieces: list[Buffer] = []
    directory: list[bytes] = []
    offset = 0
    whole = 0
    for name, data, crc in records:
        size = len(data)
        local, descriptor = _local_header(name, size, crc, offset, alignment)
        pieces += [local, data, descriptor]
        whole = crc32(descriptor, crc32_combine(crc32(local, whole), crc, size))
        directory.append(_central_header(name, size, crc, offset))
        offset += len(local) + size + len(descriptor)
    central = b"".join(directory)
    tail = central + _end_records(len(directory), len(central), offset)
    pieces.append(tail)
    return _gathered(pieces), crc32(tail, whole)


def _gathered(pieces: list[Buffer]) -> list[Buffer]:
    """Adjacent headers and small records joined into one bytes; storage views kept as they are."""
    buffers: list[Buffer] = []
    run: list[bytes] = []
    for piece in pieces:
        if isinstance(piece, bytes):
            run.append(piece)
            continue
        if run:
            buffers.append(b"".join(run))
            run = []
        buffers.append(piece)
    if run:
        buffers.append(b"".join(run))
    return [b for b in buffers if len(b)]


def _zip64_extra(fields: list[int]) -> bytes:
    return struct.pack(f"<HH{len(fields)}Q", 0x0001, 8 * len(fields), *fields) if fields else b""


def _local_header(name: bytes, size: int, crc: int, offset: int, alignment: int) -> tuple[bytes, bytes]:
    """The local header (sizes and CRC zero, as in miniz's streaming mode) and the data descriptor."""
    big_size = size >= _MAX32
    big_offset = offset >= _MAX32
    zip64 = _zip64_extra(([size, 0] if big_size else []) + ([offset] if big_offset else []))
    start = offset + 30 + len(name) + len(zip64) + 4
    padding = -start % alignment
    extra = zip64 + b"FB" + struct.pack("<H", padding) + b"Z" * padding
    flags = _UTF8_NAMES | (_HAS_DESCRIPTOR if size else 0)
    fixed = struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(name), len(extra))
    if not size:
        return fixed + name + extra, b""
    if big_size or big_offset:
        descriptor = struct.pack("<IIQQ", 0x08074B50, crc, size, size)
    else:
        descriptor = struct.pack("<IIII", 0x08074B50, crc, size, size)
    return fixed + name + extra, descriptor


def _central_header(name: bytes, size: int, crc: int, offset: int) -> bytes:
    big_size = size >= _MAX32
    big_offset = offset >= _MAX32
    extra = _zip64_extra(([size, size] if big_size else []) + ([offset] if big_offset else []))
    flags = _UTF8_NAMES | (_HAS_DESCRIPTOR if size else 0)
    fixed = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        0x02014B50,
        0,
        0,
        flags,
        0,
        0,
        0,
        crc,
        min(size, _MAX32),
        min(size, _MAX32),
        len(name),
        len(extra),
        0,
        0,
        0,
        0,
        min(offset, _MAX32),
    )
    return fixed + name + extra


def _end_records(count: int, directory_size: int, directory_offset: int) -> bytes:
    return zip_end_records(
        count,
        directory_size,
        directory_offset,
        made_by=_ZIP64_MADE_BY,
        needed=_ZIP64_NEEDED,
        end_offset=min(directory_offset, _MAX32),
    )
