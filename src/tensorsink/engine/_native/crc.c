/* CRC-32: the slice-by-8 table, the foldings with PCLMULQDQ and VPCLMULQDQ, the combine, and the choice
 * between them at import (crc.h says what each function gives). */
#include "crc.h"

#include <stdlib.h>
#include <string.h>

/* ---- CRC-32 (the ZIP polynomial, zlib's values): carry-less multiply, or slice-by-8 ---------------- */

static uint32_t crc_table[8][256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}

static uint32_t crc_table_update(uint32_t crc, const unsigned char *p, size_t n) {
    crc = ~crc;
    while (n && ((uintptr_t)p & 7)) { crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8); n--; }
    while (n >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= crc;
        crc = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^ crc_table[5][(lo >> 16) & 0xFF] ^
              crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF] ^
              crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define CRC_FOLDS 1
#if defined(__clang__) || __GNUC__ >= 8 /* VPCLMULQDQ's target attribute */
#define CRC_FOLDS_WIDE 1
#else
#define CRC_FOLDS_WIDE 0
#endif

/* One 16-byte lane carried ahead: its halves multiplied by the two constants in k, plus what comes next.
 * The constants are x^(d+31) and x^(d-33) mod P, bit-reflected, for a distance of d bits. */
#define FOLD(x, k, next) \
    _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), next)
#define BY1 _mm_set_epi64x(0xccaa009e, 0xae689191) /* 128 bits ahead: x^159, x^95 */
#define BY4 _mm_set_epi64x(0x1d9513d7, 0x8f352d95) /* 512 bits ahead: x^543, x^479 */

/* How both foldings end: `x` holds the state over everything before `p`; fold in the rest 16 bytes at
 * a time, then reduce x and the last bytes with the table. */
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc_fold_rest(__m128i x, const unsigned char *p,
                                                                           size_t n) {
    const __m128i by1 = BY1;
    for (; n >= 16; p += 16, n -= 16) x = FOLD(x, by1, _mm_loadu_si128((const __m128i *)p));
    unsigned char rest[16];
    _mm_storeu_si128((__m128i *)rest, x);
    /* the register over everything so far equals the plain CRC register over these 16 bytes from 0 */
    uint32_t raw = ~crc_table_update(~0u, rest, 16);
    return crc_table_update(~raw, p, n);
}

/* Folding with PCLMULQDQ: four 16-byte lanes, each carried 64 bytes ahead per step, then folded into
 * one. Several times the table's speed. Needs n >= 64. */
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc_fold(uint32_t crc, const unsigned char *p,
                                                                      size_t n) {
    const __m128i by4 = BY4, by1 = BY1;
    __m128i x0 = _mm_loadu_si128((const __m128i *)p), x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32)), x3 = _mm_loadu_si128((const __m128i *)(p + 48));
    x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128((int)~crc));
    for (p += 64, n -= 64; n >= 64; p += 64, n -= 64) {
        x0 = FOLD(x0, by4, _mm_loadu_si128((const __m128i *)p));
        x1 = FOLD(x1, by4, _mm_loadu_si128((const __m128i *)(p + 16)));
        x2 = FOLD(x2, by4, _mm_loadu_si128((const __m128i *)(p + 32)));
        x3 = FOLD(x3, by4, _mm_loadu_si128((const __m128i *)(p + 48)));
    }
    x0 = FOLD(x0, by1, x1);
    x0 = FOLD(x0, by1, x2);
    x0 = FOLD(x0, by1, x3);
    return crc_fold_rest(x0, p, n);
}

#if CRC_FOLDS_WIDE
/* The same with AVX-512's VPCLMULQDQ: four 64-byte registers, each four 16-byte lanes, carried 256
 * bytes ahead per step (x^2079, x^2015), then folded into one register, and its four lanes into one.
 * Twice the 16-byte lanes' speed where the data is in cache. Needs n >= 256. */
