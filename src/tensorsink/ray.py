"""Ray Data integration: a Datasink that writes each row through an AsyncWriter, and a helper that writes
a GPU actor's predictions from inside `map_batches`, returning the committed files instead of tensors.

Needs the `ray` extra (`ray[data]`); `import tensorsink` does not import Ray.

- `TensorDatasink`: `ds.write_datasink(TensorDatasink(root, key_column="id"))`. Each write task runs one
  AsyncWriter (with its own journal) over its blocks, one `write_batch` per block. A file's name comes
  from its row's key, never from the task, so a retried task rewrites the same files (each replaced
  atomically) instead of adding copies; with `skip_existing=True` it skips the rows already committed.
  Two rows with one key would silently leave one file: the write fails naming the key instead.
  With `shards=True` each task writes its rows into WebDataset shards of its own (a ShardWriter), and
  the driver lists the shards of the tasks that succeeded in one shard list: a retried task's earlier
  attempt may leave shards behind, but never in the list.
- `CommittedBatchWriter`: made in a `map_batches` callable class; `write(keys, batch)` queues the
  batch (CUDA tensors go through the pinned pool, or GDS) and returns, once the files are committed,
  the rows `key`, `path`, `bytes` for Ray to carry instead of the tensors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from .commit import sweep
from .committed import CommittedBatchWriter, check_option_names, key_values
from .errors import InvalidKeyError
from .manifest import JOURNAL_DIR
from .options import DictMode, Durability, SaveFormat, ShardOptions, WriterOptions
from .plan import validate_key
from .shards.index import publish_journaled
from .shards.writer import ShardWriter
from .writer import AsyncWriter

__all__ = ["CommittedBatchWriter", "TaskWritten", "TensorDatasink", "WriteSummary"]

log = logging.getLogger("tensorsink")


@dataclass(frozen=True)
class TaskWritten:
    """What one write task wrote: Datasink.write's return value."""

    rows: int
    files: int
    bytes: int
    skipped: int
    journal: str | None  # this task's journal (None without manifest, or when it got no rows)
    #: The task's keys as written (normalised, UTF-8, sorted), skipped rows' included: the driver
    #: checks that no two tasks wrote one key. A fixed-width bytes array, far smaller than the strs.
    keys: np.ndarray = field(default_factory=lambda: _key_array([]), repr=False, compare=False)
    #: With shards=True: the shards the task committed (url relative to the root, samples in each).
    shards: tuple[tuple[str, int], ...] = ()


@dataclass
class WriteSummary:
    """What a `write_datasink` call wrote, all tasks together (`TensorDatasink.result`)."""

    rows: int = 0
    files: int = 0
    #: Payload bytes committed (the tensors' bytes, without the formats' headers).
    bytes: int = 0
    #: Rows skipped with skip_existing because their files were already committed.
    skipped: int = 0
    tasks: int = 0
    #: The merged journal, or None (manifest=False, or nothing written).
    journal: str | None = None
    #: Temporaries left by killed attempts and removed after the write.
    swept: list[str] = field(default_factory=list)
    #: With shards=True: the shard list written (None without shard_list).
    shard_list: str | None = None


