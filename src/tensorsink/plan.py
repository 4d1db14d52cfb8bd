"""What one write() becomes: the files it makes and the arrays in each, checked before anything queues.

Everything here runs on the caller's thread and touches no payload bytes; device tensors stay
where they are (staging moves them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from .arrays import Array, as_array, nbytes
from .commit import is_temporary
from .errors import InvalidKeyError, InvalidLayoutError, UnsupportedValueError
from .formats import Container, FileEntry, Format
from .manifest import JOURNAL_DIR
from .options import DictMode

__all__ = [
    "batch_keys",
    "check_distinct_files",
    "check_one_file",
    "entry_at",
    "file_path",
    "flatten",
    "plan_files",
    "validate_key",
    "validate_suffix",
]

_NAME_MAX = 255  # bytes in one file or folder name (Linux, and most filesystems)
_PATH_MAX = 4095  # bytes in a whole path
#: A temporary's name is the final one plus at most this many bytes: final paths leave room for it.
_TEMPORARY_EXTRA = 48

_ACCEPTED = (
    "a torch.Tensor, a numpy.ndarray, a DLPack or CUDA-array-interface array (CuPy ...), "
    "a Mapping[str, tensor] or a list/tuple of tensors"
)


def validate_key(key: object) -> str:
    """The key as a normalised relative POSIX path; InvalidKeyError unless it names a file under the root."""
    if not isinstance(key, str):
        if not isinstance(key, os.PathLike):
            raise InvalidKeyError(f"key {key!r} must be a str or os.PathLike, not {type(key).__name__}")
        key = os.fspath(key)
        if not isinstance(key, str):
            raise InvalidKeyError(f"key {key!r} must be a str path, not bytes")
    if not key or key[-1] == "/" or "\0" in key:
        raise InvalidKeyError(
            f"key {key!r} must name a file: a non-empty relative path such as 'preds/scene_42', "
            "not ending in '/' and without NUL"
        )
    _check_unicode(key, "key")
    parts = key.split("/")
    if key[0] == "/" or ".." in parts:
        raise InvalidKeyError(
            f"key {key!r} must stay under the output root: relative, without '..' (e.g. 'preds/scene_42')"
        )
    if parts[-1] == ".":
        raise InvalidKeyError(f"key {key!r} names a folder, not a file; give a file name after the last '/'")
    if "" in parts or "." in parts:
        parts = [part for part in parts if part not in ("", ".")]
        if not parts:
            raise InvalidKeyError(f"key {key!r} names no file; give a relative path such as 'preds/scene_42'")
        key = "/".join(parts)
    if parts[0] == JOURNAL_DIR:
        raise InvalidKeyError(f"key {key!r} is under {JOURNAL_DIR}/, which holds tensorsink's journals")
    if len(key) > _NAME_MAX // 4:  # shorter keys cannot have a part over NAME_MAX bytes
        for part in parts:
            if len(part.encode()) > _NAME_MAX:
                raise InvalidKeyError(
                    f"key {key!r} has a part of {len(part.encode())} bytes ({part[:20]!r}...); "
                    f"a file or folder name holds at most {_NAME_MAX} bytes (UTF-8)"
                )
    return key


def batch_keys(keys: Sequence[object], name_of: Callable[[object], str] = validate_key) -> list[str]:
    """write_batch's keys, each as `name_of` checks it; InvalidKeyError for one str given instead of
    a list, or for a key that comes twice (two samples would make one file)."""
    if isinstance(keys, (str, bytes, bytearray)):
        raise InvalidKeyError(
            f"keys {keys!r} is one {type(keys).__name__}, not a sequence of keys; pass a list, "
            "e.g. write_batch([key], ...) for one sample"
        )
    names = [name_of(key) for key in keys]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InvalidKeyError(f"keys {twice} appear more than once in one batch; each sample needs its own")
    return names


def _check_unicode(text: str, what: str) -> None:
    """InvalidKeyError unless `text` is valid Unicode: no lone surrogates (Python's stand-ins for
    undecodable bytes), so that it is one UTF-8 name on disk that every reader can open."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise InvalidKeyError(
                f"{what} {text!r} is not valid Unicode ({exc.reason} at position {exc.start}); "
                "names must be UTF-8 text, without lone surrogates or undecodable bytes"
            ) from None


