"""The manifest: a journal of committed files, for resuming a job and for proving its files intact.

Each writer appends one JSON line per committed file to its own journal,
`<root>/.tensorsink/journal-<host>-<pid>-<token>.jsonl` (so every DDP rank has its own), after the
file's rename: a record never names a file that is not complete, and since each record is one
write() to the kernel, a killed job loses only the records of files still in flight. `Manifest.load`
merges every journal under a root, the latest record of a path winning.

The checksum is CRC-32, the CRC ZIP and torch's .pt use, as `tensorsink.checksum` computes it (26 GB/s
on one core of the machine in benchmarks/README.md where the CPU multiplies carry-less, zlib's 2.2
elsewhere; BLAKE2b and SHA-256 run at 1.0-1.2). It guards against torn, truncated and corrupted
files, not against tampering.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .arrays import dtype_name
from .checksum import crc32
from .errors import SymlinkError, WriterClosedError
from .formats import FileEntry, format_for, write_buffers
from .options import SaveFormat
from .shards.tar import check_shard

__all__ = [
    "JOURNAL_DIR",
    "SHARD_FORMAT",
    "SHARD_LIST_FORMAT",
    "Journal",
    "Manifest",
    "VerifyReport",
    "crc32_of_path",
    "verify",
]

JOURNAL_DIR = ".tensorsink"
#: The "format" of a shard's lines (they list its samples) and of a shard list's: files that hold no
#: key of their own.
SHARD_FORMAT = "tar"
SHARD_LIST_FORMAT = "shardlist"
RENAMING_TAIL = ',"renaming":true'  # marks the line written just before a file's rename
_READ_CHUNK = 8 << 20
_CHECK_CHUNK = 256  # files per task of verify's threads

log = logging.getLogger("tensorsink")


def crc32_of_fd(fd: int) -> tuple[int, int]:
    """CRC-32 and size of the file open at `fd`, read from its start (the page cache, just written)."""
    crc, offset = 0, 0
    while chunk := os.pread(fd, _READ_CHUNK, offset):
        crc = crc32(chunk, crc)
        offset += len(chunk)
    return crc, offset


def crc32_of_path(path: str | os.PathLike[str]) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return crc32_of_fd(fd)
    finally:
        os.close(fd)


def arrays_of(entry: FileEntry) -> list[list[Any]]:
    """[name, dtype, shape] of each array in a file, as the record lists them; a nested (ragged)
    tensor has no one shape: null."""
    return [[name, dtype_name(a), _shape(a)] for name, a in zip(entry.names, entry.arrays, strict=True)]


def _shape(array: Any) -> list[int] | None:
    if getattr(array, "is_nested", False):
        return None
    return list(array.shape)


_text = json.encoder.encode_basestring_ascii  # a str as json.dumps writes it


def _ints(values: list[int]) -> str:
    return f"[{','.join(map(str, values))}]"


def line_tail(nbytes: int, crc: int, when: float, renaming: bool) -> str:
    """A journal line's end: what the write itself tells (the native engine's line_tail in C)."""
    return f',"bytes":{nbytes},"crc32":"{crc:08x}","time":{when:.6f}{RENAMING_TAIL if renaming else ""}}}\n'


class Journal:
    """One writer's append-only journal, opened (and its folder made) at construction.

    Each committed file gets two lines, both written by the engine under its path's lock: a
    "renaming" line once the file is whole and before its rename, and its record after it (the
    native engine holds records to write them with the next renaming line). A kill between the two
    leaves the renaming line, which verify and resume accept for the file that is there. A line is
    written whole or not at all: a short write is completed, a failed one is cut off again (the
    journal truncated to its last whole line) before its OSError is raised.
    flush() and close() fsync it, unless the writer's durability is NONE (then nothing is fsynced).
    """

    def __init__(self, root: str, *, fsync: bool = True, follow_symlinks: bool = False) -> None:
        self._root = root
        self._root_slash = root.rstrip("/") + "/"
        self._fsync = fsync  # False with Durability.NONE: the journal is as durable as its files
        folder = os.path.join(root, JOURNAL_DIR)
        self._token = secrets.token_hex(4)
        self._writes = itertools.count()
        name = f"journal-{socket.gethostname()}-{os.getpid()}-{self._token}.jsonl"
        self.path = os.path.join(folder, name)
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
        # The folder and the journal are opened without following a symlink (unless asked), as every
        # folder under the root is: a `.tensorsink` link would put the journal outside the root.
        no_follow = 0 if follow_symlinks else os.O_NOFOLLOW
        try:
            directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | no_follow)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(folder):
                raise SymlinkError(folder, os.path.realpath(folder), root) from None
            raise
        try:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            self._fd: int | None = os.open(name, flags, 0o644, dir_fd=directory)
        finally:
            os.close(directory)
        self._lock = threading.Lock()

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise WriterClosedError(f"journal {self.path} is closed")
        return self._fd

    def write_id(self) -> str:
        """A new id for one write of several files, unique among every journal under the root."""
        return f"{self._token}{next(self._writes):x}"

    def prefix(
        self, key: str, path: str, fmt: str, arrays: list[list[Any]], files: int = 1, write: str | None = None
    ) -> bytes:
        """The start of a file's lines, all but what the write itself tells: size, CRC, time. `files`:
        how many files the write made for `key` (SPLIT), and `write` which write it was (write_id()), so
        that a key half written, or half rewritten, is not done."""
        if path.startswith(self._root_slash):
            relative = path[len(self._root_slash) :]  # every path a writer makes is under its root
        else:
            relative = os.path.relpath(path, self._root).replace(os.sep, "/")
        # What json.dumps(head, separators=(",", ":")) writes, less its closing brace, made directly: it
        # is the largest part of the caller's cost of a small write (tests hold the two to the same).
        members = ",".join(
            f"[{_text(name)},{_text(dtype)},{'null' if shape is None else _ints(shape)}]"
            for name, dtype, shape in arrays
        )
        count = f',"files":{files}' if files != 1 else ""
        if write is not None:
            count += f',"write":"{write}"'
        return (
            f'{{"key":{_text(key)},"path":{_text(relative)},"format":{_text(fmt)},"arrays":[{members}]{count}'
        ).encode()

    def write_line(self, prefix: bytes, nbytes: int, crc: int, when: float, *, renaming: bool) -> None:
        """Append one line (what the native engine does in C, for the Python engine)."""
        tail = line_tail(nbytes, crc, when, renaming)
        with self._lock:
            fd = self.fd
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                write_buffers(fd, [prefix, tail.encode()])  # one write() of a whole line, unless short
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise

    def sync(self) -> None:
        with self._lock:
            if self._fd is not None and self._fsync:
                os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    if self._fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)


@dataclass
class Manifest:
    """Every journal under a root merged: the latest record of each path."""

    root: Path
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: "renaming" lines later than a path's latest record, newest first: a kill between a file's
    #: rename and its record leaves one, describing the file that is there.
    renaming: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: "<journal>:<line>: why" for each line that is not a record (a torn last line is not counted).
    damaged: list[str] = field(default_factory=list)
    #: Each shard's samples, `[key, [[suffix, offset, size, crc32], ...]]`, from its renaming line
    #: (left empty by `load(root, samples=False)`), and how many samples each shard holds.
    shards: dict[str, list[Any]] = field(default_factory=dict)
    shard_sizes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, root: str | os.PathLike[str], *, samples: bool = True) -> Manifest:
        """Merge every journal under `root`. A damaged line is skipped and listed in `damaged` (and
        logged): its file counts as unrecorded, so a resumed job writes it again. With samples=False
        the samples listed in shards' lines are not read (for the shard list of millions of them)."""
        manifest = cls(Path(root))
        records: list[dict[str, Any]] = []
        for journal in sorted((manifest.root / JOURNAL_DIR).glob("journal-*.jsonl")):
            records.extend(_read_journal(journal, manifest.damaged, samples=samples))
        for problem in manifest.damaged:
            log.warning("tensorsink: damaged journal line, skipped: %s", problem)
        for record in sorted(records, key=lambda r: r["time"]):
            path = record["path"]
            if "samples" in record:
                manifest.shards[path] = record["samples"]
            if "nsamples" in record:
                manifest.shard_sizes[path] = record["nsamples"]
            if record.get("renaming"):
                manifest.renaming.setdefault(path, []).insert(0, record)
            else:
                manifest.records[path] = record
                manifest.renaming.pop(path, None)
        return manifest

    def candidates(self, path: str) -> list[dict[str, Any]]:
        """What the file at `path` may be: its latest record, then any renaming line after it."""
        record = self.records.get(path)
        return ([record] if record is not None else []) + self.renaming.get(path, [])

    def paths(self) -> set[str]:
        """Every path the journals name (with a record, or only a renaming line)."""
        return self.records.keys() | self.renaming.keys()

    def paths_done(self, paths: Sequence[str]) -> bool:
        """Whether every one of `paths` (relative) is recorded and still on disk at a recorded size."""
        for path in paths:
            try:
                size = os.stat(self.root / path).st_size
            except OSError:
                return False
            if not any(candidate["bytes"] == size for candidate in self.candidates(path)):
                return False
        return True

    @functools.cached_property
    def _paths_by_key(self) -> dict[str, list[str]]:
        """Recorded paths under each key, indexed once: done() is asked once per sample on resume."""
        index: dict[str, list[str]] = {}
        for path in self.paths():
            latest = self.candidates(path)[0]
            if latest["format"] not in (SHARD_FORMAT, SHARD_LIST_FORMAT):
                index.setdefault(latest["key"], []).append(path)
        return index

    @functools.cached_property
    def shard_samples(self) -> dict[str, tuple[str, list[Any]]]:
        """Each key in a shard that is on disk, whole in size: the shard (relative path) and its
        members; the latest such shard's where a key was written into several (a newer shard killed
        before its rename leaves the older one)."""
        index: dict[str, tuple[str, list[Any]]] = {}
        for path in sorted(self.shards, key=lambda p: self.candidates(p)[0]["time"]):
            if not self.shard_done(path):
                continue
            for key, members in self.shards[path]:
                index[key] = (path, members)
        return index

    @functools.cached_property
    def _whole_shards(self) -> dict[str, bool]:
        return {}

    def shard_done(self, path: str) -> bool:
        """Whether the shard at `path` is on disk at a recorded size (asked once per shard)."""
        whole = self._whole_shards.get(path)
        if whole is None:
            whole = self._whole_shards[path] = self.paths_done([path])
        return whole

    def files_of(self, key: str) -> list[str]:
        """The absolute paths of the files recorded under `key`."""
        return [str(self.root / path) for path in self._paths_by_key.get(key, [])]

    def done(self, key: str) -> bool:
        """Whether `key` was written: every file of its latest write is recorded (a record says how
        many its write made, `files`, 1 if absent, and which write it was, `write`, where it made
        several), and each is still there, whole in size. A rewrite killed between its files leaves
        records of two writes: not done."""
        paths = self._paths_by_key.get(key, [])
        if not paths:
            in_shard = self.shard_samples.get(key)
            return in_shard is not None and self.shard_done(in_shard[0])
        # Each path's newest line: a renaming line newer than its record may be the file that is there
        # (a kill after its rename, before its record was written), and be of another write.
        latest = {path: (self.renaming.get(path) or [self.records[path]])[0] for path in paths}
        newest = max(latest.values(), key=lambda record: record["time"])
        write = newest.get("write")
        if write is not None:  # the newest write's own files, each recorded as of that write
            paths = [path for path, record in latest.items() if record.get("write") == write]
            return len(paths) == newest.get("files", 1) and self.paths_done(paths)
        needed = max(record.get("files", 1) for record in latest.values())
        return len(paths) >= needed and self.paths_done(paths)

    def keys(self) -> set[str]:
        """Every key the journals name: of files, and of samples in shards."""
        return set(self._paths_by_key) | self.shard_samples.keys()

    def lines(self) -> Iterator[str]:
        """The merged manifest as JSON lines, sorted by path."""
        for path in sorted(self.records):
            yield json.dumps(self.records[path], separators=(",", ":"))


