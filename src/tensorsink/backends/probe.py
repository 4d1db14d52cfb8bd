"""Does GPUDirect Storage really carry bytes into a given directory? Asked without ever hanging.

First, in this process and without kvikio: libcuda.so.1 loads, cuInit succeeds, a device exists.
Then, in a child process under a hard timeout (libcufile can spin forever inside CuFile() when GDS
is half set up), a 1 MiB write of device memory through kvikio into the directory. kvikio's own
counters cannot tell GDS from libcufile's compatibility mode (with `allow_compat_mode`, libcufile
registers the file and quietly does POSIX I/O), so the verdict rests on what cuFile itself reports:
whether kvikio runs its own POSIX path, whether the nvidia-fs driver is loaded (cuFile's driver
properties), and where /proc/driver/nvidia-fs/stats exists, whether its write count grew. The
verdict is cached per filesystem.
"""

from __future__ import annotations

import atexit
import contextlib
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
import json, os, re, sys
directory = sys.argv[1]
path = os.path.join(directory, ".tensorsink-gds-probe-%d" % os.getpid())
report = {"ok": False}
STATS = "/proc/driver/nvidia-fs/stats"

def nvfs_writes():  # the nvidia-fs driver's count of writes, or None where it cannot be read
    try:
        with open(STATS) as stats:
            for line in stats:
                found = re.match(r"\s*Writes\s*:.*?\bn=(\d+)", line)
                if found:
                    return int(found.group(1))
    except OSError:
        return None
    return None

def driver(name):  # a cuFile driver property, or None where libcufile cannot say
    try:
        return bool(kvikio.cufile_driver.get(name))
    except Exception:
        return None

try:
    import kvikio
    import kvikio.cufile_driver
    import kvikio.defaults
    before = nvfs_writes()
    handle = kvikio.CuFile(path, "w")  # where a half-set-up libcufile spins
    try:
        import torch
        buffer = torch.full((1 << 20,), 7, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        written = handle.pwrite(buffer, buffer.nbytes, 0).get()
    finally:
        handle.close()
    after = nvfs_writes()
    report = {
        "ok": written == buffer.nbytes,
        "kvikio_posix": bool(kvikio.defaults.is_compat_mode_preferred()),
        "nvfs_loaded": driver("is_gds_available"),
        "allow_compat_mode": driver("allow_compat_mode"),
        "nvfs_writes": None if before is None or after is None else after - before,
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
    #: What cuFile and kvikio said about the probe's write (see judge()).
    report: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str | None:
        """How kvikio's writes are counted in stats().bytes_by_backend: "gds", "kvikio-posix", or
        None where kvikio cannot write here."""
        if not self.kvikio_works:
            return None
        return "gds" if self.gds else "kvikio-posix"


_lock = threading.Lock()
_by_filesystem: dict[int, Verdict] = {}
#: Probe children still running: killed when the process exits, so none is left spinning in
#: libcufile after a job that ended before its writer's probe did.
_children: set[subprocess.Popen[str]] = set()


@atexit.register
def _kill_children() -> None:
    for child in list(_children):
        with contextlib.suppress(OSError):
            os.killpg(child.pid, signal.SIGKILL)


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
        if not os.path.isdir(directory):  # removed while probing: no verdict on its filesystem
            return verdict
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
        _children.add(child)
        try:
            output, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            return Verdict(False, False, f"kvikio did not answer within {timeout:g} s (libcufile hangs here)")
        finally:
            _children.discard(child)
    try:
        report = json.loads(output.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return Verdict(False, False, f"the kvikio probe exited with status {child.returncode} and no report")
    return judge(report)


def judge(report: dict[str, object]) -> Verdict:
    """The verdict on a probe child's report. GDS only where kvikio did not run its own POSIX path,
    the nvidia-fs driver is loaded (else libcufile's compat mode did POSIX I/O), and nvidia-fs counted
    the write where its statistics can be read."""
    if not report.get("ok"):
        return Verdict(
            False, False, f"kvikio cannot write here: {report.get('error', 'short write')}", report
        )
    if report.get("kvikio_posix"):
        why = "kvikio runs its own POSIX path here (compat mode: no usable libcufile or nvidia-fs)"
    elif not report.get("nvfs_loaded"):
        why = (
            "the nvidia-fs driver is not loaded, so libcufile wrote through POSIX (allow_compat_mode)"
            if report.get("allow_compat_mode")
            else "the nvidia-fs driver is not loaded"
        )
    elif report.get("nvfs_writes") == 0:
        why = "nvidia-fs counted no write for the probe's bytes: libcufile fell back to POSIX I/O"
    else:
        return Verdict(True, True, "GPUDirect Storage carried the probe's bytes", report)
    return Verdict(True, False, f"kvikio works, but not by GPUDirect Storage: {why}", report)
