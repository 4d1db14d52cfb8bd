"""A dtype a format refuses is refused naming exactly the formats that do store it, found by trying."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tensorsink import AsyncWriter, SaveFormat
from tensorsink.errors import UnsupportedValueError

VALUES = {
    "structured": np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]),
    "unicode": np.array(["a", "b"], dtype="<U1"),
    "datetime": np.array(["2020-01-01"], dtype="datetime64[D]"),
    "complex128": torch.zeros(2, dtype=torch.complex128),
    "bfloat16": torch.zeros(2, dtype=torch.bfloat16),
    "float8": torch.zeros(2, dtype=torch.float8_e4m3fn),
}


def refusal(root: Path, save_format: SaveFormat, value: object) -> str | None:
    """The message of the refusal to write `value` as `save_format`, or None if it was written."""
    with AsyncWriter(root / save_format.value, save_format) as writer:
        try:
            writer.write("x", value).result()
        except UnsupportedValueError as exc:
            return str(exc)
    return None


@pytest.mark.parametrize("value", list(VALUES.values()), ids=list(VALUES))
def test_a_refusal_names_the_formats_that_store_the_value(tmp_path: Path, value: object) -> None:
    refusals = {save_format: refusal(tmp_path, save_format, value) for save_format in SaveFormat}
    holders = {save_format.name for save_format, message in refusals.items() if message is None}
    assert holders, "no format stores it: nothing to name"
    assert len(holders) < len(SaveFormat), "every format stores it: no refusal to check"
    for save_format, message in refusals.items():
        if message is not None:
            assert set(re.findall(r"SaveFormat\.(\w+)", message)) == holders, (save_format, message)


def test_structured_and_string_arrays_are_sent_to_numpy_formats(tmp_path: Path) -> None:
    """What trying finds today: numpy's own dtypes only numpy's formats hold (torch has none)."""
    for name in ("structured", "unicode"):
        for save_format in (SaveFormat.PYTORCH_PT, SaveFormat.SAFETENSORS):
            message = refusal(tmp_path / name, save_format, VALUES[name])
            assert message is not None
            assert message.endswith("use SaveFormat.NUMPY_NPY or SaveFormat.NUMPY_NPZ"), message