_RECORD_FIELDS = {"key": str, "path": str, "bytes": int, "crc32": str, "format": str, "time": float | int}


_SAMPLES, _SAMPLES_END = b',"samples":[', b'],"bytes":'


def _read_journal(path: Path, damaged: list[str], *, samples: bool = True) -> list[dict[str, Any]]:
    """The records of one journal; each line that is not one is described in `damaged`. Without
    `samples`, a shard's list of samples is cut out before the line is parsed (no key's JSON string
    can hold `],"bytes":`, whose quote would be escaped)."""
    records = []
    with open(path, "rb") as journal:
        for number, raw in enumerate(journal, 1):
            if not raw.endswith(b"\n"):  # the last line, cut by a kill: not a record, not damage
                break
            if not samples and _SAMPLES in raw:
                head, _, rest = raw.partition(_SAMPLES)
                end = rest.rfind(_SAMPLES_END)
                if end >= 0:
                    raw = head + rest[end + 1 :]
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                for name, kind in _RECORD_FIELDS.items():
                    if not isinstance(record.get(name), kind):
                        raise ValueError(f"no valid {name!r}")
            except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested beyond reason
                damaged.append(f"{path}:{number}: {exc or type(exc).__name__}")
                continue
            records.append(record)
    return records


@dataclass
class VerifyReport:
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    size_mismatch: list[str] = field(default_factory=list)
    checksum_mismatch: list[str] = field(default_factory=list)
    #: Files of a tensorsink format whose layout is not whole (a torn file), with why.
    unreadable: list[str] = field(default_factory=list)
    #: Journal lines that are not records ("<journal>:<line>: why").
    damaged_journal: list[str] = field(default_factory=list)
    checked: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (
            self.missing
            or self.extra
            or self.size_mismatch
            or self.checksum_mismatch
            or self.unreadable
            or self.damaged_journal
        )


