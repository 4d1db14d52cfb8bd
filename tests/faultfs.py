"""A FUSE passthrough filesystem that injects faults: short writes, and EIO on write, fsync or rename.

It runs as its own process (`python faultfs.py BACKING MOUNTPOINT STATE`), so a test can see what a
writer does when the kernel hands it the failures real storage produces. Which fault it injects is
read from `STATE/mode` at every operation (set it with `Faults.inject`); each fault it injects is
appended to `STATE/hits`, so a test can tell the fault really happened.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

#: What `Faults.inject` accepts.
MODES = ("none", "short", "eio-write", "eio-fsync", "eio-fsyncdir", "eio-rename")
_MOUNT_WAIT_S = 10.0
_EXIT_WAIT_S = 10.0


class FaultFS:
    """Passes every operation through to `backing`; write, fsync, fsyncdir and rename may fail.

    Modes: "short" writes half of each write (at least 1 byte) and reports that count; "eio-write"
    writes up to byte `after` of a file and fails every write past it with EIO; "eio-fsync",
    "eio-fsyncdir" and "eio-rename" fail those calls with EIO.
    """

    use_ns = True

    def __init__(self, backing: str, state: str) -> None:
        self.backing = backing
        self.state = Path(state)
        self._hits_lock = threading.Lock()

    def __call__(self, op: str, *args: Any) -> Any:
        method = getattr(self, op, None)
        if method is None:
            raise OSError(errno.ENOSYS, op)
        return method(*args)

    def _real(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def _mode(self) -> tuple[str, int]:
        try:
            config = json.loads((self.state / "mode").read_text())
        except FileNotFoundError:
            return "none", 0
        return config["mode"], config["after"]

    def _fault(self, mode: str) -> None:
        with self._hits_lock, open(self.state / "hits", "a") as hits:
            hits.write(mode + "\n")

    def _fail(self, mode: str) -> None:
        if self._mode()[0] == mode:
            self._fault(mode)
            raise OSError(errno.EIO, f"faultfs: {mode}")

    # Faulty operations.
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        mode, after = self._mode()
        if mode == "short" and len(data) > 1:
            self._fault(mode)
            data = data[: len(data) // 2]
        elif mode == "eio-write":
            if offset >= after:
                self._fault(mode)
                raise OSError(errno.EIO, "faultfs: eio-write")
            data = data[: after - offset]
        return os.pwrite(fh, data, offset)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        self._fail("eio-fsync")
        os.fsync(fh)

    def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
        self._fail("eio-fsyncdir")
        fd = os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, old: str, new: str) -> None:
        self._fail("eio-rename")
        os.rename(self._real(old), self._real(new))

    # Plain passthrough.
    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        st = os.lstat(self._real(path))
        keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_ino")
        attrs = {key: getattr(st, key) for key in keys}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def access(self, path: str, amode: int) -> None:
        if not os.access(self._real(path), amode):
            raise OSError(errno.EACCES, path)

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._real(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_frsize")
        return {key: getattr(st, key) for key in keys} | {"f_namemax": st.f_namemax}

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._real(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._real(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._real(path))

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._real(path), mode)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        os.utime(self._real(path), ns=times)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        os.truncate(self._real(path), length)

    def create(self, path: str, mode: int, fi: object = None) -> int:
        return os.open(self._real(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)

    def open(self, path: str, flags: int) -> int:
        return os.open(self._real(path), flags)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def flush(self, path: str, fh: int) -> None:
        return None

    def release(self, path: str, fh: int) -> None:
        os.close(fh)


def unavailable() -> str | None:
    """Why a FUSE filesystem cannot be mounted here, or None if it may be."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    try:
        import fuse  # noqa: F401  (fusepy loads libfuse.so.2 on import)
    except ImportError:
        return "fusepy is not installed"
    except OSError as exc:
        return f"fusepy found no libfuse: {exc}"
    if shutil.which("fusermount") is None and shutil.which("umount") is None:
        return "neither fusermount nor umount is installed"
    return None


def skip(reason: str) -> NoReturn:
    """Skip a test that needs the harness, for `reason`; under CI=true fail it instead, so that a CI
    machine without FUSE cannot pass green having run none of these tests (`make install` sets it up)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(
            f"the FUSE fault harness is required under CI=true, but {reason}: install libfuse2 and fuse "
            "(`make install` does, as root on Debian or Ubuntu)",
            pytrace=False,
        )
    pytest.skip(reason)


@dataclass
class Faults:
    """A mounted FaultFS: `mount` is its mount point, `backing` the directory it passes through to."""

    mount: Path
    backing: Path
    state: Path

    def inject(self, mode: str, after: int = 0) -> None:
        """Inject `mode` from the next operation on, and start counting its hits afresh."""
        assert mode in MODES, mode
        (self.state / "hits").write_text("")
        staged = self.state / "mode.new"
        staged.write_text(json.dumps({"mode": mode, "after": after}))
        os.replace(staged, self.state / "mode")

    def hits(self) -> int:
        """How many faults were injected since the last `inject`."""
        return len((self.state / "hits").read_text().splitlines())


def _unmount(mount: Path) -> None:
    command = ["fusermount", "-u", "-z"] if shutil.which("fusermount") else ["umount", "-l"]
    subprocess.run([*command, str(mount)], capture_output=True, timeout=_EXIT_WAIT_S, check=False)


@contextlib.contextmanager
def mounted(base: Path) -> Iterator[Faults]:
    """Mount a FaultFS over `base/backing` at `base/mount`; always unmounted and stopped on exit.

    Raises RuntimeError, with the filesystem's own output, if it is not mounted within 10 s.
    """
    faults = Faults(base / "mount", base / "backing", base / "state")
    for directory in (faults.mount, faults.backing, faults.state):
        directory.mkdir()
    faults.inject("none")
    log = base / "faultfs.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(
            [sys.executable, __file__, str(faults.backing), str(faults.mount), str(faults.state)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + _MOUNT_WAIT_S
        while not os.path.ismount(faults.mount):
            if server.poll() is not None or time.monotonic() > deadline:
                output = log.read_text(errors="replace").strip()
                raise RuntimeError(f"faultfs did not mount (exit status {server.poll()}): {output}")
            time.sleep(0.01)
        yield faults
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            _unmount(faults.mount)
        try:
            server.wait(timeout=_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            server.kill()  # closing /dev/fuse aborts the connection, so nothing can hang on it
            server.wait(timeout=_EXIT_WAIT_S)


def main(argv: list[str]) -> None:
    import fuse

    backing, mountpoint, state = argv
    fuse.FUSE(FaultFS(backing, state), mountpoint, foreground=True, fsname="faultfs")


if __name__ == "__main__":
    main(sys.argv[1:])
