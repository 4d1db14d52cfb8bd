"""S3Uploader and S3SpoolingWriter against a real S3-compatible server (moto) on loopback.

Faults are injected on the wire: a botocore `before-send` hook answers chosen requests itself (503s,
a HEAD with the wrong size), and a TCP relay in front of the server can be cut to make it vanish.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import queue
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from botocore.awsrequest import AWSResponse  # noqa: E402
from botocore.config import Config  # noqa: E402

from tensorsink import AsyncWriter, SaveFormat  # noqa: E402
from tensorsink.manifest import JOURNAL_DIR  # noqa: E402
from tensorsink.manifest import verify as manifest_verify  # noqa: E402
from tensorsink.upload import (  # noqa: E402
    S3SpoolingWriter,
    S3Uploader,
    UploadError,
    split_s3_url,
    verify_prefix,
)
from tests.support import outputs_in, outputs_under  # noqa: E402

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Fake credentials, and no host configuration leaking in."""
    nowhere = tmp_path_factory.mktemp("aws") / "none"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(nowhere),
        "AWS_SHARED_CREDENTIALS_FILE": str(nowhere),
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def make_client(url: str, attempts: int = 2) -> Any:
    config = Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=2, read_timeout=5)
    return boto3.client("s3", endpoint_url=url, config=config)


@pytest.fixture
def s3(endpoint: str, aws_env: None) -> Iterator[Any]:
    client = make_client(endpoint)
    yield client
    client.close()


@pytest.fixture
def bucket(s3: Any, endpoint: str) -> Iterator[str]:
    s3.create_bucket(Bucket="sink")
    yield "sink"
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(request).close()


def objects(s3: Any, bucket: str, *, journals: bool = False) -> dict[str, bytes]:
    """The bucket's objects; the manifest's journals (there by default) only if asked for."""
    listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    keys = [o["Key"] for o in listed if journals or f"{JOURNAL_DIR}/" not in o["Key"]]
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def local_files(root: Path, *, journals: bool = False) -> dict[str, bytes]:
    paths = root.rglob("*") if journals else outputs_under(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in paths if p.is_file()}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def key_of(request: Any, bucket: str) -> str:
    return unquote(urlsplit(request.url).path).removeprefix(f"/{bucket}/")


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **kwargs: Any) -> Iterator[bytes]:
        yield self.data


def reply(request: Any, status: int, headers: dict[str, str], body: bytes = b"") -> AWSResponse:
    return AWSResponse(request.url, status, headers, _Body(body))


SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"


def save_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def test_every_committed_file_reaches_the_bucket_intact(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str
) -> None:
    uploads: queue.Queue[Path] = queue.Queue()
    uploader = S3Uploader(
        uploads,
        tmp_path,
        bucket,
        "run/",
        endpoint_url=endpoint,
        batch_size=4,
        workers=4,
        multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB,
    )
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, upload_queue=uploads) as writer:
        for i in range(12):
            writer.write(f"small/t{i}", torch.full((100 + i,), float(i)))
        writer.write("big", torch.arange(5 * MiB, dtype=torch.float32))  # 20 MiB: multipart
    uploader.close()

    local = local_files(tmp_path)
    assert len(local) == 13
    assert objects(s3, bucket) == {f"run/{name}": data for name, data in local.items()}
    big = len(local["big.npy"])
    assert big > 20 * MiB
    etag = s3.head_object(Bucket=bucket, Key="run/big.npy")["ETag"]
    assert etag.strip('"').endswith(f"-{math.ceil(big / (5 * MiB))}")  # a multipart upload's ETag
    stats = uploader.stats()
    assert (stats.uploaded, stats.bytes, stats.deleted, stats.failed) == (
        13,
        sum(map(len, local.values())),
        0,
        0,
    )


