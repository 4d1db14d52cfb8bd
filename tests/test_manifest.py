"""The manifest: records only for committed files, resume by skipping them, verify finding every fault."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from tensorsink import AsyncWriter, SaveFormat
from tensorsink.__main__ import main
from tensorsink.commit import is_temporary
from tensorsink.manifest import JOURNAL_DIR, Journal, Manifest, verify


def _journals(root: Path) -> list[Path]:
    return sorted((root / JOURNAL_DIR).glob("journal-*.jsonl"))


@pytest.mark.parametrize("save_format", list(SaveFormat))
def test_a_record_per_committed_file_with_its_crc(tmp_path: Path, save_format: SaveFormat) -> None:
    with AsyncWriter(tmp_path, save_format, "split", manifest=True) as writer:
        writer.write("a/x", torch.arange(6, dtype=torch.float32).reshape(2, 3))
        writer.write("b", {"m": torch.zeros(2, dtype=torch.uint8), "n": torch.ones(3)})
        writer.write_batch(["t/0", "t/1"], ["zero", "one"], save=lambda p, v: p.write_text(v), suffix=".txt")
    (journal,) = _journals(tmp_path)
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    records = [line for line in lines if not line.get("renaming")]
    assert sorted(line["path"] for line in lines if line.get("renaming")) == sorted(
        r["path"] for r in records
    )
    suffix = "." + save_format.value
    assert sorted(r["path"] for r in records) == sorted(
        [f"a/x{suffix}", f"b_m{suffix}", f"b_n{suffix}", "t/0.txt", "t/1.txt"]
    )
    for record in records:
        data = (tmp_path / record["path"]).read_bytes()
        assert record["bytes"] == len(data)
        assert record["crc32"] == f"{zlib.crc32(data):08x}"
    by_path = {r["path"]: r for r in records}
    assert by_path[f"a/x{suffix}"]["key"] == "a/x"
    assert by_path[f"a/x{suffix}"]["arrays"] == [["arr_0", "float32", [2, 3]]]
    assert by_path[f"b_m{suffix}"]["key"] == "b"
    assert by_path["t/1.txt"]["format"] == "txt"
    assert verify(tmp_path).ok


def test_journal_by_default_and_none_with_manifest_false(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path / "default") as writer:
        writer.write("x", torch.zeros(3))
    assert len(_journals(tmp_path / "default")) == 1
    assert verify(tmp_path / "default").ok
    with AsyncWriter(tmp_path / "off", manifest=False) as writer:
        writer.write("x", torch.zeros(3))
    assert not (tmp_path / "off" / JOURNAL_DIR).exists()
    with pytest.raises(ValueError, match="skip_existing=True needs manifest=True"):
        AsyncWriter(tmp_path, skip_existing=True, manifest=False)


def test_resume_skips_what_is_done_and_redoes_what_is_not(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, manifest=True) as writer:
        for i in range(4):
            writer.write(f"s{i}", torch.full((3,), float(i)))
    (tmp_path / "s1.pt").unlink()  # lost since
    (tmp_path / "s2.pt").write_bytes(b"torn")  # cut short since
    with AsyncWriter(tmp_path, manifest=True, skip_existing=True) as writer:
        assert writer.is_done("s0")
        assert not writer.is_done("s1")
        assert not writer.is_done("s2")
        assert not writer.is_done("never")
        futures = [writer.write(f"s{i}", torch.full((3,), 10.0 + i)) for i in range(5)]
        batch = writer.write_batch(["s3", "s5"], torch.full((2, 3), 20.0))
    assert futures[0].result() == [tmp_path / "s0.pt"]
    values = {i: torch.load(tmp_path / f"s{i}.pt", weights_only=True)[0].item() for i in range(6)}
    assert values == {0: 0.0, 1: 11.0, 2: 12.0, 3: 3.0, 4: 14.0, 5: 20.0}
    assert batch.result() == [tmp_path / "s5.pt"]
    assert writer.stats().skipped == 3  # s0, s3 by write(); s3 in the batch
    assert verify(tmp_path).ok
    with AsyncWriter(tmp_path, manifest=True, skip_existing=True) as again:
        assert again.write_batch(["s4", "s5"], torch.zeros(2, 3)).result() == [
            tmp_path / "s4.pt",
            tmp_path / "s5.pt",
        ]
    assert again.stats().skipped == 2, "a batch skipped whole counts each of its samples"


def test_journals_of_several_writers_merge(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, manifest=True) as first, AsyncWriter(tmp_path, manifest=True) as second:
        first.write("rank0/a", torch.zeros(2))
        second.write("rank1/b", torch.ones(2))
        first.write("shared", torch.zeros(1))
        first.flush()
        second.write("shared", torch.ones(1))  # later: its record wins
    assert len(_journals(tmp_path)) == 2
    manifest = Manifest.load(tmp_path)
    assert manifest.keys() == {"rank0/a", "rank1/b", "shared"}
    assert manifest.records["shared.pt"]["bytes"] == (tmp_path / "shared.pt").stat().st_size
    assert verify(tmp_path).ok


def test_verify_reports_every_kind_of_fault(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with AsyncWriter(tmp_path, "npy", manifest=True) as writer:
        for name in ("gone", "short", "flipped", "fine"):
            writer.write(name, torch.arange(100, dtype=torch.float32))
    (tmp_path / "gone.npy").unlink()
    (tmp_path / "short.npy").write_bytes((tmp_path / "short.npy").read_bytes()[:-4])
    data = bytearray((tmp_path / "flipped.npy").read_bytes())
    data[-1] ^= 0x01
    (tmp_path / "flipped.npy").write_bytes(bytes(data))
    (tmp_path / "stray.txt").write_text("not ours")
    report = verify(tmp_path)
    assert (report.missing, report.extra, report.size_mismatch, report.checksum_mismatch) == (
        ["gone.npy"],
        ["stray.txt"],
        ["short.npy: 524 bytes on disk where the manifest records 528"],
        ["flipped.npy"],
    )
    assert report.checked == 3
    assert verify(tmp_path, checksums=False).checksum_mismatch == []
    assert main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "checksum mismatch: flipped.npy" in out
    assert "1 missing, 1 extra, 1 size mismatch, 1 checksum mismatch" in out
    for path in ("gone.npy", "stray.txt", "short.npy", "flipped.npy"):
        (tmp_path / path).unlink(missing_ok=True)
    assert main(["verify", str(tmp_path), "-q"]) == 1  # the journal still names the removed files


def test_verify_passes_a_clean_tree_and_refuses_one_without_journals(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path / "ok", manifest=True) as writer:
        writer.write("x", torch.zeros(5))
    assert main(["verify", str(tmp_path / "ok")]) == 0
    assert main(["verify", str(tmp_path)]) == 2
    assert main(["manifest", str(tmp_path / "ok")]) == 0


_CHILD = textwrap.dedent(
    """
    import sys, torch
    from tensorsink import AsyncWriter
    writer = AsyncWriter(sys.argv[1], "safetensors", manifest=True, durability="none", workers=2)
    for i in range(100000):
        writer.write(f"k{i % 50}/s{i}", torch.full((int(sys.argv[2]),), float(i)))
        if i == 20:
            print("writing", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("floats", [1000, 300_000])
def test_a_killed_job_has_no_record_for_an_incomplete_file(tmp_path: Path, floats: int) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path), str(floats)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "writing\n"
    time.sleep(0.5)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    manifest = Manifest.load(tmp_path)
    assert len(manifest.records) > 20
    report = verify(tmp_path)
    assert (report.missing, report.size_mismatch, report.checksum_mismatch) == ([], [], [])
    for extra in report.extra:  # in flight at the kill: a temporary, or committed before its record
        if not is_temporary(Path(extra).name):
            assert load_file(tmp_path / extra)["arr_0"].shape == (floats,)