class TensorDatasink(Datasink[TaskWritten]):
    """Write every row of a Ray Dataset as `<path>/<key><suffix>` (several files with SPLIT).

    - `key_column`: the column naming each row's file, str or int values (ints are written in
      decimal). A key is checked as AsyncWriter checks it: one that escapes the root fails the write
      with InvalidKeyError, and so does a key of two rows (`"a"` and `"./a"` are one), which would
      leave one file for both: in one write task at once, across tasks when every task is done.
    - `columns`: the tensor columns to store (default: every column but the key). Several are stored
      as a mapping (one file, or one per column with `dict_mode="split"`), a single one as a tensor.
    - `manifest`: each task journals its files; on completion the tasks' journals are merged into one,
      which `tensorsink verify PATH` and resume read.
    - `skip_existing`: rows whose files a journal records, still whole on disk, are not written again.
    - `sweep_on_complete`: once every task has finished, remove the temporaries that killed attempts
      left under `path` (`tensorsink.sweep`). Turn it off if other jobs write under the same root.
    - `min_bytes_per_write`: Ray gathers blocks into write tasks of at least this many bytes (64 MiB
      by default; None: one task per block, fused with the map before it). A task has a fixed cost
      and writes one block's files while it fetches the next, so few large tasks beat many small
      ones: a materialized dataset of 16 MiB blocks wrote 1.4-1.9x faster in 64 MiB tasks.
    - `shards`: write WebDataset tar shards (ShardWriter; `files` then counts samples) instead of a file
      per row, and on completion the shard list (`shard_list`, "shards.json") of the shards the
      successful tasks wrote (with `skip_existing`, of every shard under `path`, earlier runs' too).
    - `asyncwriter_options`: AsyncWriter's options (workers, durability, max_inflight_bytes, ...), or
      with shards=True ShardWriter's (shard_bytes, shard_samples, prefix, shard_list, ...).

    After `write_datasink` returns, `result` holds the WriteSummary that `on_write_complete` returned.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key_column: str,
        columns: Sequence[str] | None = None,
        save_format: SaveFormat | str = SaveFormat.SAFETENSORS,
        dict_mode: DictMode | str = DictMode.SINGLE,
        manifest: bool = True,
        skip_existing: bool = False,
        sweep_on_complete: bool = True,
        min_bytes_per_write: int | None = 64 << 20,
        shards: bool = False,
        **asyncwriter_options: Any,
    ) -> None:
        self.shards = shards
        check_option_names("TensorDatasink", asyncwriter_options, ShardWriter if shards else AsyncWriter)
        if min_bytes_per_write is not None and (
            isinstance(min_bytes_per_write, bool)
            or not isinstance(min_bytes_per_write, int)
            or min_bytes_per_write < 1
        ):
            raise ValueError(
                f"TensorDatasink(min_bytes_per_write={min_bytes_per_write!r}) must be a positive int "
                "(bytes) or None"
            )
        self._min_bytes_per_write = min_bytes_per_write
        self.path = os.path.abspath(path)
        self.key_column = key_column
        self.columns = None if columns is None else list(columns)
        if self.columns is not None and (not self.columns or key_column in self.columns):
            raise ValueError(
                f"TensorDatasink(columns={self.columns!r}) must name at least one column, and not the "
                f"key column {key_column!r}"
            )
        self.sweep_on_complete = sweep_on_complete
        self._options: dict[str, Any] = {
            "save_format": save_format,
            "dict_mode": dict_mode,
            "manifest": manifest,
            "skip_existing": skip_existing,
            **asyncwriter_options,
        }
        try:  # bad options fail here, on the driver, not in every write task
            checked = (ShardOptions if shards else WriterOptions)(out_root=Path(self.path), **self._options)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"TensorDatasink: {exc}") from None
        self._shard_list: str | None = None
        if shards:
            assert isinstance(checked, ShardOptions)
            self._shard_list = checked.shard_list
            self._options["shard_list"] = None  # the driver lists the successful tasks' shards
        self.result: WriteSummary | None = None

    def get_name(self) -> str:
        return "TensorDatasink"

    @property
    def min_bytes_per_write(self) -> int | None:
        return self._min_bytes_per_write

    def on_write_start(self, schema: Any = None) -> None:
        """Make the root. The columns are checked in each task, not against `schema`: when the write
        is fused with the map before it, Ray passes the map's input schema here, not the rows written."""
        os.makedirs(self.path, exist_ok=True)

    def write(self, blocks: Iterable[Block], ctx: Any) -> TaskWritten:
        """One write task: one AsyncWriter for all its blocks, one write_batch per block, then close()
        (which waits for every file and raises the first failure)."""
        writer: AsyncWriter | ShardWriter | None = None
        written: set[str] = set()  # this task's keys, normalised: a key of two rows fails here
        try:
            for block in blocks:
                accessor = BlockAccessor.for_block(block)
                if accessor.num_rows() == 0:
                    continue
                batch = accessor.to_batch_format("numpy")
                columns = _tensor_columns(list(batch), self.key_column, self.columns)
                keys = [validate_key(key) for key in key_values(batch[self.key_column])]
                for key in keys:
                    if key in written:
                        raise InvalidKeyError(
                            f"TensorDatasink(key_column={self.key_column!r}): key {key!r} is in two rows "
                            "of one write task, and both would be written to one file; give each row "
                            "its own key"
                        )
                    written.add(key)
                value: object = (
                    batch[columns[0]] if len(columns) == 1 else {name: batch[name] for name in columns}
                )
                if writer is None:
                    writer = (ShardWriter if self.shards else AsyncWriter)(self.path, **self._options)
                writer.write_batch(keys, value)
        except BaseException:
            if writer is not None:
                with contextlib.suppress(Exception):  # the error being raised is the one to report
                    writer.close()
            raise
        if writer is None:
            return TaskWritten(0, 0, 0, 0, None)
        writer.close()
        journal = writer._journal.path if writer._journal is not None else None
        key_array = _key_array(sorted(written))
        # Every row has its own key (checked above), so the keys count the rows.
        if isinstance(writer, ShardWriter):
            counts = writer.stats()
            shards = tuple((os.path.relpath(path, self.path), n) for path, n in writer.shards())
            return TaskWritten(
                len(written), counts.samples, counts.bytes, counts.skipped, journal, key_array, shards
            )
        stats = writer.stats()
        return TaskWritten(len(written), stats.files, stats.bytes, stats.skipped, journal, key_array)

    def on_write_complete(self, write_result: WriteResult[TaskWritten]) -> WriteSummary:
        """Every task succeeded: check that no two tasks wrote one key, merge their journals into one,
        sweep killed attempts' temporaries, and return (and keep in `result`) what was written.

        Only the attempts that succeeded return here, so a task that Ray retried counts once, however
        many of its files a killed attempt had committed (and journaled) before. A key that two tasks
        wrote raises InvalidKeyError before anything is merged or swept, as a failed task would."""
        returns = [r for r in write_result.write_returns if r is not None]
        _check_keys_once(self.key_column, returns)
        summary = WriteSummary(
            rows=sum(r.rows for r in returns),
            files=sum(r.files for r in returns),
            bytes=sum(r.bytes for r in returns),
            skipped=sum(r.skipped for r in returns),
            tasks=len(returns),
        )
        journals = [r.journal for r in returns if r.journal is not None]
        if journals:
            summary.journal = merge_journals(self.path, journals)
        if self.shards and self._shard_list is not None:
            listed = None if self._options["skip_existing"] else [s for r in returns for s in r.shards]
            summary.shard_list = str(self._publish_shard_list(listed))
        if self.sweep_on_complete:
            summary.swept = [str(p) for p in sweep(self.path)]
        self.result = summary
        return summary

    def _publish_shard_list(self, shards: list[tuple[str, int]] | None) -> Path:
        """The shard list, written and journaled by the driver (its journal holds that line alone)."""
        assert self._shard_list is not None
        durability = Durability.coerce(self._options.get("durability", "file"), argument="durability")
        return publish_journaled(
            self.path, self._shard_list, durability, manifest=self._options["manifest"], shards=shards
        )

    def on_write_failed(self, error: Exception) -> None:
        """A task failed for good: the files already committed stay (each whole, and journaled, so a
        re-run with skip_existing=True writes only the rest); no file is left torn. Temporaries of
        tasks that were killed are not swept here, since other tasks may still be writing."""
        log.warning("tensorsink: TensorDatasink write into %s failed: %s", self.path, error)


