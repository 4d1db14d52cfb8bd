"""A write that fails midway (file size limit, full filesystem) leaves nothing behind, and says so."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("each_engine")  # every test, once per write engine

# Runs in a child: writes that cannot fit must fail with `errno`, leaving the directory as it was.
CHILD = textwrap.dedent(
    """
    import errno, os, resource, signal, sys, torch
    from tensorsink import AsyncWriter, sweep
    root, limit = sys.argv[1], sys.argv[2]
    if limit != "none":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    writer = AsyncWriter(root, "safetensors")
    writer.write("fits", torch.zeros(1000))
    try:
        writer.write("too/big", torch.zeros(2 << 20)).result()
    except OSError as exc:
        assert exc.errno in (errno.EFBIG, errno.ENOSPC), exc
    else:
        raise AssertionError("the oversized write succeeded")
    try:
        writer.close()
    except OSError as exc:
        print("close raised", errno.errorcode[exc.errno])
    else:
        raise AssertionError("close() did not raise the background failure")
    listing = sorted(
        str(p.relative_to(root)) for p in __import__("pathlib").Path(root).rglob("*")
        if not str(p.relative_to(root)).startswith(".tensorsink")  # the journal, there by default
    )
    assert listing == ["fits.safetensors", "too"], listing
    assert sweep(root) == []
    print("ok")
    """
)


def test_file_size_limit_midway_leaves_no_file_and_surfaces(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), str(1 << 20)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["close", "raised", "EFBIG", "ok"]


def test_full_filesystem_midway_leaves_no_file_and_surfaces(tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    mount = tmp_path / "small"
    mount.mkdir()
    script = (
        f'mount -t tmpfs -o size=1m tmpfs "{mount}" || exit 77; exec "{sys.executable}" -c "$0" "$1" none'
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, CHILD, str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 77 or "unshare failed" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["close", "raised", "ENOSPC", "ok"]


# A .pt cut 10 bytes short by the file size limit: torch.save ignores short writes, so this once
# committed a torn file silently (and verify, reading the CRC back, blessed it).
TORN_PT = textwrap.dedent(
    """
    import errno, os, resource, signal, sys, torch
    from tensorsink import AsyncWriter
    from tensorsink.manifest import Manifest, verify
    root = sys.argv[1]
    value = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(300, dtype=torch.float64)}
    with AsyncWriter(root + "/size", "pt") as writer:
        writer.write("k", value)
    size = os.path.getsize(root + "/size/k.pt")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size - 10, size - 10))
    writer = AsyncWriter(root + "/out", "pt", durability="full", manifest=True)
    try:
        writer.write("k", value).result()
    except OSError as exc:
        assert exc.errno == errno.EFBIG and exc.filename.endswith("k.pt"), exc
    else:
        raise AssertionError("a torn .pt was committed")
    try:
        writer.close()
    except OSError as exc:
        assert exc.errno == errno.EFBIG, exc
    else:
        raise AssertionError("close() did not raise the failure")
    assert not os.path.exists(root + "/out/k.pt")
    assert Manifest.load(root + "/out").records == {}
    print("ok")
    """
)


def test_a_pt_cut_short_by_the_file_size_limit_fails_and_is_not_recorded(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", TORN_PT, str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok"]
