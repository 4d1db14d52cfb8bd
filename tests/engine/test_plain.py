"""The plain route: write(key, array) decided whole in C (engine/_native/plain.c).

The C statement of the rules is held to the Python one (tensorsink.plan, the formats, the journal)
by feeding both the same keys and values: wherever C takes a write, Python takes it too, with the
same path, header and journal record, and the same file on disk.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tensorsink import AsyncWriter, WriterClosedError
from tensorsink.arrays import dtype_name
from tensorsink.commit import is_temporary
from tensorsink.errors import InvalidKeyError, InvalidLayoutError, UnsupportedValueError
from tensorsink.formats import HeaderFormat
from tensorsink.formats.pt import PtFormat, pt_template
from tensorsink.manifest import arrays_of, verify
from tensorsink.options import DictMode, SaveFormat
from tensorsink.plan import plan_files, validate_key
from tests.support import read_back

pytest.importorskip("tensorsink.engine.native", reason="the native engine was not built")
from tensorsink.engine.native import Handle

_DTYPES = [
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", ">f4", ">i2", "<f8", "U3", "S2", "V4",
]  # fmt: skip
_TORCH = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
          torch.bfloat16, torch.float32, torch.float64, torch.complex64]  # fmt: skip


@pytest.fixture(scope="module", params=["npy", "safetensors", "pt"])
def writer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsyncWriter]:
    root = tmp_path_factory.mktemp(request.param)
    with AsyncWriter(root, request.param, engine="native", durability="none") as opened:
        assert opened._writer.plain is not None
        yield opened


def _c_plan(writer: AsyncWriter, key: object, value: object) -> tuple[str, str, bytes, bytes | None] | None:
    """What the C route would queue (it checks a new folder for symlinks itself)."""
    planned: tuple[str, str, bytes, bytes | None] | None = writer._engine._engine.plan_plain(key, value)
    return planned


def _python_plan(writer: AsyncWriter, key: object, value: object) -> tuple[str, bytes, bytes] | str:
    """What the Python plan makes of the same write: path, header, record; or why it would not."""
    fmt = writer._format
    try:
        name = validate_key(key)
        (entry,) = plan_files(writer._root, name, value, fmt, DictMode.SINGLE)
    except (InvalidKeyError, InvalidLayoutError, UnsupportedValueError) as refused:
        return f"refused: {refused}"
    record = writer._journal.prefix(name, entry.path, fmt.save_format.value, arrays_of(entry))
    if not isinstance(fmt, HeaderFormat):  # .pt: its archive up to the storage, the rest per file
        (array,) = entry.arrays
        template = pt_template(dtype_name(array), tuple(array.shape))
        if template is None:
            return "no template"
        whole = b"".join(bytes(buffer) for buffer in fmt.encode(entry))
        return entry.path, whole[: len(template.head)], record
    buffers = fmt.encode_plain(entry)
    if buffers is None:
        return "needs a copy"
    return entry.path, bytes(buffers[0]), record


def _assert_same(writer: AsyncWriter, key: object, value: object) -> bool:
    """Where C takes the write, Python takes it the same way; whether C took it."""
    planned = _c_plan(writer, key, value)
    if planned is None:
        return False
    final, temporary, header, record = planned
    assert _python_plan(writer, key, value) == (final, header, record)
    folder, _, name = final.rpartition("/")
    temporary_folder, _, temporary_name = temporary.rpartition("/")
    assert temporary_folder == folder
    assert is_temporary(temporary_name)
    assert re.fullmatch(rf"\.{re.escape(name[:200])}\.tsink-[0-9a-f]+\.partial", temporary_name)
    return True


_KEY_PARTS = st.one_of(
    st.text(alphabet="ab_-. 0", min_size=0, max_size=6),
    st.sampled_from([".", "..", "", ".tensorsink", "x.partial", "é", "a\"b", "a\\b", "\x00", "\x7f", "\ud800",
                     "a" * 255, "b" * 256, "\t"]),
)  # fmt: skip
_KEYS = st.lists(_KEY_PARTS, min_size=1, max_size=4).map("/".join)


@st.composite
def _values(draw: st.DrawFn) -> object:
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    if draw(st.booleans()):
        array = np.zeros(shape, dtype=draw(st.sampled_from(_DTYPES)))
        if array.ndim >= 2 and draw(st.booleans()):
            array = array.T  # Fortran order: Python copies it
        return array
    tensor = torch.zeros(shape, dtype=draw(st.sampled_from(_TORCH)))
    if tensor.ndim >= 2 and draw(st.booleans()):
        tensor = tensor.mT
    if tensor.is_floating_point() and draw(st.booleans()):
        tensor.requires_grad_(True)
    return tensor


@given(key=_KEYS, value=_values())
@example(key="a/b", value=np.zeros((2, 3), "float32"))
def test_c_takes_a_write_only_as_python_would(writer: AsyncWriter, key: str, value: object) -> None:
    _assert_same(writer, key, value)


@given(
    key=st.from_regex(r"[a-z0-9_]{1,12}(/[a-z0-9_.-]{1,12}){0,3}", fullmatch=True).filter(
        lambda k: all(part not in (".", "..") for part in k.split("/"))
    ),
    dtype=st.sampled_from(["bool", "int8", "uint16", "int64", "float16", "float32", "float64", "complex64"]),
    shape=st.lists(st.integers(0, 5), max_size=4).map(tuple),
)
def test_c_takes_every_plain_write(writer: AsyncWriter, key: str, dtype: str, shape: tuple[int, ...]) -> None:
    """A plain key with a contiguous host array of a dtype the format stores is C's whole: it never
    leaves the common case to Python (but an empty .pt, whose archive has another layout)."""
    taken = not (writer.save_format is SaveFormat.PYTORCH_PT and 0 in shape)
    assert _assert_same(writer, key, np.zeros(shape, dtype)) == taken
    if dtype != "uint16":  # torch's uint16 has no numpy() on every release
        assert _assert_same(writer, key, torch.zeros(shape, dtype=getattr(torch, dtype))) == taken


@pytest.mark.parametrize("align", [None, 64, 4096])
def test_long_headers_and_alignments_match(tmp_path: Path, align: int | None) -> None:
    """Every alignment the writer takes, and headers as long as numpy's 64 dimensions make them."""
    for save_format in ("npy", "safetensors"):
        with AsyncWriter(tmp_path / save_format, save_format, engine="native", align=align) as opened:
            for shape in [(), (0,), (7,), (1,) * 64, (2**40, 0), (123456789, 0, 987654321)]:
                assert _assert_same(opened, "k", np.zeros(shape, "float32"))


