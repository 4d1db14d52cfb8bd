"""Every format at every durability, against the failures storage really produces.

A write cut off by a file size limit (EFBIG) at many offsets, a filesystem filled until it is full
(ENOSPC), and a FUSE filesystem that writes short and fails writes, fsyncs and renames with EIO. In
each case the final name holds the whole file or nothing, the failure reaches the caller, and no
temporary is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tensorsink import AsyncWriter, Durability, SaveFormat, WriteFuture, sweep
from tests import faultfs
from tests.support import assert_same, outputs_under, random_tensor, read_back

pytestmark = pytest.mark.usefixtures("each_engine")  # every test, once per write engine

FORMATS = list(SaveFormat)
DURABILITIES = [d.value for d in Durability]


def sample(save_format: SaveFormat, rows: int = 16) -> Any:
    """A tensor for NPY, else a mapping of two tensors of different dtypes."""
    weights = random_tensor((rows, 8), torch.float32, seed=rows)
    if save_format is SaveFormat.NUMPY_NPY:
        return weights
    return {"weights": weights, "counts": random_tensor((33,), torch.int16, seed=rows + 1)}


def assert_whole(path: Path, save_format: SaveFormat, value: Any) -> None:
    """`path` loads with its format's reader and holds exactly `value`."""
    loaded = read_back(path, save_format)
    if isinstance(value, dict):
        assert sorted(loaded) == sorted(value), path
        for name, array in value.items():
            assert_same(loaded[name], array)
    else:
        assert_same(loaded, value)


def listing(directory: Path) -> list[str]:
    return [str(p.relative_to(directory)) for p in outputs_under(directory)]


def save_samples(path: Path, rows: int) -> None:
    """The children's values, so they write exactly what this process checks."""
    torch.save({f.value: sample(f, rows) for f in FORMATS}, path)


# Shared by the children, which write under a file size limit or on a small filesystem of their own.
CHILD_COMMON = textwrap.dedent(
    """
    import errno, json, os, resource, signal, sys, torch
    from tensorsink import AsyncWriter, sweep

    def code(call):
        try:
            call()
        except OSError as exc:
            return errno.errorcode.get(exc.errno, repr(exc))
        return None

    def attempt(writer, key, value):
        '''What write(), then the future, the next write(), flush() and close() raised.'''
        try:
            future = writer.write(key, value)
        except OSError as exc:  # written on the caller's thread: raised right here
            return {"write": errno.errorcode.get(exc.errno, repr(exc)), "close": code(writer.close)}
        case = {"write": None, "result": code(future.result)}
        if case["result"] is not None:
            case["again"] = code(lambda: writer.write(key + "-again", value))
            case["flush"] = code(writer.flush)
        return case
    """
)

CUT_CHILD = CHILD_COMMON + textwrap.dedent(
    """
    root, save_format, values = sys.argv[1:]
    value = torch.load(values, weights_only=True)[save_format]
    probe = AsyncWriter(f"{root}/probe", save_format)
    size = os.path.getsize(probe.write("value", value).result()[0])
    probe.close()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    cuts = sorted({c for c in (0, 1, 8, 64, 128, size // 2, size - 10, size - 1, size) if 0 <= c <= size})
    cases = []
    for durability in ("none", "file", "full"):
        for cut in cuts:
            writer = AsyncWriter(f"{root}/{durability}-{cut}", save_format, durability=durability)
            resource.setrlimit(resource.RLIMIT_FSIZE, (cut, resource.RLIM_INFINITY))
            case = attempt(writer, "value", value)
            case.setdefault("close", code(writer.close))
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            cases.append(dict(case, durability=durability, cut=cut))
    print(json.dumps({"size": size, "cases": cases}))
    """
)


def check_failure(case: dict[str, Any], expected: str) -> None:
    """A failed write raised `expected` to the caller; a background one also from everything after."""
    if case["write"] is not None:  # ran on the caller's thread; close() may raise it again
        assert case["write"] == expected, case
        assert case["close"] in (None, expected), case
    else:
        assert case["result"] == case["again"] == case["flush"] == case["close"] == expected, case


