"""A batch cut into its samples, for writing one file (or one SPLIT set) per sample.

A model's batch output is one tensor, or a mapping of tensors, whose first dimension indexes the
samples; staging copies it whole (one device-to-host copy per batch), and each sample's file then
gets a view of only its own rows. Any other sequence (a list, a tuple, a range) is taken as one value per
sample instead; a str or bytes never is: it is one sample's value, as is a number or a 0-d tensor, which
are therefore a batch of exactly one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from .arrays import Array, as_array, nbytes
from .errors import InvalidLayoutError, UnsupportedValueError
from .formats import Container

__all__ = ["Batch", "has_no_samples", "split_batch", "tensors_of"]

#: Sequences that are one value, not one value per sample: text, and bytes (a memoryview of them too).
_ONE_VALUE = (str, bytes, bytearray, memoryview)


class Batch(NamedTuple):
    """How a batch holds its samples: whole arrays with a sample dimension, or one value per sample."""

    container: Container  # TENSOR or MAPPING: sliced arrays; SEQUENCE: `values` are the samples
    names: tuple[str, ...]
    arrays: tuple[Array, ...]
    values: tuple[Any, ...]

    @property
    def nbytes(self) -> int:
        return sum(map(nbytes, self.arrays))

    def samples(self, arrays: tuple[Array, ...] | None = None) -> list[Any]:
        """Each sample's value, cut from `arrays` (the batch's own, or their host copies)."""
        if self.container is Container.SEQUENCE:
            return list(self.values)
        arrays = self.arrays if arrays is None else arrays
        count = arrays[0].shape[0]
        if self.container is Container.TENSOR:
            return [arrays[0][i] for i in range(count)]
        return [{name: a[i] for name, a in zip(self.names, arrays, strict=True)} for i in range(count)]


def split_batch(batch: object, count: int) -> Batch:
    """`batch` as `count` samples; InvalidLayoutError unless its first dimension (or length) is `count`.

    A value with no sample dimension (a 0-d tensor, a number, a str or bytes) is one sample, so it
    needs `count == 1`; a str is never split into characters, nor bytes into ints.
    """
    array = as_array(batch)
    if array is not None:
        if array.ndim == 0:
            _check_one_value(batch, f"a 0-d {type(batch).__name__}", count)
            return Batch(Container.SEQUENCE, (), (), (batch,))
        _check_rows("the batch", array, count)
        return Batch(Container.TENSOR, ("arr_0",), (array,), ())
    if isinstance(batch, Mapping):
        if not batch:
            raise InvalidLayoutError(
                "the batch is an empty mapping; give tensors whose first dimension indexes the samples"
            )
        names, arrays = [], []
        for name, value in batch.items():
            if not isinstance(name, str):  # as write() says: 1 and "1" would name one file
                raise UnsupportedValueError(f"batch key {name!r} must be a str, not {type(name).__name__}")
            entry = as_array(value)
            if entry is None:
                raise UnsupportedValueError(
                    f"batch[{name!r}] is a {type(value).__name__}; a mapping batch holds tensors whose "
                    "first dimension indexes the samples"
                )
            _check_rows(f"batch[{name!r}]", entry, count)
            names.append(str(name))
            arrays.append(entry)
        return Batch(Container.MAPPING, tuple(names), tuple(arrays), ())
    if isinstance(batch, Sequence) and not isinstance(batch, _ONE_VALUE):
        if len(batch) != count:
            raise InvalidLayoutError(
                f"the batch ({type(batch).__name__}) has {len(batch)} values for {count} keys; give one "
                "per key"
            )
        return Batch(Container.SEQUENCE, (), (), tuple(batch))
    if isinstance(batch, Iterable) and not isinstance(batch, _ONE_VALUE):
        raise UnsupportedValueError(
            f"a batch of type {type(batch).__name__} cannot be split into samples: it has no order or "
            "length to match the keys; pass a tensor or a mapping of tensors with the samples along the "
            "first dimension, or a list with one value per key"
        )
    _check_one_value(batch, f"one {type(batch).__name__} ({_short(batch)})", count)
    return Batch(Container.SEQUENCE, (), (), (batch,))


def has_no_samples(batch: object) -> bool:
    """Whether `batch` holds no sample at all: None, an empty mapping or sequence (not ""), a tensor
    whose first dimension is 0, or a mapping whose every tensor has 0 rows. A model that filtered out a
    whole batch returns one of these; there is nothing to write for it."""
    if batch is None:
        return True
    array = as_array(batch)
    if array is not None:
        return array.ndim > 0 and array.shape[0] == 0
    if isinstance(batch, Mapping):
        arrays = [as_array(value) for value in batch.values()]
        return all(a is not None and a.ndim > 0 and a.shape[0] == 0 for a in arrays)
    if isinstance(batch, Sequence) and not isinstance(batch, _ONE_VALUE):
        return len(batch) == 0
    return False


def _check_one_value(batch: object, what: str, count: int) -> None:
    if count != 1:
        raise InvalidLayoutError(
            f"the batch is {what}, one sample's value, but {count} keys were given; give a tensor "
            "whose first dimension indexes the samples, or a list with one value per key"
        )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_rows(where: str, array: Array, count: int) -> None:
    rows = array.shape[0] if array.ndim else None
    if rows != count:
        raise InvalidLayoutError(
            f"{where} has shape {tuple(array.shape)}, but {count} keys were given: its first dimension "
            "must index the samples, one per key"
        )


def tensors_of(value: object) -> tuple[Container, tuple[str, ...], tuple[Array, ...]] | None:
    """A sample's arrays, for staging before a custom writer gets it; None for anything else (text...)."""
    array = as_array(value)
    if array is not None:
        return Container.TENSOR, ("arr_0",), (array,)
    if isinstance(value, Mapping) and value:
        arrays = [as_array(v) for v in value.values()]
        if all(a is not None for a in arrays):
            return Container.MAPPING, tuple(map(str, value)), tuple(a for a in arrays if a is not None)
    return None
