"""`tensorsink bench`: sizes, contenders that really write, and a tiny run end to end."""

from __future__ import annotations

import argparse
import importlib.util
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
from tensorsink.bench import BenchConfig, UsageError, Workload, add_arguments, config_from, parse_size
from tensorsink.bench.contenders import contenders_for
from tensorsink.bench.environment import filesystem_of
from tensorsink.bench.producer import ROTATION, outputs_for, produce, producer_contenders
from tensorsink.bench.runner import Progress, measure
from tests.support import outputs_in

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
        assert not [p for p in outputs_in(root) if p.name.startswith(".")], "a temporary was left"
        if "threads" not in contender.name and "in C" not in contender.name:  # those time the loop whole
            assert len(sample.call_seconds) == len(items), contender.name
    names = [c.name for c in contenders if c.kind == "ceiling"]
    built = importlib.util.find_spec("tensorsink.bench._bare") is not None  # the bare loop's extension
    assert names[0].startswith("ceiling: bare loop in C") == built, names


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
    argv = ["bench", "--workload", "small", "mapping", "--count", "small=6", "mapping=6", "--size", "8KiB",
            "--rounds", "1",
            "--durability", "none", "file", "--format", "npy", "--out", str(out),
            "--json", str(report), "--plot", str(chart)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for heading in ("x ceiling", "In short", "output folder:"):
        assert heading in printed
    document = json.loads(report.read_text())
    assert set(document) == {"environment", "config", "results", "producer"}
    assert document["producer"] == [], "a producer workload runs only when named"
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
    assert not out.exists(), "the folder the bench created is removed"


def test_default_folder_is_temporary_and_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert (
        main(["bench", "--workload", "small", "--count", "3", "--rounds", "1", "--durability", "none"]) == 0
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--size", "64 furlongs"], "not understood"), (["--count", "0"], "must be 1 or more"),
     (["--format", "hdf5"], "invalid choice"), (["--count", "x"], "not a whole number"),
     (["--workload", "producer", "--ops", "-1"], "must be 0 or more"),
     (["--workload", "producer", "--wait-us", "-5"], "must be 0 or more"),
     (["--workload", "producer", "--ops", "many"], "not a whole number")],
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


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_producer_runs_only_when_named_and_takes_its_overrides() -> None:
    assert not [w for w in config_from(_args("--workload", "all")).workloads if w.producer]
    (busy,) = config_from(_args("--workload", "producer", "--ops", "50", "--wait-us", "300")).workloads
    assert (busy.ops, busy.wait_us, busy.item_size, busy.count) == (50, 300, 64 << 10, 2000)
    mixed = config_from(_args("--workload", "small", "producer-nowait", "--ops", "7", "--size", "4KiB"))
    small, nowait = mixed.workloads
    assert (small.ops, small.item_size) == (0, 4096)
    assert (nowait.ops, nowait.wait_us, nowait.item_size) == (7, 0, 4096)
    with pytest.raises(UsageError, match="--workload producer"):
        config_from(_args("--workload", "small", "--wait-us", "10"))
    with pytest.raises(ValueError, match="0 or more"):
        Workload("p", 4096, 3, producer=True, ops=-1)


def test_producer_step_holds_its_ops_wait_and_write() -> None:
    workload = Workload("p", 4096, 5, producer=True, ops=4, wait_us=2000)
    seen: list[int] = []
    steps, calls = produce(workload, outputs_for(workload), lambda step, output: seen.append(step))
    assert seen == list(range(5))
    assert len(steps) == len(calls) == 5
    assert min(steps) >= 2e-3, "the wait is part of every step"
    assert all(call <= step for call, step in zip(calls, steps, strict=True))


@pytest.mark.parametrize("size", [8 << 10, 80 << 10])  # on the caller's thread, and through the workers
def test_producer_writers_write_every_output_under_its_step(tmp_path: Path, size: int) -> None:
    workload = Workload("p", size, ROTATION + 3, producer=True, ops=2, wait_us=0)
    outputs = outputs_for(workload)
    assert len({id(t) for t in outputs}) == ROTATION
    assert len({t.numpy().tobytes() for t in outputs}) == ROTATION, "distinct contents"
    for contender in producer_contenders(SaveFormat.SAFETENSORS, DictMode.SINGLE, 2, Backend.AUTO):
        root = tmp_path / contender.kind
        root.mkdir()
        sample = contender.run(root, workload, outputs, Durability.FILE)
        assert len(sample.step_seconds) == workload.count
        if contender.kind == "baseline":
            assert sample.call_seconds == []
            assert sample.drain_seconds is None
            assert list(root.iterdir()) == []
            continue
        assert len(sample.call_seconds) == workload.count
        assert sample.drain_seconds is not None
        assert sorted(p.name for p in outputs_in(root)) == ["p"]
        assert sorted(p.name for p in (root / "p").iterdir()) == sorted(
            f"{step}.safetensors" for step in range(workload.count)
        ), contender.name
        for step in range(workload.count):
            (tensor,) = safetensors.torch.load_file(root / "p" / f"{step}.safetensors").values()
            assert torch.equal(tensor, outputs[step % ROTATION]), (contender.name, step)


def test_producer_cli_reports_step_ratios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report, chart = tmp_path / "out", tmp_path / "producer.json", tmp_path / "producer.png"
    argv = ["bench", "--workload", "producer", "--count", "12", "--ops", "3", "--wait-us", "100",
            "--size", "80KiB", "--rounds", "2", "--durability", "file", "none", "--out", str(out),
            "--json", str(report), "--plot", str(chart)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for heading in ("step ratio", "Producer loop", "12 steps of 3 ops + 100 us wait + a 80 KiB output"):
        assert heading in printed
    assert "x ceiling" not in printed, "no throughput workload was asked for"
    document = json.loads(report.read_text())
    assert document["results"] == []
    rows = {r["kind"]: r for r in document["producer"]}
    assert set(rows) == {"baseline", "tensorsink", "peer"}
    for row in rows.values():
        assert row["step_ratio"] > 0
        assert row["durability"] == "file", "the first durability given"
        assert (row["steps"], row["ops"], row["wait_us"], row["item_size"]) == (12, 3, 100, 80 << 10)
        assert len(row["step_us"]) == 2
        assert row["median_step_us"] >= 100
    assert rows["baseline"]["step_ratio"] == pytest.approx(1.0)
    assert rows["baseline"]["files"] == 0
    assert rows["baseline"]["call_p50_us"] is None
    assert rows["tensorsink"]["files"] == 12, "every output, in every round"
    assert rows["peer"]["files"] == 12
    for kind in ("tensorsink", "peer"):
        assert rows[kind]["call_p50_us"] is not None
        assert rows[kind]["drain_seconds"] is not None
        assert rows[kind]["files_per_s"] > 0
    assert chart.read_bytes()[:8] == PNG_MAGIC
    assert not out.exists(), "the folder the bench created is removed"
