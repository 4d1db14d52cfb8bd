"""ShardWriter: many small samples written as WebDataset tar shards, each committed whole.

The caller's thread checks the keys and the value, stages device tensors through the pinned pool (one
copy per batch), admits the write under the byte budget and queues it: nothing per sample. One thread
per writer hands each job to its Packer (packer.py), which appends the samples to the open shard and
commits it once full, on flush() and on close(). A handle is done when every shard holding its samples
is committed; a failed shard fails every write with a sample in it, naming them.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ..arrays import Array, nbytes
from ..batches import has_no_samples, split_batch
from ..commit import Committer
from ..errors import WriterClosedError, WriterForkedError
from ..formats import BufferFormat, Container, FileEntry, format_for
from ..future import Callbacks, WriteFuture, WriteHandle
from ..manifest import Journal, Manifest
from ..options import DictMode, Durability, SaveFormat, ShardOptions
from ..plan import flatten, validate_key
from ..staging import Staged, Stager, default_pool_bytes
from ..stats import ShardStats
from .index import publish_shard_list
from .layout import groups_of, row_of, shard_key, shard_keys
from .packer import Job, Packer, Ticket

__all__ = ["ShardWriter"]

log = logging.getLogger("tensorsink")
_open_writers: set[ShardWriter] = set()


def _close_at_exit() -> None:
    """Commit the open shard of every writer its script did not close (its failure goes to the log)."""
    for writer in list(_open_writers):
        if writer._pid == os.getpid():
            try:
                writer.close()
            except BaseException:
                log.exception(
                    "tensorsink: a ShardWriter open at exit failed; its samples are not all written"
                )


atexit.register(_close_at_exit)


class ShardWriter:
    """Writes samples into WebDataset tar shards under `out_root`, each committed atomically.

    `write(key, value)` and `write_batch(keys, batch)` take what AsyncWriter's take (tensors, CUDA ones
    too, mappings, sequences; a batch's first dimension indexes its samples) and return a handle that
    is done once the shards holding the write's samples are committed. Each sample becomes the members
    `<key>.<ext>` (`<key>.<entry>.<ext>` with DictMode.SPLIT), so `webdataset.WebDataset` reads it
    back as the sample `key`. Keys whose last part holds a dot are refused: WebDataset would split them.
    See ShardOptions for the settings.
    """

    def __init__(
        self,
        out_root: str | os.PathLike[str],
        *,
        save_format: SaveFormat | str = ShardOptions.save_format,
        dict_mode: DictMode | str = ShardOptions.dict_mode,
        shard_bytes: int = ShardOptions.shard_bytes,
        shard_samples: int | None = ShardOptions.shard_samples,
        durability: Durability | str = ShardOptions.durability,
        manifest: bool = ShardOptions.manifest,
        skip_existing: bool = ShardOptions.skip_existing,
        max_inflight_bytes: int = ShardOptions.max_inflight_bytes,
        pinned_pool_bytes: int | None = ShardOptions.pinned_pool_bytes,
        upload_queue: queue.Queue[Path] | None = ShardOptions.upload_queue,
        follow_symlinks: bool = ShardOptions.follow_symlinks,
        prefix: str = ShardOptions.prefix,
        shard_list: str | None = ShardOptions.shard_list,
        engine: str = ShardOptions.engine,
    ) -> None:
        o = self.options = ShardOptions(
            Path(out_root),
            save_format,  # type: ignore[arg-type]  # coerced and checked there
            dict_mode,  # type: ignore[arg-type]
            shard_bytes,
            shard_samples,
            durability,  # type: ignore[arg-type]
            manifest,
            skip_existing,
            max_inflight_bytes,
            pinned_pool_bytes,
            upload_queue,
            follow_symlinks,
            prefix,
            shard_list,
            engine,
        )
        validate_key(o.prefix)
        if o.shard_list is not None:
            validate_key(o.shard_list)
        self._root = os.path.abspath(o.out_root)
        self._format = format_for(o.save_format)
        self._committer = Committer(o.durability, self._root, follow_symlinks=o.follow_symlinks)
        self._journal = (
            Journal(self._root, fsync=o.durability.value != "none", follow_symlinks=o.follow_symlinks)
            if o.manifest
            else None
        )
        self._earlier = Manifest.load(self._root) if o.skip_existing else None
        self._stager: Stager | None = None
        self._pid = os.getpid()
        self._closed = False
        self._closing = threading.Lock()  # orders a write's or flush's queueing against close()
        self._callbacks = Callbacks()  # done-callbacks run there, never on the shard thread
        self._stats = ShardStats()
        self._budget = threading.Condition()
        self._queued_bytes = 0
        self._queue: queue.SimpleQueue[Job | threading.Event | None] = queue.SimpleQueue()
        assert isinstance(self._format, BufferFormat)  # every format is
        self._packer = Packer(self._root, o, self._format, self._committer, self._journal, self._stats)
        self._thread = threading.Thread(target=self._run, name="tensorsink-shards", daemon=True)
        self._thread.start()
        _open_writers.add(self)

    @property
    def root(self) -> Path:
        return Path(self._root)

    # -- the caller's side -------------------------------------------------------------------------

    def write(self, key: str | os.PathLike[str], value: object, *, copy: bool = False) -> WriteHandle:
        """Queue one sample under `key`; with copy=True its tensors may be changed as soon as this returns."""
        self._check_open()
        name = shard_key(key)
        container, names, arrays = flatten(value, self._format)
        groups_of(name, container, names, arrays, self._format, self.options.dict_mode, batched=False)
        return self._queue_job([name], [0], container, names, arrays, batched=False, copy=copy)

    def write_batch(
        self, keys: Sequence[str | os.PathLike[str]], batch: object, *, copy: bool = False
    ) -> WriteHandle:
        """Queue sample i of `batch` under keys[i]: a tensor or mapping of tensors whose first dimension
        indexes the samples (copied from a device once, whole), or a sequence of one value per key."""
        self._check_open()
        names = shard_keys(keys)
        if has_no_samples(batch) and not names:
            return self._done([])
        layout = split_batch(batch, len(names))
        if layout.container is Container.SEQUENCE:
            handles = [
                self.write(name, value, copy=copy) for name, value in zip(names, layout.values, strict=True)
            ]
            return _all_of(handles, self._callbacks)
        first = (
            row_of(layout.arrays[0], 0)
            if layout.container is Container.TENSOR
            else {name: row_of(array, 0) for name, array in zip(layout.names, layout.arrays, strict=True)}
        )
        flatten(first, self._format)  # every sample is of the same dtypes and shapes: one is checked
        groups_of(
            names[0], layout.container, layout.names, layout.arrays, self._format, self.options.dict_mode,
            batched=True,
        )  # fmt: skip
        return self._queue_job(
            names, list(range(len(names))), layout.container, layout.names, layout.arrays, batched=True,
            copy=copy,
        )  # fmt: skip

    def _queue_job(
        self,
        keys: list[str],
        rows: list[int],
        container: Container,
        names: tuple[str, ...],
        arrays: tuple[Array, ...],
        *,
        batched: bool,
        copy: bool,
    ) -> WriteHandle:
        began = time.perf_counter()
        skipped_in: list[Path] = []
        earlier = self._earlier
        if self.options.skip_existing and earlier is not None:
            kept = [i for i, key in enumerate(keys) if not earlier.done(key)]
            if len(kept) < len(keys):
                self._stats.add(skipped=len(keys) - len(kept))
                done = set(range(len(keys))) - set(kept)
                shards = {earlier.shard_samples[keys[i]][0] for i in done if keys[i] in earlier.shard_samples}
                skipped_in = [Path(self._root, shard) for shard in sorted(shards)]
                if not kept:
                    return self._done(skipped_in)
                keys, rows = [keys[i] for i in kept], [rows[i] for i in kept]
        size = sum(map(nbytes, arrays))
        if batched and len(rows) < arrays[0].shape[0]:
            size = size * len(rows) // arrays[0].shape[0]
        self._admit(size)
        staged = None
        try:
            arrays, staged = self._stage(container, names, arrays, copy)
        except BaseException:
            self._release(size)
            raise
        # Host arrays are read until their shard is written (staged when done), unless copied.
        ticket = Ticket(len(keys), staged_apart=copy or staged is not None, callbacks=self._callbacks)
        ticket.paths.extend(skipped_in)
        if copy:
            ticket.handle.set_staged()
        with self._closing:  # never after close()'s last message to the thread
            if self._closed:
                if staged is not None:
                    staged.release()
                self._release(size)
                raise WriterClosedError(f"write() on a ShardWriter into {self._root} that is closed")
            self._queue.put(Job(ticket, keys, rows, container, names, arrays, batched, staged, size))
        self._stats.add(writes=1, write_seconds=time.perf_counter() - began)
        return ticket.handle

    def _stage(
        self, container: Container, names: tuple[str, ...], arrays: tuple[Array, ...], copy: bool
    ) -> tuple[tuple[Array, ...], Staged | None]:
        """Device tensors into the pinned pool (queued on their streams), host ones copied if asked."""
        entry = FileEntry("", container, names, arrays, 0)
        if self._stager is None:
            if not copy and not any(getattr(a, "is_cuda", False) for a in arrays):
                return arrays, None
            with self._closing:
                if self._stager is None:
                    self._stager = Stager(self.options.pinned_pool_bytes or default_pool_bytes())
        entries, staged = self._stager.stage([entry], copy=copy)
        return entries[0].arrays, staged

    def _admit(self, size: int) -> None:
        """Wait while the queued writes hold max_inflight_bytes (a write larger than that goes alone)."""
        with self._budget:
            if self._queued_bytes and self._queued_bytes + size > self.options.max_inflight_bytes:
                began = time.perf_counter()
                while self._queued_bytes and self._queued_bytes + size > self.options.max_inflight_bytes:
                    self._budget.wait()
                self._stats.add(blocked_seconds=time.perf_counter() - began)
            self._queued_bytes += size

    def _release(self, size: int) -> None:
        with self._budget:
            self._queued_bytes -= size
            self._budget.notify_all()

    def _done(self, paths: list[Path]) -> WriteHandle:
        """A handle settled already: for a write with nothing left to write."""
        handle = WriteFuture()
        handle.set_result(paths)
        return handle

    def is_done(self, key: str | os.PathLike[str]) -> bool:
        """Whether `key` is in a committed shard: written here, or recorded by a journal under the root."""
        name = validate_key(key)
        if name in self._packer.committed:
            return True
        if self._earlier is None:
            self._earlier = Manifest.load(self._root)
        return self._earlier.done(name)

    def flush(self) -> None:
        """Commit the open shard and wait for every write so far and its done-callbacks; raise the
        first failure."""
        self._check_open()
        with self._closing:  # never after close()'s last message to the thread
            if self._closed:
                raise WriterClosedError(f"flush() on a ShardWriter into {self._root} that is closed")
            done = threading.Event()
            self._queue.put(done)
        done.wait()
        self._callbacks.wait()
        if self._journal is not None:
            self._journal.sync()
        self._raise_if_failed()

    def close(self) -> None:
        """flush(), then write the shard list (every shard under the root) and stop; idempotent."""
        if self._closed:
            return
        if self._pid != os.getpid():
            raise WriterForkedError(
                f"this ShardWriter was made in process {self._pid}; make one in the child"
            )
        with self._closing:
            self._closed = True
        _open_writers.discard(self)
        try:
            self._queue.put(None)  # after every job and flush queued before close() took the lock
            self._thread.join()
            if not self._callbacks.here:  # a callback's close() must not wait for itself
                self._callbacks.wait()
            if self._packer.error is None and self.options.shard_list is not None:
                # Without journals, the list of this writer's own shards; else of every one under the root.
                own = None if self._journal is not None else [
                    (os.path.relpath(path, self._root), count) for path, count in self._packer.shards
                ]  # fmt: skip
                path = publish_shard_list(
                    self._root, self.options.shard_list, self._committer, self._journal, own
                )
                if self.options.upload_queue is not None:
                    self.options.upload_queue.put(path)
        finally:
            self._callbacks.stop(wait=not self._callbacks.here)
            if self._journal is not None:
                self._journal.close()
            if self._stager is not None:
                self._stager.close()
        self._raise_if_failed()

    def stats(self) -> ShardStats:
        return self._stats.snapshot()

    def shards(self) -> list[tuple[Path, int]]:
        """The shards this writer committed so far, in order, and the samples each holds."""
        return list(self._packer.shards)

    def _check_open(self) -> None:
        if self._pid != os.getpid():
            raise WriterForkedError(
                f"this ShardWriter was made in process {self._pid}; make one in the child"
            )
        if self._closed:
            raise WriterClosedError(f"write() on a ShardWriter into {self._root} that is closed")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        error = self._packer.error
        if error is not None:
            raise error

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            self.close()
        else:
            with contextlib.suppress(Exception):  # the error in the with-block is the one to see
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ShardWriter {self._root} {self.options.save_format.value} {state}>"

    # -- the shard thread --------------------------------------------------------------------------

    def _run(self) -> None:
        """The shard thread's loop. Nothing may end it but close(): the packer turns each failure into
        the failure of the writes it touched (and the writer's)."""
        while True:
            item = self._queue.get()
            if item is None or isinstance(item, threading.Event):  # close(), or flush()
                try:
                    self._packer.end_shard()
                except BaseException as exc:  # nothing may end this thread: it is the writer's failure
                    self._packer.note_failure(exc)
                finally:
                    if item is not None:
                        item.set()
                if item is None:
                    return
                continue
            try:
                self._packer.pack_job(item)
            except BaseException as exc:
                self._packer.note_failure(exc)
            finally:
                if item.staged is not None:
                    item.staged.release()
                self._release(item.nbytes)


def _all_of(handles: list[WriteHandle], callbacks: Callbacks) -> WriteHandle:
    """One handle for several: done with every path once all are, failed with the first failure."""
    joined = WriteFuture(staged_apart=True, callbacks=callbacks)
    remaining = [len(handles)]
    lock = threading.Lock()

    def settle(_: object) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        errors = [h.exception() for h in handles if h.exception() is not None]
        joined.set_staged()
        if errors:
            joined.set_exception(errors[0])
        else:
            joined.set_result(list(dict.fromkeys(p for h in handles for p in h.result())))

    if not handles:
        settle(None)
    for handle in handles:
        handle.add_done_callback(settle)
    return joined
