"""The tar layout: headers as tarfile writes them, the C packer byte for byte its Python twin, and the
checks that tell a whole shard from a torn one."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tensorsink.engine import available_engines
from tensorsink.shards import ShardWriter
from tensorsink.shards.tar import BLOCK, END, check_shard, footprint, member_header, read_members

_names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=300
).filter(lambda name: not name.endswith("/"))  # a member's name is "<key>.<suffix>"


@given(name=_names, size=st.integers(0, 5000))
def test_headers_are_what_tarfile_reads_and_as_long_as_footprint_says(name: str, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    shard = member_header(name, size, 1_700_000_000) + data + bytes(-size % BLOCK) + END
    assert len(shard) == footprint(name, size) + len(END)
    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.size, member.mtime, member.mode) == (name, size, 1_700_000_000, 0o644)
        assert tar.extractfile(member).read() == data  # type: ignore[union-attr]
    (found,) = read_members(shard)
    assert (found.name, found.size) == (name, size)
    assert shard[found.offset : found.offset + size] == data


def test_a_size_over_eight_gib_goes_in_a_pax_record() -> None:
    header = member_header("big.npy", 9 << 30, 0)
    assert len(header) == 3 * BLOCK
    assert b"size=9663676416" in header
    # The member's size comes from the record (tarfile reads the header alone).
    with tarfile.open(fileobj=io.BytesIO(header + bytes(4 * BLOCK)), ignore_zeros=False) as tar:
        assert tar.next().size == 9 << 30  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        (lambda b: b[:-BLOCK], "end-of-archive marker"),
        (lambda b: b[: BLOCK + 10], "inside a header|past the end"),
        (lambda b: b[:100] + b"X" + b[101:], "checksum"),
        (lambda b: b[:124] + b"00000999999\0" + b[136:], "checksum"),
    ],
)
def test_a_torn_or_altered_shard_is_not_whole(tmp_path: Path, cut, why: str) -> None:  # type: ignore[no-untyped-def]
    whole = member_header("k.npy", 700, 0) + bytes(700) + bytes(-700 % BLOCK) + END
    path = tmp_path / "s.tar"
    path.write_bytes(cut(whole))
    assert check_shard(str(path), [["k", [["npy", BLOCK, 700, "00000000"]]]], checksums=False) is not None
    with pytest.raises(ValueError, match=why):
        list(read_members(cut(whole)))


def _shard_and_line(root: Path, engine: str, keys: list[str], value: object, save_format: str, mode: str):  # type: ignore[no-untyped-def]
    writer = ShardWriter(root, save_format=save_format, dict_mode=mode, engine=engine, shard_list=None)
    writer._packer.mtime = 1_700_000_000  # both packers stamp the same time
    writer.write_batch(keys, value)
    writer.close()
    (shard,) = list(root.glob("*.tar"))
    (journal,) = (root / ".tensorsink").glob("journal-*.jsonl")
    samples = [
        line.partition(b',"samples":')[2].partition(b',"bytes"')[0]
        for line in journal.read_bytes().split(b"\n")
    ]
    return shard.read_bytes(), [line for line in samples if line]


keys_strategy = st.lists(
    st.one_of(
        st.from_regex(r"[a-z0-9_]{1,12}(/[a-z0-9_]{1,12}){0,2}", fullmatch=True),
        st.text(
            st.characters(blacklist_categories=("Cs",), blacklist_characters="./\0"), min_size=1, max_size=140
        ),
    ),
    min_size=1, max_size=12, unique=True,
)  # fmt: skip


@pytest.mark.skipif("native" not in available_engines(), reason="the native engine was not built")
@given(
    keys=keys_strategy,
    save_format=st.sampled_from(["npy", "safetensors"]),
    split=st.booleans(),
    width=st.integers(0, 700),
    dtype=st.sampled_from([torch.float32, torch.int16, torch.uint8, torch.float64]),
)
def test_the_c_packer_writes_what_its_python_twin_writes(
    tmp_path_factory: pytest.TempPathFactory,
    keys: list[str],
    save_format: str,
    split: bool,
    width: int,
    dtype: torch.dtype,
) -> None:
    count = len(keys)
    data = torch.arange(count * width, dtype=torch.float64).reshape(count, width).to(dtype)
    value: object = {"a": data, "b2": data[:, : width // 2].contiguous()} if split else data
    mode = "split" if split else "single"
    shards = [
        _shard_and_line(tmp_path_factory.mktemp(engine), engine, keys, value, save_format, mode)
        for engine in ("native", "python")
    ]
    assert shards[0][0] == shards[1][0]
    assert shards[0][1] == shards[1][1]