__attribute__((target("avx512f,avx512vl,vpclmulqdq,pclmul,sse4.1"))) static uint32_t crc_fold_wide(
    uint32_t crc, const unsigned char *p, size_t n) {
    const __m512i by16 = _mm512_broadcast_i32x4(_mm_set_epi64x(0xe95c1271, 0xce3371cb));
    const __m512i by4 = _mm512_broadcast_i32x4(BY4);
    const __m128i by1 = BY1;
    __m512i z0 = _mm512_loadu_si512(p), z1 = _mm512_loadu_si512(p + 64);
    __m512i z2 = _mm512_loadu_si512(p + 128), z3 = _mm512_loadu_si512(p + 192);
    z0 = _mm512_xor_si512(z0, _mm512_inserti32x4(_mm512_setzero_si512(), _mm_cvtsi32_si128((int)~crc), 0));
#define WIDE(z, k, next)                                                                                   \
    _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(z, k, 0x00), _mm512_clmulepi64_epi128(z, k, 0x11), \
                              next, 0x96)
    for (p += 256, n -= 256; n >= 256; p += 256, n -= 256) {
        z0 = WIDE(z0, by16, _mm512_loadu_si512(p));
        z1 = WIDE(z1, by16, _mm512_loadu_si512(p + 64));
        z2 = WIDE(z2, by16, _mm512_loadu_si512(p + 128));
        z3 = WIDE(z3, by16, _mm512_loadu_si512(p + 192));
    }
    z1 = WIDE(z0, by4, z1);
    z2 = WIDE(z1, by4, z2);
    z3 = WIDE(z2, by4, z3);
#undef WIDE
    __m128i x = _mm512_castsi512_si128(z3);
    x = FOLD(x, by1, _mm512_extracti32x4_epi32(z3, 1));
    x = FOLD(x, by1, _mm512_extracti32x4_epi32(z3, 2));
    x = FOLD(x, by1, _mm512_extracti32x4_epi32(z3, 3));
    return crc_fold_rest(x, p, n);
}
#else
static uint32_t crc_fold_wide(uint32_t crc, const unsigned char *p, size_t n) { return crc_fold(crc, p, n); }
#endif
#undef FOLD

static int crc_folds;      /* the CPU has PCLMULQDQ and SSE4.1 */
static int crc_folds_wide; /* and AVX-512 with VPCLMULQDQ (and the compiler could build for it) */
#else
#define CRC_FOLDS 0
#define CRC_FOLDS_WIDE 0
static const int crc_folds = 0, crc_folds_wide = 0;
static uint32_t crc_fold_wide(uint32_t crc, const unsigned char *p, size_t n) { return crc_table_update(crc, p, n); }
static uint32_t crc_fold(uint32_t crc, const unsigned char *p, size_t n) { return crc_table_update(crc, p, n); }
#endif

/* zlib's crc32(crc, p, n). */
uint32_t crc_update(uint32_t crc, const unsigned char *p, size_t n) {
    if (crc_folds_wide && n >= 1024) return crc_fold_wide(crc, p, n);
    return crc_folds && n >= 64 ? crc_fold(crc, p, n) : crc_table_update(crc, p, n);
}

/* ---- CRC-32 of a concatenation from its parts' CRCs (zlib's crc32_combine) ----------------------- */

/* a * b mod P, both bit-reflected (x^0 is the top bit). */
static uint32_t crc_multiply(uint32_t a, uint32_t b) {
    uint32_t product = 0;
    for (uint32_t bit = 1u << 31; bit; bit >>= 1) {
        if (a & bit) product ^= b;
        b = (b & 1) ? (b >> 1) ^ 0xEDB88320u : b >> 1;
    }
    return product;
}

/* x^(8 * bytes) mod P: the factor that carries a CRC over `bytes` zero bytes. */
static uint32_t crc_shift_factor(uint64_t bytes) {
    uint32_t factor = 1u << 31, square = 1u << 23; /* x^0, and x^8 */
    for (; bytes; bytes >>= 1) {
        if (bytes & 1) factor = crc_multiply(factor, square);
        square = crc_multiply(square, square);
    }
    return factor;
}

uint32_t crc_combine(uint32_t first, uint32_t second, uint64_t second_length) {
    return crc_multiply(crc_shift_factor(second_length), first) ^ second;
}

/* ---- Which code path: chosen once, at import ----------------------------------------------------- */

void crc_setup(void) {
    crc_init();
#if CRC_FOLDS
    __builtin_cpu_init();
    crc_folds = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
    const char *narrow = getenv("TENSORSINK_CRC_NARROW"); /* "1": PCLMULQDQ only, to test and compare */
    crc_folds_wide = CRC_FOLDS_WIDE && crc_folds && __builtin_cpu_supports("avx512f") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("vpclmulqdq") &&
                     !(narrow && *narrow && strcmp(narrow, "0") != 0);
#endif
}

const char *crc_method(void) { return crc_folds_wide ? "vpclmulqdq" : crc_folds ? "pclmulqdq" : "table"; }