def file_path(root: str, key: str, tail: str) -> str:
    """`<root>/<key><tail>` once it is a name the file system and sweep() take: InvalidKeyError for a
    file name over NAME_MAX or a path over PATH_MAX bytes, or one named like a temporary."""
    path = f"{root}/{key}{tail}"
    name = path[path.rfind("/") + 1 :]
    if len(name) > _NAME_MAX // 4 and len(name.encode()) > _NAME_MAX:
        raise InvalidKeyError(
            f"key {key!r} makes the file name {name[:40]!r}... of {len(name.encode())} bytes; "
            f"a file name holds at most {_NAME_MAX} bytes (UTF-8), its suffix included"
        )
    limit = _PATH_MAX - _TEMPORARY_EXTRA
    if len(path) > limit // 4 and len(path.encode()) > limit:
        raise InvalidKeyError(
            f"key {key!r} makes a path of {len(path.encode())} bytes under {root}; at most {limit} fit "
            f"(PATH_MAX, less room for the temporary beside it)"
        )
    if ".partial" in name and is_temporary(name):
        raise InvalidKeyError(
            f"key {key!r} makes the file name {name!r}, which is how tensorsink names its temporaries "
            "(sweep() would delete it); choose another name"
        )
    return path


def validate_suffix(suffix: str) -> str:
    """A file suffix a writer may append: empty, or '.' and a name without '/' or NUL."""
    if suffix and (not suffix.startswith(".") or "/" in suffix or "\0" in suffix):
        raise InvalidKeyError(f"suffix {suffix!r} must be empty or start with '.', without '/' or NUL")
    return suffix


def plan_files(root: str, name: str, value: object, fmt: Format, dict_mode: DictMode) -> list[FileEntry]:
    """The files `write(name, value)` makes; `name` is a key validate_key() has already normalised.

    Raises InvalidKeyError, InvalidLayoutError or UnsupportedValueError, naming the bad value.
    """
    container, names, arrays = flatten(value, fmt)
    if container is Container.TENSOR:
        return [FileEntry(file_path(root, name, fmt.suffix), container, names, arrays, nbytes(arrays[0]))]
    if dict_mode is DictMode.SPLIT:
        if not arrays:
            raise InvalidLayoutError(
                f"{type(value).__name__} for key {name!r} is empty; with DictMode.SPLIT it would write "
                "no file"
            )
        if container is Container.MAPPING:
            parts = names
            for part in parts:
                check_file_part(part, name)
        else:
            parts = tuple(str(i) for i in range(len(arrays)))
        return [
            FileEntry(
                file_path(root, name, f"_{part}{fmt.suffix}"),
                Container.TENSOR,
                ("arr_0",),
                (array,),
                nbytes(array),
            )
            for part, array in zip(parts, arrays, strict=True)
        ]
    check_one_file(fmt, name, container, names, "file")
    return [FileEntry(file_path(root, name, fmt.suffix), container, names, arrays, sum(map(nbytes, arrays)))]


def check_one_file(fmt: Format, key: str, container: Container, names: tuple[str, ...], unit: str) -> None:
    """InvalidLayoutError (or the format's own refusal) unless `fmt` holds this collection in one
    file (`unit`: what SPLIT would make of each entry instead, "file" or "member")."""
    if not fmt.holds_collections:
        raise InvalidLayoutError(
            f"{fmt.suffix} holds one array, but key {key!r} has a {container.value} of {len(names)}; "
            f"use dict_mode=DictMode.SPLIT (one {unit} per entry) or SaveFormat.NUMPY_NPZ"
        )
    fmt.check_collection(key, container, names)


