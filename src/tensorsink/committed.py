"""CommittedBatchWriter: a batch's files written and committed, returned as rows that name them.

Made for Ray Data's `map_batches` (tensorsink.ray exports it), but it needs nothing of Ray: a GPU
actor, or any loop, hands it a batch and gets back the committed files as `key`, `path`, `bytes`.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .options import DictMode, SaveFormat, WriterOptions
from .plan import file_path, validate_key
from .writer import AsyncWriter

__all__ = ["CommittedBatchWriter", "check_option_names", "key_values", "keys_of"]


class CommittedBatchWriter:
    """Write a `map_batches` actor's outputs straight to files and return the committed rows.

    Make one in the callable class's `__init__`; in `__call__`, `return writer.write(keys, outputs)`
    where `outputs` is a tensor or a mapping of tensors (CUDA tensors included) whose first dimension
    indexes `keys`. The tensors go through the AsyncWriter's pinned pool (or GDS), never through
    Ray's object store; `write` returns only once every file of the batch is committed, as a batch
    `{"key": ..., "path": ..., "bytes": ...}` (one row per file). So when the dataset's execution
    returns, every file a returned row names is committed; an actor killed mid-batch returns nothing
    for that batch (Ray retries it) and leaves at most temporaries, never a torn file under a final name.

    With `compute=ActorPoolStrategy(max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)`
    one batch's files are written while the next batch is computed (Ray Data runs a class's calls one
    at a time, whatever max_concurrent_calls_per_actor says, unless enable_true_multi_threading is on).
    `close()` (also called by `__del__`, which Ray runs on graceful actor shutdown) fsyncs the journal
    (unless durability is "none") and stops the threads; nothing returned depends on it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        save_format: SaveFormat | str = SaveFormat.SAFETENSORS,
        dict_mode: DictMode | str = DictMode.SINGLE,
        manifest: bool = True,
        skip_existing: bool = False,
        **asyncwriter_options: Any,
    ) -> None:
        check_option_names("CommittedBatchWriter", asyncwriter_options)
        self.path = os.path.abspath(path)
        self._options: dict[str, Any] = {
            "save_format": save_format,
            "dict_mode": dict_mode,
            "manifest": manifest,
            "skip_existing": skip_existing,
            **asyncwriter_options,
        }
        checked = WriterOptions(out_root=Path(self.path), **self._options)
        self._suffix = "." + checked.save_format.value
        self._split = checked.dict_mode is DictMode.SPLIT
        self._writer: AsyncWriter | None = None
        self._lock = threading.Lock()

    @property
    def writer(self) -> AsyncWriter:
        """The AsyncWriter, made at the first write (in the actor, whichever thread gets there first)."""
        with self._lock:
            if self._writer is None:
                self._writer = AsyncWriter(self.path, **self._options)
            return self._writer

    def write(self, keys: Sequence[object] | np.ndarray, outputs: object) -> dict[str, np.ndarray]:
        """Write sample i of `outputs` under keys[i]; return the committed files as a batch of rows."""
        names = keys_of(keys)
        if isinstance(outputs, (list, tuple, str, bytes)):
            raise TypeError(
                f"CommittedBatchWriter.write(outputs=...) takes a tensor or a mapping of tensors batched "
                f"along the first dimension, not a {type(outputs).__name__}"
            )
        writer = self.writer
        writer.write_batch(names, outputs).result()  # raises the write's own failure
        parts = list(outputs) if self._split and isinstance(outputs, Mapping) else None
        row_keys, paths, sizes = [], [], []
        for name in names:
            key = validate_key(name)
            suffixes = [self._suffix] if parts is None else [f"_{part}{self._suffix}" for part in parts]
            for suffix in suffixes:
                path = file_path(self.path, key, suffix)
                row_keys.append(name)
                paths.append(path)
                sizes.append(os.stat(path).st_size)
        return {
            "key": np.array(row_keys, dtype=object),
            "path": np.array(paths, dtype=object),
            "bytes": np.array(sizes, dtype=np.int64),
        }

    def close(self) -> None:
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, Any]:  # made on the driver, used in an actor: no threads travel
        state = self.__dict__.copy()
        state["_writer"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def keys_of(column: Any) -> list[str]:
    """File keys from a key column, as given (str as they are, ints in decimal), each checked."""
    keys = key_values(column)
    for key in keys:
        validate_key(key)
    return keys


def key_values(column: Any) -> list[Any]:
    """A key column's values: str as they are, ints in decimal; anything else is passed on for
    validate_key to refuse with its own InvalidKeyError."""
    keys: list[Any] = []
    for value in column.tolist() if isinstance(column, np.ndarray) else list(column):
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            keys.append(str(int(value)))
        else:
            keys.append(value)
    return keys


def _asyncwriter_options() -> list[str]:
    return _options_of(AsyncWriter)


def _options_of(writer: type[Any]) -> list[str]:
    """The keyword options a writer class takes (all but its root)."""
    names = inspect.signature(writer.__init__).parameters
    return [name for name in names if name not in ("self", "out_root")]


def check_option_names(owner: str, options: Mapping[str, Any], writer: type[Any] | None = None) -> None:
    """TypeError for an option `writer` (AsyncWriter by default) does not take, naming the close ones."""
    known = _asyncwriter_options() if writer is None else _options_of(writer)
    for name in options:
        if name == "out_root":
            raise TypeError(f"{owner}(out_root=...): the output folder is the first argument, path")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TypeError(
                f"{owner}() got an unexpected keyword argument {name!r}; {hint}it takes "
                f"{(writer or AsyncWriter).__name__}'s options: {', '.join(known)}"
            )
