"""AsyncWriter: the public face. It checks each write on the caller's thread, then hands it to the stages."""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from .arrays import nbytes
from .backends import Route
from .batches import split_batch, tensors_of
from .commit import Committer, find_symlink
from .errors import InvalidKeyError, SymlinkError, WriterClosedError
from .formats import Container, FileEntry, Format, format_for
from .future import WriteFuture
from .manifest import ChecksummedWrite, Journal, Manifest, arrays_of
from .options import Backend, DictMode, Durability, SaveFormat, WriterOptions
from .plan import file_path, plan_files, validate_key, validate_suffix
from .scheduling import Gate, Job, Pipeline
from .staging import Staged, Stager, default_pool_bytes
from .stats import StatsRecorder, WriterStats

__all__ = ["AsyncWriter"]


class AsyncWriter:
    """Asynchronous, crash-safe writer of tensors, mappings and sequences of tensors under `out_root`.

    `write(key, value)` checks the key and the value, waits while the budget (`max_inflight` writes,
    `max_inflight_bytes` bytes) is full, and returns a WriteFuture; a worker writes the file into a
    temporary sibling and renames it into place. With durability NONE, payloads under `small_sync_bytes`
    are written on the caller's thread instead, where a queue hop would cost more than the write. A
    failed write, wherever it ran, is raised by the next write(), by flush() and by close(): a writer
    that failed stays failed. Keys are checked at write() (see plan.validate_key); by default no key
    may lead through a symlinked folder (`follow_symlinks`).

    CPU tensors and numpy arrays are not copied: do not modify them in place until the write's future
    is done (or flush() has returned). CUDA tensors (and CuPy or other DLPack arrays) go through a pool
    of `pinned_pool_bytes` page-locked memory on a copy stream, ordered after the caller's stream by
    events: the caller never synchronizes the device, and may reuse them once the future is staged.
    """

    def __init__(
        self,
        out_root: str | os.PathLike[str],
        save_format: SaveFormat | str = SaveFormat.PYTORCH_PT,
        dict_mode: DictMode | str = DictMode.SINGLE,
        workers: int = 4,
        max_inflight: int = 256,
        small_sync_bytes: int = 64_000,
        upload_queue: queue.Queue[Path] | None = None,
        *,
        max_inflight_bytes: int = 1 << 30,
        durability: Durability | str = Durability.FILE,
        align: int | None = None,
        pinned_pool_bytes: int | None = None,
        backend: Backend | str = Backend.AUTO,
        kvikio_threads: int = 4,
        kvikio_task_size: int = 4 << 20,
        kvikio_direct_io: bool = True,
        manifest: bool = False,
        skip_existing: bool = False,
        follow_symlinks: bool = False,
    ) -> None:
        self.options = WriterOptions(
            out_root=Path(out_root),
            save_format=save_format,  # type: ignore[arg-type]  # coerced and checked there
            dict_mode=dict_mode,  # type: ignore[arg-type]
            workers=workers,
            max_inflight=max_inflight,
            small_sync_bytes=small_sync_bytes,
            upload_queue=upload_queue,
            max_inflight_bytes=max_inflight_bytes,
            durability=durability,  # type: ignore[arg-type]
            align=align,
            pinned_pool_bytes=pinned_pool_bytes,
            backend=backend,  # type: ignore[arg-type]
            kvikio_threads=kvikio_threads,
            kvikio_task_size=kvikio_task_size,
            kvikio_direct_io=kvikio_direct_io,
            manifest=manifest,
            skip_existing=skip_existing,
            follow_symlinks=follow_symlinks,
        )
        self._root = os.path.abspath(self.options.out_root)
        self._format: Format = format_for(self.options.save_format, self.options.align)
        self._route = Route(self.options, self._root, self._format)
        self._committer = Committer(
            self.options.durability, self._root, follow_symlinks=self.options.follow_symlinks
        )
        self._checked_folders: set[str] = {self._root}  # folders found free of symlinks
        self._stats = StatsRecorder()
        o = self.options
        self._stager = Stager(o.pinned_pool_bytes or default_pool_bytes())
        self._pipeline = Pipeline(o.workers, o.max_inflight, o.max_inflight_bytes)
        self._gate = Gate()
        # A small write is cheaper on the caller than a queue hop, unless it waits for an fsync (~1 ms):
        # then the caller would stall on the disk, and workers can fsync several files at once.
        self._inline_ok = o.durability is Durability.NONE
        self._journal = Journal(self._root) if o.manifest else None
        self._done = Manifest.load(self._root) if o.skip_existing else None

    # The original AsyncWriter's attributes.
    @property
    def root(self) -> Path:
        return self.options.out_root

    @property
    def save_format(self) -> SaveFormat:
        return self.options.save_format

    @property
    def dict_mode(self) -> DictMode:
        return self.options.dict_mode

    @property
    def max_inflight(self) -> int:
        return self.options.max_inflight

    @property
    def small_sync_bytes(self) -> int:
        return self.options.small_sync_bytes

    @property
    def upload_queue(self) -> queue.Queue[Path] | None:
        return self.options.upload_queue

    @property
    def pool(self) -> ThreadPoolExecutor:
        return self._pipeline.executor

    def write(
        self, relative_path_no_ext: str | os.PathLike[str], to_save: object, *, copy: bool = False
    ) -> WriteFuture:
        """Write `to_save` to `<out_root>/<relative_path_no_ext><suffix>` (several files with SPLIT).

        Returns at once unless the budget is full. Device tensors are copied to pinned host memory on
        a copy stream ordered after the caller's current stream. With copy=True every array is first
        snapshotted (on the device, in stream order; host arrays by a copy), so the caller may
        overwrite it (static CUDA-graph outputs) as soon as this returns. Raises InvalidKeyError or
        InvalidLayoutError (ValueError), UnsupportedValueError (TypeError), WriterClosedError
        (RuntimeError), or the first background failure, before anything is queued.
        """
        self._enter(relative_path_no_ext)
        try:
            return self._write(relative_path_no_ext, to_save, copy)
        finally:
            self._gate.leave()

    def _write(self, key: str | os.PathLike[str], to_save: object, copy: bool) -> WriteFuture:
        name = validate_key(key)
        entries = plan_files(self._root, name, to_save, self._format, self.options.dict_mode)
        self._check_folders(entries)
        if self._already_written(entries):
            return self._skipped([Path(entry.path) for entry in entries])
        keys = [name] * len(entries)
        entries, staged = self._stager.stage(entries, copy=copy, direct=self._route.device_direct)
        order = self._committer.order
        numbers = [order.reserve(entry.path) for entry in entries]
        nbytes = sum(entry.nbytes for entry in entries)
        self._stats.write_started()

        if staged is None:

            def job(future: WriteFuture) -> list[Path]:
                return self._write_entries(entries, numbers, keys)

            if nbytes < self.options.small_sync_bytes and self._inline_ok:
                return self._pipeline.run_inline(job, WriteFuture())
        else:
            self._stats.blocked(staged.blocked_seconds)
            nbytes -= staged.pooled_bytes  # the pool is their budget

            def job(future: WriteFuture) -> list[Path]:
                try:
                    ready_entries = staged.wait()
                    if not staged.on_device:
                        future.set_staged()
                    return self._write_entries(ready_entries, numbers, keys)
                finally:
                    staged.release()

        future = WriteFuture(staged_apart=staged is not None or copy)
        if copy:
            future.set_staged()
        return self._submit(job, nbytes, future, entries, staged)

    def write_batch(
        self,
        keys: Sequence[str | os.PathLike[str]],
        batch: object,
        *,
        save: Callable[[Path, Any], None] | None = None,
        suffix: str = "",
    ) -> WriteFuture:
        """Write sample i of `batch` under keys[i]: one staging copy for the batch, one file per sample.

        `batch` is a tensor or a mapping of tensors whose first dimension indexes the samples (device
        tensors are copied to host memory whole, once, and each file gets only its sample's rows), or
        a list or tuple with one value per key. With `save`, each sample is written by
        `save(temporary_path, sample)` to `<key><suffix>` instead of in the writer's format, with the
        same atomic commit: the temporary's name does not end in `suffix`, so name the format
        explicitly inside `save`. One future for the whole batch; its result lists every file.
        """
        self._enter(keys)
        try:
            return self._write_batch(keys, batch, save, suffix)
        finally:
            self._gate.leave()

    def _write_batch(
        self,
        keys: Sequence[str | os.PathLike[str]],
        batch: object,
        save: Callable[[Path, Any], None] | None,
        suffix: str,
    ) -> WriteFuture:
        names = [validate_key(key) for key in keys]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise InvalidKeyError(
                f"keys {twice} appear more than once in one batch; each sample needs its own"
            )
        if save is not None:
            validate_suffix(suffix)
        layout = split_batch(batch, len(names))
        samples = layout.samples()
        planned = [
            self._plan_sample(name, sample, save, suffix) for name, sample in zip(names, samples, strict=True)
        ]
        self._check_folders([entry for entries in planned for entry in entries])
        kept = [i for i, entries in enumerate(planned) if not self._already_written(entries)]
        if not kept:
            return self._skipped([Path(entry.path) for entries in planned for entry in entries], len(planned))
        self._stats.skipped(len(planned) - len(kept))
        planned, samples = [planned[i] for i in kept], [samples[i] for i in kept]
        if layout.container is Container.SEQUENCE:
            to_stage = [entry for entries in planned for entry in entries]
        else:
            to_stage = [FileEntry("", layout.container, layout.names, layout.arrays, layout.nbytes)]
        _, staged = self._stager.stage(to_stage)
        order = self._committer.order
        flat = [entry for entries in planned for entry in entries]
        entry_keys = [names[i] for i, entries in zip(kept, planned, strict=True) for _ in entries]
        numbers = [order.reserve(entry.path) for entry in flat]
        nbytes = sum(entry.nbytes for entry in flat) - (staged.pooled_bytes if staged is not None else 0)
        self._stats.write_started()
        if staged is not None:
            self._stats.blocked(staged.blocked_seconds)

        def job(future: WriteFuture) -> list[Path]:
            try:
                host = planned
                if staged is not None:
                    ready = staged.wait()
                    future.set_staged()
                    if layout.container is Container.SEQUENCE:
                        host = _regroup(ready, planned)
                    else:
                        host_samples = layout.samples(ready[0].arrays)
                        host = [self._plan_sample(names[i], host_samples[i], save, suffix) for i in kept]
                entries = [entry for group in host for entry in group]
                writers = None
                if save is not None:
                    writers = [_saving(save, value) for value in _sample_values(host, samples)]
                return self._write_entries(entries, numbers, entry_keys, writers)
            finally:
                if staged is not None:
                    staged.release()

        return self._submit(job, max(nbytes, 0), WriteFuture(staged_apart=staged is not None), flat, staged)

    def _submit(
        self, job: Job, nbytes: int, future: WriteFuture, entries: list[FileEntry], staged: Staged | None
    ) -> WriteFuture:
        """Queue `job` once the budget has room; if that fails, give back its paths and pool blocks."""
        try:
            blocked = self._pipeline.submit(job, nbytes, future)
        except BaseException:
            for entry in entries:
                self._committer.order.release(entry.path)
            if staged is not None:
                staged.release()
            raise
        self._stats.blocked(blocked)
        return future

    def _plan_sample(
        self, name: str, sample: object, save: Callable[[Path, Any], None] | None, suffix: str
    ) -> list[FileEntry]:
        if save is None:
            return plan_files(self._root, name, sample, self._format, self.options.dict_mode)
        found = tensors_of(sample)
        container, names, arrays = found if found is not None else (Container.SEQUENCE, (), ())
        path = file_path(self._root, name, suffix)
        return [FileEntry(path, container, names, arrays, sum(map(nbytes, arrays)))]

    def _write_entries(
        self,
        entries: list[FileEntry],
        numbers: list[int],
        keys: list[str],
        writers: list[Callable[[int, str], None]] | None = None,
    ) -> list[Path]:
        """Commit each file of one write in turn (the worker's or the caller's thread); journal each
        after its rename, then hand it to the upload queue."""
        upload_queue = self.options.upload_queue
        journal = self._journal
        written: list[Path] = []
        try:
            for k, (entry, number) in enumerate(zip(entries, numbers, strict=True)):
                write, backend = (writers[k], "posix") if writers is not None else self._file_writer(entry)
                record = None
                if journal is not None:
                    # The format's buffers are checksummed as written; other writers' files are read back.
                    own_buffers = writers is None and backend == "posix"
                    write = checked = ChecksummedWrite(write, self._format if own_buffers else None, entry)
                    kind = (
                        Path(entry.path).suffix[1:] if writers is not None else self._format.save_format.value
                    )
                    record = _recorder(journal, keys[k], entry, checked, kind)
                replaced = self._committer.commit(entry.path, number, write, record)
                self._stats.file_committed(entry.nbytes, backend)
                path = Path(entry.path)
                if replaced and upload_queue is not None:
                    upload_queue.put(path)
                written.append(path)
        except BaseException:
            self._stats.write_failed()
            raise
        finally:
            for entry in entries:
                self._committer.order.release(entry.path)
        return written

    def _file_writer(self, entry: FileEntry) -> tuple[Callable[[int, str], None], str]:
        """How one file's bytes get written, and by which backend."""
        direct = self._route.writer_for(entry)
        if direct is not None:
            return direct, "kvikio"
        fmt = self._format
        return lambda fd, path: fmt.write(fd, entry), "posix"

    def _already_written(self, entries: list[FileEntry]) -> bool:
        """With skip_existing: whether a journal records every one of these files, still whole."""
        done = self._done
        return done is not None and done.paths_done([os.path.relpath(e.path, self._root) for e in entries])

    def _skipped(self, paths: list[Path], count: int = 1) -> WriteFuture:
        self._stats.skipped(count)
        future = WriteFuture()
        future.set_result(paths)
        return future

    def is_done(self, key: str | os.PathLike[str]) -> bool:
        """Whether an earlier run's journal (loaded at construction) records `key` as written, with
        every file still there at its recorded size. Needs skip_existing=True."""
        if self._done is None:
            raise RuntimeError(
                "is_done() needs AsyncWriter(..., skip_existing=True), which loads the manifest"
            )
        return self._done.done(validate_key(key))

    def _enter(self, key: object) -> None:
        """Admit one write() or write_batch() call: close() waits for every call admitted."""
        if not self._gate.enter():
            raise WriterClosedError(f"write({key!r}) after close(); create a new AsyncWriter")
        try:
            self._pipeline.raise_if_failed()
        except BaseException:
            self._gate.leave()
            raise

    def _check_folders(self, entries: list[FileEntry]) -> None:
        """SymlinkError, on the caller's thread, if a folder on the way to a file is a symlink (the
        committer refuses them too, for folders that become links later)."""
        if self.options.follow_symlinks:
            return
        checked = self._checked_folders
        for entry in entries:
            folder = entry.path.rpartition("/")[0]
            if folder not in checked:
                link = find_symlink(self._root, folder)
                if link is not None:
                    raise SymlinkError(link, os.path.realpath(link), self._root)
                checked.add(folder)

    def flush(self) -> None:
        """Wait for every write made so far; raise the first background failure, if any."""
        self._pipeline.drain()
        if self._journal is not None:
            self._journal.sync()
        self._pipeline.raise_if_failed()

    def close(self) -> None:
        """Flush, then stop the workers (also after a failure); raise the first background failure.

        Calling it again does nothing more than raise that failure again.
        """
        if self._gate.close():  # waits for the write() calls already admitted
            try:
                self._pipeline.drain()
            finally:
                self._pipeline.shutdown()
                if self._journal is not None:
                    self._journal.close()
        self._pipeline.raise_if_failed()

    def stats(self) -> WriterStats:
        if not self._stager.pool_started:
            return self._stats.snapshot(self._pipeline.in_flight)
        pool = self._stager.pool
        return self._stats.snapshot(self._pipeline.in_flight, pool.capacity, pool.peak)

    def __enter__(self) -> AsyncWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except BaseException as failure:
            if failure is not exc:
                raise

    def __repr__(self) -> str:
        o = self.options
        return (
            f"AsyncWriter({str(o.out_root)!r}, save_format={o.save_format}, dict_mode={o.dict_mode}, "
            f"workers={o.workers}, durability={o.durability}{', closed' if self._gate.closed else ''})"
        )


