"""AsyncWriter: the public face. It checks each write on the caller's thread, then hands it to the stages."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import threading
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, SupportsIndex, cast

import torch

from .arrays import nbytes
from .backends import Route
from .batches import split_batch, tensors_of
from .commit import Committer, find_symlink, remove_private_folder, take_saved
from .engine import Engine, FileJob, FileOutcome, PlainRoute, PythonEngine, engine_class
from .errors import InvalidKeyError, SymlinkError, WriterClosedError, WriterForkedError, naming
from .formats import Buffer, BufferFormat, Container, FileEntry, Format, HeaderFormat, format_for
from .future import Callbacks, WriteFuture, WriteHandle
from .manifest import Journal, Manifest, arrays_of
from .options import Backend, DictMode, Durability, SaveFormat, WriterOptions
from .plan import check_distinct_files, file_path, plan_files, validate_key, validate_suffix
from .scheduling import Gate, Pipeline
from .staging import Staged, Stager, default_pool_bytes
from .staging.cudart import own_thread_now
from .stats import StatsRecorder, WriterStats

__all__ = ["AsyncWriter"]

log = logging.getLogger("tensorsink")

#: Writers not closed yet, in this process or (after fork()) its parent's: closed at interpreter exit.
_open_writers: set[_Writer] = set()


def _close_and_log(writer: _Writer, why: str) -> None:
    """Close `writer` where nobody can be raised to: its failure, naming the key, goes to the log. Its
    done-callbacks are not waited for (one that blocks must not hang the exit); those left are said."""
    try:
        writer.close(callbacks=False)
    except BaseException as exc:
        notes = "; ".join(getattr(exc, "__notes__", ()))
        log.error("tensorsink: a write failed in a writer %s: %r%s", why, exc, f" ({notes})" if notes else "")
    left = writer._callbacks.pending
    if left:
        log.warning(
            "tensorsink: %d writes' done-callbacks had not run when a writer %s was closed", left, why
        )


def _close_at_exit() -> None:
    """Finish the writes of every writer still open. An atexit hook: it runs once the interpreter has
    waited for its non-daemon threads, so a producer thread still writing loses nothing (the thread
    pools are stopped by then: their jobs run on the calling thread)."""
    for writer in list(_open_writers):
        if writer._pid == os.getpid():
            _close_and_log(writer, "open at exit")


atexit.register(_close_at_exit)


class _Writer:
    """What an AsyncWriter is made of: its stages, its state, its threads. The threads hold this and
    never the AsyncWriter, so that a writer its user dropped is collected (and closed, see AsyncWriter)."""

    def __init__(self, options: WriterOptions) -> None:
        self.options = options
        self._pid = os.getpid()  # a child of fork() inherits the writer, not its threads
        self._root = os.path.abspath(self.options.out_root)
        self._use_format(format_for(self.options.save_format, self.options.align))
        self._route = Route(self.options, self._root, self._format)
        self._committer = Committer(  # names and creates temporaries; the engine commits them
            self.options.durability, self._root, follow_symlinks=self.options.follow_symlinks
        )
        self._checked_folders: set[str] = {self._root}  # folders found free of symlinks
        self._stats = StatsRecorder()
        o = self.options
        self._stager = Stager(o.pinned_pool_bytes or default_pool_bytes())
        if torch.cuda.is_initialized() and o.backend is not Backend.KVIKIO:  # type: ignore[no-untyped-call]
            self._stager.prepare(torch.cuda.current_device())  # a job on a GPU: pin now, off its thread
        self._callbacks = Callbacks()  # done-callbacks run there, never where writes complete
        self._gate = Gate()
        self._closed = threading.Event()
        kind = engine_class(o.engine)  # an engine that cannot run here fails before the journal is made
        self._journal = (
            Journal(self._root, fsync=o.durability is not Durability.NONE, follow_symlinks=o.follow_symlinks)
            if o.manifest
            else None
        )
        try:
            self._done = Manifest.load(self._root) if o.skip_existing else None
            self._engine = self._make_engine(kind)
        except BaseException:
            if self._journal is not None:
                self._journal.close()
            raise
        self._pipeline = Pipeline(o.workers, self._engine.budget, self._callbacks, self._engine.plain_off)
        self._use_format(self._format)  # again, now that the engine is known
        # With skip_existing, what is_done() asks of this writer's own writes: each key's latest write
        # (its handle and files), and the key whose write each path was last given to.
        self._latest: dict[str, tuple[WriteHandle, list[str]]] = {}
        self._owner: dict[str, str] = {}
        self._said_no_suffix = False
        self._progress_at = time.monotonic()
        inline = self._engine.name == "python" and o.durability is Durability.NONE
        self._inline_below = o.small_sync_bytes if inline else 0
        log.info(
            "tensorsink: %s engine, %d threads, writing into %s", self._engine.name, o.workers, self._root
        )
        _open_writers.add(self)

    def _use_format(self, fmt: Format) -> None:
        self._format = fmt
        self._header_format = isinstance(fmt, HeaderFormat)  # once, not per write: ABCs' isinstance is slow
        self._buffer_format = isinstance(fmt, BufferFormat)
        engine = getattr(self, "_engine", None)
        # The ready route: a header and views of host memory, committed and completed by the engine
        # alone. An upload queue needs Python per file, so its writes are completed in Python.
        self._ready_route = (
            engine is not None
            and engine.ready_route
            and self._header_format
            and not self.options.upload_queue
        )
        # write() and write_batch() of host arrays in one call into the engine, where nothing asks
        # Python per write (skip_existing's bookkeeping, progress lines); None where it has no such route.
        plain = (
            engine is not None
            and engine.ready_route
            and not self.options.upload_queue
            and self._done is None
            and self.options.progress_seconds is None
        )
        self.plain: PlainRoute | None = None
        if engine is not None and plain:
            self.plain = engine.open_plain(fmt)
        elif engine is not None:
            engine.plain_off()

    def _make_engine(self, kind: type[Engine]) -> Engine:
        o = self.options
        common: dict[str, Any] = {
            "follow_symlinks": o.follow_symlinks,
            "journal": self._journal,
            "max_count": o.max_inflight,
            "max_bytes": o.max_inflight_bytes,
            "on_due": self._callbacks.run,
        }
        if kind is not PythonEngine:
            return kind(o.workers, o.durability, self._root, self._completed, **common)
        # A small write is cheaper on the caller than a queue hop in Python, unless it waits for an fsync
        # (~1 ms): then the caller would stall on the disk, and workers can fsync several at once.
        return PythonEngine(
            o.workers, o.durability, self._root, self._completed, inline_below=o.small_sync_bytes, **common
        )

    def write(
        self, relative_path_no_ext: str | os.PathLike[str], to_save: object, *, copy: bool = False
    ) -> WriteHandle:
        began = self._enter(relative_path_no_ext)
        try:
            name = validate_key(relative_path_no_ext)
            entries = plan_files(self._root, name, to_save, self._format, self.options.dict_mode)
            self._check_folders(entries)
            if self._already_written(entries):
                return self._skipped([Path(entry.path) for entry in entries])
            entries, staged = self._stager.stage(entries, copy=copy, direct=self._route.device_direct)
            if staged is None and self._ready_route:
                handle = self._write_ready([name] * len(entries), entries)
                if handle is not None:
                    return handle
            future = WriteFuture(staged_apart=staged is not None or copy, callbacks=self._callbacks)
            if copy:
                future.set_staged()
            pending = _Write(future, entries, [name] * len(entries), staged)
            if staged is None:
                return self._start(pending, None)

            def ready() -> tuple[list[FileEntry], None]:
                host = staged.wait()
                if not staged.on_device:
                    future.set_staged()
                return host, None

            return self._start(pending, ready)
        finally:
            self._leave(began)

    def write_batch(
        self,
        keys: Sequence[str | os.PathLike[str]],
        batch: object,
        *,
        save: Callable[[Path, Any], None] | None = None,
        suffix: str = "",
        allow_empty: bool = False,
    ) -> WriteHandle:
        began = self._enter(keys)
        try:
            return self._write_batch(keys, batch, save, suffix, allow_empty)
        finally:
            self._leave(began)

    def _write_batch(
        self,
        keys: Sequence[str | os.PathLike[str]],
        batch: object,
        save: Callable[[Path, Any], None] | None,
        suffix: str,
        allow_empty: bool,
    ) -> WriteHandle:
        if isinstance(keys, (str, bytes, bytearray)):
            raise InvalidKeyError(
                f"keys {keys!r} is one {type(keys).__name__}, not a sequence of keys; pass a list, "
                "e.g. write_batch([key], ...) for one sample"
            )
        names = [validate_key(key) for key in keys]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise InvalidKeyError(
                f"keys {twice} appear more than once in one batch; each sample needs its own"
            )
        if save is not None:
            validate_suffix(suffix)
            if not suffix and not self._said_no_suffix:
                self._said_no_suffix = True
                log.warning(
                    "tensorsink: write_batch(save=...) without suffix= writes files with no extension "
                    "(%s/<key>); pass suffix='.png' or the like to name their format",
                    self._root,
                )
        layout = split_batch(batch, len(names))
        samples = layout.samples()
        planned = [
            self._plan_sample(name, sample, save, suffix) for name, sample in zip(names, samples, strict=True)
        ]
        check_distinct_files(names, planned)
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
        flat = [entry for entries in planned for entry in entries]
        entry_keys = [names[i] for i, entries in zip(kept, planned, strict=True) for _ in entries]
        if staged is None and save is None and self._ready_route:
            handle = self._write_ready(entry_keys, flat)
            if handle is not None:
                return handle
        future = WriteFuture(staged_apart=staged is not None, callbacks=self._callbacks)
        pending = _Write(future, flat, entry_keys, staged)
        if staged is None and save is None:
            return self._start(pending, None)

        def ready() -> tuple[list[FileEntry], list[_FileWriter] | None]:
            host = planned
            if staged is not None:
                arrived = staged.wait()
                future.set_staged()
                if layout.container is Container.SEQUENCE:
                    host = _regroup(arrived, planned)
                else:
                    host_samples = layout.samples(arrived[0].arrays)
                    host = [self._plan_sample(names[i], host_samples[i], save, suffix) for i in kept]
            savers = None
            if save is not None:
                savers = [_saving(save, value, allow_empty) for value in _sample_values(host, samples)]
            return [entry for group in host for entry in group], savers

        return self._start(pending, ready)

    def _start(self, pending: _Write, ready: _Ready | None) -> WriteFuture:
        """Number the files, wait for room, then hand them to the engine: from here if their bytes are
        in host memory already (`ready` None), else from a worker once `ready()` has them."""
        paths = [entry.path for entry in pending.entries]
        pending.numbers = self._engine.reserve(paths)
        if self._done is not None:
            self._remember(pending.keys, paths, pending.future)
        self._stats.write_started()
        try:
            blocked = self._pipeline.admit(pending.nbytes, pending.future)
        except BaseException:
            self._engine.release(paths)
            if pending.staged is not None:
                pending.staged.release()
            raise
        self._stats.blocked(blocked + (pending.staged.blocked_seconds if pending.staged is not None else 0.0))
        # Where the ready route was open, it tried the headers already: an array needs a copy.
        encoded = self._encoded_here(pending.entries) if ready is None and not self._ready_route else None
        if ready is None and (encoded is not None or pending.nbytes < self._inline_below):
            self._submit(pending, pending.entries, None, encoded)  # a header and views; or small, inline
        else:  # a serializer to run (.pt, .npz, a copy, a staging wait): the pool's threads, in parallel
            entries = pending.entries
            self._pipeline.prepare(lambda: self._prepare(pending, ready or (lambda: (entries, None))))
        return pending.future

    def _write_ready(self, keys: list[str], entries: list[FileEntry]) -> WriteHandle | None:
        """The ready route: the files' headers and views of host memory go to the engine in one call,
        which numbers them, waits for room and queues them; its threads complete the write. None where
        an array needs a copy first (then the write goes the other way)."""
        encoded = self._encoded_here(entries)
        if encoded is None:
            return None
        files: list[tuple[object, ...]] = []
        nbytes = 0
        for entry, buffers, record in zip(entries, encoded, self._records(keys, entries), strict=True):
            directory, _, name = entry.path.rpartition("/")
            temporary = self._committer.temporary_for(directory, name)
            files.append((entry.path, temporary, buffers, record is not None, record, None, entry.nbytes))
            nbytes += entry.nbytes
        handle, blocked = self._engine.write_ready(keys, files, nbytes)  # type: ignore[arg-type]  # tuples
        self._stats.write_started()
        if blocked:
            self._stats.blocked(blocked)
        if self._done is not None:
            self._remember(keys, [entry.path for entry in entries], handle)
        return cast(WriteHandle, handle)

    def _prepare(self, pending: _Write, ready: _Ready) -> None:
        """In a worker: wait for the staged bytes (or run custom writers), then submit."""
        try:
            entries, savers = ready()
        except BaseException as exc:
            self._engine.release([entry.path for entry in pending.entries])
            self._finish([(pending, None, naming(exc, pending.keys[0], pending.entries[0].path))])
            return
        self._submit(pending, entries, savers)

    def _submit(
        self,
        pending: _Write,
        entries: list[FileEntry],
        savers: list[_FileWriter] | None,
        encoded: list[list[Buffer]] | None = None,
    ) -> None:
        """The files as the engine takes them: the format's buffers, or a temporary that a custom writer
        (or kvikio) has written already. A failure before the engine has them fails the write."""
        files: list[FileJob] = []
        backends: list[str] = []
        k = 0
        records = self._records(pending.keys, entries, custom=savers is not None)
        try:
            for k, (entry, number, record) in enumerate(zip(entries, pending.numbers, records, strict=True)):
                checksum = record is not None
                # Encoded: a header and views of host memory, which only the engine can write.
                writer = (
                    None
                    if encoded is not None
                    else savers[k]
                    if savers is not None
                    else self._file_writer(entry)
                )
                if writer is None:
                    directory, _, name = entry.path.rpartition("/")
                    temporary = self._committer.temporary_for(directory, name)
                    crc = None
                    encoder = cast(BufferFormat, self._format)
                    if encoded is not None:
                        buffers = encoded[k]
                    elif checksum:  # the file's CRC, where the format has it already
                        buffers, crc = encoder.encode_with_crc(entry)
                    else:
                        buffers = encoder.encode(entry)
                    files.append(FileJob(entry.path, temporary, buffers, -1, checksum, number, record, crc))
                    backends.append("posix")
                    continue
                fd, temporary = self._committer.create(entry.path, private=savers is not None)
                files.append(FileJob(entry.path, temporary, None, fd, checksum, number, record))
                written = writer(fd, temporary)
                if written is not None:  # a save function's file, moved out of its private folder
                    files[-1] = files[-1]._replace(fd=written[0], temporary=written[1])
                backends.append("posix" if savers is not None else self._route.kvikio_label)
            pending.entries, pending.backends = entries, backends
            self._engine.submit(pending, files)
        except BaseException as exc:
            for job in files:
                if job.buffers is None:
                    _discard(job)
            self._engine.release([entry.path for entry in pending.entries])
            self._finish([(pending, None, naming(exc, pending.keys[k], entries[k].path))])

    def _file_writer(self, entry: FileEntry) -> _FileWriter | None:
        """None where the engine writes the format's buffers itself; else what writes the file
        (kvikio from device memory, or a format that is not a list of buffers)."""
        direct = self._route.writer_for(entry)
        if direct is not None or self._buffer_format:
            return direct
        fmt = self._format
        return lambda fd, temporary: fmt.write(fd, entry)

    def _encoded_here(self, entries: list[FileEntry]) -> list[list[Buffer]] | None:
        """The files' buffers, where the caller's thread may hand them to the engine itself: a header
        and views of host memory as it is (no copy, no serializer: microseconds). None otherwise."""
        if not self._header_format:
            return None
        fmt = cast(HeaderFormat, self._format)
        encoded = []
        for entry in entries:
            buffers = fmt.encode_plain(entry)
            if buffers is None:
                return None
            encoded.append(buffers)
        return encoded

    def _records(
        self, keys: list[str], entries: list[FileEntry], *, custom: bool = False
    ) -> list[bytes | None]:
        """Each file's journal record start (None without a journal): its key, path, format (a custom
        writer's by its suffix), arrays, and for a key of several files their count and the write's id,
        so that resume knows a write of them whole from a part of one."""
        journal = self._journal
        if journal is None:
            return [None] * len(entries)
        kind = self._format.save_format.value
        files_of = Counter(keys) if len(keys) > 1 else None
        ids = {key: journal.write_id() for key, n in files_of.items() if n > 1} if files_of else {}
        return [
            journal.prefix(
                key,
                entry.path,
                Path(entry.path).suffix[1:] if custom else kind,
                arrays_of(entry),
                files_of[key] if files_of is not None else 1,
                ids.get(key),
            )
            for key, entry in zip(keys, entries, strict=True)
        ]

    def _completed(self, batches: list[tuple[object, list[FileOutcome]]]) -> None:
        """Finished batches from the engine (several at once where it can): the upload queue, then the
        statistics, the budget and the futures for all of them at once. (The engine journals each file
        itself, around its rename.)"""
        uploads = self.options.upload_queue
        done: list[tuple[_Write, list[Path] | None, BaseException | None]] = []
        files, by_backend = 0, dict[str, int]()
        for token, outcomes in batches:
            pending = cast(_Write, token)
            paths: list[Path] = []
            error: BaseException | None = None
            try:
                for k, (entry, backend, outcome) in enumerate(
                    zip(pending.entries, pending.backends, outcomes, strict=True)
                ):
                    if outcome.error is not None:
                        error = error or naming(outcome.error, pending.keys[k], entry.path)
                        continue
                    files += 1
                    by_backend[backend] = by_backend.get(backend, 0) + entry.nbytes
                    path = Path(entry.path)
                    paths.append(path)
                    if outcome.replaced and uploads is not None:
                        uploads.put(path)
            except Exception as exc:  # an upload queue that refuses, say: the write fails, nothing hangs
                error = error or naming(exc, pending.keys[0], pending.entries[0].path)
            done.append((pending, paths, error))
        self._stats.files_committed(files, by_backend)
        self._finish(done)
        self._progress()

    def _progress(self) -> None:
        """A progress line every progress_seconds, from whichever thread gets there: the caller's (the
        ready route completes without Python) or a completion's."""
        every = self.options.progress_seconds
        if every is not None and time.monotonic() - self._progress_at >= every:
            self._progress_at = time.monotonic()
            log.info("tensorsink: %s", self.stats())

    def _finish(self, done: list[tuple[_Write, list[Path] | None, BaseException | None]]) -> None:
        finished = []
        for pending, paths, error in done:
            if pending.staged is not None:
                pending.staged.release()
            finished.append((pending.nbytes, pending.future, paths, error))
        self._stats.write_failed(sum(error is not None for _, _, error in done))
        self._pipeline.finish(finished)

    def _plan_sample(
        self, name: str, sample: object, save: Callable[[Path, Any], None] | None, suffix: str
    ) -> list[FileEntry]:
        if save is None:
            return plan_files(self._root, name, sample, self._format, self.options.dict_mode)
        found = tensors_of(sample)
        container, names, arrays = found if found is not None else (Container.SEQUENCE, (), ())
        path = file_path(self._root, name, suffix)
        return [FileEntry(path, container, names, arrays, sum(map(nbytes, arrays)))]

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
        if self._done is None:
            raise RuntimeError(
                "is_done() needs AsyncWriter(..., skip_existing=True), which loads the manifest"
            )
        name = validate_key(key)
        owner = self._owner
        latest = self._latest.get(name)
        if latest is not None:  # written here: its latest write done whole, and every file still its own
            handle, paths = latest
            return handle.done() and handle.exception() is None and all(owner[p] == name for p in paths)
        recorded = self._done.files_of(name)
        return self._done.done(name) and all(owner.get(p, name) == name for p in recorded)

    def _remember(self, keys: list[str], paths: list[str], handle: WriteHandle) -> None:
        """With skip_existing: the write's files are given to its keys (a later write of a path, under
        any key, takes it), and it is each key's latest write."""
        files: dict[str, list[str]] = {}
        for key, path in zip(keys, paths, strict=True):
            self._owner[path] = key
            files.setdefault(key, []).append(path)
        for key, own in files.items():
            self._latest[key] = (handle, own)

    def _enter(self, key: object) -> float:
        """Admit one write() or write_batch() call (close() waits for every call admitted); returns
        when it began, for stats().write_seconds."""
        began = time.perf_counter()
        self._refuse_if_forked()
        if not self._gate.enter():
            raise WriterClosedError(f"write({key!r}) after close(); create a new AsyncWriter")
        try:
            self._raise_if_failed()
        except BaseException:
            self._gate.leave()
            raise
        return began

    def _leave(self, began: float) -> None:
        self._stats.called(time.perf_counter() - began)
        self._gate.leave()
        if self.options.progress_seconds is not None:
            self._progress()

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
                self._engine.folder_checked(folder)

    def wait_backend(self, timeout: float | None = None) -> str:
        self._route.wait(timeout)
        return self._route.name

    def flush(self) -> None:
        self._refuse_if_forked()
        self._drain()
        if self._journal is not None:
            self._journal.sync()
        self._raise_if_failed()

    def _drain(self, *, callbacks: bool = True) -> None:
        """Wait for every write so far, on either route, and (unless told not to) their done-callbacks."""
        self._pipeline.drain()
        self._engine.drain()
        if callbacks:
            self._callbacks.wait()

    def _raise_if_failed(self) -> None:
        """Raise the first failure of either route (every time: a failed writer stays failed)."""
        error, failure = self._pipeline.error, self._engine.failure()
        if failure is not None and (error is None or self._engine.counters()[5] < self._pipeline.failed_at):
            raise failure
        if error is not None:
            raise error

    def close(self, *, callbacks: bool = True) -> None:
        """See AsyncWriter.close. With callbacks=False (at exit, or for a writer nobody holds) done-
        callbacks are not waited for: one that blocks for ever must not hang the process."""
        self._refuse_if_forked()
        _open_writers.discard(self)
        self._engine.plain_off(True)  # and wait for the plain writes inside the engine
        if self._gate.close():  # waits for the write() calls already admitted
            try:
                self._drain(callbacks=callbacks)
            finally:
                try:
                    self._pipeline.shutdown(wait_callbacks=callbacks)
                    self._engine.close()
                    self._stager.close()
                    if self._journal is not None:
                        self._journal.close()  # its fsync may fail: a failure like any other, below
                except Exception as exc:
                    self._pipeline.record(exc)
                finally:
                    if self.options.progress_seconds is not None:
                        log.info("tensorsink: closed after %s", self.stats())
                    self._closed.set()
        elif not self._callbacks.here:  # a callback's close() must not wait for the close waiting for it
            self._closed.wait()  # a close() racing the first one returns only once that one is done
        self._raise_if_failed()

    def _refuse_if_forked(self) -> None:
        if self._pid != os.getpid():
            raise WriterForkedError(
                f"this writer was made in process {self._pid}, and a child of fork() (process "
                f"{os.getpid()}) has none of its threads; make a new AsyncWriter in the child"
            )

    def dropped(self) -> None:
        """The AsyncWriter was collected: close, and warn if it was still open (as files do). On one of
        the writer's own threads (a save function held the last reference, or a collection ran
        there) the close runs on a new thread: here it would wait for itself."""
        if self._pid != os.getpid() or self._gate.closed:
            return
        try:
            warnings.warn(f"unclosed {self!r}: call close(), or use it in a `with` block", ResourceWarning, 2)
        finally:
            if own_thread_now():
                threading.Thread(
                    target=_close_and_log, args=(self, "dropped without close()"), name="tensorsink-close"
                ).start()
            else:
                _close_and_log(self, "dropped without close()")

    def stats(self) -> WriterStats:
        files, nbytes, failed, last, pending, _, plain = self._engine.counters()  # the engine's own
        ready, engine = (files, nbytes, failed, last), self._engine.name
        in_flight = self._pipeline.in_flight + pending
        if not self._stager.pool_started:
            return self._stats.snapshot(in_flight, engine=engine, ready=ready, plain=plain)
        pool = self._stager.pool
        return self._stats.snapshot(
            in_flight, pool.capacity, pool.peak, engine=engine, ready=ready, plain=plain
        )

    def __repr__(self) -> str:
        o = self.options
        return (
            f"AsyncWriter({str(o.out_root)!r}, save_format={o.save_format}, dict_mode={o.dict_mode}, "
            f"workers={o.workers}, durability={o.durability}{', closed' if self._gate.closed else ''})"
        )


