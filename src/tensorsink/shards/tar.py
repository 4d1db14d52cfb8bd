"""The tar layout of a shard: member headers, the packing of samples, and the check verify() makes.

A shard is a POSIX tar (ustar headers; a pax header before a member whose name is over 100 bytes or
not ASCII, or whose size is 8 GiB or more) ending in two zero blocks, as Python's tarfile, GNU tar and
WebDataset read it. Each member is one sample's file, `<key>.<suffix>`; its data starts at a multiple
of 512 bytes, which is the offset the journal records for reading it back without a scan.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence

from ..checksum import crc32

__all__ = [
    "BLOCK",
    "END",
    "USTAR_SIZE_LIMIT",
    "Member",
    "check_shard",
    "footprint",
    "member_header",
    "read_members",
]

BLOCK = 512
END = bytes(2 * BLOCK)  # the end-of-archive marker
USTAR_SIZE_LIMIT = 8**11  # an 11-digit octal size field holds less than this
_NAME_LIMIT = 100


def _template() -> bytearray:
    header = bytearray(BLOCK)
    header[100:108] = b"0000644\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[148:156] = b" " * 8  # the checksum field counts as spaces
    header[156:157] = b"0"  # a regular file
    header[257:265] = b"ustar\x0000"
    return header


_TEMPLATE = _template()


def _header(name: bytes, size: int, mtime: int, kind: bytes = b"0") -> bytearray:
    header = _TEMPLATE.copy()
    header[0 : len(name)] = name
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"%011o\0" % mtime
    header[156:157] = kind
    header[148:156] = b"%06o\0 " % sum(header)
    return header


def _pax_record(keyword: bytes, value: bytes) -> bytes:
    """One "<length> <keyword>=<value>\\n" record; the length counts its own digits."""
    body = b" %s=%s\n" % (keyword, value)
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return b"%d%s" % (length, body)


def _plain(raw: bytes, size: int) -> bool:
    return len(raw) <= _NAME_LIMIT and raw.isascii() and size < USTAR_SIZE_LIMIT


def footprint(name: str, size: int) -> int:
    """Bytes a member takes in a shard: its header blocks, its data and the padding after it."""
    raw = name.encode()
    header = BLOCK if _plain(raw, size) else 2 * BLOCK + _padded(len(_pax_records(raw, size)))
    return header + _padded(size)


def _padded(size: int) -> int:
    return size + (-size % BLOCK)


def _pax_records(raw: bytes, size: int) -> bytes:
    records = _pax_record(b"path", raw)
    if size >= USTAR_SIZE_LIMIT:
        records += _pax_record(b"size", b"%d" % size)
    return records


def member_header(name: str, size: int, mtime: int) -> bytes:
    """The header block(s) of a member `name` of `size` bytes: one ustar block, or a pax header and
    its records first where ustar cannot hold the name or the size."""
    raw = name.encode()
    if _plain(raw, size):
        return bytes(_header(raw, size, mtime))
    records = _pax_records(raw, size)
    padding = -len(records) % BLOCK
    pax = _header(b"././@PaxHeader", len(records), mtime, b"x")
    short = raw[:_NAME_LIMIT].decode("ascii", "replace").encode("ascii", "replace")
    plain_size = size if size < USTAR_SIZE_LIMIT else 0  # the pax record holds it, as tarfile does
    return bytes(pax) + records + bytes(padding) + bytes(_header(short, plain_size, mtime))


class Member:
    """A member found in a shard: its name, where its data starts and how long it is."""

    __slots__ = ("name", "offset", "size")

    def __init__(self, name: str, offset: int, size: int) -> None:
        self.name, self.offset, self.size = name, offset, size


def _field(block: bytes | mmap.mmap, start: int, end: int) -> bytes:
    return bytes(block[start:end]).split(b"\0", 1)[0]


def _octal(raw: bytes, where: str) -> int:
    digits = raw.strip(b" \0") or b"0"
    if not digits.isdigit():  # int() would take a sign, "_" or spaces: a size must be plain digits
        raise ValueError(f"{where}: field {raw!r} is not an octal number")
    try:
        return int(digits, 8)
    except ValueError:
        raise ValueError(f"{where}: field {raw!r} is not an octal number") from None


def _pax(data: bytes, where: str) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    position = 0
    while position < len(data):
        length_text, _, _ = data[position : position + 20].partition(b" ")
        length = int(length_text) if length_text.isdigit() else 0
        record = data[position : position + length]
        if length < 5 or not record.endswith(b"\n") or b"=" not in record:
            raise ValueError(f"{where}: a malformed pax record")
        keyword, _, value = record[len(length_text) + 1 : -1].partition(b"=")
        records[keyword] = value
        position += length
    return records


def read_members(view: bytes | mmap.mmap) -> Iterator[Member]:
    """Every regular member of a whole shard, in order; ValueError where the layout is not whole: a
    bad header checksum, a member running past the end, no end-of-archive marker."""
    position, size = 0, len(view)
    pending: dict[bytes, bytes] = {}
    while True:
        if position + BLOCK > size:
            raise ValueError(f"ends at byte {size} inside a header, without the end-of-archive blocks")
        block = view[position : position + BLOCK]
        if block == END[:BLOCK]:
            if view[position : position + 2 * BLOCK] != END:
                raise ValueError(f"the end-of-archive marker at byte {position} is not whole")
            return
        where = f"header at byte {position}"
        stored = _octal(bytes(block[148:156]), where)
        computed = sum(block[:148]) + 8 * 32 + sum(block[156:])
        if stored != computed:
            raise ValueError(f"{where}: checksum {stored} where its bytes sum to {computed}")
        length = _octal(bytes(block[124:136]), where)
        kind = block[156:157]
        data_start = position + BLOCK
        if kind == b"x":
            pending = _pax(bytes(view[data_start : data_start + length]), where)
        if b"size" in pending and kind != b"x":
            if not pending[b"size"].isdigit():
                raise ValueError(f"{where}: pax size {pending[b'size']!r} is not a number")
            length = int(pending[b"size"])
        end = data_start + length
        if end > size:
            raise ValueError(f"{where}: its {length} bytes run past the end of the file ({size} bytes)")
        if kind in (b"0", b"\0"):
            name = pending.get(b"path") or _field(block, 0, 100)
            yield Member(name.decode("utf-8", "surrogateescape"), data_start, length)
        if kind != b"x":
            pending = {}
        position = end + (-length % BLOCK)


def check_shard(path: str, samples: Sequence[list[object]], *, checksums: bool) -> str | None:
    """Why the shard at `path` is not what its journal line says (None if it is): every recorded
    member in order, at its offset and size, with its CRC-32 (`checksums`), and nothing else."""
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            return "an empty file, not a tar"
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
            try:
                found = list(read_members(view))
            except ValueError as exc:
                return str(exc)
            expected = [
                (f"{key}.{suffix}", offset, size, crc)
                for key, members in samples
                for suffix, offset, size, crc in members  # type: ignore[attr-defined]
            ]
            if len(found) != len(expected):
                return f"{len(found)} members where the journal records {len(expected)}"
            for member, (name, offset, size, crc) in zip(found, expected, strict=True):
                if (member.name, member.offset, member.size) != (name, offset, size):
                    return (
                        f"member {member.name!r} at byte {member.offset} of {member.size} bytes where "
                        f"the journal records {name!r} at {offset} of {size}"
                    )
                if checksums and f"{crc32(view[offset : offset + size]):08x}" != crc:
                    return f"member {name!r} fails its CRC-32"
    return None