@pytest.mark.parametrize("save_format", ["npy", "safetensors", "pt"])
def test_the_files_are_byte_for_byte_the_python_engines(tmp_path: Path, save_format: str) -> None:
    values = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b/c": np.arange(7, dtype=np.int16),
        "b/d": torch.tensor(3.5, dtype=torch.float64),
        "e": np.ones((2, 0, 3), dtype=bool),
        "f": torch.randn(2, 1, 3, dtype=torch.complex64),
        "g": torch.randint(0, 255, (5, 1), dtype=torch.uint8),
        "h": torch.arange(40, dtype=torch.float16).reshape(2, 20)[:, 5:15].contiguous(),
        "i": torch.arange(24).reshape(2, 3, 4)[1],  # a view into a larger storage
    }
    for engine in ("native", "python"):
        with AsyncWriter(tmp_path / engine, save_format, engine=engine) as opened:
            opened.write("b/first", np.zeros(1))  # the folder's first write is checked in Python
            for key, value in values.items():
                handle = opened.write(key, value)
                empty_pt = save_format == "pt" and key == "e"  # another archive layout: Python's
                assert isinstance(handle, Handle) == (engine == "native" and not empty_pt)
    for key in values:
        native = (tmp_path / "native" / f"{key}.{save_format}").read_bytes()
        assert native == (tmp_path / "python" / f"{key}.{save_format}").read_bytes(), key
    assert verify(tmp_path / "native").ok


def test_statistics_count_plain_writes(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, "npy", engine="native") as opened:
        handles = [opened.write(f"k{i}", np.zeros(100)) for i in range(50)]
        assert all(isinstance(handle, Handle) for handle in handles)
        opened.flush()
        stats = opened.stats()
    assert (stats.files, stats.writes, stats.errors) == (50, 50, 0)
    assert stats.bytes == 50 * 800
    assert stats.write_seconds > 0
    assert stats.elapsed_seconds > 0


def test_a_folder_with_a_symlink_on_the_way_is_refused_at_write(tmp_path: Path) -> None:
    """C takes a new folder once it finds no symlink on the way (missing parts are fine); a link on
    the way it leaves to Python, which raises."""
    (tmp_path / "elsewhere").mkdir()
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "real" / "link").symlink_to(tmp_path / "elsewhere")
    with AsyncWriter(root, "npy", engine="native") as opened:
        assert isinstance(opened.write("real/new/deeper/x", np.zeros(2)), Handle)
        assert isinstance(opened.write_batch(["real/a", "b/c"], np.zeros((2, 2))), Handle)
        for key in ("real/link/x", "real/link/deeper/x"):
            with pytest.raises(InvalidKeyError, match="symlink"):
                opened.write(key, np.zeros(2))
            with pytest.raises(InvalidKeyError, match="symlink"):
                opened.write_batch(["fine", key], np.zeros((2, 2)))
    assert not list((tmp_path / "elsewhere").iterdir())
    assert (root / "real" / "new" / "deeper" / "x.npy").exists()
    assert not (root / "fine.npy").exists()


