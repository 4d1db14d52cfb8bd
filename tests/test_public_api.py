"""The public namespace, and compatibility with the original AsyncWriter's signature."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import tensorsink
from tensorsink import AsyncWriter, DictMode, Durability, SaveFormat, WriterOptions


def test_all_is_sorted_and_complete() -> None:
    assert tensorsink.__all__ == sorted(tensorsink.__all__)
    public = {name for name in vars(tensorsink) if not name.startswith("_")} - {"annotations"}
    public |= set(tensorsink._LAZY)  # imported on first use
    modules = {name for name, value in vars(tensorsink).items() if inspect.ismodule(value)}
    assert set(tensorsink.__all__) - {"__version__"} == public - modules


def test_constructor_keeps_the_original_positional_signature() -> None:
    parameters = list(inspect.signature(AsyncWriter).parameters.values())
    original = [
        ("out_root", inspect.Parameter.empty),
        ("save_format", SaveFormat.PYTORCH_PT),
        ("dict_mode", DictMode.SINGLE),
        ("workers", 4),
        ("max_inflight", 256),
        ("small_sync_bytes", 64_000),
        ("upload_queue", None),
    ]
    assert [(p.name, p.default) for p in parameters[:7]] == original
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters[:7])
    # The rest are keyword-only, one per setting of WriterOptions, whose defaults they take.
    settings = {f.name: f.default for f in dataclasses.fields(WriterOptions) if f.name != "out_root"}
    assert {p.name: p.default for p in parameters[1:]} == settings
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[7:])


def test_original_positional_call_and_attributes(tmp_path: Path) -> None:
    import queue

    uploads: queue.Queue[Path] = queue.Queue()
    writer = AsyncWriter(tmp_path, SaveFormat.NUMPY_NPZ, DictMode.SPLIT, 2, 8, 1000, uploads)
    try:
        assert writer.root == tmp_path
        assert writer.save_format is SaveFormat.NUMPY_NPZ
        assert writer.dict_mode is DictMode.SPLIT
        assert writer.max_inflight == 8
        assert writer.small_sync_bytes == 1000
        assert writer.upload_queue is uploads
        assert writer.pool._max_workers == 2
    finally:
        writer.close()


def test_enums_expose_their_suffixes() -> None:
    assert [f.value for f in SaveFormat] == ["pt", "npy", "npz", "safetensors"]
    assert [d.value for d in Durability] == ["none", "file", "full"]


def test_shard_writer_takes_its_defaults_from_shard_options() -> None:
    from tensorsink import ShardOptions, ShardWriter

    parameters = list(inspect.signature(ShardWriter).parameters.values())
    settings = {f.name: f.default for f in dataclasses.fields(ShardOptions) if f.name != "out_root"}
    assert {p.name: p.default for p in parameters[1:]} == settings
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[1:])


def test_dir_lists_the_lazy_writers() -> None:
    assert {"AsyncWriter", "ShardWriter", "ShardReader"} <= set(dir(tensorsink))