@pytest.mark.timeout(120)
@pytest.mark.parametrize("save_format", FORMATS, ids=[f.value for f in FORMATS])
def test_file_size_limit_at_every_cut_leaves_whole_file_or_nothing(
    tmp_path: Path, save_format: SaveFormat
) -> None:
    """RLIMIT_FSIZE cuts the file at header, payload and last-byte offsets: EFBIG, and no file at all."""
    values = tmp_path / "values.pt"
    save_samples(values, rows=16)
    root = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", CUT_CHILD, str(root), save_format.value, str(values)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    value = sample(save_format, rows=16)
    final = f"value.{save_format.value}"
    assert_whole(root / "probe" / final, save_format, value)
    assert len(report["cases"]) >= 3 * 6, report  # every durability, at several cuts
    for case in report["cases"]:
        directory = root / f"{case['durability']}-{case['cut']}"
        if case["cut"] >= report["size"]:
            assert (case["write"], case["result"], case["close"]) == (None, None, None), case
            assert listing(directory) == [final]
            assert_whole(directory / final, save_format, value)
        else:
            check_failure(case, "EFBIG")
            assert listing(directory) == [], case
            assert sweep(directory) == []


FILL_CHILD = CHILD_COMMON + textwrap.dedent(
    """
    import shutil
    root, copy, values = sys.argv[1:]
    values = torch.load(values, weights_only=True)
    writers = {
        (f, d): AsyncWriter(f"{root}/{f}-{d}", f, durability=d)
        for f in ("pt", "npy", "npz", "safetensors") for d in ("none", "file", "full")
    }
    failed = {}
    for i in range(1000):
        for (f, d), writer in writers.items():
            if (f, d) not in failed:
                case = attempt(writer, f"v{i}", values[f])
                if case["write"] or case["result"]:
                    failed[f, d] = dict(case, written=i)
        if len(failed) == len(writers):
            break
    for key, writer in writers.items():
        failed.setdefault(key, {"written": None})
        failed[key].setdefault("close", code(writer.close))
    shutil.copytree(root, copy)
    swept = [str(p) for p in sweep(root)]
    print(json.dumps({"writers": [dict(c, key=f"{f}-{d}") for (f, d), c in failed.items()], "swept": swept}))
    """
)


@pytest.mark.timeout(120)
def test_full_filesystem_every_format_fails_cleanly(tmp_path: Path) -> None:
    """Writers of every format and durability fill a small tmpfs: each fails with ENOSPC, and every
    file it had committed before is whole."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    values = tmp_path / "values.pt"
    save_samples(values, rows=320)  # 10 KiB of weights: several pages, so space runs out mid-file
    mount, copy = tmp_path / "small", tmp_path / "copy"
    mount.mkdir()
    arguments = [str(mount), str(copy), str(values)]
    script = f'mount -t tmpfs -o size=1m tmpfs "{mount}" || exit 77; exec "{sys.executable}" -c "$0" "$@"'
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, FILL_CHILD, *arguments],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    if result.returncode == 77 or "unshare failed" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["swept"] == []
    assert len(report["writers"]) == len(FORMATS) * len(DURABILITIES)
    assert sum(case["written"] or 0 for case in report["writers"]) > 0, "nothing fit before the disk filled"
    for case in report["writers"]:
        assert case["written"] is not None, f"{case['key']} never filled the filesystem"
        check_failure(case, "ENOSPC")
        save_format = SaveFormat(case["key"].split("-")[0])
        names = [f"v{i}.{save_format.value}" for i in range(case["written"])]
        assert listing(copy / case["key"]) == sorted(names), case
        for name in names:
            assert_whole(copy / case["key"] / name, save_format, sample(save_format, rows=320))


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[faultfs.Faults]:
    """One fault-injecting FUSE mount for the module; skipped where FUSE cannot be mounted (failed under
    CI=true)."""
    reason = faultfs.unavailable()
    if reason is not None:
        faultfs.skip(reason)
    stack = contextlib.ExitStack()
    try:
        mounted = stack.enter_context(faultfs.mounted(tmp_path_factory.mktemp("faultfs")))
    except RuntimeError as exc:
        faultfs.skip(f"cannot mount a FUSE filesystem here: {exc}")
    with stack:
        yield mounted


@pytest.mark.parametrize(
    ("ci", "outcome"),
    [
        ("true", pytest.fail.Exception),
        ("TRUE", pytest.fail.Exception),
        ("false", pytest.skip.Exception),
        (None, pytest.skip.Exception),
    ],
)
def test_missing_harness_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch, ci: str | None, outcome: type[BaseException]
) -> None:
    """Where FUSE cannot be mounted the harness's tests skip, but CI must not pass having lost them."""
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="forced reason: /dev/fuse is missing"):
        faultfs.skip("forced reason: /dev/fuse is missing")