def _open_files() -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor is gone already
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return links


def _torn_but_recorded(root: Path, save_format: SaveFormat) -> str:
    """A file cut 10 bytes short whose record was rewritten to match it, as a torn commit once was."""
    value = {"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(8)}
    with AsyncWriter(root, save_format, "split" if save_format is SaveFormat.NUMPY_NPY else "single",
                     manifest=True) as writer:  # fmt: skip
        (path,) = writer.write("k", value if save_format is not SaveFormat.NUMPY_NPY else value["a"]).result()
    torn = path.read_bytes()[:-10]
    path.write_bytes(torn)
    (journal,) = _journals(root)
    (record,) = [json.loads(line) for line in journal.read_text().splitlines() if "renaming" not in line]
    record.update(bytes=len(torn), crc32=f"{zlib.crc32(torn):08x}")
    journal.write_text(json.dumps(record) + "\n")
    return record["path"]


@pytest.mark.parametrize("save_format", list(SaveFormat))
def test_verify_never_blesses_a_file_its_format_cannot_read(tmp_path: Path, save_format: SaveFormat) -> None:
    path = _torn_but_recorded(tmp_path, save_format)
    for checksums in (True, False):
        report = verify(tmp_path, checksums=checksums)
        assert not report.ok
        assert [entry.split(":")[0] for entry in report.unreadable] == [path]
        assert (report.size_mismatch, report.checksum_mismatch, report.missing) == ([], [], [])
    assert main(["verify", str(tmp_path), "-q"]) == 1


def test_a_torn_last_journal_line_is_a_kill_not_damage(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, "npy", manifest=True) as writer:
        writer.write("a", torch.zeros(3))
        writer.write("b", torch.ones(3))
    (journal,) = _journals(tmp_path)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines) + lines[0][:17])  # a record cut by a kill
    manifest = Manifest.load(tmp_path)
    assert (sorted(manifest.records), manifest.damaged) == (["a.npy", "b.npy"], [])
    assert verify(tmp_path).ok


