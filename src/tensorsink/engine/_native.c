/* The native write engine: the commit protocol for batches of files, run by POSIX threads that never
 * take the GIL.
 *
 * Python hands over a batch (a token and its files: final path, temporary path, buffers or an open
 * descriptor) in one call; the threads create each temporary, write its buffers with writev, fsync by
 * durability, close, rename it into place unless a later write to that path was renamed already
 * (latest write wins), fsync directories together (FULL) and unlink the temporary on failure. Python
 * collects finished batches in one call (`reap`), which releases the buffers it had pinned.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

enum { DURABILITY_NONE = 0, DURABILITY_FILE = 1, DURABILITY_FULL = 2 };

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
static uint32_t crc_update(uint32_t crc, const unsigned char *p, size_t n) {
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

static uint32_t crc_combine(uint32_t first, uint32_t second, uint64_t second_length) {
    return crc_multiply(crc_shift_factor(second_length), first) ^ second;
}

/* ---- A small string-keyed table, for per-path and per-folder state ------------------------------- */

typedef struct Slot {
    struct Slot *next;
    char *key;
    int64_t a, b, c; /* meaning depends on the table */
    int running;
} Slot;

typedef struct {
    Slot **buckets;
    size_t nbuckets;
} Table;

static uint64_t hash_of(const char *s) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    while (*s) { h ^= (unsigned char)*s++; h *= 1099511628211ull; }
    return h;
}

static int table_init(Table *t, size_t nbuckets) {
    t->buckets = calloc(nbuckets, sizeof(Slot *));
    t->nbuckets = nbuckets;
    return t->buckets ? 0 : -1;
}

/* Buckets take other bits of the hash than the stripes (h % STRIPES), or a stripe's table would
 * keep all its keys in one bucket. */
static size_t bucket_of(Table *t, uint64_t h) { return (size_t)((h >> 16) % t->nbuckets); }

static Slot *table_find(Table *t, const char *key, uint64_t h, int create) {
    Slot **head = &t->buckets[bucket_of(t, h)];
    for (Slot *s = *head; s; s = s->next)
        if (strcmp(s->key, key) == 0) return s;
    if (!create) return NULL;
    Slot *s = calloc(1, sizeof(Slot));
    if (!s) return NULL;
    s->key = strdup(key);
    if (!s->key) { free(s); return NULL; }
    s->next = *head;
    *head = s;
    return s;
}

static void table_remove(Table *t, Slot *slot, uint64_t h) {
    for (Slot **p = &t->buckets[bucket_of(t, h)]; *p; p = &(*p)->next)
        if (*p == slot) { *p = slot->next; free(slot->key); free(slot); return; }
}

static void table_free(Table *t) {
    if (!t->buckets) return;
    for (size_t i = 0; i < t->nbuckets; i++)
        for (Slot *s = t->buckets[i], *n; s; s = n) { n = s->next; free(s->key); free(s); }
    free(t->buckets);
    t->buckets = NULL;
}

/* ---- Jobs and batches ---------------------------------------------------------------------------- */

typedef struct Batch Batch;

typedef struct Job {
    struct Job *next; /* in the work queue */
    Batch *batch;
    char *final, *temporary;
    size_t directory_length; /* final[:directory_length] is its folder */
    Py_buffer *views;
    Py_ssize_t nviews;
    int fd; /* >= 0: a temporary Python already wrote; the engine syncs, closes and renames it */
    int checksum;
    char *record; /* the journal line's start ({"key":...,"arrays":[...]), or NULL: no journal */
    size_t record_length;
    int64_t number; /* order of reserve(): the latest number renamed wins */
    /* outcome */
    int replaced, error;
    const char *operation;
    uint64_t size;
    uint32_t crc;
    double renamed_at;
} Job;

struct Batch {
    Batch *next; /* in the done queue */
    PyObject *token;
    Job *jobs;
    Py_ssize_t njobs, remaining;
};

#define STRIPES 64

typedef struct {
    PyObject_HEAD
    int durability, follow_symlinks, nthreads, started, stopping, closed;
    pid_t pid; /* the process that started the threads: a child of fork() has none of them */
    char *root;
    pthread_t *threads;
    /* work queue */
    pthread_mutex_t lock;
    pthread_cond_t work, done;
    Job *head, *tail;
    Batch *done_head, *done_tail;
    Py_ssize_t unreaped; /* batches submitted and not yet reaped */
    int64_t counter;
    /* latest-write-wins per path: a = writes in flight, b = number of the latest rename */
    pthread_mutex_t order_locks[STRIPES];
    Table order[STRIPES];
    /* group-committed directory fsyncs: a = requested, b = synced, c = users */
    pthread_mutex_t sync_lock;
    pthread_cond_t sync_cond;
    Table syncs;
    /* folders made or checked: a != 0 */
    pthread_mutex_t folder_lock;
    Table folders;
    /* the journal: records appended whole (cut back on failure) */
    int journal;
    pthread_mutex_t journal_lock;
} Engine;