def _regroup(ready: list[FileEntry], planned: list[list[FileEntry]]) -> list[list[FileEntry]]:
    """Staged entries (flat, in order) grouped back by sample."""
    groups, start = [], 0
    for entries in planned:
        groups.append(ready[start : start + len(entries)])
        start += len(entries)
    return groups


def _sample_values(host: list[list[FileEntry]], samples: list[Any]) -> list[Any]:
    """What a custom writer receives for each entry: the sample with its arrays in host memory."""
    values: list[Any] = []
    for group, sample in zip(host, samples, strict=True):
        for entry in group:
            if entry.container is Container.TENSOR:
                values.append(entry.arrays[0])
            elif entry.container is Container.MAPPING:
                values.append(dict(zip(entry.names, entry.arrays, strict=True)))
            else:
                values.append(sample)  # not an array: text, numbers, whatever the writer takes
    return values


def _recorder(
    journal: Journal, key: str, entry: FileEntry, checked: ChecksummedWrite, kind: str
) -> Callable[[], None]:
    """A file's journal record, to be appended right after its rename, under its path's lock, so that
    the records of rewrites follow the order of the renames."""
    return lambda: journal.append(key, entry.path, checked.size, checked.crc, kind, arrays_of(entry))


def _saving(save: Callable[[Path, Any], None], value: Any) -> Callable[[int, str], None]:
    return lambda fd, temporary: save(Path(temporary), value)