def test_a_damaged_journal_is_reported_where_and_resume_rewrites_its_files(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, "npy", manifest=True) as writer:
        for name in "abc":
            writer.write(name, torch.zeros(3)).result()
    (journal,) = _journals(tmp_path)
    first, second, third = [
        line for line in journal.read_bytes().splitlines(keepends=True) if b"renaming" not in line
    ]
    journal.write_bytes(first + second[:20] + third + b'{"key": 5}\n')  # a cut record, then one glued on
    manifest = Manifest.load(tmp_path)
    assert [problem.split(": ")[0] for problem in manifest.damaged] == [f"{journal}:2", f"{journal}:3"]
    report = verify(tmp_path)
    assert not report.ok
    assert len(report.damaged_journal) == 2
    assert main(["verify", str(tmp_path), "-q"]) == 1
    with AsyncWriter(tmp_path, "npy", manifest=True, skip_existing=True) as resumed:
        assert resumed.is_done("a")
        assert not resumed.is_done("b")
        assert not resumed.is_done("c")
        resumed.write("b", torch.zeros(3))
        resumed.write("c", torch.zeros(3))
        assert resumed.stats().skipped == 0


def test_a_failed_journal_write_fails_the_write_and_leaves_whole_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short write of a record is completed; a failed one is cut off again and raised."""
    real_writev = os.writev
    calls = {"n": 0}

    def flaky(fd: int, buffers: list[bytes]) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl"):
            return real_writev(fd, buffers)
        calls["n"] += 1
        data = b"".join(bytes(b) for b in buffers)
        if calls["n"] == 1:
            return real_writev(fd, [data[:9]])  # short: the rest must follow
        if b'"path":"b.npy"' in data:  # b's line before its rename: cut, then the disk is full
            real_writev(fd, [data[:5]])
            raise OSError(28, "No space left on device")
        return real_writev(fd, [data])

    monkeypatch.setattr(os, "writev", flaky)
    writer = AsyncWriter(tmp_path, "npy", manifest=True, workers=1, engine="python")
    writer.write("a", torch.zeros(3)).result()
    with pytest.raises(OSError, match="No space") as info:
        writer.write("b", torch.ones(3)).result()
    assert "b.npy" in str(info.value)
    with pytest.raises(OSError, match="No space"):
        writer.close()
    monkeypatch.undo()
    manifest = Manifest.load(tmp_path)
    assert (sorted(manifest.records), manifest.damaged) == (["a.npy"], [])
    (journal,) = _journals(tmp_path)
    assert journal.read_bytes().endswith(b"\n")
    assert not (tmp_path / "b.npy").exists()  # its line failed before the rename: never renamed
    report = verify(tmp_path)
    assert report.ok, report


def test_rewrites_of_one_key_are_recorded_in_the_order_of_their_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first rewrite's record is held back while a later rewrite could be renamed: the records
    must still follow the renames, so the manifest describes the file that is there. (The Python
    engine, whose steps can be held; the native one takes the same lock in C.)"""
    from tensorsink.manifest import Journal

    renamed_later = threading.Event()
    real_replace, real_write_line = os.replace, Journal.write_line
    held = {"first": True}

    def replace(source: str, target: str) -> None:
        real_replace(source, target)
        if not held["first"]:
            renamed_later.set()

    def write_line(self: Journal, *args: Any, renaming: bool) -> None:
        if held["first"] and not renaming:
            held["first"] = False
            renamed_later.wait(timeout=1.0)  # a later rename gets this long to overtake the record
        real_write_line(self, *args, renaming=renaming)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Journal, "write_line", write_line)
    with AsyncWriter(tmp_path, "npy", manifest=True, workers=8, durability="full", engine="python") as writer:
        for i in range(20):
            writer.write("k", torch.full((1000,), float(i)))
    monkeypatch.undo()
    assert verify(tmp_path).ok
    assert (
        Manifest.load(tmp_path).records["k.npy"]["crc32"]
        == f"{zlib.crc32((tmp_path / 'k.npy').read_bytes()):08x}"
    )


