"""Upload the files an AsyncWriter commits to S3 or any S3-compatible store (needs `tensorsink[s3]`).

The writer puts the `Path` of each committed file on its `upload_queue`; `S3Uploader` takes them off in
batches and uploads each batch with a pool of threads, multipart above a threshold, retrying transient
failures with backoff. A file is deleted locally (with `delete_local=True`) only once the store reports
an object of its size under its key; a file that could not be uploaded stays on disk and is reported by
`close()`. `S3SpoolingWriter` wires a writer and an uploader together and closes them in order.

boto3 is imported only when an uploader is built, so `import tensorsink` works without it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import queue
import random
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, TypeVar, cast

from .errors import TensorsinkError
from .future import WriteFuture
from .writer import AsyncWriter

__all__ = ["S3SpoolingWriter", "S3Uploader", "UploadError", "UploadStats"]

log = logging.getLogger("tensorsink")
_Self = TypeVar("_Self", bound="_ClosedOnExit")

_STOP = cast(Path, object())  # the sentinel close() puts on the queue; compared by identity
_THROTTLING = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed"}
    | {"InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests"}
)
_MAX_BACKOFF = 20.0
_PART_CONCURRENCY = 4  # parts of one file in flight; files are already uploaded `workers` at a time
_RECENT_DELETIONS = 1 << 16  # paths remembered as uploaded and removed (older ones: asked of the store)


class UploadError(TensorsinkError, RuntimeError):
    """Files that could not be uploaded after every retry; they were kept on disk."""


@dataclass(frozen=True)
class UploadStats:
    uploaded: int  # files confirmed uploaded
    bytes: int  # their sizes, summed
    deleted: int  # local files removed after a confirmed upload
    failed: int  # files given up on, kept on disk
    retries: int  # attempts repeated after a transient failure


class _Unconfirmed(Exception):
    """The store does not (yet) show the object we just uploaded at the local file's size."""


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"S3 uploads need boto3 ({exc}): pip install 'tensorsink[s3]'") from exc