def _files_under(root: Path) -> set[str]:
    """Relative paths of every file under `root`, but the journals; temporaries count (as extra)."""
    found = set()
    for directory, subdirectories, files in os.walk(root):
        if directory == str(root) and JOURNAL_DIR in subdirectories:
            subdirectories.remove(JOURNAL_DIR)
        relative = os.path.relpath(directory, root)
        for name in files:
            found.add(name if relative == "." else f"{relative}/{name}".replace(os.sep, "/"))
    return found


def file_problems(
    report: VerifyReport, paths: list[str], check: Callable[[str], tuple[str, str] | None], workers: int
) -> int:
    """Run `check` on every path in `workers` threads and file each (kind, detail) it finds in `report`
    ("size", "checksum", "missing", "unreadable"; the detail, else the path). Returns how many paths
    it gave the kind "", which is filed nowhere: not checked, and no problem either."""
    problems = {
        "size": report.size_mismatch,
        "checksum": report.checksum_mismatch,
        "missing": report.missing,
        "unreadable": report.unreadable,
    }
    unchecked = 0
    # Paths go to the threads in chunks: one future per file cost the submitting thread more, in
    # contention for the GIL, than most files' checks.
    chunks = [paths[i : i + _CHECK_CHUNK] for i in range(0, len(paths), _CHECK_CHUNK)]
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="tensorsink-verify") as pool:
        found = (
            problem
            for chunk in pool.map(lambda chunk: [check(p) for p in chunk], chunks)
            for problem in chunk
        )
        for path, problem in zip(paths, found, strict=True):
            if problem is None:
                continue
            kind, why = problem
            if kind:
                problems[kind].append(why or path)
            else:
                unchecked += 1
    return unchecked


