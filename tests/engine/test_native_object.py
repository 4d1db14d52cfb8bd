"""The extension's Engine type as any Python object must behave: raise on misuse, never crash."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Not `tensorsink.engine._native` itself: without the extension, its sources' folder of that name
# imports as an empty namespace package.
pytest.importorskip("tensorsink.engine.native", reason="the native engine was not built")

CALLS: dict[str, Callable[[Any], object]] = {
    "reserve": lambda e: e.reserve(["/tmp/x"]),
    "release": lambda e: e.release(["/tmp/x"]),
    "submit": lambda e: e.submit(object(), [("/tmp/x", "/tmp/.x.tsink-0.partial", [b"x"], -1, 0, 1, None)]),
    "reap": lambda e: e.reap(0.01),
    "close": lambda e: e.close(),
    "pending": lambda e: e.pending,
}


@pytest.mark.parametrize("call", list(CALLS))
def test_every_method_of_an_uninitialised_engine_raises(call: str) -> None:
    # In a child: a crash (SIGFPE, SIGSEGV) must show as a failed test, not end the run.
    script = textwrap.dedent(
        f"""
        from tensorsink.engine._native import Engine
        from tests.engine.test_native_object import CALLS
        engine = Engine.__new__(Engine)
        try:
            CALLS[{call!r}](engine)
        except RuntimeError as exc:
            print("raised:", exc)
        """
    )
    root = Path(__file__).parents[2]  # where `tests` imports from
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=root
    )
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr}"
    assert "raised: Engine not initialised" in result.stdout
