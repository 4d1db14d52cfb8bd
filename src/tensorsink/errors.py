"""The exceptions tensorsink raises.

Each one is also an instance of the builtin it refines, so code that catches the builtin keeps working::

    TensorsinkError
    ├── BackendUnavailableError (RuntimeError) backend="kvikio" where kvikio cannot write
    ├── GraphCaptureError      (RuntimeError) write() of a CUDA tensor inside a CUDA graph capture
    ├── InvalidKeyError        (ValueError)   a key that is absolute, empty, climbs out with "..", is too
    │   │                                     long, not valid Unicode, or names tensorsink's own files
    │   └── SymlinkError                      a key that leads through a symlink out of the root
    ├── InvalidLayoutError     (ValueError)   a collection the format and dict mode cannot store
    ├── SaveFunctionError      (RuntimeError) a save function that did not write the path it was given
    ├── UnsupportedValueError  (TypeError)    a value, or a dtype, the chosen format cannot store
    ├── WriterClosedError      (RuntimeError) write() after close()
    └── WriterForkedError      (RuntimeError) a writer used in a child of fork(): make one there

Failures in the background (disk full, a file where a directory should be) are raised as the original
exception, by the next write(), by flush() and by close(); an OSError names the final path it was
writing (its `filename`).
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "GraphCaptureError",
    "InvalidKeyError",
    "InvalidLayoutError",
    "SaveFunctionError",
    "SymlinkError",
    "TensorsinkError",
    "UnsupportedValueError",
    "WriterClosedError",
    "WriterForkedError",
    "naming",
]


class TensorsinkError(Exception):
    """Base of every exception tensorsink raises itself."""


class BackendUnavailableError(TensorsinkError, RuntimeError):
    """An explicitly requested backend cannot work here; the message says why."""


class GraphCaptureError(TensorsinkError, RuntimeError):
    """write() of a CUDA tensor while the caller's stream captures a CUDA graph (the copy would be
    recorded into the graph, not run): write the outputs after replay instead."""


class InvalidKeyError(TensorsinkError, ValueError):
    """A key (relative path without extension) that cannot name a file under the output root."""


class SymlinkError(InvalidKeyError):
    """A folder on a key's way is a symlink: writing through it could create or replace files anywhere."""

    def __init__(self, link: str, target: str, root: str) -> None:
        self._given = (link, target, root)
        super().__init__(
            f"{link} is a symlink (to {target}); tensorsink writes only into real folders under {root}, "
            "so that no key reaches outside it. Pass AsyncWriter(..., follow_symlinks=True) to write "
            "through symlinked folders"
        )
        self.link = link

    def __reduce__(self) -> tuple[type[SymlinkError], tuple[str, str, str]]:
        return type(self), self._given  # pickled by what it was made from (Ray, multiprocessing)


class InvalidLayoutError(TensorsinkError, ValueError):
    """A mapping or sequence the chosen format and dict mode cannot store, e.g. a mapping as one .npy."""


class SaveFunctionError(TensorsinkError, RuntimeError):
    """A save function (write_batch(save=...), a PredictionWriter writer) left no file at the path it was
    given: it wrote beside it, left it empty, or removed it. Nothing is committed; what it made beside
    the path (`strays`) is removed."""

    def __init__(self, what: str, strays: list[str]) -> None:
        self.what = what
        beside = f"; it wrote {', '.join(strays)} instead (removed)" if strays else ""
        super().__init__(
            f"{what}{beside}. A save function must write to the path it is given, as it is (it has the "
            "file's own name and suffix): e.g. np.save(path, a) or image.save(path)"
        )
        self.strays = strays

    def __reduce__(self) -> tuple[type[SaveFunctionError], tuple[str, list[str]]]:
        return type(self), (self.what, self.strays)  # pickled by what it was made from


class UnsupportedValueError(TensorsinkError, TypeError):
    """A value of a type, or a tensor of a dtype, that the chosen format cannot store."""


class WriterClosedError(TensorsinkError, RuntimeError):
    """write() was called on a writer that is closed."""


class WriterForkedError(TensorsinkError, RuntimeError):
    """A writer made before fork() was used in the child, which has none of its threads."""


def naming(error: BaseException, key: str, path: str) -> BaseException:
    """`error`, with a note naming the write's key and file: a background failure is raised later, by
    another call, where its own message (a custom writer's "boom") may say neither."""
    note = f"tensorsink: while writing key {key!r} to {path}"
    if note not in getattr(error, "__notes__", ()) and hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(note)
    return error
