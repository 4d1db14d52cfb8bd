"""Upload the files an AsyncWriter commits to S3 or any S3-compatible store (needs `tensorsink[s3]`).

The writer puts the `Path` of each committed file on its `upload_queue`; `S3Uploader` takes them off in
batches and uploads each batch with a pool of threads, multipart above a threshold, retrying transient
failures with backoff. Every object is stored with its CRC-32 (`ChecksumAlgorithm="CRC32"`, a
full-object checksum also for multipart uploads), the CRC the manifest records. A file is deleted locally
(with `remove_on_upload=True`) only once the store reports an object of its size under its key; a file
that could not be uploaded stays on disk and is reported by `close()`, which also uploads the journals
of `<root>/.tensorsink/` after every file they record. `S3SpoolingWriter` wires a writer and an
uploader together and closes them in order. `verify_prefix` checks a bucket prefix against the
journals stored there, from the sizes and CRC-32s the store keeps, without downloading any file.

boto3 is imported only when an uploader is built, so `import tensorsink` works without it.
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import fnmatch
import importlib
import inspect
import logging
import os
import queue
import random
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, TypeVar, cast

from .errors import TensorsinkError
from .future import WriteHandle
from .manifest import JOURNAL_DIR, Manifest, VerifyReport, file_problems
from .options import WriterOptions
from .writer import AsyncWriter

__all__ = ["S3SpoolingWriter", "S3Uploader", "UploadError", "UploadStats", "split_s3_url", "verify_prefix"]

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
#: Every upload asks the store to keep the object's CRC-32; FULL_OBJECT makes it the whole object's
#: CRC for multipart uploads too (not a CRC of the parts' CRCs), the one the manifest records.
_CHECKSUM_ARGS = {"ChecksumAlgorithm": "CRC32", "ChecksumType": "FULL_OBJECT"}
_JOURNALS = "journal-*.jsonl"

# One set of names for the upload options of S3Uploader and S3SpoolingWriter; the other spelling of
# each is accepted with the same meaning. (`workers` is refused by S3SpoolingWriter, where it could
# mean the writer's threads as well.)
_UPLOAD_DEFAULTS: dict[str, Any] = {
    "remove_on_upload": False,
    "upload_batch_size": 100,
    "s3_upload_workers": 8,
}
_UPLOAD_ALIASES = {
    "delete_local": "remove_on_upload",
    "batch_size": "upload_batch_size",
    "workers": "s3_upload_workers",
}


class UploadError(TensorsinkError, RuntimeError):
    """Files that could not be uploaded after every retry; they were kept on disk."""


@dataclass(frozen=True)
class UploadStats:
    uploaded: int  # files confirmed uploaded
    bytes: int  # their sizes, summed
    deleted: int  # local files removed after a confirmed upload
    failed: int  # files given up on, kept on disk
    retries: int  # attempts repeated after a transient failure
    journals: int = 0  # journals of <root>/.tensorsink/ uploaded by close()


class _Unconfirmed(Exception):
    """The store does not (yet) show the object we just uploaded at the local file's size."""


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"S3 uploads need boto3 ({exc}): pip install 'tensorsink[s3]'") from exc


