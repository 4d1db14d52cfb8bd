/* CRC-32 (the ZIP polynomial, zlib's values): carry-less multiply where the CPU has it, else slice-by-8.
 *
 * A leaf: plain C, nothing of Python's or ours. Built into the `tensorsink._crc` extension (what
 * tensorsink.checksum calls) and into the engine's, which checksums the files it writes; each extension
 * has its own copy and calls crc_setup() once, at import.
 */
#ifndef TENSORSINK_CRC_H
#define TENSORSINK_CRC_H

#include <stddef.h>
#include <stdint.h>

#pragma GCC visibility push(hidden) /* shared by the extension's files, not exported from it */

/* Fill the table and choose the code path for this CPU; $TENSORSINK_CRC_NARROW (any value but empty or
 * "0") keeps it to PCLMULQDQ, to test and compare. */
void crc_setup(void);

/* zlib's crc32(crc, p, n). */
uint32_t crc_update(uint32_t crc, const unsigned char *p, size_t n);

/* The CRC-32 of A + B from crc32(A), crc32(B) and len(B) (zlib's crc32_combine). */
uint32_t crc_combine(uint32_t first, uint32_t second, uint64_t second_length);

/* How crc_update computes here: "vpclmulqdq" (AVX-512), "pclmulqdq", or "table" (slice-by-8). */
const char *crc_method(void);

#pragma GCC visibility pop

#endif