def verify(root: str | os.PathLike[str], *, checksums: bool = True, workers: int = 8) -> VerifyReport:
    """Compare the files under `root` with its manifest: missing, extra, wrong size, wrong CRC-32, and
    files of a tensorsink format that are not whole in its layout (whatever their records say)."""
    start = time.perf_counter()
    manifest = Manifest.load(root)
    report = VerifyReport(damaged_journal=list(manifest.damaged))
    on_disk = _files_under(manifest.root)
    recorded = manifest.paths()
    report.extra = sorted(on_disk - recorded)
    recorded_paths = sorted(recorded)
    formats = {f.value: format_for(f) for f in SaveFormat}

    absent_unfinished = ("", "")  # only a renaming line, no file: not checked, not missing (kind "")

    def check(path: str) -> tuple[str, str] | None:
        candidates = manifest.candidates(path)
        full = manifest.root / path  # followed if it is a symlink: the file it names is what was written
        try:
            size = os.stat(full).st_size
            matching = [c for c in candidates if c["bytes"] == size]
            if not matching:
                recorded = " or ".join(dict.fromkeys(str(c["bytes"]) for c in candidates))
                return "size", f"{path}: {size} bytes on disk where the manifest records {recorded}"
            fmt = formats.get(candidates[0]["format"])
            if candidates[0]["format"] == SHARD_FORMAT:
                problem = check_shard(os.fspath(full), manifest.shards.get(path, []), checksums=checksums)
                if problem is not None:
                    return "unreadable", f"{path}: {problem}"
            elif fmt is not None:
                try:
                    fmt.check_file(os.fspath(full))
                except FileNotFoundError:
                    raise
                except Exception as exc:
                    return "unreadable", f"{path}: {exc}"
            if checksums:
                crc = f"{crc32_of_path(full)[0]:08x}"
                if not any(c["crc32"] == crc for c in matching):
                    return "checksum", ""
        except FileNotFoundError:
            # Only a renaming line and no file: killed before its rename, a write that never
            # finished (resume writes it again), not a committed file that went missing.
            return ("missing", "") if path in manifest.records else absent_unfinished
        return None

    absent = file_problems(report, recorded_paths, check, workers)
    report.checked = len(recorded_paths) - len(report.missing) - absent
    report.seconds = time.perf_counter() - start
    return report
