"""AsyncWriter: the public face. Each call is one call into the writer's core (core.py), or, for one
host array, into the engine's plain route; the writer is closed when collected or at exit."""

from __future__ import annotations

import os
import queue
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, SupportsIndex, cast

from .core import WriterCore
from .future import WriteHandle
from .options import Backend, DictMode, Durability, SaveFormat, WriterOptions
from .stats import WriterStats

__all__ = ["AsyncWriter"]


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

    _writer: WriterCore
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
        writer = WriterCore(options)
        self._writer = writer
        self._finalizer = weakref.finalize(self, writer.dropped)
        self._finalizer.atexit = False  # at exit, core._close_at_exit closes it

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