def test_write_racing_close_never_succeeds_after_close_returned(tmp_path: Path) -> None:
    """Inline writes from three threads while close() runs: each either finished before close()
    returned or raised WriterClosedError, and no journal descriptor outlives close()."""
    from tensorsink import WriterClosedError

    for _round in range(5):
        root = tmp_path / f"r{_round}"
        writer = AsyncWriter(root, "npy", manifest=True, durability="none")
        returned: list[float] = []
        started = threading.Barrier(4)

        def produce(
            thread: int,
            writer: AsyncWriter = writer,
            returned: list[float] = returned,
            started: threading.Barrier = started,
        ) -> None:
            started.wait()
            for i in range(100_000):
                began = time.monotonic()
                try:
                    writer.write(f"t{thread}/{i}", torch.zeros(4))
                except WriterClosedError:
                    return
                returned.append(began)  # it returned: it began before close() returned

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(3)]
        for thread in threads:
            thread.start()
        started.wait()
        while len(returned) < 50:
            time.sleep(0.001)
        writer.close()
        closed_at = time.monotonic()
        for thread in threads:
            thread.join(timeout=30)
        assert not any(t > closed_at for t in returned), "a write begun after close() returned succeeded"
        assert not [link for link in _open_files() if JOURNAL_DIR in link], "a journal fd outlived close()"
        report = verify(root)
        assert report.ok, report
        assert report.checked == len(returned)


def test_a_journal_line_nested_too_deep_is_damage_not_a_crash(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, "npy", manifest=True) as writer:
        writer.write("a", torch.zeros(3))
    (journal,) = _journals(tmp_path)
    with journal.open("ab") as file:
        file.write(b"[" * 100_000 + b"\n")
    manifest = Manifest.load(tmp_path)
    assert list(manifest.records) == ["a.npy"]
    assert len(manifest.damaged) == 1
    assert not verify(tmp_path).ok


def test_a_second_close_waits_for_the_first(tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path, "npy", workers=1, durability="full", manifest=True)
    futures = [writer.write(f"k{i}", torch.zeros(1 << 18)) for i in range(30)]
    first = threading.Thread(target=writer.close)
    first.start()
    writer.close()
    assert all(future.done() for future in futures)
    assert not [link for link in _open_files() if JOURNAL_DIR in link]
    first.join(timeout=30)
    assert verify(tmp_path).ok


def test_a_kill_between_rename_and_record_leaves_a_renaming_line_that_vouches_for_the_file(
    tmp_path: Path,
) -> None:
    """The file was renamed, its record never written: verify and resume accept the file there."""
    with AsyncWriter(tmp_path, "npy", manifest=True) as writer:
        writer.write("k", torch.zeros(3)).result()
        writer.write("k", torch.ones(5)).result()
        writer.write("only", torch.ones(2)).result()
    (journal,) = _journals(tmp_path)
    lines = journal.read_bytes().splitlines(keepends=True)
    assert [b"renaming" in line for line in lines] == [True, False] * 3
    journal.write_bytes(b"".join(lines[:3] + lines[4:5]))  # both latest records lost to a "kill"
    manifest = Manifest.load(tmp_path)
    assert manifest.records["k.npy"]["bytes"] == 128 + 12  # the first version's record
    report = verify(tmp_path)
    assert report.ok, report
    assert report.checked == 2
    with AsyncWriter(tmp_path, "npy", manifest=True, skip_existing=True) as resumed:
        assert resumed.is_done("k")
        assert resumed.is_done("only")
    (tmp_path / "k.npy").write_bytes((tmp_path / "k.npy").read_bytes()[:-1] + b"\x01")  # now corrupt
    assert verify(tmp_path).checksum_mismatch == ["k.npy"]


