"""Choosing posix or kvikio: prompt fallbacks, clear refusals, and a probe that cannot hang."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tensorsink import AsyncWriter, BackendUnavailableError, SaveFormat
from tensorsink.backends import probe as probe_module
from tensorsink.backends import probe_kvikio

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
