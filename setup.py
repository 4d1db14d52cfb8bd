"""The native write engine, built where a C compiler is found; `optional` lets the install go on without it."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tensorsink.engine._native",
            ["src/tensorsink/engine/_native.c"],
            extra_compile_args=["-O2", "-pthread", "-std=gnu11"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
