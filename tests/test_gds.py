"""kvikio's device-direct path on a real GPU (marker `gpu`; `gds` where GPUDirect Storage must work).

The same rules as tests/test_cuda.py: every value is produced into a poisoned buffer behind a long
sleep on the producer's stream (the producer is checked busy at write()), and data is drawn per test.
Without GPUDirect Storage kvikio writes by its own or libcufile's POSIX path ("kvikio-posix"); these
tests run on either path, and on a GDS host they exercise GDS itself.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tensorsink import AsyncWriter, SaveFormat
from tensorsink.backends import probe
from tests.support import assert_same, random_tensor, read_back
from tests.test_cuda import (
    POISON,
    check_a_waiting_worker_sleeps,
    check_copy_under_a_graph_replay,
    check_source_is_kept_alive,
    late,
    late_tensor,
    pattern,
    report,
    seed_of,
    sleep_clock_property,  # noqa: F401  # autouse: the calibrated sleep rate in the JUnit record
    still_busy,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("kvikio") is None, reason="needs the gpu extra (kvikio)"),
]
ALIGN = 4096
#: The writers' pinned pool: small, so that pinning it (on the writer's pin thread) and unpinning it
#: cost little CPU time wherever they land. The writes here stage a few MiB at most.
POOL_BYTES = 64 << 20


@pytest.fixture(scope="module")
def verdict(tmp_path_factory: pytest.TempPathFactory) -> probe.Verdict:
    """What the probe finds for the filesystem under the tests' temporary folders."""
    found = probe.verdict_for(str(tmp_path_factory.getbasetemp()), 60)
    if not found.kvikio_works:
        pytest.skip(f"kvikio cannot write here: {found.reason}")
    return found


def gds_ruled_out() -> str | None:
    """Why GPUDirect Storage proper cannot carry bytes on this host, or None if it might: no
    nvidia-fs module, and libcufile not configured for the kernel's own PCI P2PDMA."""
    if os.path.exists("/proc/driver/nvidia-fs"):
        return None
    config = os.environ.get("CUFILE_ENV_PATH_JSON", "/etc/cufile.json")
    try:
        text = Path(config).read_text()
    except OSError:
        text = ""
    if re.search(r'"use_pci_p2pdma"\s*:\s*true', text):
        return None
    return "no nvidia-fs module (/proc/driver/nvidia-fs) and no P2PDMA in the cuFile configuration"


def kvikio_writer(root: Path, save_format: SaveFormat, **kwargs: Any) -> AsyncWriter:
    """A writer that has decided for kvikio before its first write (writes before the verdict would
    take the pinned path)."""
    kwargs.setdefault("align", ALIGN)
    kwargs.setdefault("durability", "file")
    kwargs.setdefault("pinned_pool_bytes", POOL_BYTES)
    writer = AsyncWriter(root, save_format, backend="kvikio", **kwargs)
    assert writer.wait_backend(60) == "kvikio"
    return writer


def posix_writer(root: Path, save_format: SaveFormat, **kwargs: Any) -> AsyncWriter:
    kwargs.setdefault("align", ALIGN)
    kwargs.setdefault("durability", "file")
    kwargs.setdefault("pinned_pool_bytes", POOL_BYTES)
    return AsyncWriter(root, save_format, backend="posix", **kwargs)


def pinned_kvikio_writer(root: Path, save_format: SaveFormat, **kwargs: Any) -> AsyncWriter:
    """kvikio_writer, returned once its pool is pinned: a kvikio writer pins it only when a write
    first needs it, and a device-direct warm-up write never does, so that pinning's CPU time could
    land in a timed wait. Stager.pool pins it now and waits for its pin thread (no public call does)."""
    writer = kvikio_writer(root, save_format, **kwargs)
    assert writer._stager.pool.capacity > 0
    return writer


def aligned_buffer(nbytes: int, offset: int = 0) -> torch.Tensor:
    """A poisoned uint8 CUDA tensor whose address is `offset` past a multiple of 4096."""
    raw = torch.full((nbytes + 2 * ALIGN,), POISON, dtype=torch.uint8, device="cuda")
    start = -raw.data_ptr() % ALIGN + offset
    view = raw[start : start + nbytes]
    assert view.data_ptr() % ALIGN == offset
    return view