def _key_array(keys: Sequence[str]) -> np.ndarray:
    """Keys as a fixed-width bytes array (UTF-8; keys hold no NUL, so none is lost to the padding)."""
    return np.array([key.encode() for key in keys], dtype=np.bytes_) if keys else np.empty(0, "S1")


def _check_keys_once(key_column: str, returns: Sequence[TaskWritten]) -> None:
    """InvalidKeyError naming a key that two write tasks wrote (each task's own keys are distinct)."""
    arrays = [r.keys for r in returns if len(r.keys)]
    if len(arrays) < 2:
        return
    keys = np.concatenate(arrays)
    keys.sort()
    twice = np.flatnonzero(keys[1:] == keys[:-1])
    if not len(twice):
        return
    names = [bytes(k).decode() for k in np.unique(keys[twice])]
    if len(names) == 1:
        which = f"key {names[0]!r} is"
    else:
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        which = f"{len(names)} keys ({', '.join(map(repr, names[:5]))}{more}) are each"
    raise InvalidKeyError(
        f"TensorDatasink(key_column={key_column!r}): {which} in rows of more than one write task, so one "
        "row's file replaced another's; give each row its own key"
    )


def merge_journals(root: str, journals: Sequence[str]) -> str:
    """Concatenate `journals` (whole lines only) into one new journal under `root`, then remove them.

    The merged journal is written to a temporary, fsynced and renamed into place before any task's
    journal is removed: a crash in between leaves lines twice, which Manifest.load merges (the latest
    record of a path wins). Returns the merged journal's path.
    """
    folder = os.path.join(root, JOURNAL_DIR)
    name = f"journal-{socket.gethostname()}-{os.getpid()}-merged-{secrets.token_hex(4)}.jsonl"
    final = os.path.join(folder, name)
    temporary = final + ".partial"  # not matched by journal-*.jsonl until renamed
    with open(temporary, "wb") as out:
        for journal in journals:
            with open(journal, "rb") as source:
                data = source.read()
            cut = data.rfind(b"\n") + 1  # a torn last line is not a record
            out.write(data[:cut])
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, final)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for journal in journals:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(journal)
    return final


def _tensor_columns(names: list[str], key_column: str, columns: list[str] | None) -> list[str]:
    if key_column not in names:
        raise KeyError(f"TensorDatasink(key_column={key_column!r}) is not a column; the dataset has {names}")
    if columns is None:
        chosen = [name for name in names if name != key_column]
        if not chosen:
            raise ValueError(f"TensorDatasink: the dataset has no column besides the key {key_column!r}")
        return chosen
    missing = [name for name in columns if name not in names]
    if missing:
        raise KeyError(f"TensorDatasink(columns=...): {missing} not in the dataset's columns {names}")
    return columns