static void fail(Job *job, const char *operation) {
    if (!job->error) { job->error = errno ? errno : EIO; job->operation = operation; }
}

/* Write every byte of the views to fd, resuming after short writes; 0 or -1 with errno. */
static int write_all(int fd, Py_buffer *views, Py_ssize_t n) {
    struct iovec iov[64];
    Py_ssize_t first = 0;
    size_t skip = 0; /* bytes of views[first] already written */
    while (first < n) {
        int count = 0;
        for (Py_ssize_t i = first; i < n && count < 64 && count < IOV_MAX; i++) {
            size_t offset = i == first ? skip : 0;
            if ((size_t)views[i].len == offset) continue;
            iov[count].iov_base = (char *)views[i].buf + offset;
            iov[count].iov_len = (size_t)views[i].len - offset;
            count++;
        }
        if (count == 0) return 0;
        ssize_t written = writev(fd, iov, count);
        if (written < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (written == 0) { errno = EIO; return -1; } /* no progress: never loop forever */
        size_t left = (size_t)written;
        while (first < n && left) {
            size_t rest = (size_t)views[first].len - skip;
            if (left >= rest) { left -= rest; first++; skip = 0; }
            else { skip += left; left = 0; }
        }
        while (first < n && (size_t)views[first].len == skip) { first++; skip = 0; }
    }
    return 0;
}

/* write_all() and the CRC of what it wrote. A large view is checksummed and written a piece at a
 * time, each piece written while the CRC has it in cache, so its bytes come from memory once; small
 * views go out together in one writev, then are checksummed (still in cache). */
enum { CRC_PIECE = 256 << 10 };

static int write_checksummed(int fd, Py_buffer *views, Py_ssize_t n, uint32_t *crc) {
    Py_ssize_t i = 0;
    while (i < n) {
        if (views[i].len >= CRC_PIECE) { /* a large view: checksum a piece, write it, and on */
            const unsigned char *data = views[i].buf;
            for (size_t offset = 0, length = (size_t)views[i].len; offset < length; offset += CRC_PIECE) {
                Py_buffer piece = {0};
                piece.buf = (void *)(data + offset);
                piece.len = (Py_ssize_t)(length - offset < CRC_PIECE ? length - offset : CRC_PIECE);
                *crc = crc_update(*crc, piece.buf, (size_t)piece.len);
                if (write_all(fd, &piece, 1) != 0) return -1;
            }
            i++;
            continue;
        }
        /* small views, up to a piece's worth: one writev, then their CRC while they are in cache */
        Py_ssize_t end = i;
        size_t bytes = 0;
        while (end < n && views[end].len < CRC_PIECE && bytes < CRC_PIECE) bytes += (size_t)views[end++].len;
        if (write_all(fd, views + i, end - i) != 0) return -1;
        for (; i < end; i++) *crc = crc_update(*crc, views[i].buf, (size_t)views[i].len);
    }
    return 0;
}

static int fsync_path(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

/* mkdir -p below the root, refusing symlinks unless allowed; 0, or -1 with errno and *operation. */
static int make_folders(Engine *e, const char *folder, const char **operation) {
    pthread_mutex_lock(&e->folder_lock);
    Slot *known = table_find(&e->folders, folder, hash_of(folder), 0);
    pthread_mutex_unlock(&e->folder_lock);
    if (known) return 0;
    size_t root_length = strlen(e->root);
    size_t length = strlen(folder);
    char *path = malloc(length + 1);
    if (!path) { errno = ENOMEM; *operation = "mkdir"; return -1; }
    memcpy(path, folder, length + 1);
    size_t position = root_length;
    if (strncmp(folder, e->root, root_length) != 0) position = 0;
    while (position < length) {
        size_t end = position + 1;
        while (end < length && path[end] != '/') end++;
        path[end] = '\0';
        struct stat st;
        if (lstat(path, &st) != 0) {
            if (errno != ENOENT) { *operation = "lstat"; goto error; }
            if (mkdir(path, 0777) != 0 && errno != EEXIST) { *operation = "mkdir"; goto error; }
            if (lstat(path, &st) != 0) { *operation = "lstat"; goto error; }
            if (e->durability == DURABILITY_FULL) {
                char *slash = strrchr(path, '/');
                if (slash && slash != path) {
                    *slash = '\0';
                    int rc = fsync_path(path);
                    *slash = '/';
                    if (rc != 0) { *operation = "fsync directory"; goto error; }
                }
            }
        }
        if (S_ISLNK(st.st_mode)) {
            if (!e->follow_symlinks) { errno = ELOOP; *operation = "symlink"; goto error; }
            if (stat(path, &st) != 0) { *operation = "stat"; goto error; }
        }
        if (!S_ISDIR(st.st_mode)) { errno = ENOTDIR; *operation = "mkdir"; goto error; }
        if (end < length) path[end] = '/';
        position = end;
    }
    free(path);
    pthread_mutex_lock(&e->folder_lock);
    Slot *slot = table_find(&e->folders, folder, hash_of(folder), 1);
    if (slot) slot->a = 1;
    pthread_mutex_unlock(&e->folder_lock);
    return 0;
error:;
    int saved = errno;
    free(path);
    errno = saved;
    return -1;
}

static void forget_folder(Engine *e, const char *folder) {
    pthread_mutex_lock(&e->folder_lock);
    uint64_t h = hash_of(folder);
    Slot *slot = table_find(&e->folders, folder, h, 0);
    if (slot) table_remove(&e->folders, slot, h);
    pthread_mutex_unlock(&e->folder_lock);
}

/* One fsync covers every rename made before it began: wait for a running one, then lead the next. */
static int sync_directory(Engine *e, const char *folder) {
    uint64_t h = hash_of(folder);
    pthread_mutex_lock(&e->sync_lock);
    Slot *s = table_find(&e->syncs, folder, h, 1);
    if (!s) { pthread_mutex_unlock(&e->sync_lock); errno = ENOMEM; return -1; }
    s->c++;
    int64_t ticket = ++s->a;
    while (s->running && s->b < ticket) pthread_cond_wait(&e->sync_cond, &e->sync_lock);
    int rc = 0, saved = 0;
    if (s->b < ticket) {
        s->running = 1;
        int64_t target = s->a;
        pthread_mutex_unlock(&e->sync_lock);
        rc = fsync_path(folder);
        saved = errno;
        pthread_mutex_lock(&e->sync_lock);
        s->running = 0;
        if (rc == 0) s->b = target;
        pthread_cond_broadcast(&e->sync_cond);
    }
    if (--s->c == 0) table_remove(&e->syncs, s, h);
    pthread_mutex_unlock(&e->sync_lock);
    errno = saved;
    return rc;
}

static size_t stripe_of(const char *path, uint64_t *h) {
    *h = hash_of(path);
    return (size_t)(*h % STRIPES);
}

static void release_order(Engine *e, const char *path) {
    uint64_t h;
    size_t stripe = stripe_of(path, &h);
    pthread_mutex_lock(&e->order_locks[stripe]);
    Slot *s = table_find(&e->order[stripe], path, h, 0);
    if (s && --s->a == 0) table_remove(&e->order[stripe], s, h);
    pthread_mutex_unlock(&e->order_locks[stripe]);
}

/* Append the job's journal line: `renaming` before its rename (the rename may follow), else after it.
 * A line is written whole or cut back off; 0, or -1 with errno. */
static int journal_line(Engine *e, Job *job, int renaming, double when) {
    char tail[160];
    int n = snprintf(tail, sizeof tail, ",\"bytes\":%llu,\"crc32\":\"%08x\",\"time\":%.6f%s}\n",
                     (unsigned long long)job->size, job->crc, when, renaming ? ",\"renaming\":true" : "");
    Py_buffer views[2];
    memset(views, 0, sizeof views);
    views[0].buf = job->record;
    views[0].len = (Py_ssize_t)job->record_length;
    views[1].buf = tail;
    views[1].len = n;
    pthread_mutex_lock(&e->journal_lock);
    off_t end = lseek(e->journal, 0, SEEK_END);
    int rc = end < 0 ? -1 : write_all(e->journal, views, 2);
    int saved = errno;
    if (rc != 0 && end >= 0) (void)!ftruncate(e->journal, end);
    pthread_mutex_unlock(&e->journal_lock);
    errno = saved;
    return rc;
}

static double wall_clock(void) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

static void run_job(Engine *e, Job *job) {
    char *folder = strndup(job->final, job->directory_length);
    int fd = job->fd;
    int created = 0;
    if (!folder) { errno = ENOMEM; fail(job, "open"); goto finish; }
    if (fd < 0) {
        const char *operation = "open";
        if (make_folders(e, folder, &operation) != 0) { fail(job, operation); goto finish; }
        fd = open(job->temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno == ENOENT) { /* the folder was removed since: make it again */
            forget_folder(e, folder);
            if (make_folders(e, folder, &operation) != 0) { fail(job, operation); goto finish; }
            fd = open(job->temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        }
        if (fd < 0) { fail(job, "open"); goto finish; }
        created = 1;
        int written = job->checksum ? write_checksummed(fd, job->views, job->nviews, &job->crc)
                                    : write_all(fd, job->views, job->nviews);
        if (written != 0) { fail(job, "write"); goto close_and_unlink; }
        for (Py_ssize_t i = 0; i < job->nviews; i++) job->size += (uint64_t)job->views[i].len;
    } else {
        created = 1;
        if (job->checksum) { /* read back what Python's writer put there */
            unsigned char *chunk = malloc(1 << 20);
            if (!chunk) { errno = ENOMEM; fail(job, "read"); goto close_and_unlink; }
            for (;;) {
                ssize_t got = pread(fd, chunk, 1 << 20, (off_t)job->size);
                if (got < 0 && errno == EINTR) continue;
                if (got < 0) { free(chunk); fail(job, "read"); goto close_and_unlink; }
                if (got == 0) break;
                job->crc = crc_update(job->crc, chunk, (size_t)got);
                job->size += (uint64_t)got;
            }
            free(chunk);
        } else {
            struct stat st;
            if (fstat(fd, &st) != 0) { fail(job, "fstat"); goto close_and_unlink; }
            job->size = (uint64_t)st.st_size;
        }
    }
    if (e->durability != DURABILITY_NONE && fsync(fd) != 0) { fail(job, "fsync"); goto close_and_unlink; }
    int closed = close(fd);
    fd = -1;
    if (closed != 0) { fail(job, "close"); goto unlink; }

    uint64_t h;
    size_t stripe = stripe_of(job->final, &h);
    pthread_mutex_lock(&e->order_locks[stripe]);
    Slot *s = table_find(&e->order[stripe], job->final, h, 0);
    int latest = !s || s->b <= job->number;
    if (latest) {
        if (job->record && journal_line(e, job, 1, wall_clock()) != 0) {
            fail(job, "journal");
            pthread_mutex_unlock(&e->order_locks[stripe]);
            goto unlink;
        }
        if (rename(job->temporary, job->final) != 0) {
            fail(job, "rename");
            pthread_mutex_unlock(&e->order_locks[stripe]);
            goto unlink;
        }
        if (s) s->b = job->number;
        job->renamed_at = wall_clock();
        job->replaced = 1;
        created = 0;
        if (job->record && journal_line(e, job, 0, job->renamed_at) != 0) fail(job, "journal");
    }
    pthread_mutex_unlock(&e->order_locks[stripe]);
    if (!latest) goto unlink;
    if (e->durability == DURABILITY_FULL && sync_directory(e, folder) != 0) fail(job, "fsync directory");
    goto finish;

close_and_unlink:
    if (fd >= 0) close(fd);
unlink:
    if (created) {
        int saved = errno;
        unlink(job->temporary);
        errno = saved;
    }
finish:
    free(folder);
    release_order(e, job->final);
    pthread_mutex_lock(&e->lock);
    Batch *batch = job->batch;
    if (--batch->remaining == 0) {
        batch->next = NULL;
        if (e->done_tail) e->done_tail->next = batch; else e->done_head = batch;
        e->done_tail = batch;
        pthread_cond_broadcast(&e->done);
    }
    pthread_mutex_unlock(&e->lock);
}

static void *worker(void *arg) {
    Engine *e = arg;
    for (;;) {
        pthread_mutex_lock(&e->lock);
        while (!e->head && !e->stopping) pthread_cond_wait(&e->work, &e->lock);
        Job *job = e->head;
        if (!job) { pthread_mutex_unlock(&e->lock); return NULL; }
        e->head = job->next;
        if (!e->head) e->tail = NULL;
        pthread_mutex_unlock(&e->lock);
        run_job(e, job);
    }
}

/* ---- Python interface ---------------------------------------------------------------------------- */

static void free_batch(Batch *batch) { /* with the GIL */
    for (Py_ssize_t i = 0; i < batch->njobs; i++) {
        Job *job = &batch->jobs[i];
        for (Py_ssize_t k = 0; k < job->nviews; k++) PyBuffer_Release(&job->views[k]);
        PyMem_RawFree(job->views);
        free(job->record);
        free(job->final);
        free(job->temporary);
    }
    PyMem_RawFree(batch->jobs);
    Py_XDECREF(batch->token);
    PyMem_RawFree(batch);
}

static char *copy_path(PyObject *text) {
    PyObject *encoded = PyUnicode_EncodeFSDefault(text);
    if (!encoded) return NULL;
    char *copy = strdup(PyBytes_AS_STRING(encoded));
    Py_DECREF(encoded);
    if (!copy) PyErr_NoMemory();
    return copy;
}

static void stop_threads(Engine *e) {
    pthread_mutex_lock(&e->lock);
    e->stopping = 1;
    pthread_cond_broadcast(&e->work);
    pthread_mutex_unlock(&e->lock);
    for (int i = 0; i < e->started; i++) pthread_join(e->threads[i], NULL);
    e->started = 0;
}

/* Whether the engine can be used here: __init__ has run (Engine.__new__ alone makes a zeroed object),
 * in this process (a child of fork() inherits the object but not its threads, and the locks may be
 * held by threads that no longer exist). Every method asks first. */
static int usable(Engine *e) {
    if (!e->threads) {
        PyErr_SetString(PyExc_RuntimeError, "Engine not initialised: make it with Engine(threads, durability, root)");
        return 0;
    }
    if (e->pid != getpid()) {
        PyErr_Format(PyExc_RuntimeError,
                     "this engine was started in process %ld and cannot be used after fork() (process %ld): "
                     "make a new writer in the child", (long)e->pid, (long)getpid());
        return 0;
    }
    return 1;
}

static int Engine_init(Engine *e, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"threads", "durability", "root", "follow_symlinks", "journal", NULL};
    int threads, durability, follow = 0, journal = -1;
    PyObject *root;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iiU|pi", names, &threads, &durability, &root, &follow,
                                     &journal))
        return -1;
    if (e->threads) { PyErr_SetString(PyExc_RuntimeError, "Engine already initialised"); return -1; }
    if (threads < 1 || durability < 0 || durability > 2) {
        PyErr_SetString(PyExc_ValueError, "threads must be >= 1 and durability 0, 1 or 2");
        return -1;
    }
    e->root = copy_path(root);
    if (!e->root) return -1;
    e->durability = durability;
    e->follow_symlinks = follow;
    e->pid = getpid();
    e->journal = journal;
    pthread_mutex_init(&e->journal_lock, NULL);
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->work, NULL);
    pthread_cond_init(&e->done, NULL);
    pthread_mutex_init(&e->sync_lock, NULL);
    pthread_cond_init(&e->sync_cond, NULL);
    pthread_mutex_init(&e->folder_lock, NULL);
    int bad = table_init(&e->syncs, 64) | table_init(&e->folders, 1024);
    for (int i = 0; i < STRIPES; i++) {
        pthread_mutex_init(&e->order_locks[i], NULL);
        bad |= table_init(&e->order[i], 64);
    }
    e->threads = calloc((size_t)threads, sizeof(pthread_t));
    if (bad || !e->threads) { PyErr_NoMemory(); return -1; }
    e->nthreads = threads;
    for (int i = 0; i < threads; i++) {
        if (pthread_create(&e->threads[i], NULL, worker, e) != 0) {
            stop_threads(e);
            PyErr_SetString(PyExc_RuntimeError, "cannot start the engine's threads");
            return -1;
        }
        e->started++;
    }
    return 0;
}