def test_a_failure_on_the_other_route_stops_plain_writes(tmp_path: Path) -> None:
    """A write that went through the worker threads (a non-contiguous array is copied first) fails:
    the next write raises that failure, though it is plain."""
    (tmp_path / "x.npy").mkdir()  # the file cannot be renamed over a folder
    opened = AsyncWriter(tmp_path, "npy", engine="native")
    opened.write("fine", np.zeros(2)).result(timeout=10)
    failed = opened.write("x", np.zeros((4, 4)).T)
    assert not isinstance(failed, Handle)
    failure = failed.exception(timeout=10)
    assert isinstance(failure, OSError)
    with pytest.raises(OSError, match=r"x\.npy") as raised:
        opened.write("later", np.zeros(2))
    assert raised.value is failure
    with pytest.raises(OSError, match=r"x\.npy"):
        opened.close()
    assert not (tmp_path / "later.npy").exists()


def test_keys_python_refuses_are_refused_the_same(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, "safetensors", engine="native") as opened:
        for key in ["../x", "/abs", ".tensorsink/j", "a/", "a/.", "x" * 256, "a\x00b", "\ud800"]:
            with pytest.raises(InvalidKeyError):
                opened.write(key, np.zeros(2))
        opened.write("a//./b", np.zeros(2)).result(timeout=10)  # Python normalises it: "a/b"
    assert (tmp_path / "a" / "b.safetensors").exists()


def test_close_while_another_thread_writes_loses_nothing(tmp_path: Path) -> None:
    """A producer thread writing plain files, some waiting for room in a budget of 2, while close()
    runs: every write is refused (WriterClosedError) or committed whole, and close() returns."""
    opened = AsyncWriter(tmp_path, "npy", engine="native", max_inflight=2, durability="file")
    handles: list[object] = []
    started, refused = threading.Event(), threading.Event()

    def produce() -> None:
        try:
            for i in range(100_000):
                handles.append(opened.write(f"k{i % 500}", np.full(4096, i, dtype=np.int64)))
                started.set()
        except WriterClosedError:
            refused.set()

    producer = threading.Thread(target=produce)
    producer.start()
    assert started.wait(10)
    opened.close()
    producer.join(30)
    assert not producer.is_alive()
    assert refused.is_set()
    assert all(handle.done() for handle in handles)  # type: ignore[attr-defined]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    for path in tmp_path.glob("k*.npy"):
        array = np.load(path)
        assert (array == array[0]).all()


