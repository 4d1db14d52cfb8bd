"""Does GPUDirect Storage really carry bytes into a given directory? Asked without ever hanging.

First, in this process and without kvikio: libcuda.so.1 loads, cuInit succeeds, a device exists.
Then, in a child process under a hard timeout (libcufile can spin forever inside CuFile() when GDS
is half set up), a 1 MiB write of device memory through kvikio into the directory, with kvikio's
statistics saying which backend carried the bytes. The verdict is cached per filesystem.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field

__all__ = ["Verdict", "driver_problem", "probe_kvikio", "verdict_for"]

log = logging.getLogger("tensorsink")

#: Seconds the child may take: starting Python, torch and kvikio, one small write.
DEFAULT_TIMEOUT = 30.0

_CHILD = r"""
import json, os, sys
directory = sys.argv[1]
path = os.path.join(directory, ".tensorsink-gds-probe-%d" % os.getpid())
report = {"ok": False}
try:
    import kvikio
    monitor = kvikio.SummaryMonitor()
    handle = kvikio.CuFile(path, "w")  # where a half-set-up libcufile spins
    try:
        import torch
        buffer = torch.full((1 << 20,), 7, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        written = handle.pwrite(buffer, buffer.nbytes, 0).get()
    finally:
        handle.close()
    by_backend = {name: dict(totals) for name, totals in monitor.get().by_backend.items()}
    report = {
        "ok": written == buffer.nbytes,
        "gds": any("gds" in name.lower() and t["bytes_transferred"] > 0 for name, t in by_backend.items()),
        "by_backend": by_backend,
    }
except BaseException as exc:
    lines = str(exc).strip().splitlines()
    report["error"] = "%s: %s" % (type(exc).__name__, lines[0] if lines else "")
finally:
    if os.path.exists(path):
        os.unlink(path)
print(json.dumps(report))
"""


@dataclass(frozen=True)
class Verdict:
    """What the probe found: whether kvikio works here, whether GDS carried the bytes, and why."""

    kvikio_works: bool
    gds: bool
    reason: str
    by_backend: dict[str, dict[str, int]] = field(default_factory=dict, compare=False)


_lock = threading.Lock()
_by_filesystem: dict[int, Verdict] = {}


@functools.cache
def driver_problem() -> str | None:
    """Why the CUDA driver cannot be used here, or None; asked once per process."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"the CUDA driver is not available (libcuda.so.1: {exc})"
    status = cuda.cuInit(0)
    if status != 0:
        return f"cuInit failed with CUDA error {status}"
    count = ctypes.c_int(0)
    status = cuda.cuDeviceGetCount(ctypes.byref(count))
    if status != 0 or count.value == 0:
        return "no CUDA device is visible"
    return None


def verdict_for(directory: str, timeout: float = DEFAULT_TIMEOUT) -> Verdict:
    """The cached verdict for `directory`'s filesystem (its nearest existing ancestor's), probed once."""
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    device = os.stat(directory).st_dev
    with _lock:
        cached = _by_filesystem.get(device)
    if cached is not None:
        return cached
    problem = driver_problem()
    if problem is not None:
        verdict = Verdict(False, False, problem)
    elif importlib.util.find_spec("kvikio") is None:
        verdict = Verdict(False, False, "kvikio is not installed (pip install 'tensorsink[gpu]')")
    else:
        verdict = probe_kvikio(directory, timeout)
    with _lock:
        _by_filesystem.setdefault(device, verdict)
    return verdict


def probe_kvikio(directory: str, timeout: float = DEFAULT_TIMEOUT) -> Verdict:
    """Write 1 MiB of device memory into `directory` through kvikio, in a child killed after `timeout`."""
    with tempfile.TemporaryDirectory(prefix="tensorsink-probe-") as scratch:
        environment = dict(os.environ, CUFILE_LOGFILE_PATH=os.path.join(scratch, "cufile.log"))
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, os.path.abspath(directory)],
            cwd=scratch,  # libcufile writes its log into the working directory otherwise
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            return Verdict(False, False, f"kvikio did not answer within {timeout:g} s (libcufile hangs here)")
    try:
        report = json.loads(output.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return Verdict(False, False, f"the kvikio probe exited with status {child.returncode} and no report")
    if not report.get("ok"):
        return Verdict(False, False, f"kvikio cannot write here: {report.get('error', 'short write')}")
    by_backend = report.get("by_backend", {})
    if report.get("gds"):
        return Verdict(True, True, "GPUDirect Storage carried the probe's bytes", by_backend)
    return Verdict(
        True, False, f"kvikio works but GDS did not carry the bytes (by backend: {by_backend})", by_backend
    )
