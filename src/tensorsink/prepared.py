"""The prepared route: writes whose bytes need Python before the engine can take them.

A serializer (.pt of anything but a plain tensor, .npz), a custom save function, a wait for a staging
copy, kvikio writing from device memory: a worker thread makes the files ready (or the caller's thread,
for a small one with the Python engine), and hands them to the engine as one batch. The engine commits
them and reports batches back, several at once, to `completed`: the upload queue, the statistics, the
budget and the futures, for all of them together.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

from .backends import Route
from .commit import Committer, remove_private_folder, take_saved
from .engine import Engine, FileJob, FileOutcome
from .errors import naming
from .formats import Buffer, BufferFormat, Container, FileEntry, Format
from .future import WriteFuture
from .options import WriterOptions
from .resume import Resume
from .scheduling import Pipeline
from .staging import Staged
from .stats import StatsRecorder

__all__ = ["FileWriter", "PreparedRoute", "Ready", "Stages", "Write", "regroup", "sample_values", "saving"]

#: Writes a file into the temporary open at the descriptor; returns the descriptor and path of the file
#: to commit where they changed (a save function's, moved out of its private folder), else None.
FileWriter = Callable[[int, str], "tuple[int, str] | None"]
#: What a worker calls to get a write's host entries (after staging), and custom writers if any.
Ready = Callable[[], "tuple[list[FileEntry], list[FileWriter] | None]"]


class Write:
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


class Stages(Protocol):
    """What the route uses of its writer (core.WriterCore): its stages and settings, read at each
    use (a writer's format may be swapped), and the two steps the ready route shares."""

    options: WriterOptions
    _engine: Engine
    _pipeline: Pipeline
    _committer: Committer
    _format: Format
    _route: Route
    _resume: Resume | None
    _stats: StatsRecorder
    _ready_route: bool
    _inline_below: int

    def _encoded_here(self, entries: list[FileEntry]) -> list[list[Buffer]] | None: ...

    def _records(
        self, keys: list[str], entries: list[FileEntry], *, custom: bool = False
    ) -> list[bytes | None]: ...

    def _progress(self) -> None: ...


class PreparedRoute:
    """Starts, prepares, submits and completes the writes of one writer that take this route."""

    def __init__(self, writer: Stages) -> None:
        self._writer = writer  # its stages: engine, pipeline, committer, format, journal, statistics

    def start(self, pending: Write, ready: Ready | None) -> WriteFuture:
        """Number the files, wait for room, then hand them to the engine: from here if their bytes are
        in host memory already (`ready` None), else from a worker once `ready()` has them."""
        w = self._writer
        paths = [entry.path for entry in pending.entries]
        pending.numbers = w._engine.reserve(paths)
        if w._resume is not None:
            w._resume.remember(pending.keys, paths, pending.future)
        w._stats.write_started()
        try:
            blocked = w._pipeline.admit(pending.nbytes, pending.future)
        except BaseException:
            w._engine.release(paths)
            if pending.staged is not None:
                pending.staged.release()
            raise
        w._stats.blocked(blocked + (pending.staged.blocked_seconds if pending.staged is not None else 0.0))
        # Where the ready route was open, it tried the headers already: an array needs a copy.
        encoded = w._encoded_here(pending.entries) if ready is None and not w._ready_route else None
        if ready is None and (encoded is not None or pending.nbytes < w._inline_below):
            self._submit(pending, pending.entries, None, encoded)  # a header and views; or small, inline
        else:  # a serializer to run (.pt, .npz, a copy, a staging wait): the pool's threads, in parallel
            entries = pending.entries
            w._pipeline.prepare(lambda: self._prepare(pending, ready or (lambda: (entries, None))))
        return pending.future

    def _prepare(self, pending: Write, ready: Ready) -> None:
        """In a worker: wait for the staged bytes (or run custom writers), then submit."""
        try:
            entries, savers = ready()
        except BaseException as exc:
            self._writer._engine.release([entry.path for entry in pending.entries])
            self.finish([(pending, None, naming(exc, pending.keys[0], pending.entries[0].path))])
            return
        self._submit(pending, entries, savers)

    def _submit(
        self,
        pending: Write,
        entries: list[FileEntry],
        savers: list[FileWriter] | None,
        encoded: list[list[Buffer]] | None = None,
    ) -> None:
        """The files as the engine takes them: the format's buffers, or a temporary that a custom writer
        (or kvikio) has written already. A failure before the engine has them fails the write."""
        w = self._writer
        files: list[FileJob] = []
        backends: list[str] = []
        k = 0
        records = w._records(pending.keys, entries, custom=savers is not None)
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
                    temporary = w._committer.temporary_for(directory, name)
                    crc = None
                    encoder = cast(BufferFormat, w._format)
                    if encoded is not None:
                        buffers = encoded[k]
                    elif checksum:  # the file's CRC, where the format has it already
                        buffers, crc = encoder.encode_with_crc(entry)
                    else:
                        buffers = encoder.encode(entry)
                    files.append(FileJob(entry.path, temporary, buffers, -1, checksum, number, record, crc))
                    backends.append("posix")
                    continue
                fd, temporary = w._committer.create(entry.path, private=savers is not None)
                files.append(FileJob(entry.path, temporary, None, fd, checksum, number, record))
                written = writer(fd, temporary)
                if written is not None:  # a save function's file, moved out of its private folder
                    files[-1] = files[-1]._replace(fd=written[0], temporary=written[1])
                backends.append("posix" if savers is not None else w._route.kvikio_label)
            pending.entries, pending.backends = entries, backends
            w._engine.submit(pending, files)
        except BaseException as exc:
            for job in files:
                if job.buffers is None:
                    _discard(job)
            w._engine.release([entry.path for entry in pending.entries])
            self.finish([(pending, None, naming(exc, pending.keys[k], entries[k].path))])

    def _file_writer(self, entry: FileEntry) -> FileWriter | None:
        """None where the engine writes the format's buffers itself; else what writes the file from
        device memory (kvikio)."""
        return self._writer._route.writer_for(entry)

    def completed(self, batches: list[tuple[object, list[FileOutcome]]]) -> None:
        """Finished batches from the engine (several at once where it can): the upload queue, then the
        statistics, the budget and the futures for all of them at once. (The engine journals each file
        itself, around its rename.)"""
        w = self._writer
        uploads = w.options.upload_queue
        done: list[tuple[Write, list[Path] | None, BaseException | None]] = []
        files, by_backend = 0, dict[str, int]()
        for token, outcomes in batches:
            pending = cast(Write, token)
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
        w._stats.files_committed(files, by_backend)
        self.finish(done)
        w._progress()

    def finish(self, done: list[tuple[Write, list[Path] | None, BaseException | None]]) -> None:
        finished = []
        for pending, paths, error in done:
            if pending.staged is not None:
                pending.staged.release()
            finished.append((pending.nbytes, pending.future, paths, error))
        self._writer._stats.write_failed(sum(error is not None for _, _, error in done))
        self._writer._pipeline.finish(finished)


def regroup(ready: list[FileEntry], planned: list[list[FileEntry]]) -> list[list[FileEntry]]:
    """Staged entries (flat, in order) grouped back by sample."""
    groups, start = [], 0
    for entries in planned:
        groups.append(ready[start : start + len(entries)])
        start += len(entries)
    return groups


def sample_values(host: list[list[FileEntry]], samples: list[Any]) -> list[Any]:
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


def saving(save: Callable[[Path, Any], None], value: Any, allow_empty: bool) -> FileWriter:
    """Runs `save` on the file's own name in a private folder, then takes what it left there
    (commit.take_saved: an empty file or one written beside fails the write)."""

    def run(fd: int, temporary: str) -> tuple[int, str]:
        save(Path(temporary), value)
        return take_saved(fd, temporary, allow_empty=allow_empty)

    return run


def _discard(job: FileJob) -> None:
    """Close and remove a temporary that will never be submitted (and a save function's folder)."""
    with contextlib.suppress(OSError):
        os.close(job.fd)
    with contextlib.suppress(OSError):
        os.unlink(job.temporary)
    remove_private_folder(job.temporary)