def entry_at(path: str, value: object, fmt: Format) -> FileEntry:
    """The one file at `path` that holds all of `value` (DictMode.SINGLE), for writing it directly."""
    container, names, arrays = flatten(value, fmt)
    if container is not Container.TENSOR:
        if not fmt.holds_collections:
            raise InvalidLayoutError(
                f"{fmt.suffix} holds one array, not a {container.value} of {len(arrays)}; write each "
                "entry to its own file, or use npz, pt or safetensors"
            )
        fmt.check_collection(path, container, names)
    return FileEntry(path, container, names, arrays, sum(map(nbytes, arrays)))


def check_distinct_files(keys: Sequence[str], planned: Sequence[Sequence[FileEntry]]) -> None:
    """InvalidKeyError if two keys of one batch would make the same file (SPLIT's `<key>_<name>`: key
    "x" with entry "b_c" and key "x_b" with entry "c"), which would drop one sample silently."""
    owner: dict[str, str] = {}
    for key, entries in zip(keys, planned, strict=True):
        for entry in entries:
            other = owner.setdefault(entry.path, key)
            if other != key:
                raise InvalidKeyError(
                    f"keys {other!r} and {key!r} would both write {entry.path}; rename a key or an entry "
                    "so that each file belongs to one sample"
                )


def flatten(value: object, fmt: Format) -> tuple[Container, tuple[str, ...], tuple[Array, ...]]:
    """What a value holds: its container, its entries' names and their arrays, each checked for `fmt`."""
    if isinstance(value, (bool, int, float, complex, np.generic)):  # a number: a 0-d array of it
        value = np.asarray(value)
    array = as_array(value)
    if array is not None:
        return Container.TENSOR, ("arr_0",), (_checked("value", array, fmt),)
    if isinstance(value, Mapping):
        names = tuple(value)
        for entry_name in names:
            if not isinstance(entry_name, str):
                raise UnsupportedValueError(f"mapping key {entry_name!r} must be a str")
            if not entry_name:
                raise InvalidKeyError("mapping key '' must be a non-empty str")
            _check_unicode(entry_name, "mapping key")
        arrays = tuple(_checked(f"value[{n!r}]", value[n], fmt) for n in names)
        return Container.MAPPING, names, arrays
    if isinstance(value, (list, tuple)):
        arrays = tuple(_checked(f"value[{i}]", v, fmt) for i, v in enumerate(value))
        return Container.SEQUENCE, tuple(f"arr_{i}" for i in range(len(arrays))), arrays
    raise UnsupportedValueError(f"value of type {type(value).__name__} cannot be written; pass {_ACCEPTED}")


def _checked(where: str, given: object, fmt: Format) -> Array:
    """The entry as an array; UnsupportedValueError naming `where` if it cannot be stored."""
    value = given if type(given) is torch.Tensor else as_array(given)
    if value is None:
        nested = " (nested collections are not supported)" if isinstance(given, (Mapping, Sequence)) else ""
        raise UnsupportedValueError(
            f"{where} is a {type(given).__name__}{nested}; each entry must be a torch.Tensor or numpy.ndarray"
        )
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise UnsupportedValueError(f"{where} has dtype object, which cannot be stored without pickle")
    fmt.check(where, value)
    if isinstance(value, torch.Tensor):
        if value.is_nested and not fmt.holds_nested:
            raise UnsupportedValueError(
                f"{where} is a nested tensor (torch.nested), which {fmt.suffix} cannot hold; write its "
                "parts (tensor.unbind()) or a padded tensor (tensor.to_padded_tensor(0)), or use "
                "SaveFormat.PYTORCH_PT"
            )
        if value.layout is not torch.strided and not (value.layout is torch.jagged and fmt.holds_nested):
            raise UnsupportedValueError(
                f"{where} has layout {value.layout}; convert it with .to_dense() first"
            )
        if value.is_meta:
            raise UnsupportedValueError(f"{where} is on the meta device and has no data to write")
    return value


def check_file_part(entry_name: str, key: str) -> None:
    if "/" in entry_name or "\0" in entry_name or entry_name in (".", ".."):
        raise InvalidKeyError(
            f"mapping key {entry_name!r} of {key!r} becomes part of a file name with DictMode.SPLIT; "
            "it must not contain '/' or NUL"
        )
