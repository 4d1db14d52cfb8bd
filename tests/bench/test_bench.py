"""`tensorsink bench`: sizes, contenders that really write, and a tiny run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from tensorsink import Backend, DictMode, Durability, SaveFormat
from tensorsink.__main__ import main
from tensorsink.bench import BenchConfig, Workload, parse_size
from tensorsink.bench.contenders import contenders_for
from tensorsink.bench.environment import filesystem_of
from tensorsink.bench.runner import Progress, measure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("64MiB", 64 << 20), ("4 KiB", 4096), ("1.5GB", 1_500_000_000), ("4096", 4096), ("2mib", 2 << 20),
     ("512K", 512_000), ("1GiB", 1 << 30)],
)  # fmt: skip
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "64 furlongs", "-1MiB", "0", "1e3"])
def test_parse_size_names_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text).replace("\\", "\\\\")):
        parse_size(text)


def test_mapping_workload_has_the_size_asked_for() -> None:
    (item,) = Workload("m", 1 << 20, 1, mapping=True).items(torch.device("cpu"))
    assert isinstance(item, dict)
    assert sum(t.numel() * t.element_size() for t in item.values()) == 1 << 20
    assert {t.dtype for t in item.values()} == {torch.float32, torch.float16, torch.uint8}


def _read_all(root: Path) -> dict[str, bytes]:
    """Every tensor in every final file under `root`, by file and name, as raw bytes."""
    found: dict[str, bytes] = {}
    for path in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if path.suffix == ".safetensors":
            for name, tensor in safetensors.torch.load_file(path).items():
                found[f"{path.stem}/{name}"] = tensor.numpy().tobytes()
        elif path.suffix == ".npy":
            found[path.stem] = np.load(path).tobytes()
        elif path.suffix == ".pt":
            found[path.stem] = torch.load(path, weights_only=True).numpy().tobytes()
        elif path.suffix == ".bin":
            found[path.stem] = path.read_bytes()
    return found


@pytest.mark.parametrize("durability", list(Durability))
def test_every_contender_writes_every_item_in_full(tmp_path: Path, durability: Durability) -> None:
    items = Workload("w", 40_000, 3).items(torch.device("cpu")) + Workload("w", 200_000, 2).items(
        torch.device("cpu"), seed=1
    )
    expected = [t.numpy().tobytes() for t in items]
    contenders = contenders_for(SaveFormat.SAFETENSORS, DictMode.SINGLE, 2, Backend.AUTO, torch.device("cpu"))
    for contender in contenders:
        root = tmp_path / contender.name.replace(" ", "_").replace(":", "").replace(",", "")
        root.mkdir()
        sample = contender.run(root, items, durability)
        assert sample.seconds > 0
        found = _read_all(root)
        assert len(found) == len(items), contender.name
        assert sorted(found.values()) == sorted(expected), contender.name
        assert not [p for p in root.iterdir() if p.name.startswith(".")], "a temporary was left"
        if contender.kind != "ceiling" or "1 thread" in contender.name:
            assert len(sample.call_seconds) == len(items), contender.name


def test_measure_rotates_rounds_and_reports_ratios(tmp_path: Path) -> None:
    config = BenchConfig(
        workloads=[Workload("small", 1000, 20), Workload("mapping", 4096, 5, mapping=True)],
        durabilities=[Durability.NONE, Durability.FULL],
        rounds=2,
    )
    lines: list[str] = []

    class Log:
        def isatty(self) -> bool:
            return False

        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    rows = measure(config, tmp_path, Progress(Log()))  # type: ignore[arg-type]
    contenders = {r.contender for r in rows}
    assert len(rows) == 2 * 2 * len(contenders)
    assert sum("round 2/2 done" in line for line in lines) == 4
    for row in rows:
        assert len(row.seconds) == 2
        assert row.gb_per_s == pytest.approx(row.bytes / row.median_seconds / 1e9)
    for key in {(r.workload, r.durability) for r in rows}:
        group = [r for r in rows if (r.workload, r.durability) == key]
        assert max(r.x_ceiling for r in group if r.kind == "ceiling") == pytest.approx(1.0)
        ours = next(r for r in group if r.kind == "tensorsink")
        assert ours.files == ours.items
        assert ours.blocked_seconds <= ours.median_seconds * 1.5
    assert list(tmp_path.iterdir()) == [], "each run's folder is removed"


def test_cli_run_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report, chart = tmp_path / "out", tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--workload", "small", "mapping", "--count", "6", "--size", "8KiB", "--rounds", "1",
            "--durability", "none", "file", "--format", "npy", "--out", str(out),
            "--json", str(report), "--plot", str(chart)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for heading in ("x ceiling", "In short", "output folder:"):
        assert heading in printed
    document = json.loads(report.read_text())
    assert set(document) == {"environment", "config", "results"}
    assert {"cpus", "gpu", "filesystem", "kvikio", "date"} <= set(document["environment"])
    assert document["config"]["format"] == "npy"
    assert document["config"]["dict_mode"] == "split"
    results = document["results"]
    assert {(r["workload"], r["durability"]) for r in results} == {
        (w, d) for w in ("small", "mapping") for d in ("none", "file")
    }
    fields = {"contender", "kind", "gb_per_s", "files_per_s", "blocked_seconds", "call_p50_us", "call_p99_us",
              "x_ceiling", "seconds", "bytes", "files"}  # fmt: skip
    for row in results:
        assert fields <= set(row)
        assert row["bytes"] == 6 * 8192
    split = next(r for r in results if r["kind"] == "tensorsink" and r["workload"] == "mapping")
    assert split["files"] == 6 * 4, "npy splits each mapping into one file per entry"
    assert chart.read_bytes()[:8] == PNG_MAGIC
    assert list(out.iterdir()) == []


def test_default_folder_is_temporary_and_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert (
        main(["bench", "--workload", "small", "--count", "3", "--rounds", "1", "--durability", "none"]) == 0
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--size", "64 furlongs"], "not understood"), (["--count", "0"], "must be 1 or more"),
     (["--format", "hdf5"], "invalid choice")],
)  # fmt: skip
def test_bad_options_are_refused_before_anything_runs(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--out", str(tmp_path / "never"), *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_filesystem_of_names_the_mount() -> None:
    assert filesystem_of(Path("/proc/self")).startswith("proc on /proc")


def test_python_dash_m_smoke(tmp_path: Path) -> None:
    """The command as a user runs it, in a fresh interpreter whose output is not a terminal."""
    report = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "tensorsink", "bench", "--workload", "small", "--count", "4", "--rounds", "1",
         "--durability", "file", "--json", str(report)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "round 1/1 done" in done.stderr
    assert json.loads(report.read_text())["results"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
