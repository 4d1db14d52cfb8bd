"""ShardWriter: many small samples written as WebDataset tar shards, each committed whole.

The caller's thread checks the keys and the value, stages device tensors through the pinned pool (one
copy per batch) and queues the write: nothing per sample. One thread per writer appends each sample's
members to the open shard, a temporary beside its final name, and commits the shard like any file
(fsync by durability, an atomic rename) once it is full, on flush() and on close(); then the journal
records its samples with their members' offsets, sizes and CRC-32s. A handle is done when every shard
holding its samples is committed; a failed shard fails every write with a sample in it, naming them.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from ..arrays import Array, nbytes
from ..batches import has_no_samples, split_batch
from ..checksum import crc32, crc32_combine
from ..commit import Committer
from ..engine import engine_class
from ..errors import WriterClosedError, WriterForkedError
from ..formats import Buffer, BufferFormat, Container, FileEntry, format_for, write_buffers
from ..future import WriteFuture, WriteHandle
from ..manifest import SHARD_FORMAT, Journal, Manifest
from ..options import DictMode, Durability, SaveFormat, ShardOptions
from ..plan import flatten, validate_key
from ..staging import Staged, Stager, default_pool_bytes
from ..stats import ShardStats
from .index import publish_shard_list, sample_line
from .layout import Group, groups_of, shard_key, shard_keys
from .tar import BLOCK, END, USTAR_SIZE_LIMIT, footprint, member_header

__all__ = ["ShardWriter"]

log = logging.getLogger("tensorsink")
_WRITE_AHEAD = 4 << 20  # bytes of members gathered before one writev into the shard
_KEYS_NAMED = 8  # keys a failed shard's error lists by name
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


class _Ticket:
    """One write()'s or write_batch()'s handle, and how many of its samples are not committed yet."""

    __slots__ = ("failed", "handle", "paths", "remaining")

    def __init__(self, count: int, staged_apart: bool) -> None:
        self.handle = WriteFuture(staged_apart=staged_apart)
        self.remaining = count
        self.paths: list[Path] = []
        self.failed = False


class _Job(NamedTuple):
    ticket: _Ticket
    keys: list[str]
    rows: list[int]  # the rows of `arrays` to write, one per key
    container: Container
    names: tuple[str, ...]
    arrays: tuple[Array, ...]
    batched: bool
    staged: Staged | None
    nbytes: int


class _Shard:
    """The open shard: its temporary, where the next member goes, and what it holds so far."""

    def __init__(self, final: str, fd: int, temporary: str) -> None:
        self.final, self.fd, self.temporary = final, fd, temporary
        self.size = 0
        self.crc = 0
        self.keys: set[str] = set()
        self.lines: list[str] = []  # the samples' journal entries, one or a run of them each
        self.count = 0  # samples
        self.pieces: dict[_Ticket, int] = {}
        self.pending: list[Buffer] = []
        self.pending_bytes = 0

    def add(self, buffers: list[Buffer], size: int) -> None:
        self.pending.extend(buffers)
        self.pending_bytes += size
        self.size += size

    def drain(self) -> None:
        if self.pending:
            write_buffers(self.fd, self.pending)
            self.pending, self.pending_bytes = [], 0


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
        self._name = f"{self._root}/{o.prefix}-{secrets.token_hex(4)}"
        self._numbers = 0
        self._mtime = int(time.time())
        self._earlier = Manifest.load(self._root) if o.skip_existing else None
        self._stager: Stager | None = None
        self._tar_pack = _native_packer() if engine_class(o.engine).name == "native" else None
        self._pid = os.getpid()
        self._closed = False
        self._closing = threading.Lock()  # orders a write's queueing against close()
        self._error: BaseException | None = None
        self._committed: set[str] = set()
        self._shards: list[tuple[Path, int]] = []
        self._stats = ShardStats()
        self._budget = threading.Condition()
        self._queued_bytes = 0
        self._queue: queue.SimpleQueue[_Job | threading.Event | None] = queue.SimpleQueue()
        self._shard: _Shard | None = None
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
            return _all_of(handles)
        first = (
            layout.arrays[0][0]
            if layout.container is Container.TENSOR
            else {name: array[0] for name, array in zip(layout.names, layout.arrays, strict=True)}
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
        ticket = _Ticket(len(keys), staged_apart=copy or staged is not None)
        ticket.paths.extend(skipped_in)
        if copy:
            ticket.handle.set_staged()
        with self._closing:  # never after close()'s last message to the thread
            if self._closed:
                if staged is not None:
                    staged.release()
                self._release(size)
                raise WriterClosedError(f"write() on a ShardWriter into {self._root} that is closed")
            self._queue.put(_Job(ticket, keys, rows, container, names, arrays, batched, staged, size))
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
        if name in self._committed:
            return True
        if self._earlier is None:
            self._earlier = Manifest.load(self._root)
        return self._earlier.done(name)

    def flush(self) -> None:
        """Commit the open shard and wait for every write so far; raise the first failure."""
        self._check_open()
        self._wait_for_thread()
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
            self._wait_for_thread()
            self._queue.put(None)
            self._thread.join()
            if self._error is None and self.options.shard_list is not None:
                path = publish_shard_list(self._root, self.options.shard_list, self._committer, self._journal)
                if self.options.upload_queue is not None:
                    self.options.upload_queue.put(path)
        finally:
            if self._journal is not None:
                self._journal.close()
            if self._stager is not None:
                self._stager.close()
        self._raise_if_failed()

    def stats(self) -> ShardStats:
        return self._stats.snapshot()

    def shards(self) -> list[tuple[Path, int]]:
        """The shards this writer committed so far, in order, and the samples each holds."""
        return list(self._shards)

    def _wait_for_thread(self) -> None:
        done = threading.Event()
        self._queue.put(done)
        done.wait()

    def _check_open(self) -> None:
        if self._pid != os.getpid():
            raise WriterForkedError(
                f"this ShardWriter was made in process {self._pid}; make one in the child"
            )
        if self._closed:
            raise WriterClosedError(f"write() on a ShardWriter into {self._root} that is closed")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

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
        """The shard thread's loop. Nothing may end it but close(): each failure fails the writes it
        touched (and is the writer's), and the thread goes on."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                try:
                    self._end_shard()
                finally:
                    item.set()
                continue
            try:
                self._pack(item)
                if self._shard is not None:  # the job's bytes all in the file before its memory goes back
                    self._drain(self._shard)
            except Exception as exc:  # a failure of the job itself (its staging copy, a refused value)
                if self._shard is not None and item.ticket in self._shard.pieces:
                    self._abandon(self._shard, exc)
                else:
                    self._fail_tickets([item.ticket], item.keys, exc)
            finally:
                if item.staged is not None:
                    item.staged.release()
                self._release(item.nbytes)

    def _drain(self, shard: _Shard) -> None:
        try:
            shard.drain()
        except OSError as exc:
            self._abandon(shard, exc)

    def _pack(self, job: _Job) -> None:
        arrays = job.arrays
        if job.staged is not None:
            arrays = job.staged.wait()[0].arrays
            if not job.ticket.handle.staged():
                job.ticket.handle.set_staged()
        fmt = self._format
        assert isinstance(fmt, BufferFormat)
        groups = groups_of(
            job.keys[0], job.container, job.names, arrays, fmt, self.options.dict_mode, batched=job.batched
        )
        count = arrays[0].shape[0] if job.batched else 1
        fixed = [group.buffers(fmt, count) for group in groups]
        if (
            self._tar_pack is not None
            and all(plain is not None for plain in fixed)
            and sum(len(p[0]) + sum(stride for _, stride in p[1]) for p in fixed if p) < USTAR_SIZE_LIMIT
        ):  # a member of 8 GiB or more needs a pax size record: the Python packer writes those
            self._pack_natively(job, groups, fixed)  # type: ignore[arg-type]  # none is None
            return
        for key, row in zip(job.keys, job.rows, strict=True):
            members = [
                (f"{key}.{group.suffix}", _sample_buffers(group, plain, fmt, row))
                for group, plain in zip(groups, fixed, strict=True)
            ]
            sizes = [sum(map(len, buffers)) for _, buffers in members]
            try:
                shard, _ = self._take(
                    [key], [footprint(name, size) for (name, _), size in zip(members, sizes, strict=True)]
                )
            except OSError as exc:
                self._fail_tickets([job.ticket], [key], exc)
                continue
            shard.pieces[job.ticket] = shard.pieces.get(job.ticket, 0) + 1
            try:
                self._append(shard, key, members, sizes)
            except Exception as exc:
                shard.keys.add(key)
                self._abandon(shard, exc)

    def _pack_natively(
        self, job: _Job, groups: list[Group], fixed: list[tuple[bytes, list[tuple[memoryview, int]]]]
    ) -> None:
        """Every sample of the job has the same members: runs of them go into the C packer, each run
        as many as the open shard takes."""
        assert self._tar_pack is not None
        keys, rows = job.keys, job.rows
        packed = tuple(
            (g.suffix.encode(), header, parts) for g, (header, parts) in zip(groups, fixed, strict=True)
        )
        sizes = [len(header) + sum(stride for _, stride in parts) for header, parts in fixed]
        longest = max(map(len, keys)) + 1 + max(len(g.suffix) for g in groups)
        each: int | list[int]
        if longest <= 100 and "".join(keys).isascii():  # ustar names: every sample takes as much
            each = sum(footprint("", size) for size in sizes)
        else:
            each = [
                sum(footprint(f"{key}.{g.suffix}", size) for g, size in zip(groups, sizes, strict=True))
                for key in keys
            ]
        i = 0
        while i < len(keys):
            try:
                shard, taken = self._take(keys[i:], each if isinstance(each, int) else each[i:])
            except OSError as exc:
                self._fail_tickets([job.ticket], keys[i:], exc)
                return
            run = slice(i, i + taken)
            i += taken
            shard.pieces[job.ticket] = shard.pieces.get(job.ticket, 0) + taken
            shard.keys.update(keys[run])
            try:
                shard.drain()
                shard.size, shard.crc, text = self._tar_pack(
                    shard.fd, shard.size, shard.crc, self._mtime, keys[run], rows[run], packed
                )
            except Exception as exc:  # the shard may hold part of the run: it is not committed
                self._abandon(shard, exc)
                continue
            shard.lines.append(text.decode())
            shard.count += taken

    def _take(self, keys: list[str], each: int | list[int]) -> tuple[_Shard, int]:
        """The shard the next of `keys` go into, opened if need be, and how many of them it takes (at
        least one; `each`: the bytes each takes in a shard, or all alike): up to shard_samples, up to
        shard_bytes (a sample larger than that alone), and not a key it holds already."""
        o = self.options
        shard = self._shard
        while True:
            if shard is None:
                shard = self._open_shard()
            room = len(keys)
            if o.shard_samples is not None:
                room = min(room, o.shard_samples - shard.count)
            if shard.keys and not shard.keys.isdisjoint(keys[:room]):
                room = next(i for i, key in enumerate(keys[:room]) if key in shard.keys)
            space = o.shard_bytes - len(END) - shard.size
            if isinstance(each, int):
                taken = min(room, max(space, 0) // each)
            else:
                taken = 0
                while taken < room and each[taken] <= space:
                    space -= each[taken]
                    taken += 1
            if taken == 0 and shard.count == 0 and room:  # larger than a shard: alone in one
                taken = 1
            if taken:
                return shard, taken
            self._end_shard()
            shard = None

    def _open_shard(self) -> _Shard:
        final = f"{self._name}-{self._numbers:06d}.tar"
        self._numbers += 1
        fd, temporary = self._committer.create(final)
        self._shard = _Shard(final, fd, temporary)
        return self._shard

    def _append(
        self, shard: _Shard, key: str, members: list[tuple[str, list[Buffer]]], sizes: list[int]
    ) -> None:
        records = []
        for (name, buffers), size in zip(members, sizes, strict=True):
            header = member_header(name, size, self._mtime)
            member_crc = 0
            for buffer in buffers:
                member_crc = crc32(buffer, member_crc)
            offset = shard.size + len(header)
            padding = bytes(-size % BLOCK)
            crc = (
                crc32_combine(crc32(header, shard.crc), member_crc, size)
                if size
                else crc32(header, shard.crc)
            )
            shard.crc = crc32(padding, crc)
            shard.add([header, *buffers, padding], len(header) + size + len(padding))
            records.append((name[len(key) + 1 :], offset, size, member_crc))
        shard.lines.append(sample_line(key, records))
        shard.count += 1
        shard.keys.add(key)
        if shard.pending_bytes >= _WRITE_AHEAD:
            shard.drain()

    def _end_shard(self) -> None:
        """Commit the open shard, if any; a failure fails its writes and is the writer's failure."""
        shard, self._shard = self._shard, None
        if shard is None:
            return
        try:
            shard.add([END], len(END))
            shard.crc = crc32(END, shard.crc)
            shard.drain()
        except Exception as exc:
            self._abandon(shard, exc)
            return
        try:  # finish() closes the shard's descriptor, and removes its temporary on failure
            journal = self._journal
            journaled = None
            if journal is not None:
                relative = os.path.relpath(shard.final, self._root)
                head = (
                    journal.prefix(relative, shard.final, SHARD_FORMAT, []) + b',"nsamples":%d' % shard.count
                )
                full = head + f',"samples":[{",".join(shard.lines)}]'.encode()

                def journaled(renaming: bool, when: float) -> None:
                    line = full if renaming else head
                    journal.write_line(line, shard.size, shard.crc, when, renaming=renaming)

            number = self._committer.order.reserve(shard.final)
            self._committer.finish(shard.final, number, shard.temporary, shard.fd, None, journaled)
        except Exception as exc:
            self._abandon(shard, exc, closed=True)
            return
        path = Path(shard.final)
        self._committed.update(shard.keys)
        self._shards.append((path, shard.count))
        self._stats.add(shards=1, samples=shard.count, bytes=shard.size)
        for ticket, count in shard.pieces.items():
            ticket.paths.append(path)
            ticket.remaining -= count
            if ticket.remaining == 0 and not ticket.failed:
                ticket.handle.set_result(ticket.paths)
        if self.options.upload_queue is not None:
            self.options.upload_queue.put(path)

    def _abandon(self, shard: _Shard, exc: BaseException, *, closed: bool = False) -> None:
        """A shard that failed: its temporary removed, each write with a sample in it failed."""
        if self._shard is shard:
            self._shard = None
        if not closed:
            with contextlib.suppress(OSError):
                os.close(shard.fd)
        with contextlib.suppress(OSError):
            os.unlink(shard.temporary)
        self._fail_tickets(list(shard.pieces), sorted(shard.keys), exc, shard.final)

    def _fail_tickets(
        self, tickets: list[_Ticket], keys: list[str], exc: BaseException, where: str = ""
    ) -> None:
        shown = ", ".join(map(repr, keys[:_KEYS_NAMED])) + (
            f" and {len(keys) - _KEYS_NAMED} more" if len(keys) > _KEYS_NAMED else ""
        )
        if hasattr(exc, "add_note"):
            exc.add_note(f"tensorsink: while writing the shard {where or 'of'} with keys {shown}")
        for ticket in tickets:
            if not ticket.failed:
                ticket.failed = True
                ticket.handle.set_exception(exc)
        self._stats.add(errors=1)
        if self._error is None:
            self._error = exc


def _native_packer() -> Callable[..., tuple[int, int, bytes]]:
    from ..engine._native import tar_pack

    return tar_pack


def _sample_buffers(
    group: Group, plain: tuple[bytes, list[tuple[memoryview, int]]] | None, fmt: BufferFormat, row: int
) -> list[Buffer]:
    if plain is None:
        return [memoryview(b).cast("B") if not isinstance(b, bytes) else b for b in group.encoded(fmt, row)]
    header, parts = plain
    return [header, *(view[row * stride : (row + 1) * stride] for view, stride in parts)]


def _all_of(handles: list[WriteHandle]) -> WriteHandle:
    """One handle for several: done with every path once all are, failed with the first failure."""
    joined = WriteFuture(staged_apart=True)
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