static PyObject *Engine_submit(Engine *e, PyObject *args) {
    PyObject *token, *files;
    if (!PyArg_ParseTuple(args, "OO!", &token, &PyList_Type, &files) || !usable(e)) return NULL;
    if (e->closed) { PyErr_SetString(PyExc_RuntimeError, "the engine is closed"); return NULL; }
    Py_ssize_t n = PyList_GET_SIZE(files);
    if (n == 0) { PyErr_SetString(PyExc_ValueError, "a batch needs at least one file"); return NULL; }
    Batch *batch = PyMem_RawCalloc(1, sizeof(Batch));
    Job *jobs = PyMem_RawCalloc((size_t)n, sizeof(Job));
    if (!batch || !jobs) { PyMem_RawFree(batch); PyMem_RawFree(jobs); return PyErr_NoMemory(); }
    batch->jobs = jobs;
    batch->njobs = n;
    batch->remaining = n;
    Py_INCREF(token);
    batch->token = token;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(files, i);
        PyObject *final, *temporary, *buffers, *record, *known = Py_None;
        int fd, checksum;
        long long number;
        Job *job = &jobs[i];
        job->batch = batch;
        job->fd = -1;
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "UUOipLO|O", &final, &temporary, &buffers, &fd,
                                                      &checksum, &number, &record, &known)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError,
                                "each file is (final, temporary, buffers, fd, checksum, number, record, crc)");
            goto error;
        }
        if (checksum && known != Py_None) { /* the format has it already: no second pass */
            unsigned long value = PyLong_AsUnsignedLong(known);
            if (value == (unsigned long)-1 && PyErr_Occurred()) goto error;
            if (value > 0xFFFFFFFFul) {
                PyErr_Format(PyExc_ValueError, "a file's crc is 32 bits, not %lu", value);
                goto error;
            }
            job->crc = (uint32_t)value;
            checksum = 0;
        }
        job->number = number;
        if (record != Py_None) {
            if (!PyBytes_Check(record) || e->journal < 0) {
                PyErr_SetString(PyExc_TypeError, "a record is bytes, for an engine with a journal");
                goto error;
            }
            job->record_length = (size_t)PyBytes_GET_SIZE(record);
            job->record = malloc(job->record_length + 1);
            if (!job->record) { PyErr_NoMemory(); goto error; }
            memcpy(job->record, PyBytes_AS_STRING(record), job->record_length);
        }
        job->final = copy_path(final);
        job->temporary = job->final ? copy_path(temporary) : NULL;
        if (!job->temporary) goto error;
        char *slash = strrchr(job->final, '/');
        if (!slash) { PyErr_Format(PyExc_ValueError, "final path %R is not absolute", final); goto error; }
        job->directory_length = (size_t)(slash - job->final);
        job->checksum = checksum;
        if (buffers == Py_None) {
            if (fd < 0) { PyErr_SetString(PyExc_ValueError, "a file without buffers needs its fd"); goto error; }
            job->fd = fd;
            continue;
        }
        PyObject *sequence = PySequence_Fast(buffers, "buffers must be a sequence of bytes-like objects");
        if (!sequence) goto error;
        Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
        job->views = PyMem_RawCalloc((size_t)(count ? count : 1), sizeof(Py_buffer));
        if (!job->views) { Py_DECREF(sequence); PyErr_NoMemory(); goto error; }
        for (Py_ssize_t k = 0; k < count; k++) {
            if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(sequence, k), &job->views[k], PyBUF_SIMPLE) != 0) {
                Py_DECREF(sequence);
                goto error;
            }
            job->nviews++;
        }
        Py_DECREF(sequence);
    }
    pthread_mutex_lock(&e->lock);
    e->unreaped++;
    for (Py_ssize_t i = 0; i < n; i++) {
        jobs[i].next = NULL;
        if (e->tail) e->tail->next = &jobs[i]; else e->head = &jobs[i];
        e->tail = &jobs[i];
    }
    if (n == 1) pthread_cond_signal(&e->work); else pthread_cond_broadcast(&e->work);
    pthread_mutex_unlock(&e->lock);
    Py_RETURN_NONE;
