"""What a sample becomes in a shard: the members `<key>.<suffix>` and the bytes of each.

WebDataset groups a shard's members into samples by the part of their name before the first dot of
its last component, so a key whose last part holds a dot, or a SPLIT entry name with one, would be read
back as another sample: both are refused at write(). Everything here but `Group.buffers` runs on the
caller's thread and reads no payload bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ..arrays import Array, byte_view, nbytes, plain_byte_view
from ..errors import InvalidKeyError, InvalidLayoutError
from ..formats import Buffer, BufferFormat, Container, FileEntry, Format, HeaderFormat
from ..options import DictMode
from ..plan import batch_keys, check_file_part, check_one_file, validate_key

__all__ = ["Group", "groups_of", "row_of", "shard_key", "shard_keys"]

#: Keys every reader takes as they are: plain ASCII names and folders; checked for a whole batch at once.
_PLAIN_KEYS = re.compile(r"(?:[A-Za-z0-9_-]{1,255}(?:/[A-Za-z0-9_-]{1,255})*\n)*")


def shard_key(key: object) -> str:
    """The key as write() takes it (validate_key), and one WebDataset can group: no dot in its last part."""
    name = validate_key(key)
    last = name.rpartition("/")[2]
    if "." in last:
        raise InvalidKeyError(
            f"key {name!r} has a dot in its last part; in a shard WebDataset takes what precedes the "
            f"first dot as the sample's key and the rest as a member's type, so {last!r} would be read "
            f"back as key {last.partition('.')[0]!r}; use '_' or '-' instead"
        )
    return name


def shard_keys(keys: Sequence[object]) -> list[str]:
    """shard_key() of each key, the common case checked with one match for the whole batch; and
    InvalidKeyError where a key comes twice (a shard holds one sample per key)."""
    if not isinstance(keys, (str, bytes, bytearray)):  # (one str is refused by batch_keys)
        keys = list(keys)  # once: a generator would be used up by the match
        try:
            if _PLAIN_KEYS.fullmatch("\n".join(keys) + "\n") is not None:  # type: ignore[arg-type]
                return batch_keys(keys, str)
        except TypeError:  # a key that is not a str: checked, and named, one by one
            pass
    return batch_keys(keys, shard_key)


def row_of(array: Array, row: int) -> Array:
    """Sample `row` of a batch: an array always (numpy makes a row of a 1-D array a scalar)."""
    sample = array[row]
    return np.asarray(sample) if isinstance(sample, np.generic) else sample


class Group(NamedTuple):
    """One member of every sample of a write: its suffix, and its arrays with a row per sample."""

    suffix: str  # "npy", or "<entry>.npy" with DictMode.SPLIT
    container: Container
    names: tuple[str, ...]
    rows: tuple[Array, ...]  # each array's rows are the samples (or, `batched` False, the one sample)
    batched: bool

    def sample(self, row: int) -> FileEntry:
        arrays = tuple(row_of(a, row) for a in self.rows) if self.batched else self.rows
        return FileEntry("", self.container, self.names, arrays, sum(map(nbytes, arrays)))

    def buffers(self, fmt: Format, count: int) -> tuple[bytes, list[tuple[memoryview, int]]] | None:
        """The header every sample's member starts with and each array's bytes with their length per
        sample, where the format's header is the same for every sample; None where each needs its own
        encoding (.pt, .npz)."""
        if not isinstance(fmt, HeaderFormat) or count == 0:
            return None
        header = fmt.header(self.sample(0))
        parts = []
        for array in self.rows:
            view = plain_byte_view(array, native=fmt.native_payload)
            if view is None:  # not C-contiguous, or not in native order: one copy of the whole batch
                view = byte_view(array, native=fmt.native_payload)
            parts.append((view, len(view) // count))
        return header, parts

    def encoded(self, fmt: BufferFormat, row: int) -> list[Buffer]:
        return fmt.encode(self.sample(row))


def groups_of(
    key: str,
    container: Container,
    names: tuple[str, ...],
    rows: tuple[Array, ...],
    fmt: Format,
    dict_mode: DictMode,
    *,
    batched: bool,
) -> list[Group]:
    """The members each sample of a write makes (its arrays already checked for the format, by
    flatten()). Raises what write() raises for a collection the format or the dict mode cannot store,
    and InvalidKeyError for a SPLIT entry name WebDataset could not group."""
    ext = fmt.suffix[1:]
    if container is Container.TENSOR:
        return [Group(ext, container, names, rows, batched)]
    if dict_mode is DictMode.SPLIT:
        if not rows:
            raise InvalidLayoutError(
                f"{container.value} for key {key!r} is empty; with DictMode.SPLIT it would make no member"
            )
        parts = names if container is Container.MAPPING else tuple(str(i) for i in range(len(rows)))
        for part in parts:
            check_file_part(part, key)
            if "." in part:
                raise InvalidKeyError(
                    f"mapping key {part!r} of {key!r} names a shard member '{key}.{part}.{ext}', which "
                    "WebDataset would read as another type of member; use a name without '.'"
                )
        return [
            Group(f"{part}.{ext}", Container.TENSOR, ("arr_0",), (array,), batched)
            for part, array in zip(parts, rows, strict=True)
        ]
    check_one_file(fmt, key, container, names, "member")
    return [Group(ext, container, names, rows, batched)]