def _late_layout(
    layout: str, stream: torch.cuda.Stream, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(what to write, its values on the host, its base buffer), produced by `stream` after a sleep."""
    if layout == "transposed":
        target, expected = late_tensor(stream, (512, 640), torch.bfloat16, seed)
        return target.t(), expected.t(), target
    count = (1 << 20) - (3 if layout == "unaligned" else 0)
    expected = random_tensor((count,), torch.float32, seed)
    source = expected.cuda()
    target = aligned_buffer(count * 4, offset=12 if layout == "unaligned" else 0).view(torch.float32)
    torch.cuda.synchronize()
    late(stream, target, source, 0.2)
    return target, expected, target


def _stored(path: Path, save_format: SaveFormat) -> Any:
    stored = read_back(path, save_format)
    return stored["arr_0"] if isinstance(stored, dict) else stored


def _payload_backends(by_backend: dict[str, int], verdict: probe.Verdict, nbytes: int) -> None:
    """kvikio's bytes are under the probe's label; heads and tails written from host may be "posix"."""
    assert verdict.label in by_backend, by_backend
    assert set(by_backend) <= {verdict.label, "posix"}, by_backend
    assert sum(by_backend.values()) == nbytes


@pytest.mark.parametrize("save_format", [SaveFormat.NUMPY_NPY, SaveFormat.SAFETENSORS])
@pytest.mark.parametrize("layout", ["aligned", "unaligned", "transposed"])
def test_kvikio_and_pinned_paths_give_byte_identical_files(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    verdict: probe.Verdict,
    save_format: SaveFormat,
    layout: str,
) -> None:
    if layout == "transposed" and save_format is SaveFormat.NUMPY_NPY:
        pytest.skip("numpy has no bfloat16")
    seed = seed_of(request)
    files: dict[str, bytes] = {}
    for backend, make in (("kvikio", kvikio_writer), ("posix", posix_writer)):
        producer = torch.cuda.Stream()
        with make(tmp_path / backend, save_format) as writer:
            value, expected, _ = _late_layout(layout, producer, seed)
            with torch.cuda.stream(producer):  # write() orders after the caller's current stream
                still_busy(producer, "at write()")
                future = writer.write("x", value)
                still_busy(producer, "when write() returned")
            (path,) = future.result()
        assert_same(_stored(path, save_format), expected)
        files[backend] = path.read_bytes()
        nbytes = value.numel() * value.element_size()
        if backend == "kvikio":
            _payload_backends(writer.stats().bytes_by_backend, verdict, nbytes)
        else:
            assert writer.stats().bytes_by_backend == {"posix": nbytes}
    assert files["kvikio"] == files["posix"]


def test_mapping_with_host_and_device_tensors_through_kvikio(
    tmp_path: Path, request: pytest.FixtureRequest, verdict: probe.Verdict
) -> None:
    seed = seed_of(request)
    files = {}
    for backend, make in (("kvikio", kvikio_writer), ("posix", posix_writer)):
        producer = torch.cuda.Stream()
        gpu_expected = random_tensor((1000,), torch.float32, seed)
        b_expected = random_tensor((3,), torch.float32, seed + 1)
        cpu = random_tensor((7,), torch.int64, seed + 2)
        gpu, b = aligned_buffer(4000).view(torch.float32), aligned_buffer(12, 16).view(torch.float32)
        with make(tmp_path / backend, SaveFormat.SAFETENSORS) as writer:
            late(producer, gpu, gpu_expected.cuda(), 0.2)
            late(producer, b, b_expected.cuda(), 0.01)
            with torch.cuda.stream(producer):
                still_busy(producer, "at write()")
                (path,) = writer.write("m", {"gpu": gpu, "cpu": cpu, "b": b}).result()
        stored = read_back(path, SaveFormat.SAFETENSORS)
        assert_same(stored["gpu"], gpu_expected)
        assert_same(stored["cpu"], cpu)
        assert_same(stored["b"], b_expected)
        files[backend] = path.read_bytes()
    assert files["kvikio"] == files["posix"]


#: Odd sizes at odd addresses, several to a 4 KiB block of the file: (name, count, dtype, offset).
ODD = [
    ("one", 1, torch.uint8, 1),
    ("odd", 4097, torch.uint8, 3),
    ("half", 12345, torch.float16, 2),
    ("tiny", 3, torch.int32, 4),
    ("wide", 3 * 1000, torch.float32, 0),
    ("bf", 777, torch.bfloat16, 6),
    ("big", (1 << 20) + 5, torch.int8, 5),
    ("last", 2, torch.int64, 8),
]


@pytest.mark.parametrize("align", [None, ALIGN])
def test_odd_sized_unaligned_mappings(
    tmp_path: Path, request: pytest.FixtureRequest, verdict: probe.Verdict, align: int | None
) -> None:
    """Odd-sized payloads from odd device addresses, packed back to back as safetensors lays them
    out, so that several share a 4 KiB block of the file (the first one starts on a block boundary
    with align=4096, off one with align=None): kvikio writes only whole blocks and the shared ones go
    from host memory, and the files must equal the pinned path's, four times over."""
    seed = seed_of(request)
    for round_ in range(4):
        files = {}
        expected: dict[str, torch.Tensor] = {}
        for backend, make in (("kvikio", kvikio_writer), ("posix", posix_writer)):
            producer = torch.cuda.Stream()
            with make(tmp_path / backend, SaveFormat.SAFETENSORS, align=align) as writer:
                values = {}
                for k, (name, count, dtype, offset) in enumerate(ODD):
                    host = random_tensor((count,), dtype, seed + 100 * round_ + k)
                    target = aligned_buffer(count * dtype.itemsize, offset).view(dtype)
                    late(producer, target, host.cuda(), 0.01 if k else 0.2)
                    values[name], expected[name] = target, host
                with torch.cuda.stream(producer):
                    still_busy(producer, "at write()")
                    (path,) = writer.write(f"odd{round_}", values).result()
            stored = read_back(path, SaveFormat.SAFETENSORS)
            for name, host in expected.items():
                assert_same(stored[name], host)
            files[backend] = path.read_bytes()
        assert files["kvikio"] == files["posix"], f"round {round_}"


def test_bytes_by_backend_names_the_path_that_carried_them(
    tmp_path: Path, request: pytest.FixtureRequest, verdict: probe.Verdict
) -> None:
    """kvikio's bytes count as "gds" only where the probe saw GPUDirect Storage carry bytes, else as
    "kvikio-posix" (its compat path); backend="auto" takes kvikio only for GDS."""
    report(request, "verdict", f"{verdict.label}: {verdict.reason}")
    report(request, "probe_report", json.dumps(verdict.report, default=str))
    assert verdict.label in ("gds", "kvikio-posix")
    assert (verdict.label == "gds") is verdict.gds
    ruled_out = gds_ruled_out()
    if ruled_out is not None:
        assert not verdict.gds, f"the probe claims GDS although {ruled_out}"
        assert verdict.label == "kvikio-posix"
    seed = seed_of(request)
    nbytes = 4 << 20
    for backend in ("kvikio", "auto"):
        producer = torch.cuda.Stream()
        with AsyncWriter(
            tmp_path / backend,
            SaveFormat.NUMPY_NPY,
            align=ALIGN,
            backend=backend,
            pinned_pool_bytes=POOL_BYTES,
        ) as writer:
            chosen = writer.wait_backend(60)
            target = aligned_buffer(nbytes)
            source = pattern(nbytes, seed)
            expected = source.cpu()
            late(producer, target, source, 0.2)
            with torch.cuda.stream(producer):
                still_busy(producer, "at write()")
                (path,) = writer.write("x", target).result()
        assert_same(_stored(path, SaveFormat.NUMPY_NPY), expected)
        by_backend = writer.stats().bytes_by_backend
        report(request, f"{backend}_bytes_by_backend", json.dumps(by_backend))
        assert "kvikio" not in by_backend, "the labels are 'gds' and 'kvikio-posix' now"
        if backend == "kvikio" or verdict.gds:
            assert chosen == "kvikio"
            _payload_backends(by_backend, verdict, nbytes)
        else:
            assert chosen == "posix", "backend='auto' took kvikio without GPUDirect Storage"
            assert by_backend == {"posix": nbytes}
        if not verdict.gds:
            assert "gds" not in by_backend


class _Injection:
    """What the watched handles share: how pwrite #2 fails, the calls, the handles, what went wrong."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls: list[int] = []
        self.handles: list[_WatchedCuFile] = []
        self.problems: list[str] = []


class _LateFuture:
    """Stands for kvikio's IOFuture: the real pwrite starts after `delay` on a thread of its own
    (so it is surely in flight when a later one fails), or fails on get() if `fail`."""

    def __init__(self, handle: _WatchedCuFile, args: tuple[Any, ...], delay: float, fail: bool) -> None:
        self._finished = threading.Event()
        self._result: int | None = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(handle, args, delay, fail), daemon=True)
        self.thread.start()

    def _run(self, handle: _WatchedCuFile, args: tuple[Any, ...], delay: float, fail: bool) -> None:
        try:
            time.sleep(delay)
            if handle.was_closed:
                handle.injection.problems.append("a kvikio write started after its handle was closed")
                raise OSError(errno.EBADF, "the handle was closed")
            if fail:
                raise OSError(errno.EIO, "injected kvikio failure (get)")
            self._result = handle.real.pwrite(*args).get()
        except BaseException as exc:
            self._error = exc
        finally:
            self._finished.set()

    def done(self) -> bool:
        return self._finished.is_set()

    def get(self) -> int:
        self._finished.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class _WatchedCuFile:
    """kvikio.CuFile, with pwrite #2 failing (at the call, or on get()) and close() checked."""

    def __init__(self, real_class: Any, injection: _Injection, *args: Any, **kwargs: Any) -> None:
        self.real = real_class(*args, **kwargs)
        self.injection = injection
        self.futures: list[_LateFuture] = []
        self.was_closed = False
        injection.handles.append(self)

    def pwrite(
        self, buf: Any, size: int | None = None, file_offset: int = 0, task_size: int | None = None
    ) -> _LateFuture:
        self.injection.calls.append(file_offset)
        number = len(self.injection.calls)
        if number == 2 and self.injection.mode == "call":
            raise OSError(errno.EIO, "injected kvikio failure (call)")
        future = _LateFuture(self, (buf, size, file_offset, task_size), 0.2 * number, number == 2)
        self.futures.append(future)
        return future

    def close(self) -> None:
        pending = sum(not future.done() for future in self.futures)
        if pending:
            self.injection.problems.append(f"the handle was closed with {pending} kvikio write(s) in flight")
        self.was_closed = True
        self.real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _mentions(error: BaseException | None, text: str) -> bool:
    while error is not None:
        if text in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@pytest.mark.parametrize("mode", ["call", "get"])
def test_kvikio_failure_at_the_second_pwrite_leaves_no_write_in_flight(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    verdict: probe.Verdict,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    """pwrite #2 of a file fails while #1 (and #3) are still writing: the writer waits for every one
    of them before it closes the handle, fails the write, and leaves nothing in the folder."""
    import kvikio

    injection = _Injection(mode)
    monkeypatch.setattr(kvikio, "CuFile", functools.partial(_WatchedCuFile, kvikio.CuFile, injection))
    seed = seed_of(request)
    root = tmp_path / "out"
    producer = torch.cuda.Stream()
    writer = kvikio_writer(root, SaveFormat.SAFETENSORS)
    values = {}
    for k in range(3):
        target = aligned_buffer(4 << 20)
        late(producer, target, pattern(4 << 20, seed + k), 0.2 if k == 0 else 0.01)
        values[f"v{k}"] = target
    with torch.cuda.stream(producer):
        still_busy(producer, "at write()")
        future = writer.write("x", values)
    error = future.exception(timeout=60)
    assert _mentions(error, "injected kvikio failure"), error
    raised: BaseException | None = None
    try:
        writer.close()
    except OSError as exc:
        raised = exc
    assert _mentions(raised, "injected kvikio failure"), f"close() raised {raised!r}"
    for handle in injection.handles:
        for delayed in handle.futures:
            delayed.thread.join(5)  # whatever the writer waited for, every delayed write has run now
    assert len(injection.calls) >= 2, "the injection never ran: kvikio.CuFile is not what the writer calls"
    assert injection.problems == []
    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_a_kvikio_worker_waiting_for_the_producer_uses_little_cpu(
    tmp_path: Path, request: pytest.FixtureRequest, verdict: probe.Verdict
) -> None:
    """The worker of a device-direct write waits on the producer's ready event itself."""
    check_a_waiting_worker_sleeps(request, tmp_path, pinned_kvikio_writer, aligned_buffer(4 << 20))


def test_written_source_deleted_and_its_size_reallocated_through_kvikio(
    tmp_path: Path, request: pytest.FixtureRequest, verdict: probe.Verdict
) -> None:
    """kvikio reads the caller's memory until the file is written: far longer than the pinned copy."""
    check_source_is_kept_alive(tmp_path, seed_of(request), kvikio_writer, SaveFormat.NUMPY_NPY)


def test_copy_true_under_a_cuda_graph_replay_through_kvikio(
    tmp_path: Path, request: pytest.FixtureRequest, verdict: probe.Verdict
) -> None:
    check_copy_under_a_graph_replay(tmp_path, seed_of(request), kvikio_writer, SaveFormat.SAFETENSORS)


@pytest.fixture
def gds(verdict: probe.Verdict) -> probe.Verdict:
    if not verdict.gds:
        pytest.skip(f"GPUDirect Storage does not carry bytes here: {verdict.reason}")
    return verdict


@pytest.mark.gds
def test_auto_chooses_kvikio_where_gds_carries_the_bytes(
    tmp_path: Path, request: pytest.FixtureRequest, gds: probe.Verdict
) -> None:
    nbytes = 4 << 20
    producer = torch.cuda.Stream()
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, align=ALIGN, pinned_pool_bytes=POOL_BYTES) as writer:
        assert writer.wait_backend(60) == "kvikio"
        target = aligned_buffer(nbytes)
        source = pattern(nbytes, seed_of(request))
        expected = source.cpu()
        late(producer, target, source, 0.2)
        with torch.cuda.stream(producer):
            still_busy(producer, "at write()")
            (path,) = writer.write("x", target).result()
    assert_same(_stored(path, SaveFormat.NUMPY_NPY), expected)
    assert writer.stats().bytes_by_backend == {"gds": nbytes}