error:
    free_batch(batch);
    return NULL;
}

/* Number paths in the order of write() calls, before their batch is submitted: the latest number wins. */
static PyObject *Engine_reserve(Engine *e, PyObject *paths) {
    if (!usable(e)) return NULL;
    if (!PyList_Check(paths)) { PyErr_SetString(PyExc_TypeError, "reserve() takes a list of paths"); return NULL; }
    Py_ssize_t n = PyList_GET_SIZE(paths);
    PyObject *numbers = PyList_New(n);
    if (!numbers) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        char *path = copy_path(PyList_GET_ITEM(paths, i));
        if (!path) goto error;
        uint64_t h;
        size_t stripe = stripe_of(path, &h);
        pthread_mutex_lock(&e->order_locks[stripe]);
        Slot *s = table_find(&e->order[stripe], path, h, 1);
        int64_t number = ++e->counter; /* under the GIL: reserve() calls do not overlap */
        if (s && s->a++ == 0) s->b = -1;
        pthread_mutex_unlock(&e->order_locks[stripe]);
        free(path);
        PyObject *value = s ? PyLong_FromLongLong(number) : PyErr_NoMemory();
        if (!value) goto error;
        PyList_SET_ITEM(numbers, i, value);
    }
    return numbers;
error: /* give back the numbers taken so far */
    for (Py_ssize_t k = 0; k < n && PyList_GET_ITEM(numbers, k); k++) {
        char *path = copy_path(PyList_GET_ITEM(paths, k));
        if (path) { release_order(e, path); free(path); }
    }
    Py_DECREF(numbers);
    return NULL;
}

