"""A batch cut into its samples, for writing one file (or one SPLIT set) per sample.

A model's batch output is one tensor, or a mapping of tensors, whose first dimension indexes the
samples; staging copies it whole (one device-to-host copy per batch), and each sample's file then
gets a view of only its own rows. A list or tuple is taken as one value per sample instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from .arrays import Array, as_array, nbytes
from .errors import InvalidLayoutError, UnsupportedValueError
from .formats import Container

__all__ = ["Batch", "split_batch", "tensors_of"]


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
    """`batch` as `count` samples; InvalidLayoutError unless its first dimension (or length) is `count`."""
    array = as_array(batch)
    if array is not None:
        _check_rows("the batch", array, count)
        return Batch(Container.TENSOR, ("arr_0",), (array,), ())
    if isinstance(batch, Mapping):
        if not batch:
            raise InvalidLayoutError(
                "the batch is an empty mapping; give tensors whose first dimension indexes the samples"
            )
        names, arrays = [], []
        for name, value in batch.items():
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
    if isinstance(batch, (list, tuple)):
        if len(batch) != count:
            raise InvalidLayoutError(f"the batch has {len(batch)} values for {count} keys; give one per key")
        return Batch(Container.SEQUENCE, (), (), tuple(batch))
    raise UnsupportedValueError(
        f"a batch of type {type(batch).__name__} cannot be split into samples; pass a tensor or a mapping "
        "of tensors with the samples along the first dimension, or a list with one value per key"
    )


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