@pytest.mark.parametrize("delete_local", [True, False])
def test_delete_local_removes_files_only_after_a_confirmed_upload(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str, delete_local: bool
) -> None:
    client = make_client(endpoint)
    seen: list[tuple[str, str, bool]] = []  # (method, key, whether the local file existed then)

    def record(request: Any, **kwargs: Any) -> None:
        key = key_of(request, bucket)
        seen.append((request.method, key, (tmp_path / key).exists()))

    client.meta.events.register("before-send.s3", record)
    uploads: queue.Queue[Path] = queue.Queue()
    datas = {f"d/{i}.bin": random.randbytes(1000 + i) for i in range(20)}
    # The writer is closed first (on leaving the block), then the uploader.
    with (
        S3Uploader(uploads, tmp_path, bucket, client=client, batch_size=8, delete_local=delete_local) as up,
        AsyncWriter(tmp_path, upload_queue=uploads) as writer,
    ):
        writer.write_batch(
            [k.removesuffix(".bin") for k in datas], list(datas.values()), save=save_bytes, suffix=".bin"
        )
    client.close()

    assert objects(s3, bucket) == datas
    assert local_files(tmp_path) == ({} if delete_local else datas)
    assert up.stats().deleted == (len(datas) if delete_local else 0)
    assert {key for _, key, _ in seen if f"{JOURNAL_DIR}/" not in key} == set(datas)
    assert all(existed for _, _, existed in seen)  # never deleted before its PUT, nor before its HEAD
    heads = [key for method, key, _ in seen if method == "HEAD" and f"{JOURNAL_DIR}/" not in key]
    assert sorted(heads) == (sorted(datas) if delete_local else [])


def test_transient_server_errors_are_retried_and_nothing_is_deleted_before_success(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str
) -> None:
    client = make_client(endpoint)
    failures: dict[str, int] = {}
    failed_while_missing: list[str] = []
    lock = threading.Lock()

    def slow_down(request: Any, **kwargs: Any) -> AWSResponse | None:
        """503 SlowDown for the first 3 writes of each key: botocore retries once inside one call,
        so the uploader's own retry is what gets each file through."""
        if request.method not in ("PUT", "POST"):
            return None
        key = key_of(request, bucket)
        with lock:
            failures[key] = failures.get(key, 0) + 1
            if failures[key] > 3:
                return None
        if not (tmp_path / key).exists():
            failed_while_missing.append(key)
        return reply(request, 503, {"Content-Type": "application/xml"}, SLOW_DOWN)

    client.meta.events.register("before-send.s3", slow_down)
    datas = {f"f{i}.bin": random.randbytes(2000) for i in range(6)}
    datas["big.bin"] = random.randbytes(11 * MiB)  # multipart: its CreateMultipartUpload fails first
    uploads: queue.Queue[Path] = queue.Queue()
    uploader = S3Uploader(
        uploads,
        tmp_path,
        bucket,
        client=client,
        delete_local=True,
        max_attempts=4,
        backoff_seconds=0.01,
        multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB,
    )
    with AsyncWriter(tmp_path, upload_queue=uploads) as writer:
        writer.write_batch(
            [k.removesuffix(".bin") for k in datas], list(datas.values()), save=save_bytes, suffix=".bin"
        )
    uploader.close()
    client.close()

    assert objects(s3, bucket) == datas
    assert local_files(tmp_path) == {}
    assert failed_while_missing == []
    stats = uploader.stats()
    assert (stats.uploaded, stats.deleted, stats.failed) == (len(datas), len(datas), 0)
    assert stats.retries >= len(datas)  # every file needed the uploader's retry


def test_an_unconfirmed_upload_keeps_the_local_file(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str
) -> None:
    client = make_client(endpoint)

    def wrong_size(request: Any, **kwargs: Any) -> AWSResponse | None:
        if request.method != "HEAD":
            return None
        return reply(request, 200, {"Content-Length": "1", "ETag": '"x"'})

    client.meta.events.register("before-send.s3", wrong_size)
    uploads: queue.Queue[Path] = queue.Queue()
    uploader = S3Uploader(
        uploads, tmp_path, bucket, client=client, delete_local=True, max_attempts=2, backoff_seconds=0
    )
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, upload_queue=uploads) as writer:
        for i in range(3):
            writer.write(f"x{i}", np.arange(10 + i))
    with pytest.raises(UploadError, match=r"^3 file\(s\) could not be uploaded") as raised:
        uploader.close()
    client.close()
    assert "has 1 bytes" in str(raised.value.__cause__)
    assert sorted(local_files(tmp_path)) == ["x0.npy", "x1.npy", "x2.npy"]
    assert sorted(p.name for p, _ in uploader.failed) == ["x0.npy", "x1.npy", "x2.npy"]
    assert uploader.stats().retries == 3
    with pytest.raises(UploadError):  # close() again: the same error, no hang
        uploader.close()