static PyObject *Engine_release(Engine *e, PyObject *paths) {
    if (!usable(e)) return NULL;
    if (!PyList_Check(paths)) { PyErr_SetString(PyExc_TypeError, "release() takes a list of paths"); return NULL; }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(paths); i++) {
        char *path = copy_path(PyList_GET_ITEM(paths, i));
        if (!path) return NULL;
        release_order(e, path);
        free(path);
    }
    Py_RETURN_NONE;
}

static PyObject *batch_outcome(Batch *batch) {
    PyObject *results = PyList_New(batch->njobs);
    if (!results) return NULL;
    for (Py_ssize_t i = 0; i < batch->njobs; i++) {
        Job *job = &batch->jobs[i];
        PyObject *item = Py_BuildValue(
            "(OKkdis)", job->replaced ? Py_True : Py_False, (unsigned long long)job->size,
            (unsigned long)job->crc, job->renamed_at, job->error, job->error ? job->operation : NULL);
        if (!item) { Py_DECREF(results); return NULL; }
        PyList_SET_ITEM(results, i, item);
    }
    PyObject *pair = PyTuple_Pack(2, batch->token, results);
    Py_DECREF(results);
    return pair;
}

static PyObject *Engine_reap(Engine *e, PyObject *args) {
    double timeout;
    if (!PyArg_ParseTuple(args, "d", &timeout)) return NULL;
    if (!usable(e)) return NULL;
    Batch *taken = NULL;
    int finished = 0;
    Py_BEGIN_ALLOW_THREADS
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += (time_t)timeout;
    deadline.tv_nsec += (long)((timeout - (double)(time_t)timeout) * 1e9);
    if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
    pthread_mutex_lock(&e->lock);
    while (!e->done_head && !(e->closed && e->unreaped == 0)) {
        if (pthread_cond_timedwait(&e->done, &e->lock, &deadline) == ETIMEDOUT) break;
    }
    taken = e->done_head;
    e->done_head = e->done_tail = NULL;
    for (Batch *b = taken; b; b = b->next) e->unreaped--;
    finished = !taken && e->closed && e->unreaped == 0;
    pthread_mutex_unlock(&e->lock);
    Py_END_ALLOW_THREADS
    if (finished) Py_RETURN_NONE;
    PyObject *out = PyList_New(0);
    for (Batch *b = taken, *next; b; b = next) {
        next = b->next;
        PyObject *pair = out ? batch_outcome(b) : NULL;
        if (pair) { if (PyList_Append(out, pair) != 0) Py_CLEAR(out); Py_DECREF(pair); }
        else Py_CLEAR(out);
        free_batch(b);
    }
    return out;
}