class _ClosedOnExit:
    """`with` support for the classes here: close() on the way out; if the block is already failing,
    a close() failure is logged rather than hiding the block's own exception."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.close()
        except BaseException as failure:
            if exc is None:
                raise
            log.error("tensorsink: %s (while handling %r)", failure, exc)


class S3Uploader(_ClosedOnExit):
    """Upload every path put on `upload_queue` to `s3://<bucket>/<prefix><path relative to local_root>`.

    The key is `prefix` plus the relative path with '/' separators; give `prefix` its trailing '/'.
    Credentials come from boto3's usual chain (environment, config files, instance role); `client`
    replaces the client built here (tests, custom sessions). Close the AsyncWriter first, so that every
    committed path is on the queue, then this uploader: `close()` waits for all of them.
    """

    def __init__(
        self,
        upload_queue: queue.Queue[Path],
        local_root: str | os.PathLike[str],
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        batch_size: int = 100,
        workers: int = 8,
        delete_local: bool = False,
        max_attempts: int = 5,
        backoff_seconds: float = 0.5,
        multipart_threshold: int = 8 << 20,
        multipart_chunksize: int = 8 << 20,
        client: Any = None,
    ) -> None:
        if batch_size < 1 or workers < 1 or max_attempts < 1 or backoff_seconds < 0:
            raise ValueError("batch_size, workers and max_attempts must be >= 1, backoff_seconds >= 0")
        boto3 = _import("boto3")
        transfer = _import("boto3.s3.transfer")
        self._errors = _import("botocore.exceptions")
        self.upload_queue = upload_queue
        self.local_root = Path(os.path.abspath(local_root))  # as AsyncWriter names its files
        self.bucket, self.prefix = bucket, prefix
        self.batch_size, self.delete_local = batch_size, delete_local
        self.max_attempts, self.backoff_seconds = max_attempts, backoff_seconds
        self._transfer = transfer.TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=_PART_CONCURRENCY,
        )
        self._owns_client = client is None
        if client is None:
            # Few, short botocore retries and timeouts: a vanished server should fail an attempt in
            # seconds, and our own retries (with longer backoff) decide when to give up.
            config = _import("botocore.config").Config(
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=5,
                read_timeout=10,
                max_pool_connections=workers * _PART_CONCURRENCY,
            )
            client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self.client: Any = client
        self.failed: list[tuple[Path, Exception]] = []
        self._uploaded = self._bytes = self._deleted = self._retries = 0
        self._recently_deleted: dict[Path, None] = {}  # insertion-ordered, the oldest dropped first
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._closed = False
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tensorsink-upload")
        self._thread = threading.Thread(target=self._run, name="tensorsink-uploader", daemon=True)
        self._thread.start()

    @property
    def first_error(self) -> Exception | None:
        with self._lock:
            return self.failed[0][1] if self.failed else None

    def stats(self) -> UploadStats:
        with self._lock:
            return UploadStats(self._uploaded, self._bytes, self._deleted, len(self.failed), self._retries)

    def key_for(self, path: Path) -> str:
        return self.prefix + Path(os.path.abspath(path)).relative_to(self.local_root).as_posix()

    def _run(self) -> None:
        """Wait for a path, take whatever else is already queued (up to batch_size), upload the batch;
        after the sentinel, upload what is left without waiting, then stop."""
        stopping = False
        while True:
            batch: list[Path] = []
            block = not stopping
            while len(batch) < self.batch_size:
                try:
                    item = self.upload_queue.get(block=block)
                except queue.Empty:
                    break
                block = False
                if item is _STOP:
                    stopping = True
                else:
                    batch.append(item)
            if batch:
                # One upload per path in a batch (a key rewritten twice); batches run one after the other,
                # so a later version of a file is never overtaken by an earlier one.
                wait([self._pool.submit(self._upload, path) for path in dict.fromkeys(batch)])
            elif stopping:
                return

    def _upload(self, path: Path) -> None:
        """Upload one file with retries; on final failure keep it and record why."""
        try:
            key = self.key_for(path)
            for attempt in range(self.max_attempts):
                try:
                    self._upload_once(path, key)
                    return
                except Exception as exc:
                    if attempt + 1 == self.max_attempts or not self._transient(exc):
                        raise
                    with self._lock:
                        self._retries += 1
                    delay = min(_MAX_BACKOFF, self.backoff_seconds * 2**attempt)
                    time.sleep(delay * random.uniform(1.0, 1.2))  # jitter: retries do not arrive in step
        except Exception as exc:
            log.warning("tensorsink: upload of %s failed, kept on disk: %r", path, exc)
            with self._lock:
                self.failed.append((path, exc))

    def _upload_once(self, path: Path, key: str) -> None:
        try:
            before = os.stat(path)
        except FileNotFoundError:
            if self.delete_local and self._already_uploaded(path, key):
                return  # a rewrite's entry: its version went up with an earlier one, then was removed
            raise
        self.client.upload_file(os.fspath(path), self.bucket, key, Config=self._transfer)
        if self.delete_local:
            size = self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
            if size != before.st_size:
                raise _Unconfirmed(f"s3://{self.bucket}/{key} has {size} bytes, {path} {before.st_size}")
            if self._remove_if_unchanged(path, before):
                with self._lock:
                    self._deleted += 1
                    self._recently_deleted[path] = None
                    if len(self._recently_deleted) > _RECENT_DELETIONS:
                        del self._recently_deleted[next(iter(self._recently_deleted))]
        with self._lock:
            self._uploaded += 1
            self._bytes += before.st_size

    @staticmethod
    def _remove_if_unchanged(path: Path, uploaded: os.stat_result) -> bool:
        """Remove `path` if it is still the file that was uploaded. It is first renamed aside (to a
        name sweep() removes, should we be killed here), so that no rewrite can land between the check
        and the removal; a newer version found aside is put back, unless an even newer one is there."""
        aside = path.with_name(f".{path.name[:200]}.tsink-{secrets.token_hex(4)}0.partial")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        moved = os.stat(aside)
        if (moved.st_ino, moved.st_mtime_ns) == (uploaded.st_ino, uploaded.st_mtime_ns):
            os.unlink(aside)
            return True
        # A newer version committed during the upload: it is queued again by its own rename.
        with contextlib.suppress(FileExistsError):  # an even newer one is in place: this one is stale
            os.link(aside, path)
        os.unlink(aside)
        return False

    def _already_uploaded(self, path: Path, key: str) -> bool:
        """Whether a path found missing was uploaded and removed by this uploader: every rewrite of a
        key queues its path again, and an earlier entry may have taken the latest version already."""
        with self._lock:
            if path in self._recently_deleted:
                return True
        try:  # deleted long ago (a long backlog): the store still has what was uploaded then
            self.client.head_object(Bucket=self.bucket, Key=key)
        except self._errors.ClientError:
            return False
        return True

    def _transient(self, exc: BaseException) -> bool:
        """Whether another attempt may succeed: connection trouble, 5xx and throttling, also when
        boto3 wraps them (S3UploadFailedError keeps the ClientError as its context)."""
        e = self._errors
        seen: BaseException | None = exc
        for _ in range(8):  # the chain is short; the bound guards against cycles
            if seen is None:
                return False
            # botocore's own notion of transient: EndpointConnectionError, ConnectTimeoutError (both
            # ConnectionError), ConnectionClosedError, ReadTimeoutError (both HTTPClientError).
            if isinstance(seen, _Unconfirmed | e.ConnectionError | e.HTTPClientError):
                return True
            if isinstance(seen, e.ClientError):
                status = seen.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                return bool(status >= 500 or seen.response.get("Error", {}).get("Code") in _THROTTLING)
            seen = seen.__cause__ or seen.__context__
        return False

    def close(self) -> None:
        """Wait until every queued path is uploaded or given up on; raise UploadError if any failed.

        Close the AsyncWriter first: paths it commits after this returns are not uploaded. Calling it
        again does nothing more than raise the same error again.
        """
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self.upload_queue.put(_STOP)
                self._thread.join()
                self._pool.shutdown()
                if self._owns_client:
                    self.client.close()
        with self._lock:
            failed = list(self.failed)
        if failed:
            path, exc = failed[0]
            raise UploadError(
                f"{len(failed)} file(s) could not be uploaded to s3://{self.bucket}/{self.prefix} and were "
                f"kept on disk; the first, {path}: {exc}"
            ) from exc


class S3SpoolingWriter(_ClosedOnExit):
    """An AsyncWriter into `spool_dir` whose committed files are uploaded by an S3Uploader.

    `close()` closes the writer first (every local write finishes and is queued), then the uploader
    (every upload finishes); it raises the writer's first failure if there was one, else the uploader's
    UploadError. `writer_options` go to AsyncWriter (save_format, dict_mode, durability, ...).
    """

    def __init__(
        self,
        spool_dir: str | os.PathLike[str],
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        upload_batch_size: int = 100,
        remove_on_upload: bool = False,
        local_writer_workers: int = 4,
        s3_upload_workers: int = 8,
        client: Any = None,
        **writer_options: Any,
    ) -> None:
        self.upload_queue: queue.Queue[Path] = queue.Queue()
        self.uploader = S3Uploader(
            self.upload_queue,
            spool_dir,
            bucket,
            prefix,
            endpoint_url=endpoint_url,
            batch_size=upload_batch_size,
            workers=s3_upload_workers,
            delete_local=remove_on_upload,
            client=client,
        )
        try:
            self.writer = AsyncWriter(
                spool_dir, workers=local_writer_workers, upload_queue=self.upload_queue, **writer_options
            )
        except BaseException:
            self.uploader.close()  # nothing was queued, so nothing can have failed
            raise

    def write(self, key: str | os.PathLike[str], to_save: object, *, copy: bool = False) -> WriteFuture:
        return self.writer.write(key, to_save, copy=copy)

    def write_batch(
        self,
        keys: Sequence[str | os.PathLike[str]],
        batch: object,
        *,
        save: Callable[[Path, Any], None] | None = None,
        suffix: str = "",
    ) -> WriteFuture:
        return self.writer.write_batch(keys, batch, save=save, suffix=suffix)

    def close(self) -> None:
        """Close the writer, then the uploader, even if the writer failed; raise the first failure."""
        try:
            self.writer.close()
        except BaseException:
            try:
                self.uploader.close()
            except UploadError as upload_failure:
                log.error("tensorsink: besides the writer's failure, %s", upload_failure)
            raise
        self.uploader.close()
