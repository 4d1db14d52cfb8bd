"""The manifest: records only for committed files, resume by skipping them, verify finding every fault."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tensorsink import AsyncWriter, SaveFormat
from tensorsink.__main__ import main
from tensorsink.commit import is_temporary
from tensorsink.manifest import JOURNAL_DIR, Manifest, verify


def _journals(root: Path) -> list[Path]:
    return sorted((root / JOURNAL_DIR).glob("journal-*.jsonl"))


@pytest.mark.parametrize("save_format", list(SaveFormat))
def test_a_record_per_committed_file_with_its_crc(tmp_path: Path, save_format: SaveFormat) -> None:
    with AsyncWriter(tmp_path, save_format, "split", manifest=True) as writer:
        writer.write("a/x", torch.arange(6, dtype=torch.float32).reshape(2, 3))
        writer.write("b", {"m": torch.zeros(2, dtype=torch.uint8), "n": torch.ones(3)})
        writer.write_batch(["t/0", "t/1"], ["zero", "one"], save=lambda p, v: p.write_text(v), suffix=".txt")
    (journal,) = _journals(tmp_path)
    records = [json.loads(line) for line in journal.read_text().splitlines()]
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


def test_no_journal_unless_asked(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path) as writer:
        writer.write("x", torch.zeros(3))
    assert not (tmp_path / JOURNAL_DIR).exists()
    with pytest.raises(ValueError, match="skip_existing=True needs manifest=True"):
        AsyncWriter(tmp_path, skip_existing=True)


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
        ["short.npy"],
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