def raised_by(call: Callable[[], object]) -> OSError | None:
    try:
        call()
    except OSError as exc:
        return exc
    return None


def attempt(directory: Path, save_format: SaveFormat, durability: str, value: Any) -> OSError | None:
    """Write `value` once; a background failure must also be raised by the next write(), flush() and
    close(). Returns the failure."""
    writer = AsyncWriter(directory, save_format, durability=durability)
    futures: list[WriteFuture] = []
    error = raised_by(lambda: futures.append(writer.write("value", value)))
    if error is not None:  # small writes at durability "none" run on the caller's thread
        closed = raised_by(writer.close)
        assert closed is None or closed.errno == error.errno, closed  # it again, or nothing
        return error
    background = futures[0].exception(timeout=30)
    if background is None:
        writer.close()
        return None
    assert isinstance(background, OSError), background
    for call in (lambda: writer.write("again", value), writer.flush, writer.close):
        again = raised_by(call)
        assert getattr(again, "errno", None) == background.errno, again
    return background


# Which durabilities each fault fails: the others never make the call it breaks.
FAILS = {
    "short": set(),
    "eio-write": set(DURABILITIES),
    "eio-fsync": {"file", "full"},
    "eio-fsyncdir": {"full"},
    "eio-rename": set(DURABILITIES),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("durability", DURABILITIES)
@pytest.mark.parametrize("save_format", FORMATS, ids=[f.value for f in FORMATS])
@pytest.mark.parametrize("mode", list(FAILS))
def test_injected_fault_leaves_whole_file_or_nothing(
    faults: faultfs.Faults, mode: str, save_format: SaveFormat, durability: str, each_engine: str
) -> None:
    """A short write is retried until the file is whole; EIO is raised to the caller and leaves no
    file (after a failed directory fsync the renamed file may stay, whole) and no temporary."""
    name = f"{each_engine}-{mode}-{save_format.value}-{durability}"
    directory = faults.mount / name
    directory.mkdir()  # before the fault: a new directory is fsynced in its parent at "full"
    value = sample(save_format)
    faults.inject(mode, after=100)
    try:
        error = attempt(directory, save_format, durability, value)
    finally:
        hits = faults.hits()
        faults.inject("none")
    final = f"value.{save_format.value}"
    stored = faults.backing / name
    if durability not in FAILS[mode]:
        assert error is None, error
        assert (hits > 0) == (mode == "short"), hits
        assert listing(stored) == [final]
        assert_whole(stored / final, save_format, value)
        return
    assert isinstance(error, OSError), error
    assert error.errno == errno.EIO, error
    assert hits > 0
    if mode == "eio-fsyncdir" and listing(stored):
        assert listing(stored) == [final]
        assert_whole(stored / final, save_format, value)
    else:
        assert listing(stored) == []
    assert sweep(directory) == []