class AsyncWriter:
    """Asynchronous, crash-safe writer of tensors, mappings and sequences of tensors under `out_root`.

    `write(key, value)` checks the key and the value, waits while the budget (`max_inflight` writes,
    `max_inflight_bytes` bytes) is full, and returns a WriteHandle; the write engine (`engine`: native
    C threads, or their pure-Python twin) writes the file into a temporary sibling and renames it into
    place. With the Python engine and durability NONE, payloads under `small_sync_bytes` are written on
    the caller's thread instead, where a queue hop would cost more than the write. A failed write,
    wherever it ran, is raised by the next write(), by flush() and by close(): a writer that failed
    stays failed. Keys are checked at write() (see plan.validate_key); by default no key
    may lead through a symlinked folder (`follow_symlinks`).

    CPU tensors and numpy arrays are not copied: do not modify them in place until the write's future
    is done (or flush() has returned). CUDA tensors (and CuPy or other DLPack arrays) go through a pool
    of `pinned_pool_bytes` page-locked memory on a copy stream, ordered after the caller's stream by
    events: the caller never synchronizes the device, and may reuse them once the future is staged.

    A writer dropped without close() is closed when it is collected, with a ResourceWarning (as an
    unclosed file warns); one still open at interpreter exit finishes its writes first, and logs any
    failure. In a child of fork() an inherited writer refuses every call (WriterForkedError): make a
    new one there.
    """

    _writer: _Writer
    _finalizer: weakref.finalize[[], AsyncWriter]

    def __init__(
        self,
        out_root: str | os.PathLike[str],
        save_format: SaveFormat | str = WriterOptions.save_format,
        dict_mode: DictMode | str = WriterOptions.dict_mode,
        workers: int = WriterOptions.workers,
        max_inflight: int = WriterOptions.max_inflight,
        small_sync_bytes: int = WriterOptions.small_sync_bytes,
        upload_queue: queue.Queue[Path] | None = WriterOptions.upload_queue,
        *,
        max_inflight_bytes: int = WriterOptions.max_inflight_bytes,
        durability: Durability | str = WriterOptions.durability,
        align: int | None = WriterOptions.align,
        pinned_pool_bytes: int | None = WriterOptions.pinned_pool_bytes,
        backend: Backend | str = WriterOptions.backend,
        kvikio_threads: int = WriterOptions.kvikio_threads,
        kvikio_task_size: int = WriterOptions.kvikio_task_size,
        kvikio_direct_io: bool = WriterOptions.kvikio_direct_io,
        manifest: bool = WriterOptions.manifest,
        skip_existing: bool = WriterOptions.skip_existing,
        follow_symlinks: bool = WriterOptions.follow_symlinks,
        engine: str = WriterOptions.engine,
        progress_seconds: float | None = WriterOptions.progress_seconds,
    ) -> None:
        options = WriterOptions(
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
            engine=engine,
            progress_seconds=progress_seconds,
        )
        writer = _Writer(options)
        self._writer = writer
        self._finalizer = weakref.finalize(self, writer.dropped)
        self._finalizer.atexit = False  # at exit, _close_at_exit closes it

    @property
    def options(self) -> WriterOptions:
        return self._writer.options

    # The original AsyncWriter's attributes.
    @property
    def root(self) -> Path:
        return self._writer.options.out_root

    @property
    def save_format(self) -> SaveFormat:
        return self._writer.options.save_format

    @property
    def dict_mode(self) -> DictMode:
        return self._writer.options.dict_mode

    @property
    def max_inflight(self) -> int:
        return self._writer.options.max_inflight

    @property
    def small_sync_bytes(self) -> int:
        return self._writer.options.small_sync_bytes

    @property
    def upload_queue(self) -> queue.Queue[Path] | None:
        return self._writer.options.upload_queue

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The threads that wait for staging copies and run custom writers (the engine writes)."""
        return self._writer._pipeline.executor

    def write(
        self, relative_path_no_ext: str | os.PathLike[str], to_save: object, *, copy: bool = False
    ) -> WriteHandle:
        """Write `to_save` to `<out_root>/<relative_path_no_ext><suffix>` (several files with SPLIT).

        Returns at once unless the budget is full. Device tensors are copied to pinned host memory on
        a copy stream ordered after the caller's current stream. With copy=True every array is first
        snapshotted (on the device, in stream order; host arrays by a copy), so the caller may
        overwrite it (static CUDA-graph outputs) as soon as this returns. Raises InvalidKeyError or
        InvalidLayoutError (ValueError), UnsupportedValueError (TypeError), WriterClosedError
        (RuntimeError), or the first background failure, before anything is queued.
        """
        plain = self._writer.plain
        if plain is not None and not copy:  # one host array: one call into the engine, where it can
            handle = plain.write(relative_path_no_ext, to_save)
            if handle is not None:
                return cast(WriteHandle, handle)
        return self._writer.write(relative_path_no_ext, to_save, copy=copy)

    def write_batch(
        self,
        keys: Sequence[str | os.PathLike[str]],
        batch: object,
        *,
        save: Callable[[Path, Any], None] | None = None,
        suffix: str = "",
        allow_empty: bool = False,
    ) -> WriteHandle:
        """Write sample i of `batch` under keys[i]: one staging copy for the batch, one file per sample.

        `batch` is a tensor or a mapping of tensors whose first dimension indexes the samples (device
        tensors are copied to host memory whole, once, and each file gets only its sample's rows), or
        a sequence with one value per key. With `save`, each sample is written by `save(path, sample)`
        to `<key><suffix>` instead of in the writer's format, with the same atomic commit: `path` is a
        temporary ending in `suffix`, so `np.save(path, a)`, `image.save(path)` and
        `path.with_suffix(suffix)` write where they should. A save function that leaves `path` empty
        (unless `allow_empty`), or writes elsewhere, fails its write with SaveFunctionError. One future
        for the whole batch; its result lists every file.
        """
        plain = self._writer.plain
        if plain is not None and save is None:  # one host array of samples: one call, where it can
            handle = plain.write_batch(keys, batch)
            if handle is not None:
                return cast(WriteHandle, handle)
        return self._writer.write_batch(keys, batch, save=save, suffix=suffix, allow_empty=allow_empty)

    def is_done(self, key: str | os.PathLike[str]) -> bool:
        """Whether `key` is written: committed by this writer, or recorded by an earlier run's journal
        (loaded at construction) with every file still there at its recorded size. Needs
        skip_existing=True."""
        return self._writer.is_done(key)

    def wait_backend(self, timeout: float | None = None) -> str:
        """Wait until the backend for CUDA tensors is decided ("kvikio" or "posix"), and return it.

        write() never waits for that decision (with backend='auto' a probe makes it in the background,
        and until then CUDA tensors take the pinned path); call this to start timing after it, say.
        Returns the backend of the moment if `timeout` passes first.
        """
        return self._writer.wait_backend(timeout)

    def flush(self) -> None:
        """Wait for every write made so far; raise the first background failure, if any."""
        self._writer.flush()

    def close(self) -> None:
        """Flush, then stop the workers (also after a failure); raise the first background failure.

        Calling it again does nothing more than raise that failure again.
        """
        self._writer.close()

    def stats(self) -> WriterStats:
        return self._writer.stats()

    def __getattr__(self, name: str) -> Any:
        """The writer's private parts (its stages, for tests and integrations that look inside)."""
        if not name.startswith("_") or name in ("_writer", "_finalizer") or "_writer" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self._writer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        """Its own attributes as any object's; a private part of the writer's is set there."""
        inner = self.__dict__.get("_writer")
        if inner is not None and name.startswith("_") and name not in self.__dict__ and hasattr(inner, name):
            setattr(inner, name, value)
        else:
            object.__setattr__(self, name, value)

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError(
            f"cannot pickle or copy {self!r}: a writer holds threads and open files; make one where it "
            "is used (in the worker, the actor), from the same options"
        )

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
        inner = self.__dict__.get("_writer")
        return repr(inner) if inner is not None else f"<{type(self).__name__}, not made>"


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


def _saving(save: Callable[[Path, Any], None], value: Any, allow_empty: bool) -> _FileWriter:
    """Runs `save` on the file's own name in a private folder, then takes what it left there
    (commit.take_saved: an empty file or one written beside fails the write)."""

    def saving(fd: int, temporary: str) -> tuple[int, str]:
        save(Path(temporary), value)
        return take_saved(fd, temporary, allow_empty=allow_empty)

    return saving


def _discard(job: FileJob) -> None:
    """Close and remove a temporary that will never be submitted (and a save function's folder)."""
    with contextlib.suppress(OSError):
        os.close(job.fd)
    with contextlib.suppress(OSError):
        os.unlink(job.temporary)
    remove_private_folder(job.temporary)


#: Writes a file into the temporary open at the descriptor; returns the descriptor and path of the file
#: to commit where they changed (a save function's, moved out of its private folder), else None.
_FileWriter = Callable[[int, str], "tuple[int, str] | None"]
#: What a worker calls to get a write's host entries (after staging), and custom writers if any.
_Ready = Callable[[], "tuple[list[FileEntry], list[_FileWriter] | None]"]


class _Write:
    """One write() or write_batch() on its way: what its completion needs."""

    __slots__ = ("backends", "entries", "future", "keys", "nbytes", "numbers", "staged")

    def __init__(
        self, future: WriteFuture, entries: list[FileEntry], keys: list[str], staged: Staged | None
    ) -> None:
        self.future = future
        self.entries = entries
        self.keys = keys
        self.staged = staged
        pooled = staged.pooled_bytes if staged is not None else 0  # the pool is their budget
        self.nbytes = max(sum(entry.nbytes for entry in entries) - pooled, 0)
        self.numbers: list[int] = []
        self.backends: list[str] = []
