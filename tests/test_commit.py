"""The commit protocol: temporaries, fsyncs, rename, directory fsync, and sweep."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from tensorsink import AsyncWriter, Durability, SaveFormat, SymlinkError, sweep
from tensorsink import commit as commit_module
from tensorsink.commit import Committer, DirectorySync, KeyOrder, is_temporary
from tensorsink.options import WriterOptions


def test_temporaries_are_hidden_siblings_that_sweep_recognises(tmp_path: Path) -> None:
    committer = Committer(Durability.NONE, str(tmp_path))
    final = tmp_path / "d" / ("x" * 240 + ".npy")
    temporary = Path(committer.temporary_for(str(final.parent), final.name))
    assert temporary.parent == final.parent
    assert temporary.name.startswith(".")
    assert temporary.name.endswith(".partial")
    assert len(temporary.name) < 255
    assert is_temporary(temporary.name)
    assert committer.temporary_for(str(final.parent), final.name) != str(temporary)
    # A save function's private folder is named as a temporary, and so is its file once moved out.
    for name in [".x.tsink-1f.partial", ".x.tsink-1f.partial.file"]:
        assert is_temporary(name), name
    for name in [
        "x.npy",
        ".x.npy",
        "x.partial",
        ".x.partial",
        ".x.tsink-zz.partial",
        ".x.tsink-1f.partial.pt",
    ]:
        assert not is_temporary(name), name


def test_sweep_removes_only_temporaries(tmp_path: Path) -> None:
    finals = [tmp_path / "a.pt", tmp_path / "d" / ".hidden.npy", tmp_path / "d" / "x.partial"]
    temporaries = [tmp_path / ".a.pt.tsink-0a1.partial", tmp_path / "d" / "e" / ".b.npy.tsink-ff.partial"]
    for path in finals + temporaries:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert sweep(tmp_path) == sorted(temporaries)
    assert all(p.exists() for p in finals)
    assert not any(p.exists() for p in temporaries)
    assert sweep(tmp_path) == []


@pytest.mark.parametrize(
    ("durability", "file_syncs", "directory_syncs"),
    [(Durability.NONE, 0, 0), (Durability.FILE, 1, 0), (Durability.FULL, 1, 1)],
)
def test_durability_decides_the_fsyncs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    durability: Durability,
    file_syncs: int,
    directory_syncs: int,
) -> None:
    (tmp_path / "d").mkdir()
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with AsyncWriter(
        tmp_path, SaveFormat.NUMPY_NPY, durability=durability, engine="python", manifest=False
    ) as writer:  # the data files' fsyncs alone (a journal adds its own at close)
        writer.write("d/x", torch.zeros(4)).result()
    assert synced.count("file") == file_syncs
    assert synced.count("dir") == directory_syncs


def test_full_durability_fsyncs_new_directories_in_their_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    monkeypatch.setattr(
        commit_module, "fsync_directory", lambda d: synced.append(str(Path(d).relative_to(tmp_path)))
    )
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, durability="full", engine="python") as writer:
        writer.write("a/b/x", torch.zeros(4)).result()
    assert synced == [".", "a", "a/b"]  # a in root, b in a, then x in b


def test_directory_sync_groups_concurrent_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = threading.Event()
    release = threading.Event()
    calls: list[str] = []

    def slow_fsync(directory: str) -> None:
        calls.append(directory)
        started.set()
        assert release.wait(10)

    monkeypatch.setattr(commit_module, "fsync_directory", slow_fsync)
    sync = DirectorySync()
    first = threading.Thread(target=sync.sync, args=(str(tmp_path),))
    first.start()
    assert started.wait(10)
    waiting = [threading.Thread(target=sync.sync, args=(str(tmp_path),)) for _ in range(8)]
    for t in waiting:
        t.start()
    deadline = time.monotonic() + 10
    while sync._states[str(tmp_path)].requested < 9:  # until every waiter holds its ticket
        assert time.monotonic() < deadline
        time.sleep(0.001)
    release.set()
    for t in [first, *waiting]:
        t.join(10)
    assert len(calls) == 2  # the first one, then one for all eight that queued behind it
    assert sync._states == {}


def test_directory_sync_failure_reaches_every_waiter(tmp_path: Path) -> None:
    sync = DirectorySync()
    with pytest.raises(FileNotFoundError):
        sync.sync(str(tmp_path / "missing"))
    assert sync._states == {}


def test_failed_write_leaves_no_temporary_and_no_final(tmp_path: Path) -> None:
    committer = Committer(Durability.FILE, str(tmp_path))
    final = str(tmp_path / "x.npy")
    number = committer.order.reserve(final)

    def explode(fd: int, path: str) -> None:
        os.write(fd, b"half a file")
        raise OSError(28, "No space left on device")

    fd, temporary = committer.create(final)
    with pytest.raises(OSError, match="No space"):
        committer.finish(final, number, temporary, fd, explode)
    assert list(tmp_path.iterdir()) == []


def test_existing_final_file_survives_a_failed_overwrite(tmp_path: Path) -> None:
    final = tmp_path / "x.npy"
    final.write_bytes(b"previous")
    committer = Committer(Durability.NONE, str(tmp_path))

    def explode(fd: int, path: str) -> None:
        raise RuntimeError("encoder failed")

    fd, temporary = committer.create(str(final))
    with pytest.raises(RuntimeError):
        committer.finish(str(final), committer.order.reserve(str(final)), temporary, fd, explode)
    assert final.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [final]


def test_key_order_forgets_idle_paths(tmp_path: Path) -> None:
    order = KeyOrder()
    path = str(tmp_path / "k")
    first, second = order.reserve(path), order.reserve(path)
    with order.lock(path):
        assert order.should_replace(path, second)
        assert not order.should_replace(path, first)
    order.release(path)
    order.release(path)
    assert order._paths == {}


def test_directory_removed_under_a_writer_is_made_again(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, durability=WriterOptions(tmp_path).durability) as writer:
        writer.write("d/a", torch.zeros(2)).result()
        (tmp_path / "d" / "a.npy").unlink()
        (tmp_path / "d").rmdir()
        writer.write("d/b", torch.zeros(2)).result()
    assert (tmp_path / "d" / "b.npy").exists()


def test_sweep_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tensorsink.__main__ import main

    (tmp_path / ".x.pt.tsink-01.partial").write_bytes(b"")
    (tmp_path / "x.pt").write_bytes(b"")
    assert main(["sweep", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / ".x.pt.tsink-01.partial")
    assert "removed 1 temporary" in err
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_a_key_through_a_symlinked_folder_is_refused_and_nothing_is_written_outside(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "link").symlink_to(elsewhere)
    (root / "a" / "deep").symlink_to(elsewhere)
    with AsyncWriter(root, SaveFormat.NUMPY_NPY) as writer:
        for key, link in (("link/x", root / "link"), ("a/deep/y/z", root / "a" / "deep")):
            with pytest.raises(SymlinkError, match="follow_symlinks=True") as info:
                writer.write(key, torch.zeros(2))
            assert info.value.link == str(link)
        with pytest.raises(SymlinkError):
            writer.write_batch(["fine", "link/b"], torch.zeros(2, 3))
        writer.write("a/real", torch.zeros(2)).result()  # the writer goes on
    assert list(elsewhere.iterdir()) == []
    assert not (root / "fine.npy").exists()


def test_the_committer_refuses_a_symlink_the_caller_did_not_see(tmp_path: Path) -> None:
    """A folder that became a symlink after write() checked it is refused in the background too."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    committer = Committer(Durability.NONE, str(tmp_path / "out"))
    (tmp_path / "out" / "d").symlink_to(elsewhere)
    final = str(tmp_path / "out" / "d" / "x.npy")
    with pytest.raises(SymlinkError):
        committer.create(final)
    assert list(elsewhere.iterdir()) == []


def test_follow_symlinks_writes_through_symlinked_folders(tmp_path: Path) -> None:
    from tensorsink.manifest import verify

    root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "link").symlink_to(elsewhere)
    with AsyncWriter(root, SaveFormat.NUMPY_NPY, manifest=True, follow_symlinks=True) as writer:
        writer.write("link/x", torch.arange(3.0)).result()
    assert (elsewhere / "x.npy").exists()
    report = verify(root)
    assert report.missing == []
    assert report.checked == 1


def test_a_symlinked_output_root_is_the_users_choice(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "root").symlink_to(tmp_path / "real")
    with AsyncWriter(tmp_path / "root", SaveFormat.NUMPY_NPY) as writer:
        writer.write("d/x", torch.zeros(1)).result()
    assert (tmp_path / "real" / "d" / "x.npy").exists()
