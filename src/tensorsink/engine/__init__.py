"""The write engine: the commit protocol for batches of files, behind one interface with two engines.

`NativeEngine` runs it in C threads that never take the GIL (the `_native` extension, built at install
where a C compiler is found); `PythonEngine` is its pure-Python twin, the fallback. Both take a batch of
files in one `submit` and report each finished batch, with one outcome per file, through the
`on_complete` callback they were built with, several batches at a time where they can. The same
conformance suite (tests/engine/) runs against both.
"""

from __future__ import annotations

import os

from .base import Completion, Engine, FileJob, FileOutcome, PlainRoute
from .python import PythonEngine

__all__ = [
    "ENGINE_VARIABLE",
    "Completion",
    "Engine",
    "FileJob",
    "FileOutcome",
    "PlainRoute",
    "PythonEngine",
    "available_engines",
    "engine_class",
]


def available_engines() -> dict[str, type[Engine]]:
    """The engines that can run here, by name."""
    engines: dict[str, type[Engine]] = {"python": PythonEngine}
    try:
        from .native import NativeEngine
    except ImportError:
        return engines
    return {"native": NativeEngine, **engines}


#: Overrides engine="auto" for a whole process (a job's environment, or a test run): "native" or "python".
ENGINE_VARIABLE = "TENSORSINK_ENGINE"


def engine_class(name: str) -> type[Engine]:
    """The engine `name` asks for ("auto": $TENSORSINK_ENGINE if set, else native where it was built);
    ValueError if it cannot run here."""
    engines = available_engines()
    if name == "auto":
        chosen = os.environ.get(ENGINE_VARIABLE, "auto")
        if chosen == "auto":
            return engines.get("native", engines["python"])
        name = chosen
    if name not in engines:
        why = "the native engine was not built (no C compiler at install?)" if name == "native" else ""
        raise ValueError(
            f"engine={name!r} ({ENGINE_VARIABLE}={os.environ.get(ENGINE_VARIABLE)!r}) is not available "
            f"here{': ' + why if why else ''}; use 'auto', 'native' or 'python'"
        )
    return engines[name]