def test_a_fresh_process_whose_first_write_is_plain_gets_its_result(tmp_path: Path) -> None:
    """The handle's helpers (pathlib.Path, the callbacks' runner) are there for the first plain write
    of a process, which runs no Python that could import them."""
    child = (
        "import sys, numpy as np\n"
        "from tensorsink import AsyncWriter\n"
        "with AsyncWriter(sys.argv[1], 'npy', engine='native') as w:\n"
        "    handle = w.write('a', np.zeros(3))\n"
        "    print(type(handle).__name__, handle.result(timeout=10))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"Handle [PosixPath('{tmp_path / 'a.npy'}')]"


@pytest.mark.parametrize("save_format", ["npy", "safetensors", "pt"])
@pytest.mark.parametrize("kind", ["tensor", "ndarray"])
def test_a_batch_of_samples_is_one_call_and_python_engines_bytes(
    tmp_path: Path, save_format: str, kind: str
) -> None:
    """write_batch(keys, array) with the samples along the first dimension: a file per sample, each
    the bytes the Python engine writes, one handle listing them in order."""
    batches = [torch.arange(60, dtype=torch.float32).reshape(5, 3, 4), torch.arange(5, dtype=torch.int16)]
    for engine in ("native", "python"):
        with AsyncWriter(tmp_path / engine, save_format, engine=engine) as opened:
            for b, batch in enumerate(batches):
                keys = [f"b{b}/s{i}" for i in range(5)]
                handle = opened.write_batch(keys, batch if kind == "tensor" else batch.numpy())
                assert isinstance(handle, Handle) == (engine == "native")
                root = tmp_path / engine
                assert handle.result(timeout=10) == [root / f"{key}.{save_format}" for key in keys]
    for b in range(2):
        for i in range(5):
            name = f"b{b}/s{i}.{save_format}"
            assert (tmp_path / "native" / name).read_bytes() == (tmp_path / "python" / name).read_bytes()


def test_a_batch_python_refuses_is_refused_the_same(tmp_path: Path) -> None:
    with AsyncWriter(tmp_path, "npy", engine="native") as opened:
        with pytest.raises(InvalidKeyError, match="more than once"):
            opened.write_batch(["a", "b", "a"], np.zeros((3, 2)))
        with pytest.raises(InvalidKeyError, match="more than once"):
            opened.write_batch(["a", "b", "./a"], np.zeros((3, 2)))
        with pytest.raises(ValueError, match="3"):
            opened.write_batch(["a", "b"], np.zeros((3, 2)))
        with pytest.raises(InvalidKeyError):
            opened.write_batch(["a", "../b"], np.zeros((2, 2)))
        with pytest.raises(InvalidKeyError, match="one str"):
            opened.write_batch("ab", np.zeros((2, 2)))
        assert isinstance(opened.write_batch(("t0", "t1"), np.zeros((2, 2))), Handle)  # a tuple of keys
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == ["t0.npy", "t1.npy"]


def test_a_batch_keeps_its_memory_until_written(tmp_path: Path) -> None:
    """The samples are views of the batch's memory: the batch may be dropped at once."""
    with AsyncWriter(tmp_path, "npy", engine="native") as opened:
        handles = [
            opened.write_batch([f"r{r}/{i}" for i in range(8)], torch.full((8, 1000), r)) for r in range(50)
        ]
    for handle in handles:
        assert handle.exception() is None
    for r in (0, 17, 49):
        assert (np.load(tmp_path / f"r{r}" / "5.npy") == r).all()


def test_a_pt_tensor_whose_strides_are_not_plain_is_left_to_python(tmp_path: Path) -> None:
    """A .pt records the strides: one of size 1 with another stride than a fresh tensor's would not
    match the template, so Python writes it (as torch.save would)."""
    odd = torch.rand(3, 1, 4).transpose(0, 1)  # shape (1, 3, 4), strides (4, 4, 1)
    assert odd.is_contiguous()
    with AsyncWriter(tmp_path, "pt", engine="native") as opened:
        assert not isinstance(opened.write("odd", odd), Handle)
        assert isinstance(opened.write("plain", odd.clone(memory_format=torch.contiguous_format)), Handle)
    loaded = torch.load(tmp_path / "odd.pt", weights_only=True)
    assert loaded.stride() == odd.stride()
    assert torch.equal(loaded, odd)
    assert torch.equal(torch.load(tmp_path / "plain.pt", weights_only=True), odd)


@given(
    dtype=st.sampled_from([torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                           torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128]),
    shape=st.lists(st.integers(1, 4), max_size=4).map(tuple),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_a_pt_file_is_torch_saves_own_bytes(
    tmp_path_factory: pytest.TempPathFactory, dtype: torch.dtype, shape: tuple[int, ...], seed: int
) -> None:
    """The archive filled in C once the storage's CRC is known: the bytes tensorsink's .pt writer
    makes in Python, whose layout is torch.save's, loadable and whole to zipfile."""
    tensor = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100).to(dtype)
    root = tmp_path_factory.mktemp("pt")
    with AsyncWriter(root, "pt", engine="native", durability="none") as opened:
        assert isinstance(opened.write("t", tensor), Handle)
    written = (root / "t.pt").read_bytes()
    fmt = PtFormat()
    (entry,) = plan_files(str(root), "t", tensor, fmt, DictMode.SINGLE)
    buffers, _ = fmt.encode_with_crc(entry)
    assert written == b"".join(bytes(buffer) for buffer in buffers)
    assert zipfile.ZipFile(root / "t.pt").testzip() is None
    assert torch.equal(torch.load(root / "t.pt", weights_only=True), tensor)
    assert verify(root).ok


@pytest.mark.parametrize("save_format", ["npy", "safetensors", "pt"])
@pytest.mark.parametrize("durability", ["none", "file"])
def test_threads_writing_arrays_of_many_shapes_each_get_their_own_header(
    tmp_path: Path, save_format: str, durability: str
) -> None:
    """The engine keeps the last shape's layout; a call may give up the GIL while it uses one (a .pt
    template made in Python, a wait for room), and another thread's call must not replace it then."""
    writer = AsyncWriter(tmp_path, save_format, durability=durability, manifest=False, max_inflight=8)
    problems: list[BaseException] = []

    def run(thread: int) -> None:
        try:
            for i in range(150):
                n = (thread * 7 + i * 13) % 41 + 1
                writer.write(f"t{thread}/{i}", torch.full((n,), float(n)))
        except BaseException as exc:
            problems.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    assert not problems
    fmt = SaveFormat(save_format)
    for t in range(3):
        for i in range(150):
            n = (t * 7 + i * 13) % 41 + 1
            stored = read_back(tmp_path / f"t{t}" / f"{i}.{save_format}", fmt)
            stored = stored["arr_0"] if isinstance(stored, dict) else stored
            np.testing.assert_array_equal(np.asarray(stored), np.full(n, float(n), np.float32))