static PyObject *Engine_close(Engine *e, PyObject *unused) {
    if (!usable(e)) return NULL;
    if (e->closed) Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    stop_threads(e); /* the threads finish the queue first */
    pthread_mutex_lock(&e->lock);
    e->closed = 1;
    pthread_cond_broadcast(&e->done);
    pthread_mutex_unlock(&e->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static void Engine_dealloc(Engine *e) {
    if (e->threads && e->pid != getpid()) { /* a child of fork(): no threads to stop, locks maybe held */
        Py_TYPE(e)->tp_free((PyObject *)e);
        return;
    }
    if (e->threads) {
        Py_BEGIN_ALLOW_THREADS
        stop_threads(e);
        Py_END_ALLOW_THREADS
        for (Batch *b = e->done_head, *n; b; b = n) { n = b->next; free_batch(b); }
        table_free(&e->syncs);
        table_free(&e->folders);
        for (int i = 0; i < STRIPES; i++) table_free(&e->order[i]);
        free(e->threads);
    }
    free(e->root);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *Engine_pending(Engine *e, void *unused) {
    if (!usable(e)) return NULL;
    pthread_mutex_lock(&e->lock);
    Py_ssize_t n = e->unreaped;
    pthread_mutex_unlock(&e->lock);
    return PyLong_FromSsize_t(n);
}

static PyMethodDef Engine_methods[] = {
    {"reserve", (PyCFunction)Engine_reserve, METH_O, "reserve(paths): a number for each path, in call order."},
    {"release", (PyCFunction)Engine_release, METH_O, "release(paths): give back numbers never submitted."},
    {"submit", (PyCFunction)Engine_submit, METH_VARARGS,
     "submit(token, files): queue a batch; files are (final, temporary, buffers | None, fd, checksum, "
     "number, record | None[, crc | None]); a crc given is the file's, and spares the checksum pass."},
    {"reap", (PyCFunction)Engine_reap, METH_VARARGS,
     "reap(timeout): finished batches as (token, [(replaced, size, crc, renamed_at, errno, operation)]); "
     "[] on timeout, None once closed and all reaped."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "close(): finish every queued file, stop the threads."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"pending", (getter)Engine_pending, NULL, "batches submitted and not yet reaped", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tensorsink.engine._native.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(threads, durability, root, follow_symlinks=False, journal=-1): the commit protocol in "
              "threads; with a journal descriptor, files given a record are journaled around their rename.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

/* ---- The bare loop: what the machine can do, for the benchmark's ceiling ------------------------- */

typedef struct {
    char **finals, **temporaries;
    Py_buffer **views; /* per file */
    Py_ssize_t *nviews;
    Py_ssize_t first, count, step;
    int durability, error;
} Stripe;

static void *bare_stripe(void *arg) {
    Stripe *s = arg;
    for (Py_ssize_t i = s->first; i < s->count; i += s->step) {
        int fd = open(s->temporaries[i], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0 || write_all(fd, s->views[i], s->nviews[i]) != 0 ||
            (s->durability != DURABILITY_NONE && fsync(fd) != 0) || close(fd) != 0 ||
            rename(s->temporaries[i], s->finals[i]) != 0) {
            s->error = errno ? errno : EIO;
            return NULL;
        }
        if (s->durability == DURABILITY_FULL) {
            char *slash = strrchr(s->finals[i], '/');
            *slash = '\0';
            int rc = fsync_path(s->finals[i]);
            *slash = '/';
            if (rc != 0) { s->error = errno; return NULL; }
        }
    }
    return NULL;
}

static PyObject *bare_loop(PyObject *module, PyObject *args) {
    PyObject *finals, *temporaries, *buffers;
    int durability, threads;
    if (!PyArg_ParseTuple(args, "O!O!O!ii", &PyList_Type, &finals, &PyList_Type, &temporaries, &PyList_Type,
                          &buffers, &durability, &threads))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(finals);
    if (PyList_GET_SIZE(temporaries) != n || PyList_GET_SIZE(buffers) != n || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "as many temporaries and buffer lists as finals, and threads >= 1");
        return NULL;
    }
    char **paths = PyMem_RawCalloc((size_t)(2 * n + 1), sizeof(char *));
    Py_buffer **views = PyMem_RawCalloc((size_t)(n + 1), sizeof(Py_buffer *));
    Py_ssize_t *nviews = PyMem_RawCalloc((size_t)(n + 1), sizeof(Py_ssize_t));
    Stripe *stripes = PyMem_RawCalloc((size_t)threads, sizeof(Stripe));
    pthread_t *ids = PyMem_RawCalloc((size_t)threads, sizeof(pthread_t));
    PyObject *result = NULL;
    int error = 0, started = 0;
    if (!paths || !views || !nviews || !stripes || !ids) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < n; i++) {
        paths[i] = copy_path(PyList_GET_ITEM(finals, i));
        paths[n + i] = paths[i] ? copy_path(PyList_GET_ITEM(temporaries, i)) : NULL;
        if (!paths[n + i]) goto done;
        PyObject *sequence = PySequence_Fast(PyList_GET_ITEM(buffers, i), "each file's buffers: a sequence");
        if (!sequence) goto done;
        Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
        views[i] = PyMem_RawCalloc((size_t)(count ? count : 1), sizeof(Py_buffer));
        if (!views[i]) { Py_DECREF(sequence); PyErr_NoMemory(); goto done; }
        for (Py_ssize_t k = 0; k < count; k++) {
            if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(sequence, k), &views[i][k], PyBUF_SIMPLE) != 0) {
                Py_DECREF(sequence);
                goto done;
            }
            nviews[i]++;
        }
        Py_DECREF(sequence);
    }
    Py_BEGIN_ALLOW_THREADS
    for (int t = 0; t < threads; t++) {
        stripes[t] = (Stripe){paths, paths + n, views, nviews, t, n, threads, durability, 0};
        if (pthread_create(&ids[t], NULL, bare_stripe, &stripes[t]) != 0) { error = EAGAIN; break; }
        started++;
    }
    for (int t = 0; t < started; t++) {
        pthread_join(ids[t], NULL);
        if (stripes[t].error && !error) error = stripes[t].error;
    }
    Py_END_ALLOW_THREADS
    if (error) { errno = error; PyErr_SetFromErrno(PyExc_OSError); goto done; }
    result = Py_None;
    Py_INCREF(result);
done:
    for (Py_ssize_t i = 0; views && i < n; i++) {
        for (Py_ssize_t k = 0; k < nviews[i]; k++) PyBuffer_Release(&views[i][k]);
        PyMem_RawFree(views[i]);
    }
    if (paths) for (Py_ssize_t i = 0; i < 2 * n; i++) free(paths[i]);
    PyMem_RawFree(paths);
    PyMem_RawFree(views);
    PyMem_RawFree(nviews);
    PyMem_RawFree(stripes);
    PyMem_RawFree(ids);
    return result;
}

static PyObject *crc32_py(PyObject *module, PyObject *args) {
    Py_buffer view;
    unsigned long value = 0;
    if (!PyArg_ParseTuple(args, "y*|k:crc32", &view, &value)) return NULL;
    uint32_t crc = (uint32_t)value;
    if (view.len >= (1 << 16)) { /* large: let other threads run meanwhile */
        Py_BEGIN_ALLOW_THREADS
        crc = crc_update(crc, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else {
        crc = crc_update(crc, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(crc);
}

static PyObject *crc32_combine_py(PyObject *module, PyObject *args) {
    unsigned long first, second;
    long long second_length;
    if (!PyArg_ParseTuple(args, "kkL:crc32_combine", &first, &second, &second_length)) return NULL;
    if (second_length < 0) {
        PyErr_Format(PyExc_ValueError, "crc32_combine(len2=%lld): a length from 0 to 2**63 - 1", second_length);
        return NULL;
    }
    return PyLong_FromUnsignedLong(
        crc_combine((uint32_t)first, (uint32_t)second, (uint64_t)second_length) & 0xFFFFFFFFu);
}

static PyObject *crc32_method_py(PyObject *module, PyObject *unused) {
    return PyUnicode_FromString(crc_folds_wide ? "vpclmulqdq" : crc_folds ? "pclmulqdq" : "table");
}

static PyMethodDef module_methods[] = {
    {"crc32", crc32_py, METH_VARARGS,
     "crc32(data, value=0): zlib.crc32's value; carry-less multiply where the CPU has it, the GIL released "
     "for 64 KiB and more."},
    {"crc32_combine", crc32_combine_py, METH_VARARGS,
     "crc32_combine(crc1, crc2, len2): the CRC-32 of A + B from crc32(A), crc32(B) and len(B)."},
    {"crc32_method", crc32_method_py, METH_NOARGS,
     "crc32_method(): how crc32 computes here: 'vpclmulqdq' (AVX-512), 'pclmulqdq', or 'table' (slice-by-8)."},
    {"bare_loop", bare_loop, METH_VARARGS,
     "bare_loop(finals, temporaries, buffers, durability, threads): for each file, with its own list of "
     "buffers: open, writev, fsync (FILE, FULL), close, rename, fsync the folder (FULL); GIL released."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "tensorsink.engine._native", "The native write engine.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    crc_init();
#if CRC_FOLDS
    __builtin_cpu_init();
    crc_folds = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
    const char *narrow = getenv("TENSORSINK_CRC_NARROW"); /* "1": PCLMULQDQ only, to test and compare */
    crc_folds_wide = CRC_FOLDS_WIDE && crc_folds && __builtin_cpu_supports("avx512f") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("vpclmulqdq") &&
                     !(narrow && *narrow && strcmp(narrow, "0") != 0);
#endif
    if (PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (!module) return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(module, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
