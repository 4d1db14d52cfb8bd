"""The `tensorsink` command line: what each command imports, its help, exit codes and output."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import tensorsink
from tensorsink import AsyncWriter
from tensorsink.__main__ import BROKEN_PIPE, main
from tensorsink.bench import UsageError, add_arguments, config_from
from tensorsink.bench.workloads import PRESETS, format_size, parse_size
from tensorsink.manifest import verify

# Runs the command line in a fresh interpreter in which torch, numpy, safetensors and matplotlib cannot
# be imported, and whose `tensorsink` package is a bare one (no __init__ run): what the command line
# itself imports, whatever the package's __init__ does.
_WITHOUT_HEAVY_IMPORTS = textwrap.dedent(
    """
    import importlib.abc, importlib.util, sys, types

    HEAVY = {"torch", "numpy", "safetensors", "matplotlib"}

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HEAVY:
                raise ImportError(f"{name} was imported")
            return None

    spec = importlib.util.find_spec("tensorsink")
    package = types.ModuleType("tensorsink")
    package.__path__ = list(spec.submodule_search_locations)
    package.__version__ = "0.0.test"
    sys.modules["tensorsink"] = package
    sys.meta_path.insert(0, Refuse())
    from tensorsink.__main__ import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit_:
        code = exit_.code
    loaded = sorted(name for name in sys.modules if name.startswith("tensorsink."))
    print("LOADED", " ".join(loaded), file=sys.stderr)
    sys.exit(code)
    """
)


def _run_light(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_HEAVY_IMPORTS, *argv],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _loaded(stderr: str) -> set[str]:
    line = next(line for line in stderr.splitlines() if line.startswith("LOADED"))
    return set(line.split()[1:])


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--version"], ["bench", "--help"], ["sweep", "--help"], ["verify", "--help"],
     ["manifest", "--help"], ["shards", "--help"]],
)  # fmt: skip
def test_help_and_version_import_neither_torch_nor_the_benchmark(argv: list[str]) -> None:
    done = _run_light(*argv)
    assert done.returncode == 0, done.stderr
    assert "was imported" not in done.stderr
    loaded = _loaded(done.stderr)
    assert not {"tensorsink.bench.runner", "tensorsink.bench.contenders", "tensorsink.manifest"} & loaded


def test_sweep_imports_only_the_commit_protocol(tmp_path: Path) -> None:
    (tmp_path / ".x.pt.tsink-01.partial").write_bytes(b"")
    done = _run_light("sweep", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "removed 1 temporary" in done.stderr
    assert _loaded(done.stderr) <= {
        "tensorsink.__main__", "tensorsink.bench", "tensorsink.bench.workloads", "tensorsink.commit",
        "tensorsink.errors", "tensorsink.options",
    }  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_help_does_not_import_torch_with_the_installed_package() -> None:
    probe = "import sys, tensorsink; print('torch' in sys.modules)"
    answer = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert answer.stdout.strip() == "False", "import tensorsink imports torch: AsyncWriter is to load lazily"
    script = "import sys\nfrom tensorsink.__main__ import main\n"
    script += "try:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    script += "\nprint('torch' in sys.modules, file=sys.stderr)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.stderr.strip().endswith("False")


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"tensorsink {tensorsink.__version__}"


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # one help line per option


@pytest.mark.usefixtures("wide")
def test_every_command_is_described_and_gives_its_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    top = _help(capsys)
    assert "The `tensorsink` command line." not in top
    assert "remove the temporaries a killed" in top
    assert "exit status:" in top
    descriptions = {
        "sweep": "Final files are never touched",
        "verify": "Check every file a writer with manifest=True journaled",
        "manifest": "one JSON line per file",
        "bench": "the machine's ceiling",
    }
    for command, phrase in descriptions.items():
        text = " ".join(_help(capsys, command).split())  # the description is filled to the width
        assert phrase in text, command
        assert "exit status:" in text, command
    verify = _help(capsys, "verify")
    for code in ("0 ", "1 ", "2 ", "141"):
        assert f"\n  {code}" in verify, code
    assert "holds no journals" in verify


@pytest.mark.usefixtures("wide")
def test_bench_options_have_help_and_shown_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _help(capsys, "bench").splitlines()

    def line_of(option: str) -> str:
        """The option's line and its help's (on the next line after a long list of choices)."""
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(option))
        return " ".join(lines[at : at + 2])

    assert "(default: safetensors)" in line_of("--format")
    assert "write threads (default: 4)" in line_of("--workers")
    assert "(default: auto)" in line_of("--backend")
    assert "medians are reported (default: 3)" in line_of("--rounds")


@pytest.mark.parametrize("command", ["sweep", "verify", "manifest"])
def test_a_root_that_is_not_a_folder_is_exit_2_for_every_command(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, str(tmp_path / "missing")]) == 2
    assert f"tensorsink {command}: no such folder: {tmp_path / 'missing'}" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main([command, str(tmp_path / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("command", ["verify", "manifest"])
def test_a_root_without_journals_is_exit_2_for_verify_and_manifest(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / ".tensorsink").mkdir()  # a journal folder without journals is no manifest either
    assert main([command, str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "no journals in" in err
    assert "manifest=True" in err


def test_sweep_of_an_empty_folder_is_fine_and_a_failed_removal_is_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["sweep", str(tmp_path)]) == 0
    assert "removed 0 temporaries" in capsys.readouterr().err

    def refused(root: object) -> list[Path]:
        raise PermissionError(13, "Permission denied", str(tmp_path / ".a.npy.tsink-01.partial"))

    monkeypatch.setattr("tensorsink.commit.sweep", refused)
    assert main(["sweep", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"could not remove {tmp_path / '.a.npy.tsink-01.partial'}: Permission denied" in err


def _journal(root: Path, count: int, damaged_line: int | None = None) -> Path:
    """A journal recording `count` .npy files (none of them on disk), one line replaced by junk."""
    (root / ".tensorsink").mkdir(parents=True)
    lines = []
    for index in range(count):
        name = f"sample_{index:06d}"
        record = {"key": name, "path": f"{name}.npy", "format": "npy", "arrays": [["arr_0", "float32", [3]]],
                  "bytes": 140, "crc32": "189bf6a9", "time": 1.0 + index}  # fmt: skip
        lines.append("{not json" if index == damaged_line else json.dumps(record))
    journal = root / ".tensorsink" / "journal-host-1-0a.jsonl"
    journal.write_text("\n".join(lines) + "\n")
    return journal


def test_manifest_exits_1_when_it_skipped_a_damaged_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _journal(tmp_path, 3, damaged_line=1)
    assert main(["manifest", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert [json.loads(line)["path"] for line in out.splitlines()] == [
        "sample_000000.npy",
        "sample_000002.npy",
    ]
    assert "skipped 1 damaged journal line" in err
    tmp_clean = tmp_path / "clean"
    _journal(tmp_clean, 2)
    assert main(["manifest", str(tmp_clean)]) == 0


def test_verify_without_checksums_reports_no_checksum_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with AsyncWriter(tmp_path, "npy", manifest=True) as writer:
        writer.write("a", torch.zeros(4))
    assert main(["verify", str(tmp_path), "--no-checksum"]) == 0
    summary = capsys.readouterr().out
    assert "checked sizes and layouts of 1 files" in summary
    assert "checksum" not in summary
    assert main(["verify", str(tmp_path)]) == 0
    assert "0 checksum mismatch" in capsys.readouterr().out


def test_a_size_mismatch_shows_both_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with AsyncWriter(tmp_path, "npy", manifest=True) as writer:
        writer.write("a", torch.zeros(4))
    whole = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(whole[:-4])
    detail = f"a.npy: {len(whole) - 4} bytes on disk where the manifest records {len(whole)}"
    assert verify(tmp_path).size_mismatch == [detail]
    assert main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"size mismatch: {detail}\n" in out
    assert "1 size mismatch" in out


@pytest.fixture
def no_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing from the host's AWS set-up: boto3's chain finds no credentials, and asks no network."""
    boto3 = pytest.importorskip("boto3")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it keeps the credentials an earlier test had
    nowhere = tmp_path / "no-aws"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(nowhere))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def s3_endpoint(no_aws_credentials: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An S3 server without buckets (moto's) on loopback, and fake credentials for it."""
    moto_server = pytest.importorskip("moto.server")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _refused(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a refused command printed (on standard error, nothing on standard output)."""
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_verify_of_a_bucket_that_is_not_there_is_one_line_and_exit_2(
    s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", "s3://no-such-bucket/run/", "--endpoint-url", s3_endpoint]) == 2
    err = _refused(capsys)
    assert err.startswith("tensorsink verify: cannot read s3://no-such-bucket/run/: ")
    assert "NoSuchBucket" in err


@pytest.mark.usefixtures("no_aws_credentials")
def test_verify_of_a_bucket_without_credentials_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # No store is asked: the request cannot be signed. Port 9 (discard) is where none would answer.
    assert main(["verify", "s3://bucket/run/", "--endpoint-url", "http://127.0.0.1:9"]) == 2
    err = _refused(capsys)
    assert "cannot read s3://bucket/run/: Unable to locate credentials" in err
    assert "AWS_ACCESS_KEY_ID" in err


def test_verify_of_an_unreachable_store_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    exceptions = pytest.importorskip("botocore.exceptions")

    def unreachable(*args: object, **kwargs: object) -> None:  # as boto3 after its retries
        raise exceptions.EndpointConnectionError(endpoint_url="http://store.invalid:9000/bucket")

    monkeypatch.setattr("tensorsink.upload.verify_prefix", unreachable)
    assert main(["verify", "s3://bucket/run/", "--endpoint-url", "http://store.invalid:9000"]) == 2
    err = _refused(capsys)
    assert "Could not connect to the endpoint URL" in err
    assert "is --endpoint-url http://store.invalid:9000 the store's address?" in err


def test_verify_of_a_bucket_without_boto3_or_of_no_bucket_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", "s3://"]) == 2
    assert "'s3://' is not an S3 URL; write it as s3://bucket/prefix/" in _refused(capsys)
    monkeypatch.setitem(sys.modules, "botocore.exceptions", None)  # as if boto3 were not installed
    assert main(["verify", "s3://bucket/run/"]) == 2
    assert "pip install 'tensorsink[s3]'" in _refused(capsys)


def _closed_early(argv: list[str]) -> tuple[int, str]:
    """Run the command with its output read for one line and then closed, as `| head -1` does."""
    with subprocess.Popen(
        [sys.executable, "-m", "tensorsink", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as child:
        assert child.stdout is not None
        assert child.stderr is not None
        assert child.stdout.readline()
        child.stdout.close()
        err = child.stderr.read().decode()
        return child.wait(timeout=120), err


@pytest.mark.parametrize("command", ["manifest", "verify", "sweep"])
def test_output_closed_early_ends_quietly(command: str, tmp_path: Path) -> None:
    if command == "sweep":
        for index in range(3000):  # some 300 KB of paths: more than a pipe holds
            (tmp_path / f".sample_{index:06d}.npy.tsink-0a.partial").write_bytes(b"")
    else:
        _journal(tmp_path, 8000)  # verify: a "missing:" line each, manifest: a record each
    code, err = _closed_early([command, str(tmp_path)])
    assert "Traceback" not in err
    assert "BrokenPipe" not in err
    assert "Exception ignored" not in err
    assert code == BROKEN_PIPE


def _bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_count_applies_to_the_workload_it_names() -> None:
    (small,) = config_from(_bench_args("--workload", "small", "--count", "16")).workloads
    assert small.count == 16
    config = config_from(_bench_args("--workload", "small", "mid", "--count", "small=200"))
    assert [(w.name, w.count) for w in config.workloads] == [("small", 200), ("mid", PRESETS["mid"].count)]
    config = config_from(_bench_args("--workload", "all", "--count", "large=1", "mapping=8"))
    assert {w.name: w.count for w in config.workloads} == {"large": 1, "mid": 64, "small": 1000, "mapping": 8}
    with pytest.raises(UsageError, match=r"several workloads \(mid, small, mapping\).*--count mid=16"):
        config_from(_bench_args("--count", "16"))  # the default workloads
    with pytest.raises(UsageError, match="mid is not run"):
        config_from(_bench_args("--workload", "small", "--count", "mid=3"))
    with pytest.raises(UsageError, match="one N"):
        config_from(_bench_args("--workload", "small", "--count", "5", "small=3"))


def test_count_refusals_exit_2_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["--count", "16"], ["--count", "tiny=3"], ["--workload", "small", "--count", "mid=3"]):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "--out", str(tmp_path / "never"), *argv])
        assert exit_.value.code == 2, argv
        assert "tensorsink bench: error:" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("text", "shown"),
    [("64MB", "64 MB"), ("64MiB", "64 MiB"), ("1.5GB", "1.5 GB"), ("512K", "512 KB"), ("16kib", "16 KiB"),
     ("64 KB", "64 KB"), ("4097", "4097 B")],
)  # fmt: skip
def test_sizes_are_shown_as_they_were_given(text: str, shown: str) -> None:
    (small,) = config_from(_bench_args("--workload", "small", "--size", text)).workloads
    assert small.item_size == parse_size(text)
    assert small.describe() == f"small: 1,000 tensors of {shown}"


@pytest.mark.parametrize(
    ("nbytes", "shown"),
    [(64 * 10**6, "64 MB"), (64 << 20, "64 MiB"), (1_500_000_000, "1.5 GB"), (16 << 10, "16 KiB"),
     (1 << 30, "1 GiB"), (4097, "4.097 KB"), (100, "100 B")],
)  # fmt: skip
def test_sizes_without_a_given_unit_are_shown_exactly(nbytes: int, shown: str) -> None:
    assert format_size(nbytes) == shown


_TINY = ["--workload", "small", "--count", "2", "--size", "64KB", "--rounds", "1", "--durability", "none"]


def test_out_that_existed_keeps_what_it_held_and_nothing_more(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scratch"
    out.mkdir()
    (out / "keep.txt").write_text("the user's")
    assert main(["bench", *_TINY, "--out", str(out)]) == 0
    assert "small: 2 tensors of 64 KB" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "the user's"


def test_out_the_bench_created_is_removed_with_its_parents(tmp_path: Path) -> None:
    assert main(["bench", *_TINY, "--out", str(tmp_path / "new" / "deeper")]) == 0
    assert list(tmp_path.iterdir()) == []


def test_out_that_cannot_be_made_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *_TINY, "--out", str(tmp_path / "file" / "sub")])
    assert exit_.value.code == 2
    assert f"--out {tmp_path / 'file' / 'sub'}" in capsys.readouterr().err


def test_python_dash_m_and_the_script_agree(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tensorsink", "sweep", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )  # fmt: skip
    assert done.returncode == 2
    assert "no such folder" in done.stderr
    assert "Traceback" not in done.stderr


def test_shards_writes_the_list_of_every_shard_under_the_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import torch

    from tensorsink import ShardWriter
    from tensorsink.manifest import verify

    for writer_number in range(2):  # two jobs, neither of which wrote a list (as if killed)
        with ShardWriter(tmp_path, save_format="npy", shard_samples=3, shard_list=None) as writer:
            writer.write_batch([f"j{writer_number}/{i}" for i in range(4)], torch.ones(4, 2))
    assert not (tmp_path / "shards.json").exists()
    assert main(["shards", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "shards.json")
    assert err.strip() == "listed 4 shards, 8 samples"
    listing = json.loads((tmp_path / "shards.json").read_text())
    assert sorted(shard["nsamples"] for shard in listing["shardlist"]) == [1, 1, 3, 3]
    assert verify(tmp_path).ok  # the list is journaled
    assert main(["shards", str(tmp_path), "--name", "../out.json"]) == 2
    assert main(["shards", str(tmp_path / "nowhere")]) == 2