class Relay:
    """A TCP relay to the server. cut() makes the server vanish for the client: new connections are
    refused and every open one is torn down, as if the machine had gone away."""

    def __init__(self, url: str) -> None:
        self.target = ("127.0.0.1", urlsplit(url).port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.02)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.forwarded = 0  # bytes sent on to the server
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.gone = threading.Event()
        self.acceptor = threading.Thread(target=self.accept, daemon=True)
        self.acceptor.start()

    def accept(self) -> None:
        while not self.gone.is_set():
            try:
                near, _ = self.listener.accept()
            except TimeoutError:
                continue
            far = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [near, far]
            threading.Thread(target=self.pipe, args=(near, far, True), daemon=True).start()
            threading.Thread(target=self.pipe, args=(far, near, False), daemon=True).start()
        self.listener.close()

    def pipe(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
                if count:
                    with self.lock:
                        self.forwarded += len(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        self.gone.set()
        self.acceptor.join()
        with self.lock:
            sockets, self.sockets = self.sockets, []
            for s in sockets:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)  # wakes the relay thread blocked in recv()
                s.close()


def test_a_vanished_server_fails_close_and_loses_no_file(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str
) -> None:
    relay = Relay(endpoint)
    uploads: queue.Queue[Path] = queue.Queue()
    uploader = S3Uploader(
        uploads,
        tmp_path,
        bucket,
        endpoint_url=relay.url,  # the client built by the uploader, with its own timeouts
        workers=4,
        delete_local=True,
        max_attempts=3,
        backoff_seconds=0.01,
        multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB,
    )
    written: dict[str, bytes] = {}
    closed = False
    try:
        with AsyncWriter(tmp_path, upload_queue=uploads) as writer:

            def write(names: list[str], size: int) -> None:
                datas = [random.randbytes(size) for _ in names]
                written.update({f"{n}.bin": d for n, d in zip(names, datas, strict=True)})
                writer.write_batch(names, datas, save=save_bytes, suffix=".bin").result()

            write([f"before/{i}" for i in range(5)], 3000)
            wait_for(lambda: uploader.stats().uploaded == 5, "the first uploads")
            sent = relay.forwarded
            write(["during/big"], 16 * MiB)
            wait_for(lambda: relay.forwarded > sent + 2 * MiB, "the big upload to start")
            relay.cut()
            write([f"after/{i}" for i in range(6)], 3000)
        started = time.monotonic()
        closed = True
        with pytest.raises(UploadError) as raised:
            uploader.close()
        assert time.monotonic() - started < 30
    finally:
        relay.cut()
        if not closed:
            uploader.close()

    assert raised.value.__cause__ is uploader.first_error
    failed = {p.relative_to(tmp_path).as_posix() for p, _ in uploader.failed}
    assert {f"after/{i}.bin" for i in range(6)} <= failed
    local, stored = local_files(tmp_path), objects(s3, bucket)  # the server itself is still up
    assert failed <= set(local)  # kept on disk
    for name, data in written.items():
        assert local.get(name) == data or stored.get(name) == data, f"{name} was lost"
    assert all(local[name] == data for name, data in written.items() if name in local)
    assert not any(name.startswith("after/") for name in stored)
    assert all(stored[f"before/{i}.bin"] == written[f"before/{i}.bin"] for i in range(5))


def test_spooling_writer_closes_the_writer_before_the_uploader(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str
) -> None:
    def slow_save(path: Path, data: bytes) -> None:
        time.sleep(0.3)  # still being written when close() starts: an uploader closed first would miss it
        path.write_bytes(data)

    spool = tmp_path / "spool"
    with S3SpoolingWriter(
        spool,
        bucket,
        "out/",
        endpoint_url=endpoint,
        upload_batch_size=3,
        remove_on_upload=True,
        save_format="npy",
    ) as sink:
        for i in range(7):
            sink.write(f"s/{i}", torch.full((50,), float(i)))
        sink.write_batch(["b/0", "b/1"], torch.arange(20.0).reshape(2, 10))
        sink.write_batch(["late/0", "late/1"], [b"zero", b"one"], save=slow_save, suffix=".bin")

    stored = objects(s3, bucket)
    assert sorted(stored) == sorted(
        [f"out/s/{i}.npy" for i in range(7)]
        + ["out/b/0.npy", "out/b/1.npy", "out/late/0.bin", "out/late/1.bin"]
    )
    for i in range(7):
        assert np.array_equal(
            np.load(io.BytesIO(stored[f"out/s/{i}.npy"])), np.full(50, float(i), np.float32)
        )
    assert np.array_equal(np.load(io.BytesIO(stored["out/b/1.npy"])), np.arange(10.0, 20.0, dtype=np.float32))
    assert (stored["out/late/0.bin"], stored["out/late/1.bin"]) == (b"zero", b"one")
    assert local_files(spool) == {}
    assert sink.uploader.stats().deleted == 11


def test_spooling_writer_raises_the_writers_failure_first(tmp_path: Path, bucket: str, endpoint: str) -> None:
    client = make_client(endpoint)

    def denied(request: Any, **kwargs: Any) -> AWSResponse | None:
        body = b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>"
        return reply(request, 403, {}, body) if request.method == "PUT" else None

    client.meta.events.register("before-send.s3", denied)

    def broken(path: Path, data: bytes) -> None:
        raise ValueError("cannot encode")

    sink = S3SpoolingWriter(tmp_path, bucket, client=client)
    sink.write("ok", torch.zeros(3)).result()
    sink.write_batch(["bad"], [b"x"], save=broken, suffix=".bin")
    with pytest.raises(ValueError, match="cannot encode"):
        sink.close()
    client.close()
    assert (sink.uploader.stats().failed, sink.uploader.stats().retries) == (1, 0)  # AccessDenied: final
    assert (tmp_path / "ok.pt").exists()


def test_boto3_is_optional(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    loaded = "[m for m in sys.modules if m.startswith(('boto', 'tensorsink.upload'))]"
    subprocess.run(
        [sys.executable, "-c", f"import sys, tensorsink; assert not {loaded}, {loaded}"], check=True
    )
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ImportError, match=r"pip install 'tensorsink\[s3\]'"):
        S3Uploader(queue.Queue(), tmp_path, "bucket")


def test_rewrites_of_one_key_with_remove_on_upload_leave_the_latest_in_the_bucket(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str
) -> None:
    """Each rewrite queues its path again; once an upload took the latest version and removed the
    file, the entries left behind are done, not failures."""
    spool = tmp_path / "spool"
    with S3SpoolingWriter(
        spool, bucket, "run/", endpoint_url=endpoint, upload_batch_size=2, remove_on_upload=True,
        save_format="npy", durability="none", local_writer_workers=8,
    ) as sink:  # fmt: skip
        for i in range(20):
            sink.write("k", torch.full((64,), float(i))).result()
    assert local_files(spool) == {}
    stored = objects(s3, bucket)
    assert list(stored) == ["run/k.npy"]
    assert np.array_equal(np.load(io.BytesIO(stored["run/k.npy"])), np.full(64, 19.0, np.float32))
    assert sink.uploader.stats().failed == 0


def test_a_queued_file_gone_before_its_first_upload_is_still_a_failure(
    tmp_path: Path, bucket: str, endpoint: str
) -> None:
    uploads: queue.Queue[Path] = queue.Queue()
    uploader = S3Uploader(uploads, tmp_path, bucket, endpoint_url=endpoint, delete_local=True)
    uploads.put(tmp_path / "never-there.npy")
    with pytest.raises(UploadError, match="never-there"):
        uploader.close()


def test_a_rewrite_landing_while_its_predecessor_is_removed_is_kept(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The removal after a confirmed upload cannot take a newer version with it, whenever it lands."""
    import tensorsink.upload as upload_module

    path = tmp_path / "k.bin"
    path.write_bytes(b"version 1")
    real_rename = os.rename

    def rewrite_first(source: Any, target: Any) -> None:
        if Path(source) == path:  # a rewrite lands just before the uploaded file is moved aside
            newer = tmp_path / "newer.tmp"
            newer.write_bytes(b"version 2, larger")
            os.replace(newer, path)
        real_rename(source, target)

    monkeypatch.setattr(upload_module.os, "rename", rewrite_first)
    uploads: queue.Queue[Path] = queue.Queue()
    uploader = S3Uploader(uploads, tmp_path, bucket, endpoint_url=endpoint, delete_local=True)
    uploads.put(path)
    uploader.close()
    monkeypatch.undo()
    assert path.read_bytes() == b"version 2, larger"  # kept, for its own queue entry to upload
    assert objects(s3, bucket) == {"k.bin": b"version 1"}
    assert uploader.stats().deleted == 0
    assert sorted(p.name for p in outputs_in(tmp_path)) == ["k.bin"]


def crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def test_every_upload_stores_the_whole_files_crc32(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str
) -> None:
    """Multipart too: the store's CRC-32 is the whole object's, the one the manifest records."""
    datas = {"small.bin": random.randbytes(3000), "big.bin": random.randbytes(11 * MiB)}
    uploads: queue.Queue[Path] = queue.Queue()
    with (
        S3Uploader(
            uploads, tmp_path, bucket, endpoint_url=endpoint,
            multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB,
        ),
        AsyncWriter(tmp_path, upload_queue=uploads) as writer,
    ):  # fmt: skip
        writer.write_batch(
            [k.removesuffix(".bin") for k in datas], list(datas.values()), save=save_bytes, suffix=".bin"
        )
    for key, data in datas.items():
        head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        assert head["ChecksumCRC32"] == crc32_b64(data), key
    assert (
        s3.head_object(Bucket=bucket, Key="big.bin", ChecksumMode="ENABLED")["ChecksumType"] == "FULL_OBJECT"
    )


def test_one_set_of_upload_names_the_other_accepted(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str
) -> None:
    uploads: queue.Queue[Path] = queue.Queue()
    with S3Uploader(
        uploads, tmp_path, bucket, endpoint_url=endpoint, batch_size=3, workers=2, delete_local=True
    ) as up:
        assert (up.upload_batch_size, up.s3_upload_workers, up.remove_on_upload) == (3, 2, True)
        assert (up.batch_size, up.delete_local) == (3, True)
    with S3Uploader(
        uploads, tmp_path, bucket, endpoint_url=endpoint, upload_batch_size=5, s3_upload_workers=1,
        remove_on_upload=False,
    ) as up:  # fmt: skip
        assert (up.upload_batch_size, up.s3_upload_workers, up.remove_on_upload) == (5, 1, False)
    with S3SpoolingWriter(
        tmp_path / "spool", bucket, endpoint_url=endpoint, delete_local=True, batch_size=2
    ) as sink:
        assert (sink.uploader.remove_on_upload, sink.uploader.upload_batch_size) == (True, 2)
        sink.write("a", torch.zeros(2))
    assert local_files(tmp_path / "spool") == {}
    assert list(objects(s3, bucket)) == ["a.pt"]


OPTION_ERRORS = [  # (class, keyword arguments, exception, message)
    (S3Uploader, {"workers": 2, "s3_upload_workers": 3}, TypeError,
     r"^S3Uploader\(s3_upload_workers=\.\.\., workers=\.\.\.\): workers is another name for s3_upload_"),
    (S3Uploader, {"delete_local": True, "remove_on_upload": False}, TypeError,
     r"^S3Uploader\(remove_on_upload=\.\.\., delete_local=\.\.\.\)"),
    (S3Uploader, {"batch_size": 0}, ValueError, r"^S3Uploader: batch_size=0 is not valid; use an int >= 1"),
    (S3Uploader, {"s3_upload_workers": 0}, ValueError, r"^S3Uploader: s3_upload_workers=0 is not valid"),
    (S3Uploader, {"delete_local": "yes"}, ValueError,
     r"^S3Uploader: delete_local='yes' is not valid; use True or False"),
    (S3Uploader, {"backoff_seconds": -1}, ValueError, r"^S3Uploader: backoff_seconds=-1"),
    (S3Uploader, {"max_attempt": 3}, TypeError,
     r"^S3Uploader\(\) got an unexpected keyword argument 'max_attempt'; did you mean 'max_attempts'"),
    (S3SpoolingWriter, {"upload_batch_size": 2, "batch_size": 3}, TypeError,
     r"^S3SpoolingWriter\(upload_batch_size=\.\.\., batch_size=\.\.\.\)"),
    (S3SpoolingWriter, {"batch_size": 0}, ValueError, r"^S3SpoolingWriter: batch_size=0"),
    (S3SpoolingWriter, {"workers": 2}, TypeError,
     r"^S3SpoolingWriter\(workers=2\) is ambiguous: pass local_writer_workers=.* s3_upload_workers="),
    (S3SpoolingWriter, {"local_writer_workers": 0}, ValueError,
     r"^S3SpoolingWriter: local_writer_workers=0 is not valid"),
    (S3SpoolingWriter, {"durability": "sometimes"}, ValueError,
     r"^S3SpoolingWriter: durability='sometimes' is not valid"),
    (S3SpoolingWriter, {"remove_on_uplaod": True}, TypeError,
     r"^S3SpoolingWriter\(\) got an unexpected keyword argument 'remove_on_uplaod'; did you mean 'remove_"),
    (S3SpoolingWriter, {"upload_queue": queue.Queue()}, TypeError,
     r"^S3SpoolingWriter\(upload_queue=\.\.\.\)"),
]  # fmt: skip


def upload_threads() -> int:
    return sum(t.name.startswith("tensorsink-upload") for t in threading.enumerate())


@pytest.mark.parametrize(("cls", "kwargs", "error", "message"), OPTION_ERRORS)
def test_upload_option_errors_name_the_class_and_the_argument_typed(
    tmp_path: Path, cls: type, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    before = upload_threads()
    spool = tmp_path / "spool"
    with pytest.raises(error, match=message) as raised:
        cls(queue.Queue(), spool, "b", **kwargs) if cls is S3Uploader else cls(spool, "b", **kwargs)
    assert "WriterOptions" not in str(raised.value)
    assert upload_threads() == before, "a refused uploader starts no thread"
    assert not spool.exists()


def write_with_manifest(sink: S3SpoolingWriter) -> dict[str, bytes]:
    datas = {f"deep/er/{i}.bin": random.randbytes(500 + i) for i in range(5)}
    datas |= {f"top{i}.bin": random.randbytes(100) for i in range(3)}
    sink.write_batch(
        [k.removesuffix(".bin") for k in datas], list(datas.values()), save=save_bytes, suffix=".bin"
    )
    sink.write("tensor", torch.arange(10.0))
    return datas


def test_the_journal_follows_its_files_and_the_spool_is_left_empty(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str
) -> None:
    client = make_client(endpoint)
    puts: list[str] = []  # the keys of the upload requests, in the order they were sent
    client.meta.events.register(
        "before-send.s3",
        lambda request, **_: puts.append(key_of(request, bucket)) if request.method == "PUT" else None,
    )
    spool = tmp_path / "spool"
    with S3SpoolingWriter(spool, bucket, "run/", client=client, remove_on_upload=True, manifest=True) as sink:
        datas = write_with_manifest(sink)
    client.close()

    assert list(spool.iterdir()) == [], "no file, no journal, no empty folder is left in the spool"
    stored = objects(s3, bucket, journals=True)
    journals = [k for k in stored if k.startswith("run/.tensorsink/journal-") and k.endswith(".jsonl")]
    assert len(journals) == 1
    assert {f"run/{k}" for k in datas} | {"run/tensor.pt"} | set(journals) == set(stored)
    assert puts.index(journals[0]) > max(puts.index(f"run/{k}") for k in [*datas, "tensor.pt"])
    assert sink.uploader.stats().journals == 1
    lines = stored[journals[0]].decode().splitlines()
    assert {json.loads(line)["path"] for line in lines} == {*datas, "tensor.pt"}

    report = verify_prefix(bucket, "run/", endpoint_url=endpoint)
    assert report.ok, report
    assert report.checked == len(datas) + 1
    from tensorsink.__main__ import main

    for root in (f"s3://{bucket}/run/", f"s3://{bucket}/run"):  # a root is a folder, "/" or not
        assert main(["verify", root, "--endpoint-url", endpoint, "--quiet"]) == 0


def test_a_kept_spool_keeps_its_journal_and_both_verify(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str
) -> None:
    spool = tmp_path / "spool"
    with S3SpoolingWriter(spool, bucket, "run/", endpoint_url=endpoint, manifest=True) as sink:
        datas = write_with_manifest(sink)
    local = local_files(spool)
    assert {f"run/{k}": v for k, v in local.items()} == objects(s3, bucket)  # the journal too, byte for byte
    assert manifest_verify(spool).ok
    assert verify_prefix(bucket, "run/", endpoint_url=endpoint).checked == len(datas) + 1


def test_a_failed_upload_keeps_the_journal_out_of_the_bucket(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str
) -> None:
    client = make_client(endpoint)

    def deny_one(request: Any, **kwargs: Any) -> AWSResponse | None:
        if request.method == "PUT" and key_of(request, bucket) == "top1.bin":
            return reply(request, 403, {}, b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>")
        return None

    client.meta.events.register("before-send.s3", deny_one)
    spool = tmp_path / "spool"
    sink = S3SpoolingWriter(spool, bucket, client=client, remove_on_upload=True, manifest=True)
    write_with_manifest(sink)
    with pytest.raises(
        UploadError, match=r"1 file\(s\) .* the 1 journal\(s\) in .* were kept there, not uploaded"
    ):
        sink.close()
    client.close()
    assert not [k for k in objects(s3, bucket, journals=True) if ".tensorsink" in k]
    assert sorted(local_files(spool, journals=True)) == [
        f".tensorsink/{p.name}" for p in (spool / ".tensorsink").iterdir()
    ] + ["top1.bin"]
    assert not (spool / "deep").exists(), "the folders emptied by removals are gone"


def test_verify_prefix_reports_what_the_bucket_lacks_or_got_wrong(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str
) -> None:
    spool = tmp_path / "spool"
    with S3SpoolingWriter(spool, bucket, "run/", endpoint_url=endpoint, manifest=True) as sink:
        write_with_manifest(sink)
    s3.delete_object(Bucket=bucket, Key="run/top0.bin")
    s3.put_object(Bucket=bucket, Key="run/stray.bin", Body=b"x", ChecksumAlgorithm="CRC32")
    s3.put_object(Bucket=bucket, Key="run/top1.bin", Body=b"shorter", ChecksumAlgorithm="CRC32")
    same_size = bytes(len(local_files(spool)["top2.bin"]))
    s3.put_object(Bucket=bucket, Key="run/top2.bin", Body=same_size, ChecksumAlgorithm="CRC32")
    # No checksum sent: the store keeps none.
    bare = boto3.client(
        "s3", endpoint_url=endpoint, config=Config(request_checksum_calculation="when_required")
    )
    bare.put_object(Bucket=bucket, Key="run/tensor.pt", Body=local_files(spool)["tensor.pt"])
    bare.close()

    client = make_client(endpoint)
    sent: list[tuple[str, str]] = []
    client.meta.events.register(
        "before-send.s3", lambda request, **_: sent.append((request.method, key_of(request, bucket)))
    )
    report = verify_prefix(bucket, "run/", client=client)
    client.close()
    assert report.missing == ["top0.bin"]
    assert report.extra == ["stray.bin"]
    assert report.size_mismatch == ["top1.bin"]
    assert report.checksum_mismatch == ["top2.bin"]
    assert len(report.unreadable) == 1
    assert report.unreadable[0].startswith("tensor.pt: the store keeps no CRC-32 of it")
    assert not report.ok
    assert report.checked == 8
    gets = [key for method, key in sent if method == "GET" and key != f"/{bucket}"]  # but the listing
    assert gets
    assert all(key.startswith("run/.tensorsink/journal-") for key in gets), "no payload downloaded"
    headed = ["top2.bin", "tensor.pt"] + [f"deep/er/{i}.bin" for i in range(5)]  # recorded, of their size
    assert sorted(key for method, key in sent if method == "HEAD") == sorted(f"run/{k}" for k in headed)
    sizes_only = verify_prefix(bucket, "run/", endpoint_url=endpoint, checksums=False)
    assert (sizes_only.checksum_mismatch, sizes_only.unreadable) == ([], [])


def test_verify_prefix_cannot_confirm_a_composite_checksum(
    tmp_path: Path, bucket: str, endpoint: str
) -> None:
    """A multipart upload made without a full-object checksum keeps a CRC of its parts' CRCs ("-N"
    on AWS): not the file's CRC-32, so verify says it cannot check it rather than calling it wrong."""
    with S3SpoolingWriter(tmp_path, bucket, endpoint_url=endpoint, manifest=True) as sink:
        sink.write_batch(["a"], [b"payload"], save=save_bytes, suffix=".bin")
    client = make_client(endpoint)

    def composite(request: Any, **kwargs: Any) -> AWSResponse | None:
        if request.method != "HEAD":
            return None
        headers = {
            "Content-Length": "7",
            "x-amz-checksum-crc32": "AAAAAA==-2",
            "x-amz-checksum-type": "COMPOSITE",
        }
        return reply(request, 200, headers)

    client.meta.events.register("before-send.s3", composite)
    report = verify_prefix(bucket, client=client)
    client.close()
    assert report.checksum_mismatch == []
    assert len(report.unreadable) == 1
    assert report.unreadable[0].startswith("a.bin: the store keeps a CRC-32 of its multipart upload's parts")


def test_verify_prefix_without_journals_says_so(s3: Any, bucket: str, endpoint: str) -> None:
    s3.put_object(Bucket=bucket, Key="run/a.bin", Body=b"a")
    with pytest.raises(FileNotFoundError, match=r"no journals under s3://sink/run\.tensorsink/ .*'run/'"):
        verify_prefix(bucket, "run", endpoint_url=endpoint)


def test_split_s3_url() -> None:
    assert split_s3_url("s3://bucket/run-7/") == ("bucket", "run-7/")
    assert split_s3_url("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="not an S3 URL"):
        split_s3_url("/local/path")


def test_the_command_line_verifies_a_bucket_prefix(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tensorsink.__main__ import main

    with S3SpoolingWriter(tmp_path / "spool", bucket, "run/", endpoint_url=endpoint, manifest=True) as sink:
        datas = write_with_manifest(sink)
    assert main(["verify", f"s3://{bucket}/run/", "--endpoint-url", endpoint]) == 0
    assert f"of {len(datas) + 1:,} files" in capsys.readouterr().out
    s3.delete_object(Bucket=bucket, Key="tensor.pt".join(["run/", ""]))
    assert main(["verify", f"s3://{bucket}/run/", "--endpoint-url", endpoint]) == 1
    assert "missing: tensor.pt" in capsys.readouterr().out
    assert main(["verify", f"s3://{bucket}/elsewhere/", "--endpoint-url", endpoint]) == 2


def test_shards_and_their_list_reach_the_bucket_intact(
    tmp_path: Path, s3: Any, bucket: str, endpoint: str
) -> None:
    from tensorsink.shards import ShardWriter

    uploads: queue.Queue[Path] = queue.Queue()
    uploader = S3Uploader(uploads, tmp_path, bucket, "run/", endpoint_url=endpoint)
    with ShardWriter(tmp_path, save_format="npy", shard_samples=10, upload_queue=uploads) as writer:
        writer.write_batch(
            [f"s{i}" for i in range(25)], torch.arange(25 * 8, dtype=torch.float32).reshape(25, 8)
        )
    uploader.close()
    local = local_files(tmp_path)
    assert sorted(name.rpartition(".")[2] for name in local) == ["json", "tar", "tar", "tar"]
    assert objects(s3, bucket) == {f"run/{name}": data for name, data in local.items()}
