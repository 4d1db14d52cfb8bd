from __future__ import annotations

import re
from pathlib import Path

import pytest

from tensorsink import AsyncWriter, DictMode, Durability, SaveFormat, WriterOptions


@pytest.mark.parametrize(("given", "expected"), [("none", Durability.NONE), ("FULL", Durability.FULL),
                                                 (Durability.FILE, Durability.FILE)])  # fmt: skip
def test_durability_accepts_strings(tmp_path: Path, given: object, expected: Durability) -> None:
    assert WriterOptions(tmp_path, durability=given).durability is expected  # type: ignore[arg-type]


def test_formats_and_modes_accept_their_values(tmp_path: Path) -> None:
    options = WriterOptions(tmp_path, save_format="npz", dict_mode="split")  # type: ignore[arg-type]
    assert options.save_format is SaveFormat.NUMPY_NPZ
    assert options.dict_mode is DictMode.SPLIT


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("durability", "fsync", "durability='fsync' is not valid; use one of Durability.NONE ('none')"),
        ("save_format", ".pt", "save_format='.pt' is not valid"),
        ("workers", 0, "workers=0 is not valid; use an int >= 1"),
        ("max_inflight", 2.5, "max_inflight=2.5 is not valid"),
        ("small_sync_bytes", -1, "small_sync_bytes=-1 is not valid; use an int >= 0"),
        ("max_inflight_bytes", True, "max_inflight_bytes=True is not valid"),
        ("kvikio_task_size", 6000, "kvikio_task_size=6000 must be a multiple of 4096"),
    ],
)
def test_bad_settings_name_the_value(tmp_path: Path, argument: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        AsyncWriter(tmp_path, **{argument: value})  # type: ignore[arg-type]


def test_upload_queue_must_have_put(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"upload_queue=.* has no put"):
        AsyncWriter(tmp_path, upload_queue=[])  # type: ignore[arg-type]


def test_replace_validates_again(tmp_path: Path) -> None:
    options = WriterOptions(tmp_path)
    assert options.replace(workers=8).workers == 8
    with pytest.raises(ValueError, match="workers=-1"):
        options.replace(workers=-1)