def test_a_kill_between_renaming_line_and_rename_is_an_unfinished_write_not_a_missing_file(
    tmp_path: Path,
) -> None:
    with AsyncWriter(tmp_path, "npy", manifest=True) as writer:
        writer.write("done", torch.zeros(3)).result()
        writer.write("cut", torch.ones(5)).result()
    (journal,) = _journals(tmp_path)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:3]))  # "cut": its renaming line, then the kill
    (tmp_path / "cut.npy").unlink()  # the rename never happened
    report = verify(tmp_path)
    assert report.ok, report
    assert report.missing == []
    assert report.checked == 1
    with AsyncWriter(tmp_path, "npy", manifest=True, skip_existing=True) as resumed:
        assert resumed.is_done("done")
        assert not resumed.is_done("cut")  # written again on resume
    (tmp_path / "done.npy").unlink()
    assert verify(tmp_path).missing == ["done.npy"]  # a recorded file that went missing still is


@pytest.mark.usefixtures("each_engine")
def test_records_reach_the_journal_while_the_writer_idles(tmp_path: Path) -> None:
    """The native engine holds a file's record (the line after its rename) to write it with the next
    file's renaming line; a writer that goes quiet still has it written, without flush() or close()."""
    writer = AsyncWriter(tmp_path, "npy", durability="none", manifest=True)
    try:
        writer.write("a", torch.zeros(3)).result()
        (journal,) = _journals(tmp_path)
        deadline = time.monotonic() + 5
        while journal.read_bytes().count(b"\n") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        raw = journal.read_bytes()
    finally:
        writer.close()
    lines = raw.splitlines()
    assert [b"renaming" in line for line in lines] == [True, False]
    for line in lines:  # the time as the Python twin writes it: f"{when:.6f}"
        text = line.split(b'"time":')[1].split(b",")[0].rstrip(b"}")
        assert text == f"{float(text):.6f}".encode(), line
        assert abs(float(text) - time.time()) < 60


