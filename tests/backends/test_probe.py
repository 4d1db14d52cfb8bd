"""Choosing posix or kvikio: prompt fallbacks, clear refusals, and a probe that cannot hang."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from tensorsink import AsyncWriter, BackendUnavailableError, SaveFormat
from tensorsink.backends import Route, probe_kvikio
from tensorsink.backends import probe as probe_module
from tensorsink.staging import pool as pool_module

needs_no_driver = pytest.mark.skipif(
    probe_module.driver_problem() is None, reason="a CUDA driver is present: these test the fallbacks"
)


@pytest.fixture(autouse=True)
def fresh_probe_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe_module, "_by_filesystem", {})


@needs_no_driver
@pytest.mark.timeout(30)
def test_auto_falls_back_to_posix_at_once_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="tensorsink")
    start = time.monotonic()
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, backend="auto") as writer:
        assert writer._route.device_direct() is False
        assert writer.wait_backend(5) == "posix"
        writer.write("x", torch.ones(100_000))
    assert time.monotonic() - start < 5
    assert writer.stats().bytes_by_backend == {"posix": 400_000}
    (line,) = [r.getMessage() for r in caplog.records if "go by" in r.getMessage()]
    assert "go by posix" in line
    assert "libcuda.so.1" in line


@needs_no_driver
@pytest.mark.timeout(30)
def test_explicit_kvikio_is_a_clear_error_within_seconds(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(
        RuntimeError, match=r"backend='kvikio' cannot write into .*libcuda\.so\.1.*'auto'"
    ) as info:
        AsyncWriter(tmp_path / "never", SaveFormat.SAFETENSORS, backend="kvikio")
    assert isinstance(info.value, BackendUnavailableError)
    assert time.monotonic() - start < 5
    assert not (tmp_path / "never").exists()  # refused before anything was made


def test_posix_never_probes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object) -> None:
        raise AssertionError("backend='posix' must not probe")

    monkeypatch.setattr(probe_module, "verdict_for", forbidden)
    with AsyncWriter(tmp_path, backend="posix") as writer:
        assert writer._route.device_direct() is False


def test_formats_without_a_device_layout_never_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe_module, "verdict_for", lambda *a: pytest.fail("PT is staged, never probed"))
    with AsyncWriter(tmp_path, SaveFormat.PYTORCH_PT) as writer:
        assert writer._route.device_direct() is False
        assert "pinned staging" in str(writer._route.reason)


def test_bad_backend_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="backend='gds' is not valid"):
        AsyncWriter(tmp_path, backend="gds")


def test_verdict_is_cached_per_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(probe_module, "driver_problem", lambda: calls.append(1) or "no driver (test)")
    first = probe_module.verdict_for(str(tmp_path))
    second = probe_module.verdict_for(str(tmp_path / "not" / "made" / "yet"))
    assert first is second
    assert calls == [1]
    assert first.reason == "no driver (test)"


@pytest.mark.timeout(30)
def test_a_hanging_probe_is_killed_at_its_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe_module, "_CHILD", "import time\nwhile True: time.sleep(1)")
    start = time.monotonic()
    verdict = probe_kvikio(str(tmp_path), timeout=1)
    assert time.monotonic() - start < 10
    assert not verdict.kvikio_works
    assert "did not answer within 1 s" in verdict.reason


@pytest.mark.timeout(60)
@pytest.mark.skipif(importlib.util.find_spec("kvikio") is None, reason="the gpu extra is not installed")
def test_kvikio_imports_and_its_probe_answers_without_a_gpu(tmp_path: Path) -> None:
    import kvikio

    assert kvikio.__version__
    verdict = probe_kvikio(str(tmp_path), timeout=30)
    if not torch.cuda.is_available():
        assert not verdict.kvikio_works
    assert list(tmp_path.iterdir()) == []  # no probe file, no cufile.log left behind


NAMESPACE_CHILD = textwrap.dedent(
    """
    import sys, time
    from tensorsink import AsyncWriter, BackendUnavailableError
    from tensorsink.backends import probe_kvikio
    root = sys.argv[1]
    start = time.monotonic()
    verdict = probe_kvikio(root, timeout=3)
    print("probe", verdict.kvikio_works, round(time.monotonic() - start))
    start = time.monotonic()
    with AsyncWriter(root, "npy", backend="auto") as writer:
        print("auto", writer._route.device_direct(), round(time.monotonic() - start))
    try:
        AsyncWriter(root, "npy", backend="kvikio")
    except BackendUnavailableError:
        print("kvikio refused", round(time.monotonic() - start))
    """
)


@needs_no_driver
@pytest.mark.timeout(120)
@pytest.mark.skipif(importlib.util.find_spec("kvikio") is None, reason="the gpu extra is not installed")
def test_with_run_udev_present_nothing_hangs(tmp_path: Path) -> None:
    """/run/udev makes libcufile spin in CuFile(); made to exist only in a throwaway mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    script = 'mount -t tmpfs tmpfs /run && mkdir -p /run/udev || exit 77; exec "$0" -c "$1" "$2"'
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    result = subprocess.run(
        [*command, sys.executable, NAMESPACE_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    if result.returncode == 77 or "unshare failed" in result.stderr:
        pytest.skip(f"no private mount namespace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    probe_line, auto_line, refused_line = result.stdout.splitlines()
    assert probe_line.split()[:2] == ["probe", "False"]
    assert int(probe_line.split()[2]) <= 6  # killed at its 3 s timeout, not left spinning
    assert auto_line.split()[:2] == ["auto", "False"]
    assert int(auto_line.split()[2]) <= 5
    assert refused_line.startswith("kvikio refused")


# What cuFile says decides GDS; kvikio's own counters cannot tell libcufile's compat mode from GDS.
@pytest.mark.parametrize(
    ("report", "gds", "label", "why"),
    [
        ({"ok": False, "error": "OSError: nope"}, False, None, "cannot write here: OSError: nope"),
        ({"ok": True, "kvikio_posix": True, "nvfs_loaded": True}, False, "kvikio-posix", "own POSIX path"),
        (
            {"ok": True, "nvfs_loaded": False, "allow_compat_mode": True},
            False,
            "kvikio-posix",
            "allow_compat_mode",
        ),
        ({"ok": True, "nvfs_loaded": None}, False, "kvikio-posix", "nvidia-fs driver is not loaded"),
        ({"ok": True, "nvfs_loaded": True, "nvfs_writes": 0}, False, "kvikio-posix", "counted no write"),
        ({"ok": True, "nvfs_loaded": True, "nvfs_writes": 3}, True, "gds", "carried the probe's bytes"),
        ({"ok": True, "nvfs_loaded": True, "nvfs_writes": None}, True, "gds", "carried the probe's bytes"),
    ],
)
def test_judging_a_probe_report(report: dict[str, object], gds: bool, label: str | None, why: str) -> None:
    verdict = probe_module.judge(report)
    assert verdict.gds is gds
    assert verdict.label == label
    assert why in verdict.reason


def test_the_probe_child_reads_nvidia_fs_write_counts(tmp_path: Path) -> None:
    stats = tmp_path / "stats"
    stats.write_text(
        "GDS Version: 1.10.0.4\nNVFS statistics(ver: 4.0)\n"
        "Reads                          : n=5 ok=5 err=0 readMiB=10 io_state_err=0\n"
        "Writes                         : n=12 ok=12 err=0 writeMiB=48 io_state_err=0\n"
    )
    prelude = probe_module._CHILD.split("try:\n    import kvikio")[0]
    namespace: dict[str, object] = {}
    exec(prelude.replace("sys.argv[1]", repr(str(tmp_path))), namespace)  # our own source
    namespace["STATS"] = str(stats)
    assert namespace["nvfs_writes"]() == 12  # type: ignore[operator]
    namespace["STATS"] = str(tmp_path / "absent")
    assert namespace["nvfs_writes"]() is None  # type: ignore[operator]


class _GatedProbe:
    """verdict_for that answers only once released, counting its calls and their threads."""

    def __init__(self, verdict: probe_module.Verdict) -> None:
        self.verdict = verdict
        self.release = threading.Event()
        self.threads: list[str] = []

    def __call__(self, directory: str, timeout: float = 30.0) -> probe_module.Verdict:
        self.threads.append(threading.current_thread().name)
        assert self.release.wait(10), "the test never released the probe"
        return self.verdict


@pytest.mark.timeout(30)
@pytest.mark.parametrize("gds", [True, False])
def test_auto_never_waits_for_the_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gds: bool) -> None:
    gated = _GatedProbe(probe_module.judge({"ok": True, "nvfs_loaded": gds, "nvfs_writes": 1}))
    monkeypatch.setattr(probe_module, "verdict_for", gated)
    monkeypatch.setattr(Route, "_kvikio_writer", lambda self: object())  # no kvikio needed
    with AsyncWriter(tmp_path, SaveFormat.SAFETENSORS, backend="auto") as writer:
        start = time.monotonic()
        assert writer._route.device_direct() is False  # the pinned path until the verdict
        assert writer._route.device_direct() is False
        assert time.monotonic() - start < 1
        assert writer.wait_backend(timeout=0.2) == "posix"  # not decided yet
        gated.release.set()
        assert writer.wait_backend(timeout=10) == ("kvikio" if gds else "posix")
        assert writer._route.device_direct() is gds
        assert writer._route.kvikio_label == ("gds" if gds else "kvikio-posix")
    assert gated.threads == ["tensorsink-probe"]  # once, and never on the caller's thread


def test_a_failing_probe_leaves_the_pinned_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(directory: str, timeout: float = 30.0) -> probe_module.Verdict:
        raise RuntimeError("probe broke")

    monkeypatch.setattr(probe_module, "verdict_for", broken)
    with AsyncWriter(tmp_path, SaveFormat.SAFETENSORS) as writer:
        assert writer.wait_backend(10) == "posix"
        assert "probe broke" in str(writer._route.reason)


def test_explicit_kvikio_on_its_posix_path_is_counted_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compat = probe_module.judge({"ok": True, "nvfs_loaded": False, "allow_compat_mode": True})
    monkeypatch.setattr(probe_module, "verdict_for", lambda directory, timeout=30.0: compat)
    monkeypatch.setattr(Route, "_kvikio_writer", lambda self: object())
    with AsyncWriter(tmp_path, SaveFormat.SAFETENSORS, backend="kvikio") as writer:
        assert writer._route.name == "kvikio"
        assert writer._route.kvikio_label == "kvikio-posix"  # never "gds" where nvidia-fs is absent


def test_a_process_using_cuda_pins_at_construction_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probe_module, "verdict_for", lambda *a, **k: pytest.fail("no CUDA tensor: no probe"))
    pinned: list[tuple[int, str, int | None]] = []
    devices: list[int] = []

    def fake_pin(nbytes: int) -> tuple[torch.Tensor, object]:
        pinned.append((nbytes, threading.current_thread().name, devices[-1] if devices else None))
        return torch.empty(nbytes, dtype=torch.uint8), lambda: None

    monkeypatch.setattr(pool_module, "pinned_buffer", fake_pin)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    size = 3 * (1 << 20) + 3 * 4096  # not a power of two: pinned exactly
    with AsyncWriter(tmp_path, SaveFormat.SAFETENSORS, pinned_pool_bytes=size) as writer:
        assert writer._stager.pool.capacity == size
    assert pinned == [(size, "tensorsink-pin", 3)]  # in the background, in the caller's device's context
    assert writer.stats().pinned_pool_bytes == size


def test_a_failed_background_pinning_is_tried_again_by_the_first_cuda_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def flaky_pin(nbytes: int) -> tuple[torch.Tensor, object]:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise RuntimeError("CUDA error 2 (test)")
        return torch.empty(nbytes, dtype=torch.uint8), lambda: None

    monkeypatch.setattr(pool_module, "pinned_buffer", flaky_pin)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    with AsyncWriter(tmp_path, SaveFormat.SAFETENSORS, pinned_pool_bytes=1 << 20) as writer:
        assert writer._stager.pool.capacity == 1 << 20
    assert calls == ["tensorsink-pin", threading.current_thread().name]


def test_a_cpu_process_neither_pins_nor_probes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe_module, "verdict_for", lambda *a, **k: pytest.fail("no CUDA tensor: no probe"))
    monkeypatch.setattr(pool_module, "pinned_buffer", lambda n: pytest.fail("no CUDA tensor: nothing pinned"))
    with AsyncWriter(tmp_path, SaveFormat.SAFETENSORS) as writer:
        writer.write("cpu", torch.ones(8))
    assert not writer._stager.pool_started