def _unexpected(owner: str, name: str, takes: Sequence[str]) -> TypeError:
    close = difflib.get_close_matches(name, takes, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return TypeError(
        f"{owner}() got an unexpected keyword argument {name!r}; {hint}it takes {', '.join(takes)}"
    )


def _int_at_least(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name}={value!r} is not valid; use an int >= {minimum}")


def _upload_options(
    owner: str, given: Mapping[str, Any], aliases: Mapping[str, Any], **others: Any
) -> dict[str, Any]:
    """The upload options by their names here, from either spelling, checked: a ValueError or TypeError
    names `owner` and the argument as it was typed. `given`: the names here (None: not passed);
    `aliases`: the other spelling; `others`: max_attempts, backoff_seconds, multipart_*."""
    values = dict(_UPLOAD_DEFAULTS)
    typed = {name: name for name in values}
    values.update({name: value for name, value in given.items() if value is not None})
    for alias, value in aliases.items():
        name = _UPLOAD_ALIASES[alias]
        if given.get(name) is not None:
            raise TypeError(
                f"{owner}({name}=..., {alias}=...): {alias} is another name for {name}; pass only one"
            )
        values[name], typed[name] = value, alias
    remove = values["remove_on_upload"]
    if not isinstance(remove, bool):
        raise ValueError(f"{owner}: {typed['remove_on_upload']}={remove!r} is not valid; use True or False")
    _int_at_least(owner, typed["upload_batch_size"], values["upload_batch_size"], 1)
    _int_at_least(owner, typed["s3_upload_workers"], values["s3_upload_workers"], 1)
    _int_at_least(owner, "max_attempts", others["max_attempts"], 1)
    _int_at_least(owner, "multipart_threshold", others["multipart_threshold"], 1)
    _int_at_least(owner, "multipart_chunksize", others["multipart_chunksize"], 1)
    backoff = others["backoff_seconds"]
    if isinstance(backoff, bool) or not isinstance(backoff, int | float) or not backoff >= 0:
        raise ValueError(f"{owner}: backoff_seconds={backoff!r} is not valid; use a number of seconds >= 0")
    return {**values, **others}


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
    Files are taken off the queue `upload_batch_size` at a time (default 100) and uploaded by
    `s3_upload_workers` threads (default 8); `remove_on_upload=True` removes each local file once the
    store confirms its upload. `batch_size`, `workers` and `delete_local` are accepted for them too.
    Credentials come from boto3's usual chain (environment, config files, instance role); `client`
    replaces the client built here (tests, custom sessions). Close the AsyncWriter first, so that every
    committed path is on the queue, then this uploader: `close()` waits for all of them, then uploads
    the journals under `<local_root>/.tensorsink/`.
    """

    def __init__(
        self,
        upload_queue: queue.Queue[Path],
        local_root: str | os.PathLike[str],
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        upload_batch_size: int | None = None,
        remove_on_upload: bool | None = None,
        s3_upload_workers: int | None = None,
        max_attempts: int = 5,
        backoff_seconds: float = 0.5,
        multipart_threshold: int = 8 << 20,
        multipart_chunksize: int = 8 << 20,
        client: Any = None,
        **aliases: Any,
    ) -> None:
        for name in aliases:
            if name not in _UPLOAD_ALIASES:
                raise _unexpected("S3Uploader", name, [*_own_parameters(S3Uploader), *_UPLOAD_ALIASES])
        options = _upload_options(
            "S3Uploader",
            {
                "upload_batch_size": upload_batch_size,
                "remove_on_upload": remove_on_upload,
                "s3_upload_workers": s3_upload_workers,
            },
            aliases,
            max_attempts=max_attempts,
            backoff_seconds=backoff_seconds,
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
        )
        boto3 = _import("boto3")
        transfer = _import("boto3.s3.transfer")
        self._errors = _import("botocore.exceptions")
        self.upload_queue = upload_queue
        self.local_root = Path(os.path.abspath(local_root))  # as AsyncWriter names its files
        self.bucket, self.prefix = bucket, prefix
        self.upload_batch_size: int = options["upload_batch_size"]
        self.remove_on_upload: bool = options["remove_on_upload"]
        self.s3_upload_workers: int = options["s3_upload_workers"]
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
                max_pool_connections=self.s3_upload_workers * _PART_CONCURRENCY,
            )
            client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self.client: Any = client
        self.failed: list[tuple[Path, Exception]] = []
        self._uploaded = self._bytes = self._deleted = self._retries = self._journals = 0
        self._recently_deleted: dict[Path, None] = {}  # insertion-ordered, the oldest dropped first
        self._emptied: set[Path] = set()  # folders a removal may have left empty, removed by close()
        self._kept_journals: list[Path] = []
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._closed = False
        self._pool = ThreadPoolExecutor(self.s3_upload_workers, thread_name_prefix="tensorsink-upload")
        self._thread = threading.Thread(target=self._run, name="tensorsink-uploader", daemon=True)
        self._thread.start()

    @property
    def batch_size(self) -> int:
        """The same as upload_batch_size."""
        return self.upload_batch_size

    @property
    def delete_local(self) -> bool:
        """The same as remove_on_upload."""
        return self.remove_on_upload

    @property
    def first_error(self) -> Exception | None:
        with self._lock:
            return self.failed[0][1] if self.failed else None

    def stats(self) -> UploadStats:
        with self._lock:
            return UploadStats(
                self._uploaded, self._bytes, self._deleted, len(self.failed), self._retries, self._journals
            )

    def key_for(self, path: Path) -> str:
        return self.prefix + Path(os.path.abspath(path)).relative_to(self.local_root).as_posix()

    def _run(self) -> None:
        """Wait for a path, take whatever else is already queued (up to batch_size), upload the batch;
        after the sentinel, upload what is left without waiting, then stop."""
        stopping = False
        while True:
            batch: list[Path] = []
            block = not stopping
            while len(batch) < self.upload_batch_size:
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
            self._retrying(lambda: self._upload_once(path, key))
        except Exception as exc:
            log.warning("tensorsink: upload of %s failed, kept on disk: %r", path, exc)
            with self._lock:
                self.failed.append((path, exc))

    def _retrying(self, attempt_once: Callable[[], None]) -> None:
        """Call `attempt_once` until it succeeds, up to max_attempts times while its failures are
        transient, with exponential backoff between; raise its last failure."""
        for attempt in range(self.max_attempts):
            try:
                attempt_once()
                return
            except Exception as exc:
                if attempt + 1 == self.max_attempts or not self._transient(exc):
                    raise
                with self._lock:
                    self._retries += 1
                delay = min(_MAX_BACKOFF, self.backoff_seconds * 2**attempt)
                time.sleep(delay * random.uniform(1.0, 1.2))  # jitter: retries do not arrive in step

    def _put(self, path: Path, key: str, size: int) -> None:
        """Upload `path` as `key` with its CRC-32; with remove_on_upload, confirm the stored size."""
        self.client.upload_file(
            os.fspath(path), self.bucket, key, ExtraArgs=dict(_CHECKSUM_ARGS), Config=self._transfer
        )
        if self.remove_on_upload:
            stored = self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
            if stored != size:
                raise _Unconfirmed(f"s3://{self.bucket}/{key} has {stored} bytes, {path} {size}")

    def _upload_once(self, path: Path, key: str) -> None:
        try:
            before = os.stat(path)
        except FileNotFoundError:
            if self.remove_on_upload and self._already_uploaded(path, key):
                return  # a rewrite's entry: its version went up with an earlier one, then was removed
            raise
        self._put(path, key, before.st_size)
        if self.remove_on_upload and self._remove_if_unchanged(path, before):
            with self._lock:
                self._deleted += 1
                self._emptied.add(Path(os.path.abspath(path)).parent)
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

    def _upload_journals(self) -> None:
        """After every queued file: the journals under <local_root>/.tensorsink/, so that a journal in
        the bucket names only objects that are there. If a file failed, they stay local, not uploaded.
        With remove_on_upload they are removed once uploaded, and so are the folders left empty."""
        folder = self.local_root / JOURNAL_DIR
        journals = sorted(folder.glob(_JOURNALS)) if folder.is_dir() else []
        with self._lock:
            failed = bool(self.failed)
        if failed:
            self._kept_journals = journals
        elif journals:
            wait([self._pool.submit(self._upload_journal, journal) for journal in journals])
            self._emptied.add(folder)
        if self.remove_on_upload:
            self._remove_empty_folders()

    def _upload_journal(self, path: Path) -> None:
        def once() -> None:
            self._put(path, key, os.stat(path).st_size)

        try:
            key = self.key_for(path)
            self._retrying(once)
            if self.remove_on_upload:
                os.unlink(path)
            with self._lock:
                self._journals += 1
        except Exception as exc:
            log.warning("tensorsink: upload of the journal %s failed, kept on disk: %r", path, exc)
            with self._lock:
                self.failed.append((path, exc))

    def _remove_empty_folders(self) -> None:
        """Remove the folders under local_root (never local_root itself) that removals left empty."""
        for start in sorted(self._emptied, key=lambda folder: len(folder.parts), reverse=True):
            folder = start
            while folder != self.local_root and self.local_root in folder.parents:
                try:
                    os.rmdir(folder)
                except FileNotFoundError:
                    pass  # removed already, from a folder below it
                except OSError:
                    break  # not empty: neither is any folder above it
                folder = folder.parent

    def close(self) -> None:
        """Wait until every queued path is uploaded or given up on, then upload the journals under
        `<local_root>/.tensorsink/` (with remove_on_upload: remove them, and the folders left empty);
        raise UploadError if any file failed.

        Close the AsyncWriter first: paths it commits after this returns are not uploaded. Calling it
        again does nothing more than raise the same error again.
        """
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self.upload_queue.put(_STOP)
                self._thread.join()
                try:
                    self._upload_journals()
                finally:
                    self._pool.shutdown()
                    if self._owns_client:
                        self.client.close()
        with self._lock:
            failed = list(self.failed)
        if failed:
            path, exc = failed[0]
            kept = (
                f"; the {len(self._kept_journals)} journal(s) in {self.local_root / JOURNAL_DIR} were kept "
                "there, not uploaded, so that no journal in the bucket names a missing object"
                if self._kept_journals
                else ""
            )
            raise UploadError(
                f"{len(failed)} file(s) could not be uploaded to s3://{self.bucket}/{self.prefix} and were "
                f"kept on disk{kept}; the first, {path}: {exc}"
            ) from exc


def _own_parameters(cls: type) -> list[str]:
    return [name for name, p in inspect.signature(cls).parameters.items() if p.kind is p.KEYWORD_ONLY]


class S3SpoolingWriter(_ClosedOnExit):
    """An AsyncWriter into `spool_dir` whose committed files are uploaded by an S3Uploader.

    `close()` closes the writer first (every local write finishes and is queued), then the uploader
    (every upload finishes, then the journals go up); it raises the writer's first failure if there
    was one, else the uploader's UploadError. The upload options are S3Uploader's, by the same names
    (`batch_size` and `delete_local` are accepted too; `workers` is refused as ambiguous: pass
    `local_writer_workers` for the writer's threads, `s3_upload_workers` for the uploads').
    `writer_options` go to AsyncWriter (save_format, dict_mode, durability, manifest, ...).
    """

    def __init__(
        self,
        spool_dir: str | os.PathLike[str],
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        upload_batch_size: int | None = None,
        remove_on_upload: bool | None = None,
        local_writer_workers: int = 4,
        s3_upload_workers: int | None = None,
        max_attempts: int = 5,
        backoff_seconds: float = 0.5,
        multipart_threshold: int = 8 << 20,
        multipart_chunksize: int = 8 << 20,
        client: Any = None,
        **writer_options: Any,
    ) -> None:
        owner = "S3SpoolingWriter"
        aliases: dict[str, Any] = {
            name: writer_options.pop(name)
            for name in ("batch_size", "delete_local")
            if name in writer_options
        }
        _check_writer_option_names(owner, writer_options)
        options = _upload_options(
            owner,
            {
                "upload_batch_size": upload_batch_size,
                "remove_on_upload": remove_on_upload,
                "s3_upload_workers": s3_upload_workers,
            },
            aliases,
            max_attempts=max_attempts,
            backoff_seconds=backoff_seconds,
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
        )
        _int_at_least(owner, "local_writer_workers", local_writer_workers, 1)
        try:  # the writer's options fail here, naming this class, before any thread starts
            WriterOptions(out_root=Path(spool_dir), workers=local_writer_workers, **writer_options)
        except ValueError as exc:
            raise ValueError(f"{owner}: {exc}") from None
        except TypeError as exc:
            raise TypeError(f"{owner}: {exc}") from None
        self.upload_queue: queue.Queue[Path] = queue.Queue()
        self.uploader = S3Uploader(
            self.upload_queue, spool_dir, bucket, prefix, endpoint_url=endpoint_url, client=client, **options
        )
        try:
            self.writer = AsyncWriter(
                spool_dir, workers=local_writer_workers, upload_queue=self.upload_queue, **writer_options
            )
        except BaseException:
            self.uploader.close()  # nothing was queued, so nothing can have failed
            raise

    def write(self, key: str | os.PathLike[str], to_save: object, *, copy: bool = False) -> WriteHandle:
        return self.writer.write(key, to_save, copy=copy)

    def write_batch(
        self,
        keys: Sequence[str | os.PathLike[str]],
        batch: object,
        *,
        save: Callable[[Path, Any], None] | None = None,
        suffix: str = "",
        allow_empty: bool = False,
    ) -> WriteHandle:
        return self.writer.write_batch(keys, batch, save=save, suffix=suffix, allow_empty=allow_empty)

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


def _check_writer_option_names(owner: str, options: Mapping[str, Any]) -> None:
    """Refuse, naming `owner`, what is neither one of its own arguments nor an AsyncWriter option."""
    if "workers" in options:
        raise TypeError(
            f"{owner}(workers={options['workers']!r}) is ambiguous: pass local_writer_workers= for the "
            "threads writing the spool, s3_upload_workers= for the threads uploading"
        )
    if "upload_queue" in options:
        raise TypeError(f"{owner}(upload_queue=...): it makes its own queue for its uploader; leave it out")
    if "out_root" in options:
        raise TypeError(f"{owner}(out_root=...): the writer's root is the first argument, spool_dir")
    passed_on = [
        name for name in inspect.signature(AsyncWriter.__init__).parameters
        if name not in ("self", "out_root", "workers", "upload_queue")
    ]  # fmt: skip
    for name in options:
        if name not in passed_on:
            own = [*_own_parameters(S3SpoolingWriter), "batch_size", "delete_local"]
            raise _unexpected(owner, name, [*own, *passed_on])


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` as ("bucket", "some/prefix/"): the prefix exactly as written."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise ValueError(f"{url!r} is not an S3 URL; write it as s3://bucket/prefix/")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix


def verify_prefix(
    bucket: str,
    prefix: str = "",
    *,
    checksums: bool = True,
    workers: int = 8,
    client: Any = None,
    endpoint_url: str | None = None,
) -> VerifyReport:
    """Check the objects under `s3://<bucket>/<prefix>` against the journals uploaded with them
    (`<prefix>.tensorsink/journal-*.jsonl`), without downloading any file but the journals.

    The listing gives each object's size; with `checksums`, a HeadObject (ChecksumMode ENABLED) per
    recorded object gives the CRC-32 the store computed when it received the object, compared with the
    journal's. The report is manifest.verify's, its paths relative to `prefix`: `missing` (recorded,
    not in the bucket), `extra` (in the bucket, not recorded), `size_mismatch`, `checksum_mismatch`,
    `damaged_journal` (as `s3://` URLs of the journals), and in `unreadable` the objects whose CRC-32
    the store cannot give (uploaded without ChecksumAlgorithm="CRC32", or a multipart upload's
    composite checksum), with why. `checked` counts the recorded objects found. Raises
    FileNotFoundError if no journal is stored under the prefix. `client` replaces the boto3 client
    built here (with `endpoint_url`, from boto3's usual credentials); `workers` threads send the HEADs.
    """
    start = time.perf_counter()
    owns_client = client is None
    if client is None:
        config = _import("botocore.config").Config(
            retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=max(10, workers)
        )
        client = _import("boto3").client("s3", endpoint_url=endpoint_url, config=config)
    errors = _import("botocore.exceptions")
    try:
        journal_prefix = f"{prefix}{JOURNAL_DIR}/"
        listed: dict[str, int] = {}
        journals: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for stored in page.get("Contents", []):
                key = stored["Key"]
                if key.startswith(journal_prefix):  # tensorsink's own folder, like the local verify
                    name = key[len(journal_prefix) :]
                    if "/" not in name and fnmatch.fnmatchcase(name, _JOURNALS):
                        journals.append(key)
                else:
                    listed[key[len(prefix) :]] = stored["Size"]
        if not journals:
            hint = (
                f" (the uploads' prefix may be {prefix + '/'!r})"
                if prefix and not prefix.endswith("/")
                else ""
            )
            raise FileNotFoundError(
                f"no journals under s3://{bucket}/{journal_prefix}{hint}; were the files uploaded from an "
                "AsyncWriter(..., manifest=True) by a tensorsink S3Uploader, and its close() called?"
            )
        with tempfile.TemporaryDirectory(prefix="tensorsink-verify-") as copy:
            folder = Path(copy, JOURNAL_DIR)
            folder.mkdir()
            for key in journals:
                body = client.get_object(Bucket=bucket, Key=key)["Body"]
                (folder / key.rsplit("/", 1)[-1]).write_bytes(body.read())
            manifest = Manifest.load(copy)
        here = f"{folder}{os.sep}"
        report = VerifyReport(
            damaged_journal=[
                line.replace(here, f"s3://{bucket}/{journal_prefix}") for line in manifest.damaged
            ]
        )
        recorded = manifest.paths()
        report.extra = sorted(listed.keys() - recorded)

        def check(path: str) -> tuple[str, str] | None:
            if path not in listed:
                # Only a renaming line: a write killed before its rename, not a committed file.
                return ("missing", "") if path in manifest.records else None
            matching = [c for c in manifest.candidates(path) if c["bytes"] == listed[path]]
            if not matching:
                return "size", ""
            if not checksums:
                return None
            try:
                head = client.head_object(Bucket=bucket, Key=prefix + path, ChecksumMode="ENABLED")
            except errors.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return "missing", ""  # removed since the listing
                raise
            crc = head.get("ChecksumCRC32")
            if crc is None:
                return "unreadable", (
                    f"{path}: the store keeps no CRC-32 of it (uploaded without "
                    "ChecksumAlgorithm='CRC32'); only a download can check it"
                )
            if head.get("ChecksumType") == "COMPOSITE" or "-" in crc:
                return "unreadable", (
                    f"{path}: the store keeps a CRC-32 of its multipart upload's parts ({crc}), not of the "
                    "whole object; only a download can check it"
                )
            if not any(c["crc32"] == f"{int.from_bytes(base64.b64decode(crc), 'big'):08x}" for c in matching):
                return "checksum", ""
            return None

        paths = sorted(recorded)
        file_problems(report, paths, check, workers)
        report.checked = sum(1 for path in paths if path in listed)
        report.seconds = time.perf_counter() - start
        return report
    finally:
        if owns_client:
            client.close()
