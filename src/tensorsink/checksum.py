"""CRC-32 (ZIP's polynomial, zlib's values), the one checksum the package computes: in the manifest,
in NPZ's and .pt's ZIP records, and in verify.

Where the `_crc` extension is built and the CPU multiplies carry-less, `crc32` folds the data in
16-byte lanes: with AVX-512's VPCLMULQDQ 256 bytes a step, else with PCLMULQDQ (x86-64 since 2010)
64 bytes. On the 2-core VM of benchmarks/README.md that is 26 GB/s out of memory and 65 GB/s in
cache, against zlib's 2.2 and 5. Elsewhere it is `zlib.crc32`. Both release the GIL on large buffers
(the native one from 64 KiB, zlib's from 5 KiB).
$TENSORSINK_CRC_NARROW=1 (any value but empty or 0), read at import, keeps the native code to
PCLMULQDQ (to test and compare).

`crc32_combine` gives the CRC of a concatenation from its parts' CRCs, so a format that checksums each
member anyway (ZIP requires it) also has the whole file's CRC without reading the file again.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["IMPLEMENTATION", "crc32", "crc32_combine", "crc32_of"]

_POLY = 0xEDB88320


def _multiply(a: int, b: int) -> int:
    """a * b mod P, both bit-reflected (x^0 is the top bit)."""
    product = 0
    bit = 1 << 31
    while bit:
        if a & bit:
            product ^= b
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
        bit >>= 1
    return product


#: x^(8 * 2^k) mod P: the factor that carries a CRC over 2^k zero bytes.
_SHIFTS = [1 << 23]  # x^8: one byte
for _ in range(63):
    _SHIFTS.append(_multiply(_SHIFTS[-1], _SHIFTS[-1]))


def _python_combine(crc1: int, crc2: int, len2: int) -> int:
    if not 0 <= len2 < 1 << 63:
        raise ValueError(f"crc32_combine(len2={len2}): a length from 0 to 2**63 - 1")
    factor, k = 1 << 31, 0  # x^0
    while len2:
        if len2 & 1:
            factor = _multiply(factor, _SHIFTS[k])
        len2 >>= 1
        k += 1
    return _multiply(factor, crc1) ^ crc2


crc32: Callable[..., int]
crc32_combine: Callable[[int, int, int], int]
try:
    from . import _crc
except ImportError:  # not built: zlib, and the combine in Python
    crc32, crc32_combine, IMPLEMENTATION = zlib.crc32, _python_combine, "zlib"
else:
    method = _crc.crc32_method()  # without carry-less multiply, zlib's own code
    if method == "table":
        crc32, IMPLEMENTATION = zlib.crc32, "zlib"
    else:
        crc32, IMPLEMENTATION = _crc.crc32, f"native ({method})"
    crc32_combine = _crc.crc32_combine


def crc32_of(buffers: Iterable[Any]) -> int:
    """The CRC-32 of the buffers one after another."""
    crc = 0
    for buffer in buffers:
        crc = crc32(buffer, crc)
    return crc