def test_a_journal_that_cannot_take_held_records_fails_the_writer_naming_their_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Native engine: a record held past its file's commit and then refused by the journal is the
    writer's failure, raised by flush() and close() and naming the file's key, never dropped."""
    from tensorsink.engine import ENGINE_VARIABLE, available_engines

    if "native" not in available_engines():
        pytest.skip("the native engine was not built here")
    monkeypatch.setenv(ENGINE_VARIABLE, "native")
    writer = AsyncWriter(tmp_path, "npy", durability="none", manifest=True)
    writer.write("held", torch.zeros(3)).result()
    journal_fd = writer._journal.fd  # type: ignore[union-attr]
    readonly = os.open(os.devnull, os.O_RDONLY)
    os.dup2(readonly, journal_fd)
    os.close(readonly)
    with pytest.raises(OSError, match="Bad file descriptor") as info:
        writer.flush()
    assert "held.npy" in str(info.value)
    with pytest.raises(OSError, match="Bad file descriptor"):
        writer.close()
    assert (tmp_path / "held.npy").exists()  # the file was committed; only its record was lost


@pytest.mark.usefixtures("each_engine")
def test_a_journal_that_cannot_be_written_fails_the_write_before_its_rename(tmp_path: Path) -> None:
    writer = AsyncWriter(tmp_path, "npy", manifest=True)
    writer.write("a", torch.zeros(3)).result()
    journal_fd = writer._journal.fd  # type: ignore[union-attr]
    readonly = os.open(os.devnull, os.O_RDONLY)
    os.dup2(readonly, journal_fd)  # every further journal write fails with EBADF
    os.close(readonly)
    with pytest.raises(OSError, match="Bad file descriptor") as info:
        writer.write("b", torch.ones(3)).result()
    assert "b.npy" in str(info.value)
    with pytest.raises(OSError, match="Bad file descriptor"):  # the first failure, not the fsync's
        writer.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["a.npy"]
    assert [p for p in tmp_path.iterdir() if is_temporary(p.name)] == []


def test_a_constructor_that_fails_leaves_no_journal_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="engine='bogus'"):
        AsyncWriter(tmp_path / "unknown", engine="bogus")
    assert not (tmp_path / "unknown").exists() or not _journals(tmp_path / "unknown")

    from tensorsink.engine.python import PythonEngine

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("the engine could not start")

    monkeypatch.setattr(PythonEngine, "__init__", refuse)
    with pytest.raises(OSError, match="could not start"):
        AsyncWriter(tmp_path / "failed", engine="python")
    assert not [link for link in _open_files() if JOURNAL_DIR in link], "the journal's fd was left open"


@pytest.mark.usefixtures("each_engine")
def test_a_key_whose_split_write_failed_halfway_is_not_done(tmp_path: Path) -> None:
    (tmp_path / "k_b.npy").mkdir()  # the second file cannot be renamed into place
    writer = AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, "split")
    future = writer.write("k", {"a": torch.ones(2), "b": torch.ones(2)})
    with pytest.raises(OSError, match=r"k_b\.npy"):
        future.result()
    with pytest.raises(OSError, match=r"k_b\.npy"):
        writer.close()
    assert (tmp_path / "k_a.npy").exists()  # the first file was committed and journaled
    assert "k_a.npy" in Manifest.load(tmp_path).records
    (tmp_path / "k_b.npy").rmdir()
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, "split", skip_existing=True) as resumed:
        assert not resumed.is_done("k"), "half of k's files are not k written"
        assert resumed.write("k", {"a": torch.ones(2), "b": torch.ones(2)}).result() == [
            tmp_path / "k_a.npy",
            tmp_path / "k_b.npy",
        ]
        assert resumed.is_done("k")
    with AsyncWriter(tmp_path, SaveFormat.NUMPY_NPY, "split", skip_existing=True) as again:
        assert again.is_done("k")


def test_a_journal_folder_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    from tensorsink import SymlinkError

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / JOURNAL_DIR).symlink_to(outside)
    with pytest.raises(SymlinkError, match=JOURNAL_DIR):
        AsyncWriter(root)
    assert list(outside.iterdir()) == []
    with AsyncWriter(root, follow_symlinks=True) as writer:  # asked for: as for any folder
        writer.write("a", torch.ones(2))
    assert len(list(outside.iterdir())) == 1


@given(
    key=st.text(min_size=1, max_size=30),
    names=st.lists(st.text(max_size=10), max_size=3),
    shape=st.one_of(st.none(), st.lists(st.integers(0, 2**40), max_size=4)),
    files=st.integers(1, 5),
    write=st.one_of(st.none(), st.text(alphabet="0123456789abcdef", min_size=1, max_size=12)),
)
def test_a_records_prefix_is_the_json_of_its_fields(
    tmp_path_factory: pytest.TempPathFactory,
    key: str,
    names: list[str],
    shape: list[int] | None,
    files: int,
    write: str | None,
) -> None:
    """The prefix is built by hand for speed: it must be what json.dumps writes, to the byte."""
    root = str(tmp_path_factory.getbasetemp())
    journal = Journal.__new__(Journal)  # only prefix() is used: no file
    journal._root, journal._root_slash = root, root + "/"
    arrays = [[name, "float32", shape] for name in names]
    head: dict[str, Any] = {"key": key, "path": f"{key}.npy", "format": "npy", "arrays": arrays}
    if files != 1:
        head["files"] = files
    if write is not None:
        head["write"] = write
    expected = json.dumps(head, separators=(",", ":"))[:-1].encode()
    assert journal.prefix(key, f"{root}/{key}.npy", "npy", arrays, files, write) == expected


def test_a_rewrite_killed_between_its_files_is_not_done(tmp_path: Path) -> None:
    """A first write of k made k_a and k_b; a rewrite renamed its k_a and was killed before k_b: the
    files there are of two writes, so k is not done (resume writes it again)."""
    (tmp_path / "k_a.npy").write_bytes(b"new")
    (tmp_path / "k_b.npy").write_bytes(b"old")
    (tmp_path / JOURNAL_DIR).mkdir()

    def line(path: str, size: int, write: str, when: float) -> str:
        head = {"key": "k", "path": path, "format": "npy", "arrays": [], "files": 2, "write": write}
        return json.dumps({**head, "bytes": size, "crc32": "00000000", "time": when}) + "\n"

    journal = tmp_path / JOURNAL_DIR / "journal-h-1-aa.jsonl"
    journal.write_text(line("k_a.npy", 3, "w1", 1.0) + line("k_b.npy", 3, "w1", 2.0))
    assert Manifest.load(tmp_path).done("k")  # the first write, whole
    journal.write_text(journal.read_text() + line("k_a.npy", 3, "w2", 3.0))  # the rewrite's first file
    assert not Manifest.load(tmp_path).done("k")
    journal.write_text(journal.read_text() + line("k_b.npy", 3, "w2", 4.0))  # and its second
    assert Manifest.load(tmp_path).done("k")


def test_a_rewrite_killed_before_its_first_files_record_is_not_done(tmp_path: Path) -> None:
    """As above, but the rewrite's first file has only its renaming line (its record, written after
    the rename, was lost to the kill): that line is the file there, of the rewrite."""
    (tmp_path / "k_a.npy").write_bytes(b"new")
    (tmp_path / "k_b.npy").write_bytes(b"old")
    (tmp_path / JOURNAL_DIR).mkdir()

    def line(path: str, write: str, when: float, renaming: bool = False) -> str:
        head = {"key": "k", "path": path, "format": "npy", "arrays": [], "files": 2, "write": write}
        tail = {"renaming": True} if renaming else {}
        return json.dumps({**head, "bytes": 3, "crc32": "00000000", "time": when, **tail}) + "\n"

    journal = tmp_path / JOURNAL_DIR / "journal-h-1-aa.jsonl"
    first = line("k_a.npy", "w1", 1.0) + line("k_b.npy", "w1", 2.0)
    journal.write_text(first + line("k_a.npy", "w2", 3.0, renaming=True))
    assert not Manifest.load(tmp_path).done("k")
    journal.write_text(first + line("k_a.npy", "w1", 3.0, renaming=True))  # a rename of the same write
    assert Manifest.load(tmp_path).done("k")


@given(
    nbytes=st.integers(0, 1 << 50),
    crc=st.integers(0, (1 << 32) - 1),
    when=st.floats(1e9, 4e9, allow_nan=False),
    renaming=st.booleans(),
)
def test_the_engines_line_end_is_the_python_twins(nbytes: int, crc: int, when: float, renaming: bool) -> None:
    from tensorsink.engine import available_engines

    if "native" not in available_engines():
        pytest.skip("the native engine was not built here")
    from tensorsink.engine._native import line_tail as c_line_tail
    from tensorsink.manifest import line_tail

    assert c_line_tail(nbytes, crc, when, renaming) == line_tail(nbytes, crc, when, renaming).encode()


def test_a_closed_writer_never_writes_its_journal_again(tmp_path: Path) -> None:
    """The journal refused a held record at close(): the number of its descriptor, closed with the
    writer, may be another file's by the next call, which must not get the record."""
    writer = AsyncWriter(tmp_path, "npy", durability="none", engine="native")
    writer.write("held", torch.zeros(3)).result()
    journal_fd = writer._journal.fd  # type: ignore[union-attr]
    readonly = os.open(os.devnull, os.O_RDONLY)
    os.dup2(readonly, journal_fd)
    os.close(readonly)
    with pytest.raises(OSError, match="Bad file descriptor"):
        writer.close()
    opened = []
    try:
        while (fd := os.open(tmp_path / "unrelated.txt", os.O_WRONLY | os.O_CREAT, 0o644)) != journal_fd:
            opened.append(fd)
            assert len(opened) < 1000, "the journal's descriptor number never came back"
        opened.append(fd)
        with pytest.raises(OSError, match="Bad file descriptor"):
            writer.flush()
    finally:
        for fd in opened:
            os.close(fd)
    assert (tmp_path / "unrelated.txt").read_bytes() == b""
