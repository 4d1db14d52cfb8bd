"""The C extensions, built where a C compiler is found; `optional` lets the install go on without them.

- tensorsink._crc: CRC-32 for tensorsink.checksum; a leaf, it imports nothing of ours.
- tensorsink.engine._native: the native write engine, one C file per concern (engine/_native/engine.h
  lists them), with its own copy of the CRC.
- tensorsink.bench._bare: the benchmark's bare loop, the machine's ceiling; it writes with the engine's
  files.c.

`depends` names the headers each includes: a changed header rebuilds it, and an sdist carries them.
"""

from setuptools import Extension, setup

ENGINE = "src/tensorsink/engine/_native/"
FLAGS = {"extra_compile_args": ["-O2", "-pthread", "-std=gnu11"], "extra_link_args": ["-pthread"]}
ENGINE_FILES = [
    *("module", "engine", "handle", "plain", "commit", "folders", "order", "journal", "files", "table", "crc"),
    "tar",
]

setup(
    ext_modules=[
        Extension(
            "tensorsink._crc",
            ["src/tensorsink/_crc.c", ENGINE + "crc.c"],
            depends=[ENGINE + "crc.h"],
            optional=True,
            **FLAGS,
        ),
        Extension(
            "tensorsink.engine._native",
            [f"{ENGINE}{name}.c" for name in ENGINE_FILES],
            depends=[f"{ENGINE}{name}.h" for name in ("engine", "files", "table", "crc")],
            optional=True,
            **FLAGS,
        ),
        Extension(
            "tensorsink.bench._bare",
            ["src/tensorsink/bench/_bare.c", ENGINE + "files.c"],
            depends=[ENGINE + "files.h"],
            optional=True,
            **FLAGS,
        ),
    ]
)
