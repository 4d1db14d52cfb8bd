"""What an AsyncWriter is made of: its stages built from WriterOptions and wired together, its state.

A write is checked and planned here, on the caller's thread, then takes a route: the ready route (a
header and views of host memory, to the engine in one call) or the prepared route (prepared.py). The
writers still open at interpreter exit are closed here too.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from .arrays import nbytes
from .backends import Route
from .batches import split_batch, tensors_of
from .commit import find_symlink, make_root
from .engine import Engine, PlainRoute, PythonEngine, engine_class
from .engine.base import CopyWait, Settled
from .errors import SymlinkError, WriterClosedError, WriterForkedError
from .formats import Buffer, Container, FileEntry, Format, HeaderFormat, format_for
from .future import Callbacks, WriteFuture, WriteHandle
from .manifest import Journal, arrays_of
from .options import Backend, Durability, WriterOptions
from .plan import batch_keys, check_distinct_files, file_path, plan_files, validate_key, validate_suffix
from .prepared import FileWriter, PreparedRoute, Write, regroup, sample_values, saving
from .resume import Resume
from .scheduling import Gate, Pipeline
from .staging import Staged, Stager, default_pool_bytes
from .staging.cudart import own_thread_now
from .stats import StatsRecorder, WriterStats

__all__ = ["WriterCore"]

log = logging.getLogger("tensorsink")

#: Writers not closed yet, in this process or (after fork()) its parent's: closed at interpreter exit.
_open_writers: set[WriterCore] = set()


def _close_and_log(writer: WriterCore, why: str) -> None:
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


class WriterCore:
    """What an AsyncWriter is made of: its stages, its state, its threads. The threads hold this and
    never the AsyncWriter, so that a writer its user dropped is collected (and closed, see AsyncWriter)."""

    def __init__(self, options: WriterOptions) -> None:
        self.options = options
        self._pid = os.getpid()  # a child of fork() inherits the writer, not its threads
        self._root = os.path.abspath(self.options.out_root)
        self._use_format(format_for(self.options.save_format, self.options.align))
        self._route = Route(self.options, self._root, self._format)
        make_root(self._root, self.options.durability)  # before the journal, which lies under it
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
            self._resume = Resume(self._root) if o.skip_existing else None
            self._prepared = PreparedRoute(self)
            self._engine = self._make_engine(kind)
        except BaseException:
            if self._journal is not None:
                self._journal.close()
            raise
        self._committer = self._engine.committer  # names and creates temporaries; the engine commits
        self._pipeline = Pipeline(o.workers, self._engine.budget, self._callbacks, self._engine.plain_off)
        self._use_format(self._format)  # again, now that the engine is known
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
            and self._resume is None
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
            return kind(o.workers, o.durability, self._root, self._prepared.completed, **common)
        # A small write is cheaper on the caller than a queue hop in Python, unless it waits for an fsync
        # (~1 ms): then the caller would stall on the disk, and workers can fsync several at once.
        return PythonEngine(
            o.workers,
            o.durability,
            self._root,
            self._prepared.completed,
            inline_below=o.small_sync_bytes,
            **common,
        )

    def write(
        self, relative_path_no_ext: str | os.PathLike[str], to_save: object, *, copy: bool = False
    ) -> WriteHandle:
        began = self._enter(relative_path_no_ext)
        try:
            name = validate_key(relative_path_no_ext)
            entries = plan_files(self._root, name, to_save, self._format, self.options.dict_mode)
            self._check_folders(entries)
            if self._resume is not None and self._resume.written(entries):
                return self._skipped([Path(entry.path) for entry in entries])
            entries, staged = self._stager.stage(entries, copy=copy, direct=self._route.device_direct)
            waits = staged.native_waits() if staged is not None else None
            if self._ready_route and (staged is None or waits is not None):
                handle = self._write_ready([name] * len(entries), entries, staged, waits, copied=copy)
                if handle is not None:
                    return handle
            future = WriteFuture(staged_apart=staged is not None or copy, callbacks=self._callbacks)
            if copy:
                future.set_staged()
            pending = Write(future, entries, [name] * len(entries), staged)
            if staged is None:
                return self._prepared.start(pending, None)

            def ready() -> tuple[list[FileEntry], None]:
                host = staged.wait()
                if not staged.on_device:
                    future.set_staged()
                return host, None

            return self._prepared.start(pending, ready)
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
        names = batch_keys(keys)
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
        resume = self._resume
        kept = [i for i, entries in enumerate(planned) if resume is None or not resume.written(entries)]
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

        def on_host(arrived: list[FileEntry]) -> list[list[FileEntry]]:
            """The samples' files again, of the staged arrays in host memory (views: nothing is read)."""
            if layout.container is Container.SEQUENCE:
                return regroup(arrived, planned)
            host_samples = layout.samples(arrived[0].arrays)
            return [self._plan_sample(names[i], host_samples[i], save, suffix) for i in kept]

        if save is None and self._ready_route:  # host arrays, or device ones the engine waits for
            waits = staged.native_waits() if staged is not None else None
            if staged is None:
                handle = self._write_ready(entry_keys, flat)
            elif waits is None:
                handle = None
            else:
                try:
                    host_files = [entry for group in on_host(staged.entries) for entry in group]
                except Exception:  # planned again below, in a worker, which reports it
                    host_files = None
                handle = self._write_ready(entry_keys, host_files, staged, waits) if host_files else None
            if handle is not None:
                return handle
        future = WriteFuture(staged_apart=staged is not None, callbacks=self._callbacks)
        pending = Write(future, flat, entry_keys, staged)
        if staged is None and save is None:
            return self._prepared.start(pending, None)

        def ready() -> tuple[list[FileEntry], list[FileWriter] | None]:
            host = planned
            if staged is not None:
                arrived = staged.wait()
                future.set_staged()
                host = on_host(arrived)
            savers = None
            if save is not None:
                savers = [saving(save, value, allow_empty) for value in sample_values(host, samples)]
            return [entry for group in host for entry in group], savers

        return self._prepared.start(pending, ready)

    def _write_ready(
        self,
        keys: list[str],
        entries: list[FileEntry],
        staged: Staged | None = None,
        waits: list[CopyWait] | None = None,
        *,
        copied: bool = False,
    ) -> WriteHandle | None:
        """The ready route: the files' headers and views of host memory go to the engine in one call,
        which numbers them, waits for room and queues them; its threads complete the write. With
        `staged` (and its `waits`, staged.native_waits()), the views are of the pinned pool, whose
        copies are still on their way: the engine's threads wait for them, and a done-callback gives
        the pool blocks back. None where an array needs a copy first (the write goes the other way)."""
        try:
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
        except BaseException:
            if staged is not None:
                staged.release()
            raise
        if staged is None:  # `copied`: its arrays are copies (write(copy=True)), so it is staged now
            handle, blocked = self._engine.write_ready(keys, files, nbytes, None, None, copied)  # type: ignore[arg-type]
        else:  # the engine owns the release from here: called as the write settles, or if refused
            nbytes = max(nbytes - staged.pooled_bytes, 0)  # the pool is their budget
            releasing = _releasing(staged)
            handle, blocked = self._engine.write_ready(keys, files, nbytes, waits, releasing, copied)  # type: ignore[arg-type]
            blocked += staged.blocked_seconds
        self._stats.write_started()
        if blocked:
            self._stats.blocked(blocked)
        if self._resume is not None:
            self._resume.remember(keys, [entry.path for entry in entries], handle)
        return cast(WriteHandle, handle)

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
        writer's by its suffix), arrays (none for a custom writer's file: a PNG is no array of its
        input's dtype and shape), and for a key of several files their count and the write's id,
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
                [] if custom else arrays_of(entry),  # a custom writer's file holds no arrays we know of
                files_of[key] if files_of is not None else 1,
                ids.get(key),
            )
            for key, entry in zip(keys, entries, strict=True)
        ]

    def _progress(self) -> None:
        """A progress line every progress_seconds, from whichever thread gets there: the caller's (the
        ready route completes without Python) or a completion's."""
        every = self.options.progress_seconds
        if every is not None and time.monotonic() - self._progress_at >= every:
            self._progress_at = time.monotonic()
            log.info("tensorsink: %s", self.stats())

    def _plan_sample(
        self, name: str, sample: object, save: Callable[[Path, Any], None] | None, suffix: str
    ) -> list[FileEntry]:
        if save is None:
            return plan_files(self._root, name, sample, self._format, self.options.dict_mode)
        found = tensors_of(sample)
        container, names, arrays = found if found is not None else (Container.SEQUENCE, (), ())
        path = file_path(self._root, name, suffix)
        return [FileEntry(path, container, names, arrays, sum(map(nbytes, arrays)))]

    def _skipped(self, paths: list[Path], count: int = 1) -> WriteFuture:
        self._stats.skipped(count)
        future = WriteFuture()
        future.set_result(paths)
        return future

    def is_done(self, key: str | os.PathLike[str]) -> bool:
        if self._resume is None:
            raise RuntimeError(
                "is_done() needs AsyncWriter(..., skip_existing=True), which loads the manifest"
            )
        return self._resume.is_done(key)

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


def _releasing(staged: Staged) -> Settled:
    """Gives a ready-route write's pool blocks back as it settles: at once where it succeeded (the
    engine's threads waited for every copy), after waiting for its copies where it did not."""
    return Settled(lambda handle: staged.release(landed=handle is not None and handle.exception() is None))
